"""Runs the training worker (setup + steps) in 2 gloo processes over in-memory rows (a helper module, not collected).

Each process joins one torch.distributed group, then runs every case of `CASES` in order through
`synray.train.worker` with a `LocalContext`, and writes what the tests check to `root/<case>/rank<r>.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

WORLD = 2
#: captions per worker micro-batch and images per caption of every case
ROWS, M = 4, 2
#: overrides shared by the cases: a tiny ViT, no augmentation randomness, a log line every step
BASE = ["images.per_caption=2", f"train.captions_per_worker={ROWS}", "train.num_workers=2", "train.log_every=1",
        "train.checkpoint_every=100", "train.warmup_steps=1", "train.lr=0.002", "train.augment.preset=none",
        "train.head.hidden_dim=64", "train.head.out_dim=32"]
#: a small SynCLR: 2 local crops, 64 prototypes
SYNCLR = ["train.synclr.local_crops=2", "train.synclr.prototypes=64", "train.synclr.prototype_hidden_dim=64",
          "train.synclr.prototype_bottleneck_dim=32", "train.synclr.predictor_hidden_dim=64"]
#: case name -> overrides; each objective learns on one fixed batch, then the grad_accum and resume checks
CASES: dict[str, list[str]] = {
    "stablerep": ["train.loss=stablerep", "train.steps=8"],
    "simclr": ["train.loss=simclr", "train.steps=8", "train.augment.preset=crop",
               "train.augment.crop_scale_min=0.6"],
    "supervised": ["train.loss=supervised", "train.steps=8"],
    "clip": ["train.loss=clip", "train.steps=8", "train.text.max_length=16", "train.temperature=0.1"],
    "grad_accum": ["train.loss=stablerep", "train.steps=2", "train.grad_accum=2"],
    "resume": ["train.loss=stablerep", "train.steps=6", "train.checkpoint_every=2"],
    "synclr": ["train.loss=synclr", "train.steps=8", *SYNCLR],
    # momentum 0.9 -> 0.99: the update after a resume at step 6 tells the schedule's position (0.99 x 0.9^...)
    "synclr_resume": ["train.loss=synclr", "train.steps=6", "train.checkpoint_every=3", *SYNCLR,
                      "train.synclr.ema_momentum=0.9", "train.synclr.ema_momentum_final=0.99"],
    # bf16 master weights exported as float32, against DeepSpeed's own consolidation of the checkpoint
    "bf16_export": ["train.loss=stablerep", "train.steps=2", "train.zero_stage=1"],
    # a node of the group is being preempted at the 3rd report, until the next question: one checkpoint, at step 3
    "preemption": ["train.loss=stablerep", "train.steps=6"],
}
#: the GPU built-ins' step (bf16, ZeRO 1, 2 micro-steps a window, each objective's own augmentation and clipping)
#: watched for host syncs, one case per objective; grad checkpointing on in the image-text case
SYNC_BASE = ["train.steps=3", "train.grad_accum=2", "train.zero_stage=1", "train.augment.preset=null"]
for _objective, _extra in {"stablerep": [], "simclr": [], "supervised": [],
                           "clip": ["train.text.max_length=16", "train.grad_checkpointing=true"],
                           "synclr": SYNCLR}.items():
    CASES[f"no_host_sync_{_objective}"] = [f"train.loss={_objective}", *SYNC_BASE, *_extra]
#: a stream slower than the step (REPLAY_ARRIVALS batches a rank, one every REPLAY_DELAY_S), each row used once or
#: up to 3 times: the data-wait share falls, and the record of trained rows holds each row once
REPLAY_ARRIVALS, REPLAY_DELAY_S = 24, 0.05
for _uses in (1, 3):
    CASES[f"replay_{_uses}"] = ["train.loss=stablerep", "train.steps=500", f"data.replay={_uses}",
                                "data.replay_buffer_rows=8"]
#: cases trained in bf16 on the CPU, as the GPU configs do (the config refuses bf16 without use_gpu)
BF16 = {"bf16_export", *(name for name in CASES if name.startswith("no_host_sync_"))}


def fixed_rows(rank: int, steps: int) -> dict[str, np.ndarray]:
    """The same ROWS caption rows (M procedural images each) repeated `steps` times; other rows on each rank.
    Raw rows, as a store holds them: the worker's context gets them through the preprocessing UDF."""
    from synray.config import ImagesConfig
    from synray.images.procedural import ProceduralRenderer

    captions = ["a red circle", "two blue squares", "a large green triangle", "a yellow star",
                "a white cross", "a pink ring", "a purple diamond", "an orange heart"]
    mine = captions[rank * ROWS:(rank + 1) * ROWS]
    ids = [f"{rank:02d}{i:014x}" for i in range(ROWS)]
    renderer = ProceduralRenderer(ImagesConfig(backend="procedural", per_caption=M, resolution=32, output_size=32),
                                  None, run_seed=rank)
    out = renderer({"caption": np.asarray(mine, dtype=object), "caption_id": np.asarray(ids, dtype=object),
                    "label": np.arange(rank * ROWS, (rank + 1) * ROWS, dtype=np.int64)})
    return {k: np.concatenate([out[k]] * steps) for k in ("caption_id", "label", "caption", "images")}


