"""DeepSpeed set-up from the train config: engine config, AdamW, warmup + cosine schedule, checkpoints."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synray.config import TrainConfig

if TYPE_CHECKING:   # torch and DeepSpeed are imported where the engine is built: plans read checkpoints without them
    from torch import nn

CHECKPOINT_TAG = "state"
META_FILE = "synray_checkpoint.json"
#: the meta key of the size of the worker group that wrote a checkpoint
WORLD_KEY = "world_size"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed by this run."""


def images_per_step(cfg: TrainConfig, images_per_row: int, views: int, world_size: int) -> int:
    """Images (views) per optimizer step: rows per worker x images per row x views x workers x accumulation."""
    return cfg.captions_per_worker * images_per_row * views * world_size * cfg.grad_accum


def learning_rate(cfg: TrainConfig, images_per_step: int) -> float:
    """The configured lr, or StableRep's rule base_lr x (images per step) / 256."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.base_lr * images_per_step / 256


def deepspeed_config(cfg: TrainConfig, micro_batch: int, world_size: int, grad_clip: float = 0.0,
                     load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config dict (micro batch = images per worker per forward pass; grad_clip 0: no clipping), set
    so that a step waits for the device as little as DeepSpeed allows: no throughput timer (it synchronises at every
    forward and step), no bf16 overflow check (an all-reduce and a host read per step; bf16 needs no loss scale),
    and without clipping no gradient norm in ZeRO 1/2. What remains: with clipping, ZeRO checks the norm's
    validity on the host once per optimizer step (its partitioned optimizer steps one parameter group at a time,
    so a clip inside the optimizer would not see the global norm); fp16's loss scaling reads an overflow flag.
    `load_universal`: the checkpoint to load is a universal one (`to_universal`: written by a group of another size)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage in (1, 2) and grad_clip == 0:
        zero["compute_grad_norm"] = False
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": micro_batch * cfg.grad_accum * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": cfg.precision == "fp16"},
        "gradient_clipping": grad_clip,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False}},
        **({"checkpoint": {"load_universal": True}} if load_universal else {}),
    }


def warmup_cosine(total_steps: int, warmup_steps: int):
    """lr multiplier: linear warmup from 0, then cosine to 0 at total_steps."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's groups: weight decay on matrices, none on biases and norms; parameters without gradients (an EMA
    teacher) left out of the optimizer and its state."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: nn.Module, cfg: TrainConfig, micro_batch: int, world_size: int, lr: float,
                 grad_clip: float = 0.0, load_universal: bool = False):
    """deepspeed.initialize with a torch AdamW (`param_groups`), a warmup+cosine LambdaLR and DeepSpeed's gradient
    clipping at `grad_clip` (0: none); `load_universal`: it will load a universal checkpoint."""
    import deepspeed
    import torch

    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps, cfg.warmup_steps))
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                 config=deepspeed_config(cfg, micro_batch, world_size, grad_clip,
                                                                         load_universal))
    return engine, opt, sched


def save(engine, directory: Path, step: int, fingerprint: dict[str, Any], rank: int, world_size: int) -> None:
    """Every rank writes its DeepSpeed shards; rank 0 also the step, the group's size, an id, and what the checkpoint
    was trained as."""
    engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state={"step": step})
    if rank == 0:
        meta = {"step": step, WORLD_KEY: world_size, "id": uuid.uuid4().hex, **fingerprint}
        (directory / META_FILE).write_text(json.dumps(meta, sort_keys=True))


def has_state(directory: str | Path) -> bool:
    """Whether a checkpoint directory holds training state (not only exported weights)."""
    return (Path(directory) / META_FILE).is_file()


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.exists():
        raise CheckpointError(f"{directory} is not a synray training checkpoint (no {META_FILE})")
    return json.loads(path.read_text())


def check_compatible(directory: str | Path, want: dict[str, Any]) -> int:
    """The step of a checkpoint, after checking it was written for this model and loss (``want``: the
    objective's fingerprint of the run's train config)."""
    meta = read_meta(directory)
    diff = [k for k in want if json.dumps(meta.get(k), sort_keys=True) != json.dumps(want[k], sort_keys=True)]
    if diff:
        raise CheckpointError(f"checkpoint {directory} was written by another config: it differs in "
                         f"{', '.join('train.' + d for d in diff)} ({ {d: meta.get(d) for d in diff} })")
    return int(meta["step"])


def saved_world_size(directory: str | Path) -> int | None:
    """The size of the group that wrote a checkpoint (None: written before synray recorded it)."""
    size = read_meta(directory).get(WORLD_KEY)
    return None if size is None else int(size)


def to_universal(directory: Path, out: Path) -> Path:
    """DeepSpeed's universal form of a checkpoint (`deepspeed.checkpoint.ds_to_universal`: every parameter's fp32
    weights and optimizer moments whole, by name), which a group of any size loads; under `out`, with the same tag.
    ZeRO partitions the optimizer state by the group's size, so a checkpoint loads as written only into a group
    of the size that wrote it."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(directory / CHECKPOINT_TAG), output_folder=str(out / CHECKPOINT_TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)   # one process: no pool forked from a training worker
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):   # its progress bars
        ds_to_universal.main(args)
    return out


def load(engine, directory: Path) -> int:
    _, client = engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
    if client is None:
        raise CheckpointError(f"could not load the DeepSpeed checkpoint in {directory}")
    return int(client["step"])
