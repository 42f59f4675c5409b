"""SynCLR's pieces: Sinkhorn-Knopp targets, the EMA teacher and its schedules, iBOT masks and loss, the
teacher-key contrastive loss, multi-crop; and on 2 processes the same figures as on one with the whole batch."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.multiprocessing as mp
from torch import nn

from synray.train.losses import multi_positive_contrastive
from synray.models.heads import SynCLROutputs
from synray.train.synclr import (
    MultiCrop,
    ema_momentum,
    ema_update,
    ibot_loss,
    masked_positions,
    mim_count,
    mim_masks,
    multi_positive_keys_loss,
    sinkhorn_knopp,
    synclr_loss,
    teacher_temperature,
)

WORLD = 2


def _plain_sinkhorn(logits: torch.Tensor, temperature: float, iterations: int) -> torch.Tensor:
    """SwAV/iBOT's published form (exp, then alternate normalisations), for mild logits where exp() is safe."""
    q = torch.exp(logits / temperature).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).T


def test_sinkhorn_knopp_rows_sum_to_one_and_prototype_columns_go_to_b_over_k():
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = sinkhorn_knopp(logits, temperature=0.1, iterations=3).double()
    assert q.shape == (64, 16) and (q >= 0).all()
    assert torch.allclose(q.sum(dim=1), torch.ones(64, dtype=torch.float64), atol=1e-5)   # each target sums to 1
    assert torch.allclose(q, _plain_sinkhorn(logits, 0.1, 3), atol=1e-5)       # the published algorithm
    spread = [(sinkhorn_knopp(logits, 0.1, n).sum(dim=0) - 64 / 16).abs().max().item() for n in (3, 10, 50)]
    assert spread[0] > spread[1] > spread[2] and spread[2] < 0.05             # columns go to B/K = 4
    sharp = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)) * 20
    assert torch.isfinite(sinkhorn_knopp(sharp, temperature=0.04)).all()      # log space: no exp() underflow


def test_ema_momentum_rises_on_a_cosine_from_0_994_to_1_and_the_teacher_temperature_warms_up():
    assert ema_momentum(0, 1000) == pytest.approx(0.994)
    assert ema_momentum(500, 1000) == pytest.approx(0.997)
    assert ema_momentum(1000, 1000) == pytest.approx(1.0) and ema_momentum(5000, 1000) == pytest.approx(1.0)
    values = [ema_momentum(s, 100) for s in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert teacher_temperature(0, 30) == pytest.approx(0.04) and teacher_temperature(15, 30) == pytest.approx(0.055)
    assert teacher_temperature(30, 30) == pytest.approx(0.07) and teacher_temperature(99, 30) == pytest.approx(0.07)


def test_ema_update_moves_the_teacher_towards_the_student_by_one_minus_momentum():
    torch.manual_seed(0)
    student, teacher = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), nn.Sequential(nn.Linear(4, 3),
                                                                                           nn.BatchNorm1d(3))
    student[1].running_mean.fill_(0.5)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, momentum=0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s)
    assert torch.equal(teacher[1].running_mean, student[1].running_mean)       # buffers follow the student
    frozen = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, momentum=1.0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.parameters()))


