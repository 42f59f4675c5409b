"""Trains the worker in one group of gloo processes, then resumes its checkpoint in a group of another size (a helper
module, not collected): what an elastic run does when Ray Train restarts its group at a new size.

`run(rank, world, phase, port, root)`: phase "first" trains a fresh group on the pool's rows for 4 steps (its last
checkpoint then marks the stream's end); a phase "resumed..." starts a group from a copy of that checkpoint (in
`root/<phase>`) and trains on what is left of the pool. Each rank writes `root/<phase>-rank<r>.json`: the step it
started from, the rows of each batch, and the full (not partitioned) fp32 weights and Adam state of every parameter
(DeepSpeed's own accessors), after the first phase and right after the resumed one restored.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

#: captions per worker micro-batch (at full size), images per caption, group sizes of the elastic range
ROWS, M, RANGE = 4, 2, (1, 3)
#: rows of the pool: 9 steps of the configured step (ROWS x 3 workers)
POOL = 9 * ROWS * RANGE[1]
OVERRIDES = ["images.per_caption=2", f"train.captions_per_worker={ROWS}", f"train.num_workers=[{RANGE[0]}, "
             f"{RANGE[1]}]", "train.log_every=1", "train.checkpoint_every=100", "train.warmup_steps=2",
             "train.lr=0.002", "train.augment.preset=none", "train.head.hidden_dim=64", "train.head.out_dim=32",
             "train.loss=stablerep", "train.steps=9"]


def pool_rows() -> dict[str, np.ndarray]:
    """POOL caption rows of M procedural images each, with their plan-row ids (raw, as a store holds them)."""
    from synray.config import ImagesConfig
    from synray.data.ledger import ROW_ID
    from synray.images.procedural import ProceduralRenderer

    shapes = ["a red circle", "two blue squares", "a large green triangle", "a yellow star", "a white cross",
              "a pink ring"]
    captions = [shapes[i % len(shapes)] for i in range(POOL)]   # each row its own id, so its own images
    renderer = ProceduralRenderer(ImagesConfig(backend="procedural", per_caption=M, resolution=32, output_size=32),
                                  None, run_seed=0)
    out = renderer({"caption": np.asarray(captions, dtype=object),
                    "caption_id": np.asarray([f"{i:016x}" for i in range(POOL)], dtype=object),
                    "label": np.arange(POOL, dtype=np.int64) % len(shapes)})
    return {**{k: out[k] for k in ("caption_id", "label", "caption", "images")},
            ROW_ID: np.arange(POOL, dtype=np.int64)}


def full_state(engine: Any) -> dict[str, dict[str, str]]:
    """Each parameter's whole fp32 weights and Adam moments, as digests of their bytes (a collective: every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # DeepSpeed's ZeRO-1 links each parameter to its slice of the Adam state once, after its optimizer's first step,
    # which steps the parameter groups one at a time: the later groups' moments stay unlinked, so link them again
    optimizer = engine.optimizer
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()

    def digest(t: torch.Tensor) -> str:
        return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]

    def moment(p: torch.Tensor, key: str) -> str | None:
        try:
            return digest(safe_get_full_optimizer_state(p, key))
        except ValueError:   # a parameter without optimizer state
            return None

    return {name: {"fp32": digest(safe_get_full_fp32_param(p)), "exp_avg": moment(p, "exp_avg"),
                   "exp_avg_sq": moment(p, "exp_avg_sq")} for name, p in engine.module.named_parameters()}


def adam_steps(engine: Any) -> list[float]:
    """The Adam step counts of the optimizer's partition on this rank."""
    return sorted({float(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s})


def run(rank: int, world: int, phase: str, port: int, root: str) -> None:
    from conftest import small_config

    from synray.data.ledger import ROW_ID
    from synray.train.context import LocalContext
    from synray.train.objectives import get_objective
    from synray.train.preprocess import RowPreprocessor
    from synray.train.spec import TrainPlan
    from synray.train.worker import current_lr, setup, train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    trained: list[list[int]] = []

    class Recorded(LocalContext):
        def batches(self, rows: int, epoch: int, shuffle_rows: int, seed: int):
            for batch in super().batches(rows, epoch, shuffle_rows, seed):
                trained.append(batch[ROW_ID].tolist())
                yield batch

    try:
        cfg = small_config(*OVERRIDES)
        objective = get_objective(cfg.train.loss)
        plan = TrainPlan(objective.name, M, num_classes=6, epochs=False,
                         columns=tuple(objective.columns(None)) + ("caption_id", "label"))
        rows = RowPreprocessor(cfg, plan)(pool_rows())
        shard = {k: v[rank::world] for k, v in rows.items()}
        state = setup(cfg, plan, Recorded(rank, world, shard, Path(root) / phase))
        out: dict[str, Any] = {"start_step": state.step, "rows_per_batch": state.cfg.train.captions_per_worker,
                               "grad_accum": state.cfg.train.grad_accum}
        if phase.startswith("resumed"):
            out.update(restored=full_state(state.engine), adam_steps=adam_steps(state.engine),
                       lr=current_lr(state), scheduler_steps=int(state.scheduler.last_epoch))
        else:   # the first group's stream ends after 4 of its steps
            micro = 4 * state.cfg.train.grad_accum
            state.batches = (b for _, b in zip(range(micro), state.batches))
        out["final_step"] = train(state)
        out.update(trained=trained, final=full_state(state.engine), final_adam_steps=adam_steps(state.engine),
                   final_lr=current_lr(state), final_scheduler_steps=int(state.scheduler.last_epoch),
                   reports=LocalContext.read_reports(Path(root) / phase, rank))
        (Path(root) / f"{phase}-rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()
