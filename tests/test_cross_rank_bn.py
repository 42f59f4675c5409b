"""CrossRankBatchNorm1d: two gloo processes holding halves of a batch give the full batch's outputs and gradients."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from synray.models.heads import CrossRankBatchNorm1d

WORLD = 2


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(10, 5, generator=g, dtype=torch.float64) * 3 + 1, torch.randn(10, 5, generator=g,
                                                                                    dtype=torch.float64)


def _layer() -> CrossRankBatchNorm1d:
    bn = CrossRankBatchNorm1d(5).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 5))
        bn.bias.copy_(torch.linspace(-1, 1, 5))
    return bn


def _worker(rank: int, tmp: str, cut: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        x, c = _batch()
        part = slice(0, cut) if rank == 0 else slice(cut, None)
        xr = x[part].clone().requires_grad_(True)
        bn = _layer()
        y = bn(xr)
        (y * c[part]).sum().backward()  # this rank's share of the full-batch loss
        torch.save({"y": y.detach(), "x_grad": xr.grad, "w_grad": bn.weight.grad, "running_var": bn.running_var},
                   Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cut", [5, 3], ids=["equal", "unequal"])
def test_two_ranks_match_one_full_batch(tmp_path: Path, cut: int) -> None:
    mp.spawn(_worker, args=(str(tmp_path), cut), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    x, c = _batch()
    x = x.clone().requires_grad_(True)
    bn = _layer()
    y = bn(x)
    (y * c).sum().backward()
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y.detach())
    torch.testing.assert_close(torch.cat([r0["x_grad"], r1["x_grad"]]), x.grad)  # stats gradients cross ranks
    torch.testing.assert_close(r0["w_grad"] + r1["w_grad"], bn.weight.grad)
    torch.testing.assert_close(r0["running_var"], bn.running_var)
    torch.testing.assert_close(r1["running_var"], bn.running_var)


def test_single_process_is_plain_batchnorm() -> None:
    x, _ = _batch()
    ours, ref = _layer(), torch.nn.BatchNorm1d(5).double()
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)


@pytest.mark.parametrize("training", [True, False])
def test_bf16_parameters_beside_float32_statistics_as_deepspeed_casts(training: bool) -> None:
    """DeepSpeed's bf16 casts a module's parameters, not its buffers: the layer then normalises in float32 and
    gives BatchNorm1d's float64 result to bf16 precision, with the running statistics updated alike."""
    x, _ = _batch()
    ours, ref = _layer(), torch.nn.BatchNorm1d(5).double()
    ref.load_state_dict(ours.state_dict())
    ours = ours.float()
    for p in ours.parameters():
        p.data = p.data.to(torch.bfloat16)
    ours.train(training)
    ref.train(training)
    out = ours(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref(x), atol=0.05, rtol=0.02)
    torch.testing.assert_close(ours.running_mean.double(), ref.running_mean, atol=0.01, rtol=0.01)
    torch.testing.assert_close(ours.running_var.double(), ref.running_var, atol=0.01, rtol=0.01)
