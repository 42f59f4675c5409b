"""Tests for the contrastive losses (values, gradients, the 2-process case) and caption picking."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from synray.train.batches import caption_ok, pick_pairs
from synray.train.losses import (clip_loss, dist_rank_world, gather_rows, info_nce,
                                 multi_positive_contrastive, supervised_ce)


# ----------------------------------------------------------------------------- references
def numpy_stablerep(features: np.ndarray, labels: np.ndarray, tau: float) -> float:
    """Independent reference: log-sum-exp over the other rows, uniform target over positives."""
    z = features / np.linalg.norm(features, axis=1, keepdims=True)
    n = len(z)
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        s = np.array([z[i] @ z[j] / tau for j in others])
        lse = s.max() + np.log(np.exp(s - s.max()).sum())
        pos = [k for k, j in enumerate(others) if labels[j] == labels[i]]
        if pos:
            total += -np.mean([s[k] - lse for k in pos])
    return total / n


def naive_torch_stablerep(features: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """A double loop with explicit exp/log, differentiable, for gradient comparison."""
    z = features / features.norm(dim=1, keepdim=True)
    n = z.shape[0]
    total = features.new_zeros(())
    for i in range(n):
        denom = features.new_zeros(())
        for j in range(n):
            if j != i:
                denom = denom + torch.exp(z[i] @ z[j] / tau)
        pos = [j for j in range(n) if j != i and labels[j] == labels[i]]
        for j in pos:
            total = total - (z[i] @ z[j] / tau - torch.log(denom)) / len(pos)
    return total / n


def reference_simclr(v1: torch.Tensor, v2: torch.Tensor, tau: float) -> torch.Tensor:
    """The usual NT-Xent: cross-entropy over 2N x 2N similarities with the diagonal removed."""
    z = F.normalize(torch.cat([v1, v2]), dim=1)
    n = v1.shape[0]
    sim = z @ z.T / tau
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def reference_clip(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    logits = scale * F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T
    target = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


# ----------------------------------------------------------------------------- single process
def test_hand_computed_square() -> None:
    # Four unit vectors at 90 degrees; pairs (0,1) and (2,3) share a label. Each anchor sees its
    # positive at cosine 0, one negative at 0 and one at -1, so loss = log(2 + exp(-1/tau)).
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    for tau in (1.0, 0.5, 0.1):
        expected = math.log(2 + math.exp(-1 / tau))
        got = multi_positive_contrastive(feats, labels, temperature=tau)
        assert got.item() == pytest.approx(expected, rel=1e-6)


def test_matches_numpy_reference_and_positive_free_rows() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(10, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4, 5])  # rows 5, 8, 9 have no positive
    got = multi_positive_contrastive(feats, labels, temperature=0.2)
    assert got.item() == pytest.approx(numpy_stablerep(feats.numpy(), labels.numpy(), 0.2), rel=1e-10)

    # No positive at all: every row contributes 0 and the mean is 0.
    assert multi_positive_contrastive(feats, torch.arange(10), 0.1).item() == 0.0
    # A positive-free row contributes 0 but still counts in the mean. Three orthogonal rows, the
    # first two sharing a label: each of them sees its positive and one negative, both at cosine 0,
    # so its loss is log 2; the lone row adds 0; the mean is over 3 anchors.
    eye = torch.eye(3)
    got3 = multi_positive_contrastive(eye, torch.tensor([0, 0, 7]), 1.0)
    assert got3.item() == pytest.approx(2 / 3 * math.log(2), rel=1e-6)
    # With only the two rows, the positive is the only other row: loss 0.
    assert multi_positive_contrastive(eye[:2], torch.tensor([0, 0]), 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_scale_invariance_and_dtype() -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(12, 8, generator=g)
    labels = torch.arange(12) // 3
    a = multi_positive_contrastive(feats, labels, 0.1)
    b = multi_positive_contrastive(feats * 37.5, labels, 0.1)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    half = multi_positive_contrastive(feats.bfloat16(), labels, 0.1)
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_gradient_matches_naive_double_loop() -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(9, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4])
    x1 = base.clone().requires_grad_(True)
    x2 = base.clone().requires_grad_(True)
    fast = multi_positive_contrastive(x1, labels, 0.3)
    slow = naive_torch_stablerep(x2, labels, 0.3)
    fast.backward()
    slow.backward()
    assert fast.item() == pytest.approx(slow.item(), rel=1e-10)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: multi_positive_contrastive(x, labels, 0.3),
                                    (base.clone().requires_grad_(True),))


def test_info_nce_matches_simclr_reference() -> None:
    g = torch.Generator().manual_seed(3)
    v1, v2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    assert info_nce(v1, v2, 0.5).item() == pytest.approx(reference_simclr(v1, v2, 0.5).item(), rel=1e-5)
    with pytest.raises(ValueError):
        info_nce(v1, v2[:5], 0.5)


def test_clip_loss_matches_reference() -> None:
    g = torch.Generator().manual_seed(4)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    assert clip_loss(img, txt, temperature=0.07).item() == pytest.approx(
        reference_clip(img, txt, 1 / 0.07).item(), rel=1e-5)
    scale = torch.tensor(10.0, requires_grad=True)
    loss = clip_loss(img, txt, logit_scale=scale)
    assert loss.item() == pytest.approx(reference_clip(img, txt, 10.0).item(), rel=1e-5)
    loss.backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)


def test_supervised_ce() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    expected = 0.5 * (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)))
    assert supervised_ce(logits, torch.tensor([0, 1])).item() == pytest.approx(expected, rel=1e-6)


def test_gathers_are_identity_without_dist() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert dist_rank_world() == (0, 1)
    g = gather_rows(x, grad=True)
    assert g.tensor is x and g.offset == 0 and g.sizes == (3,)
    assert gather_rows(x, grad=False).tensor is x


def test_bad_shapes() -> None:
    with pytest.raises(ValueError):
        multi_positive_contrastive(torch.randn(4, 2), torch.arange(3))


# ----------------------------------------------------------------------------- captions
def test_pick_pairs_draws_captions_uniformly_with_laclips_fallback() -> None:
    caps = ["a dog on grass", "a puppy lying on a lawn", "dog", "", "a brown dog outdoors"]
    n = 2000  # one draw per row

    def rows(options: list[str], count: int) -> dict[str, torch.Tensor]:
        k = len(options)
        return {"images": torch.zeros(count, 1, 3, 2, 2, dtype=torch.uint8),
                "input_ids": torch.arange(k).repeat(count, 1)[..., None],
                "caption_ok": torch.tensor([[caption_ok(c) for c in options]] * count, dtype=torch.bool)}

    pairs = pick_pairs(rows(caps, n), np.random.default_rng(0))
    picks = [caps[i] for i in pairs.caption_index.tolist()]
    assert pairs.input_ids[:, 0].tolist() == pairs.caption_index.tolist()  # the drawn caption's tokens
    assert set(picks) == {caps[0], caps[1], caps[4]}  # one-word and empty picks fall back
    counts = {c: picks.count(c) for c in set(picks)}
    assert counts[caps[1]] == pytest.approx(400, abs=80)  # uniform over the 5 entries
    assert counts[caps[0]] == pytest.approx(1200, abs=120)  # its own 1/5 plus the 2 fallbacks
    only = pick_pairs(rows(["only the original"], 4), np.random.default_rng(1))
    assert only.caption_index.tolist() == [0] * 4
    with pytest.raises(ValueError):
        pick_pairs(rows([], 4), np.random.default_rng(1))


# ----------------------------------------------------------------------------- two processes
WORLD = 2


def _make_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        # 12 images of 6 captions; labels repeat across the two halves, so positives cross ranks.
        "feats": torch.randn(12, 6, generator=g, dtype=torch.float64),
        "labels": torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 6, 7]),
        "v1": torch.randn(8, 6, generator=g, dtype=torch.float64),
        "v2": torch.randn(8, 6, generator=g, dtype=torch.float64),
        "proj": torch.randn(6, 6, generator=g, dtype=torch.float64),
        "txt": torch.randn(8, 6, generator=g, dtype=torch.float64),
    }


def _losses(x: dict[str, torch.Tensor], w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every loss on (a slice of) the batch, features passed through a shared linear layer w."""
    return {
        "stablerep": multi_positive_contrastive(x["feats"] @ w, x["labels"], 0.1),
        "simclr": info_nce(x["v1"] @ w, x["v2"] @ w, 0.2),
        "clip": clip_loss(x["v1"] @ w, x["txt"], temperature=0.1),
    }