def _weights(state: Any) -> float:
    return float(sum(p.detach().double().sum() for p in state.engine.module.parameters()))


def _digest(params: Any) -> str:
    """Exact identity of a list of tensors (their bytes)."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _synclr_resume(cfg: Any, plan: Any, rows: dict[str, np.ndarray], rank: int, root: Path) -> dict[str, Any]:
    """Train to the end, then a new worker group restores: its teacher, student and step; its first update's EMA
    momentum (the schedule at the restored step); the export is the teacher's backbone."""
    from synray.models.backbone import load_backbone
    from synray.train.context import LocalContext
    from synray.train.synclr import ema_momentum
    from synray.train.worker import BACKBONE_DIR, Meter, setup, train, train_step

    first = setup(cfg, plan, LocalContext(rank, WORLD, rows, root))
    model = first.engine.module
    out: dict[str, Any] = {"init_teacher": _digest(model.teacher.parameters())}
    out["first_final_step"] = train(first)
    out.update(first_teacher=_digest(model.teacher.parameters()), first_student=_digest(model.student.parameters()))
    export = load_backbone(LocalContext(rank, WORLD, rows, root).checkpoints()[-1] / BACKBONE_DIR)
    out["export_is_teacher"] = _digest(export.parameters()) == _digest(model.teacher.encoder.parameters())
    again = setup(cfg, plan, LocalContext(rank, WORLD, rows, root))
    restored = again.engine.module
    out.update(restored_step=again.step, restored_teacher=_digest(restored.teacher.parameters()),
               restored_student=_digest(restored.student.parameters()))
    teacher_before = [p.detach().clone() for p in restored.teacher.parameters()]
    batch, *_ = next(again.batches)
    train_step(again, batch, 0.0, Meter())
    m = ema_momentum(again.step, cfg.train.steps, cfg.train.synclr.ema_momentum, cfg.train.synclr.ema_momentum_final)
    out["ema_error"] = max(float((t - (m * b + (1 - m) * s)).abs().max()) for t, b, s in
                           zip(restored.teacher.parameters(), teacher_before, restored.student.parameters()))
    out["ema_momentum"] = m
    return out


def _host_syncs(cfg: Any, plan: Any, rows: dict[str, np.ndarray], rank: int, root: Path) -> dict[str, Any]:
    """Every micro-step after the first window (which creates the optimizer's state) under the host-sync guard."""
    from synray.train.context import LocalContext
    from synray.train.syncguard import optimizer_host_tensors, watch_host_syncs
    from synray.train.worker import Meter, setup, train_step

    state = setup(cfg, plan, LocalContext(rank, WORLD, rows, root))
    steps = []
    for i, (batch, *_) in enumerate(state.batches):
        if i < cfg.train.grad_accum:
            train_step(state, batch, 0.0, Meter())
            continue
        with watch_host_syncs(state.device, optimizer_host_tensors(state.engine.optimizer)) as syncs:
            boundary = train_step(state, batch, 0.0, Meter())
        steps.append({"boundary": boundary, "syncs": [[s.kind, s.call, s.where] for s in syncs.found]})
    return {"micro_steps": steps, "dtype": str(next(state.engine.module.parameters()).dtype),
            "grad_clip": state.objective.grad_clip(cfg.train)}


def _slow_stream(cfg: Any, plan: Any, rows: dict[str, np.ndarray], rank: int, root: Path) -> dict[str, Any]:
    """The worker over a stream that delivers a batch every REPLAY_DELAY_S, to its end; row ids on every row."""
    from synray.data.ledger import ROW_ID, load_consumed
    from synray.train.context import LocalContext
    from synray.train.worker import setup, train

    class SlowStream(LocalContext):
        def batches(self, rows_per_batch: int, epoch: int, shuffle_rows: int, seed: int):
            for batch in super().batches(rows_per_batch, epoch, shuffle_rows, seed):
                time.sleep(REPLAY_DELAY_S)
                yield batch

    n = len(rows["label"])
    rows = {**rows, ROW_ID: np.arange(n, dtype=np.int64) + rank * 100_000}
    ctx = SlowStream(rank, WORLD, rows, root)
    final = train(setup(cfg, plan, ctx))
    return {"final_step": final, "consumed": load_consumed(ctx.checkpoints()[-1]).tolist(), "rows_streamed": n}


