"""The host-sync guard: each kind of sync is caught on device tensors, host-side work is not, and CUDA's own sync
debug mode reports where a GPU is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synray.train.syncguard import optimizer_host_tensors, watch_host_syncs


def _accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def _kinds(fn, host=()) -> list[tuple[str, str]]:
    with watch_host_syncs(host=host) as syncs:
        fn()
    return [(s.kind, s.call) for s in syncs.found]


@pytest.mark.parametrize("fn, want", [
    (lambda x: x[0].item(), ("read", "item")),
    (lambda x: x.tolist(), ("read", "tolist")),
    (lambda x: bool((x > 0).any()), ("read", "__bool__")),
    (lambda x: x.cpu(), ("read", "cpu")),
    (lambda x: x.nonzero(), ("data-dependent shape", "nonzero")),
    (lambda x: x[x > 0], ("data-dependent shape", "__getitem__")),
    (lambda x: torch.unique(x), ("data-dependent shape", "unique")),
    (lambda x: x.repeat_interleave((x > 0).long()), ("data-dependent shape", "repeat_interleave")),
    (lambda x: torch.as_tensor(np.arange(4), device=x.device), ("blocking copy", "as_tensor")),
    (lambda x: torch.tensor(-1.0, device=x.device), ("blocking copy", "tensor")),
    (lambda x: torch.arange(4).to(x.device), ("blocking copy", "to")),
    (lambda x: torch.cuda.synchronize(), ("synchronize", "torch.cuda.synchronize")),
    (lambda x: _accelerator().synchronize(), ("synchronize", "deepspeed accelerator.synchronize")),
])
def test_each_kind_of_sync_on_a_device_tensor_is_caught(fn, want) -> None:
    x = torch.randn(4)     # made before the guard: a device tensor in its account
    if want[1] == "torch.cuda.synchronize" and not torch.cuda.is_available():
        pytest.skip("torch.cuda.synchronize needs CUDA to run at all")
    assert want in _kinds(lambda: fn(x))


def test_host_work_and_asynchronous_copies_are_not_syncs() -> None:
    x = torch.randn(4)
    picks = np.arange(4)

    def work() -> None:
        order = torch.randperm(4).tolist()                       # made on the host, read on the host
        y = x * 2 + x.sum()                                      # device arithmetic
        y = y.index_select(0, torch.tensor(order).to(x.device, non_blocking=True))
        torch.from_numpy(picks).to(x.device, non_blocking=True)
        torch.where(y > 0, y, torch.zeros_like(y))
        torch.full((1,), 3.0, device=x.device)                   # filled on the device, nothing copied

    assert _kinds(work) == []


def test_named_host_tensors_are_not_device_reads() -> None:
    """torch's optimizers keep their step counters on the host: reading them is free, and the guard is told so."""
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    counters = optimizer_host_tensors(opt)
    assert len(counters) == 1 and counters[0] is opt.state[p]["step"]
    assert _kinds(lambda: counters[0].item(), host=counters) == []
    assert _kinds(lambda: counters[0].item()) == [("read", "item")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_cuda_reports_a_device_read() -> None:
    x = torch.randn(4, device="cuda")
    with watch_host_syncs(x.device) as syncs:
        x.sum().item()
    assert any(s.kind == "cuda" for s in syncs.found)