def _split(batch: dict[str, torch.Tensor], rank: int, cuts: dict[str, int]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in batch.items():
        cut = cuts["feats"] if key in ("feats", "labels") else cuts["pairs"]
        out[key] = value if key == "proj" else (value[:cut] if rank == 0 else value[cut:])
    return out


def _worker(rank: int, tmp: str, cuts: dict[str, int]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        x = _split(_make_batch(), rank, cuts)
        results = {}
        for name in ("stablerep", "simclr", "clip"):
            w = x["proj"].clone().requires_grad_(True)
            leaves = {k: x[k].clone().requires_grad_(True) for k in ("feats", "v1", "v2")}
            loss = _losses({**x, **leaves}, w)[name]
            loss.backward()
            w_grad = w.grad.clone()
            dist.all_reduce(w_grad)  # what DDP / DeepSpeed do: average the gradients over ranks
            w_grad /= WORLD
            results[name] = {"loss": loss.detach(), "w_grad": w_grad,
                             **{k: v.grad for k, v in leaves.items() if v.grad is not None}}
        torch.save(results, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cuts", [{"feats": 6, "pairs": 4}, {"feats": 7, "pairs": 3}], ids=["equal", "unequal"])
def test_two_process_loss_and_gradients_match_single_process(tmp_path: Path, cuts: dict[str, int]) -> None:
    mp.spawn(_worker, args=(str(tmp_path), cuts), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    batch = _make_batch()
    for name in ("stablerep", "simclr", "clip"):
        w = batch["proj"].clone().requires_grad_(True)
        leaves = {k: batch[k].clone().requires_grad_(True) for k in ("feats", "v1", "v2")}
        full = _losses({**batch, **leaves}, w)[name]
        full.backward()

        r0, r1 = per_rank[0][name], per_rank[1][name]
        # The average of the per-rank losses is the full-batch loss...
        assert ((r0["loss"] + r1["loss"]) / WORLD).item() == pytest.approx(full.item(), rel=1e-10), name
        # Averaged parameter gradients (DDP/DeepSpeed) equal the full-batch gradient.
        torch.testing.assert_close(r0["w_grad"], w.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(r1["w_grad"], w.grad, rtol=1e-9, atol=1e-12)
        # Per-rank feature gradients, concatenated, are world_size x the full-batch ones.
        for key, leaf in leaves.items():
            if key in r0:
                got = torch.cat([r0[key], r1[key]]) / WORLD
                torch.testing.assert_close(got, leaf.grad, rtol=1e-9, atol=1e-12, msg=f"{name}/{key}")