def test_mim_masks_mask_half_the_images_and_half_of_their_tokens():
    g = torch.Generator().manual_seed(0)
    m = mim_masks(10, 16, image_share=0.5, patch_share=0.5, generator=g)
    per_image = m.sum(dim=1)
    assert m.dtype == torch.bool and m.shape == (10, 16)
    assert (per_image > 0).sum() == 5 and set(per_image.tolist()) == {0, 8}
    other = mim_masks(10, 16, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(m, other)                                           # drawn, not fixed
    assert mim_masks(4, 9, image_share=1.0, patch_share=0.3).sum(dim=1).tolist() == [3, 3, 3, 3]


def _query_grad(q: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    q = q.clone().requires_grad_(True)
    multi_positive_keys_loss(q, keys, labels, 0.1).backward()
    return q.grad


def test_the_anchors_own_key_is_left_out_and_keys_get_no_gradient():
    torch.manual_seed(0)
    q = torch.randn(8, 5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    # with the queries as keys it is StableRep's multi-positive loss (which leaves each anchor's own column out)
    assert multi_positive_keys_loss(q, q, labels, 0.1).item() == pytest.approx(
        multi_positive_contrastive(q, labels, 0.1).item(), rel=1e-6)
    # query i enters only anchor i's term: its gradient ignores key i, and not its positive's key
    keys = torch.randn(8, 5)
    own, other = keys.clone(), keys.clone()
    own[0] += torch.randn(5) * 3
    other[1] += torch.randn(5) * 3
    base = _query_grad(q, keys, labels)
    assert torch.allclose(_query_grad(q, own, labels)[0], base[0], atol=1e-7)
    assert not torch.allclose(_query_grad(q, other, labels)[0], base[0], atol=1e-4)
    k = keys.clone().requires_grad_(True)
    multi_positive_keys_loss(q.clone().requires_grad_(True), k, labels, 0.1).backward()
    assert k.grad is None                                                       # keys come from the teacher


def test_ibot_loss_is_the_cross_entropy_at_masked_tokens_only():
    torch.manual_seed(0)
    scores = torch.randn(3, 4, 6)
    targets = torch.softmax(torch.randn(3, 4, 6), dim=-1)
    masks = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    positions = masked_positions(masks, 4)
    assert positions.tolist() == masks.flatten().nonzero().flatten().tolist()
    student = scores.flatten(0, 1)[positions].requires_grad_(True)
    loss = ibot_loss(student, targets.flatten(0, 1)[positions], student_temperature=0.1)
    ce = -(targets * torch.log_softmax(scores / 0.1, dim=-1)).sum(-1)
    expected = (ce[0, [0, 2]].mean() + ce[2, [0, 3]].mean()) / 2                # image 1 has no masked token
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    changed = scores.clone()
    changed[0, 1] += 5                                                          # an unmasked token
    assert ibot_loss(changed.flatten(0, 1)[positions], targets.flatten(0, 1)[positions]).item() == \
        pytest.approx(loss.item(), rel=1e-6)
    nothing = torch.zeros(0, 6, requires_grad=True)
    assert ibot_loss(nothing, torch.zeros(0, 6)).item() == 0.0
    assert mim_count(10, 16) == 40 and mim_count(4, 9, 1.0, 0.3) == 12


def test_each_view_of_the_queries_gets_its_own_loss_against_the_same_keys():
    torch.manual_seed(0)
    views, keys, labels = torch.randn(3, 8, 5), torch.randn(8, 5), torch.arange(8) // 2
    per_view = multi_positive_keys_loss(views, keys, labels, 0.1, local_own_key=False)
    assert per_view.shape == (3,)
    for v in range(3):
        assert per_view[v].item() == pytest.approx(multi_positive_keys_loss(views[v], keys, labels, 0.1).item())


def _published_supcon_momentum(q: torch.Tensor, k: torch.Tensor, s_labels: torch.Tensor, t_labels: torch.Tensor,
                               temperature: float, avoid_local_global_same: bool) -> tuple[float, float]:
    """The published SynCLR contrastive loss (syn-rep-learn, SynCLR/train_pytorch/models/mask_losses.py,
    SupConMomentumLoss.forward on one process), written out: queries q [(1 + locals) x n, D], the global crops'
    first, against the teacher keys k [n, D]. Row i < n (a global crop) has its own key i masked out of the
    denominator and the positives; a local crop's row keeps its own image's key unless avoid_local_global_same.
    Returns (global loss, local loss)."""
    q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
    n = k.shape[0]
    mask = (s_labels.view(-1, 1) == t_labels.view(1, -1)).float()
    exclude = torch.arange(n).view(-1, 1)
    if avoid_local_global_same:
        exclude = exclude.repeat(q.shape[0] // n, 1)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, exclude, 0)
    mask = mask * logits_mask
    logits = q @ k.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return -mean_log_prob_pos[:n].mean().item(), -mean_log_prob_pos[n:].mean().item()


@pytest.mark.parametrize("local_own_key", [True, False])
def test_global_and_local_terms_equal_the_published_loss(local_own_key):
    """With local_own_key (the published default run) a local crop keeps its own image's key as a positive; without
    it, it is the published --avoid_local_global_same. Random queries, keys and 2-4 images per caption."""
    g = torch.Generator().manual_seed(7)
    for trial in range(5):
        n, locals_, dim = 12, 4, 16
        labels = torch.arange(n) // (2 + trial % 3)
        queries, keys = torch.randn(1 + locals_, n, dim, generator=g), torch.randn(n, dim, generator=g)
        per_view = multi_positive_keys_loss(queries, keys, labels, 0.1, local_own_key=local_own_key)
        published = _published_supcon_momentum(queries.flatten(0, 1), keys, labels.repeat(1 + locals_), labels, 0.1,
                                                avoid_local_global_same=not local_own_key)
        assert per_view[0].item() == pytest.approx(published[0], rel=1e-5)
        assert per_view[1:].mean().item() == pytest.approx(published[1], rel=1e-5)
        out = SynCLROutputs(queries, keys, torch.zeros(0, 4), torch.zeros(0, 4))
        total, parts = synclr_loss(out, labels, 0.1, teacher_temp=0.05, local_own_key=local_own_key)
        assert (parts["loss_global"].item(), parts["loss_local"].item()) == pytest.approx(published, rel=1e-5)
        assert total.item() == pytest.approx(sum(published), rel=1e-5) and parts["loss_ibot"].item() == 0.0


def test_multi_crop_makes_one_global_and_several_local_views_on_the_device():
    images = torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8)
    global_view, local_views = MultiCrop(24, 12, local_crops=4)(images)
    assert global_view.shape == (3, 3, 24, 24) and global_view.dtype == torch.float32
    assert len(local_views) == 4 and all(v.shape == (3, 3, 12, 12) for v in local_views)
    crops = MultiCrop(24, 12, 2)
    assert (crops.global_view.crop_scale_min, crops.global_view.crop_scale_max) == pytest.approx((0.32, 1.0))
    assert (crops.local_view.crop_scale_min, crops.local_view.crop_scale_max) == pytest.approx((0.08, 0.32))
    torch.manual_seed(0)
    _, local_views = crops(images)
    assert not torch.equal(local_views[0], local_views[1])  # each local crop is drawn on its own


# ------------------------------------------------------------------------- two processes
def _batch() -> dict[str, torch.Tensor]:
    """12 images of 4 captions, 3 views of queries; 2 masked tokens per image's prototype scores (K = 10)."""
    g = torch.Generator().manual_seed(3)
    return {"q": torch.randn(3, 12, 6, generator=g), "k": torch.randn(12, 6, generator=g),
            "labels": torch.arange(12) // 3, "logits": torch.randn(24, 10, generator=g) * 2,
            "student": torch.randn(24, 10, generator=g)}


def _synclr_loss(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SynCLR's whole loss on a batch (queries and student scores with gradient): (loss, their gradients)."""
    q, student = b["q"].clone().requires_grad_(True), b["student"].clone().requires_grad_(True)
    loss, _ = synclr_loss(SynCLROutputs(q, b["k"], student, b["logits"]), b["labels"], 0.1, teacher_temp=0.05)
    loss.backward()
    return loss.detach(), q.grad, student.grad


def _two_process_worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        b = {k: v.chunk(WORLD, dim=1 if k == "q" else 0)[rank] for k, v in _batch().items()}
        loss, q_grad, s_grad = _synclr_loss(b)
        targets = sinkhorn_knopp(b["logits"], 0.05, 3)
        torch.save({"loss": loss, "grad": q_grad, "student_grad": s_grad, "targets": targets}, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_single_process_loss_gradients_and_sinkhorn_targets(tmp_path: Path):
    """SynCLR's whole loss (3 views against the teacher keys, plus iBOT with Sinkhorn-Knopp targets)."""
    mp.spawn(_two_process_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    full = _batch()
    loss, q_grad, s_grad = _synclr_loss(full)
    assert sum(r["loss"] for r in ranks).item() / WORLD == pytest.approx(loss.item(), rel=1e-6)
    # each rank's gradient on its own queries and scores, averaged over ranks (as DDP does), is the full batch's
    assert torch.allclose(torch.cat([r["grad"] for r in ranks], dim=1) / WORLD, q_grad, atol=1e-7)
    assert torch.allclose(torch.cat([r["student_grad"] for r in ranks]) / WORLD, s_grad, atol=1e-7)
    targets = torch.cat([r["targets"] for r in ranks])
    assert torch.allclose(targets, sinkhorn_knopp(full["logits"], 0.05, 3), atol=1e-6)
    assert math.isfinite(loss.item())


def test_the_export_is_the_teachers_backbone_unless_the_student_is_asked_for(tmp_path: Path):
    from synray.config import RunConfig, TrainConfig
    from synray.models.backbone import load_backbone
    from synray.train.objectives import get_objective

    t = TrainConfig(loss="synclr", head={"hidden_dim": 32, "out_dim": 16},
                    synclr={"prototypes": 8, "prototype_hidden_dim": 16, "prototype_bottleneck_dim": 8,
                            "predictor_hidden_dim": 16})
    objective = get_objective("synclr")
    model = objective.build(RunConfig(train=t), 2, None).model
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)                                                         # the student moved, the teacher not
    assert all(not p.requires_grad for p in model.teacher.parameters())         # the teacher is never optimised
    for side, want in (("teacher", model.teacher.encoder), ("student", model.student.encoder)):
        cfg = t.model_copy(update={"synclr": t.synclr.model_copy(update={"export": side})})
        objective.export(model, tmp_path / side, None, cfg)
        got = load_backbone(tmp_path / side)
        assert all(torch.equal(a, b) for a, b in zip(got.parameters(), want.parameters())), side



# ---------------------------------------------------------------------- schedules and warnings
def _initial_share(momentum: float, steps: int, final: float = 1.0) -> float:
    """What share of the teacher is still its initialisation after the first tenth of a run: the product of the
    momenta of those steps (teacher_s = m_s teacher_(s-1) + (1 - m_s) student_s)."""
    return math.prod(ema_momentum(k, steps, momentum, final) for k in range(steps // 10))


def test_an_ema_horizon_stated_as_a_share_of_the_run_means_the_same_at_every_length():
    from synray.plan import load_run_config

    shares = []
    for steps in (1600, 16000, 160000):
        s = load_run_config("shapes-synclr", [f"train.steps={steps}", "train.synclr.ema_horizon=0.02"]).train.synclr
        assert s.momentum_at_start(steps) == pytest.approx(1 - 1 / (0.02 * steps))
        shares.append(_initial_share(s.momentum_at_start(steps), steps))
    assert max(shares) - min(shares) < 0.01 and max(shares) < 0.01   # the initialisation is gone by then, alike
    # the published per-step momentum does not: 38% of the teacher is initialisation after 160 of 1,600 steps
    assert _initial_share(0.994, 1600) == pytest.approx(0.38, abs=0.01)
    assert _initial_share(0.994, 160000) < 1e-6


def test_the_teacher_temperature_warms_up_over_its_share_or_its_published_steps():
    from synray.plan import load_run_config

    s = load_run_config("shapes-synclr", []).train.synclr
    assert s.temperature_warmup_steps(1600) == 80                   # 5% of the run (SynCLR: 4,000 of 85,000)
    vitb = load_run_config("synclr-vitb16", []).train.synclr
    assert vitb.temperature_warmup_steps(19500) == 4000             # the paper's iterations, at any length


def test_synray_plan_warns_of_a_teacher_horizon_and_prototypes_that_do_not_fit_the_run_naming_the_keys():
    from procs import ROOT, synray_main

    r = synray_main("plan", "shapes-synclr", "--set", "train.synclr.ema_horizon=null", "--set",
                    "train.synclr.prototypes=1024")   # the published per-step settings at the shapes budget
    assert r.code == 0, (r.error, r.err[-2000:])
    assert "train.synclr.ema_momentum=0.994 averages the teacher over about 167 steps, 10% of train.steps=1600" \
        in r.log and "train.synclr.ema_horizon" in r.log
    assert "train.synclr.prototypes=1024 outnumber the 256 masked tokens of a step" in r.log
    shipped = synray_main("plan", "shapes-synclr")   # a 2% horizon and 128 prototypes
    assert shipped.code == 0 and "train.synclr." not in shipped.log
    published = synray_main("plan", "synclr-vitb16", "--cluster", str(ROOT / "cluster.yaml"))
    assert published.code == 0 and "train.synclr." not in published.log


# ------------------------------------------------------------------------------------ heads
def test_the_prototype_layer_is_torchs_weight_norm_linear_with_a_trainable_norm_from_one():
    """The published DINOHead's last layer: weight_norm(Linear(bottleneck, K, bias=False)) with weight_g filled
    with 1 and trainable; against torch's own weight_norm parametrisation with the same direction and norms."""
    from torch.nn.utils.parametrizations import weight_norm

    from synray.models.heads import PrototypeHead

    torch.manual_seed(0)
    head = PrototypeHead(8, 16, 6, prototypes=10, num_layers=2)
    assert head.norms is not None and head.norms.requires_grad and torch.equal(head.norms, torch.ones(10, 1))
    with torch.no_grad():
        head.norms.mul_(torch.linspace(0.5, 2.0, 10)[:, None])            # as if trained
    ref = weight_norm(nn.Linear(6, 10, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original1.copy_(head.prototypes)      # v, the direction
        ref.parametrizations.weight.original0.copy_(head.norms)           # g, each prototype's norm
    x = torch.randn(5, 8)
    expected = ref(F.normalize(head.mlp(x), dim=-1))
    assert torch.allclose(head(x), expected, atol=1e-6)
    fixed = PrototypeHead(8, 16, 6, prototypes=10, num_layers=2, trainable_norm=False)
    assert fixed.norms is None and "norms" not in dict(fixed.named_parameters())


def test_the_synclr_heads_are_the_published_layer_norm_mlps_with_truncated_normal_weights():
    from synray.config import BackboneConfig, HeadConfig
    from synray.models.heads import build_synclr_model
    from synray.plan import load_run_config

    s = load_run_config("shapes-synclr", ["train.synclr.head_norm=ln"]).train.synclr
    torch.manual_seed(0)
    model = build_synclr_model(BackboneConfig(arch="vit", size="tiny", image_size=32, patch_size=8),
                               HeadConfig(hidden_dim=64, out_dim=32, num_layers=3), s)
    projection, predictor = model.student.head, model.predictor
    # the published MLPHead with mlp_norm='ln': Linear, LayerNorm, GELU per hidden layer; Linear without bias and a
    # LayerNorm without affine parameters last
    expected = ["Linear", "LayerNorm", "GELU", "Linear", "LayerNorm", "GELU", "Linear", "LayerNorm"]
    assert [type(m).__name__ for m in projection] == expected
    assert projection[-2].bias is None and not projection[-1].elementwise_affine
    assert [type(m).__name__ for m in predictor] == expected[:3] + expected[-2:]
    linears = [m for part in (projection, predictor, model.student.prototypes.mlp) for m in part.modules()
               if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert weights.std().item() == pytest.approx(0.02, rel=0.1)   # trunc_normal_(std=0.02): cut at +-2, not 2 std
    assert all(m.bias is None or not m.bias.any() for m in linears)
    default = load_run_config("shapes-synclr", []).train.synclr
    bn = build_synclr_model(BackboneConfig(arch="vit", size="tiny", image_size=32, patch_size=8),
                            HeadConfig(hidden_dim=64, out_dim=32, num_layers=3), default)
    assert default.head_norm == "bn" and type(bn.student.head).__name__ == "MLPHead"


def test_synclr_does_not_clip_gradients_unless_asked_as_its_published_code_and_the_others_clip_at_1():
    from synray.plan import load_run_config
    from synray.train.engine import deepspeed_config
    from synray.train.objectives import get_objective

    t = load_run_config("shapes-synclr", []).train
    assert deepspeed_config(t, 8, 1, get_objective("synclr").grad_clip(t))["gradient_clipping"] == 0.0
    assert get_objective("stablerep").grad_clip(t) == 1.0
    assert get_objective("synclr").grad_clip(t.model_copy(update={"grad_clip": 3.0})) == 3.0