def _bf16_export(cfg: Any, plan: Any, rows: dict[str, np.ndarray], rank: int, root: Path) -> dict[str, Any]:
    """Train in bf16, then compare the exported backbone with DeepSpeed's zero_to_fp32 consolidation of the
    last checkpoint's optimizer shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from synray.models.backbone import load_backbone
    from synray.train.context import LocalContext
    from synray.train.engine import CHECKPOINT_TAG
    from synray.train.worker import BACKBONE_DIR, setup, train

    ctx = LocalContext(rank, WORLD, rows, root)
    state = setup(cfg, plan, ctx)
    train(state)
    dist.barrier()
    out: dict[str, Any] = {"module_dtype": str(next(state.engine.module.parameters()).dtype)}
    if rank == 0:
        last = ctx.checkpoints()[-1]
        export = load_backbone(last / BACKBONE_DIR).state_dict()
        master = get_fp32_state_dict_from_zero_checkpoint(str(last), tag=CHECKPOINT_TAG)
        out["export_dtypes"] = sorted({str(v.dtype) for v in export.values()})
        out["max_difference"] = max(float((v - master[f"encoder.{k}"].float()).abs().max())
                                    for k, v in export.items() if f"encoder.{k}" in master)
        out["compared"] = sum(f"encoder.{k}" in master for k in export)
        out["bf16_rounding"] = max(float((v - v.bfloat16().float()).abs().max()) for v in export.values())
    return out


def _preemption(cfg: Any, plan: Any, rows: dict[str, np.ndarray], rank: int, root: Path) -> dict[str, Any]:
    """The worker under a context that says a node is being preempted at the 3rd report and once more (what Ray
    Train's `get_preemption_info` says once a node is drained with a deadline), then no more (a drain withdrawn)."""
    from synray.train.context import LocalContext
    from synray.train.worker import setup, train

    class Preempted(LocalContext):
        asked = 0

        def preemption(self) -> dict[str, Any] | None:
            self.asked += 1
            return {"deadline_ms": 1_000_000, "ranks": [1]} if self.asked in (3, 4) else None

    ctx = Preempted(rank, WORLD, rows, root)
    return {"final_step": train(setup(cfg, plan, ctx)), "asked": ctx.asked,
            "checkpoints": [p.name for p in ctx.checkpoints()]}


def _as_gpu_precision(cfg: Any) -> Any:
    """The config with bf16 training, which validation allows only with use_gpu (DeepSpeed runs bf16 on the CPU)."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": "bf16"})})


def _run_case(name: str, rank: int, root: Path, text_model: str) -> dict[str, Any]:
    from conftest import small_config

    from synray.train.context import LocalContext
    from synray.train.objectives import get_objective
    from synray.train.preprocess import RowPreprocessor
    from synray.train.spec import TrainPlan
    from synray.train.worker import Meter, setup, train, train_step

    cfg = small_config(*BASE, *CASES[name])
    if name in BF16:
        cfg = _as_gpu_precision(cfg)
    objective = get_objective(cfg.train.loss)
    plan = TrainPlan(objective.name, M, num_classes=2 * ROWS, epochs=False,
                     columns=tuple(objective.columns(None)) + ("caption_id", "label"),
                     text_model=text_model if objective.image_text else None)
    steps = REPLAY_ARRIVALS if name.startswith("replay_") else cfg.train.steps * cfg.train.grad_accum
    rows = RowPreprocessor(cfg, plan)(fixed_rows(rank, steps))  # the Ray Data stage's code, in this process
    ctx = LocalContext(rank, WORLD, rows, root / name)
    out: dict[str, Any] = {}
    if name == "grad_accum":
        state = setup(cfg, plan, ctx)
        flags, sums = [], [_weights(state)]
        for batch, *_ in state.batches:
            flags.append(train_step(state, batch, 0.0, Meter()))
            sums.append(_weights(state))
        out.update(boundaries=flags, weight_sums=sums, global_steps=int(state.engine.global_steps),
                   scheduler_steps=int(state.scheduler.last_epoch))
        state = setup(cfg, plan, LocalContext(rank, WORLD, rows, root / "grad_accum_train"))
        out.update(final_step=train(state), train_global_steps=int(state.engine.global_steps))
    elif name.startswith("no_host_sync_"):
        out.update(_host_syncs(cfg, plan, rows, rank, root / name))
    elif name.startswith("replay_"):
        out.update(_slow_stream(cfg, plan, rows, rank, root / name))
    elif name == "bf16_export":
        out.update(_bf16_export(cfg, plan, rows, rank, root / name))
    elif name == "preemption":
        out.update(_preemption(cfg, plan, rows, rank, root / name))
    elif name == "synclr_resume":
        out.update(_synclr_resume(cfg, plan, rows, rank, root / name))
    elif name == "resume":
        first = setup(cfg, plan, ctx)
        out["first_final_step"] = train(first)
        again = setup(cfg, plan, LocalContext(rank, WORLD, rows, root / name))
        out.update(restored_step=again.step, restarted=again.restarted,
                   same_weights=_weights(again) == _weights(first))
    else:
        out["final_step"] = train(setup(cfg, plan, ctx))
    out["reports"] = LocalContext.read_reports(root / name, rank)
    return out


def worker(rank: int, port: int, root: str, text_model: str, cases: list[str]) -> None:
    """One process of the group: every case in order; results to root/<case>/rank<r>.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        for name in cases:
            result = _run_case(name, rank, Path(root), text_model)
            (Path(root) / name / f"rank{rank}.json").write_text(json.dumps(result, default=str))
    finally:
        dist.destroy_process_group()
