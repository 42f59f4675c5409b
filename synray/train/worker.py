"""The per-worker training function: DeepSpeed engine, data shard -> augmented views (and texts) -> loss -> step."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from synray.config import RunConfig, TrainConfig
from synray.train import engine as ds_engine
from synray.train.batches import ImageBatch, ImageTextBatch, flatten_rows, image_text_pairs

log = logging.getLogger(__name__)

#: Ray Data batches prefetched by each worker while it computes
PREFETCH_BATCHES = 2
#: the checkpoint folder holding the exported backbone (save_pretrained format)
BACKBONE_DIR = "backbone"


# ------------------------------------------------------------------------------------- model
class Classifier(nn.Module):
    """Encoder + linear layer over concept labels (the supervised cross-entropy baseline)."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(pixel_values))


def build_model(cfg: TrainConfig, num_classes: int, text_tower: nn.Module | None = None) -> nn.Module:
    from synray.models.backbone import build_backbone
    from synray.models.heads import build_contrastive_model

    if cfg.loss == "supervised":
        return Classifier(build_backbone(cfg.backbone), num_classes)
    if cfg.loss == "clip":
        from synray.models.image_text import ImageTextModel

        if text_tower is None:
            raise ValueError("train.loss=clip needs a text tower")
        return ImageTextModel(build_backbone(cfg.backbone), text_tower, init_temperature=cfg.temperature)
    return build_contrastive_model(cfg.backbone, cfg.head)


def compute_loss(model: nn.Module, augment: nn.Module, batch: ImageBatch | ImageTextBatch, cfg: TrainConfig,
                 device: torch.device) -> torch.Tensor:
    """One forward pass and the configured loss on this worker's share of the global batch."""
    from synray.train import losses

    images = batch.images.to(device, non_blocking=True)
    if isinstance(batch, ImageTextBatch):
        image_features, text_features, scale = model(augment(images), batch.input_ids.to(device),
                                                     batch.attention_mask.to(device))
        return losses.clip_loss(image_features, text_features, logit_scale=scale)
    if cfg.loss == "stablerep":
        return losses.multi_positive_contrastive(model(augment(images)), batch.caption_ids.to(device),
                                                 cfg.temperature)
    if cfg.loss == "simclr":
        return losses.info_nce(model(augment(images)), model(augment(images)), cfg.temperature)
    if cfg.loss == "supervised":
        return losses.supervised_ce(model(augment(images)), batch.labels.to(device))
    raise ValueError(f"train.loss {cfg.loss!r} is not supported by the image trainer")


# -------------------------------------------------------------------------------------- data
def shard_batches(shard: Any, rows: int, epochs: bool, shuffle_rows: int = 0,
                  seed: int = 0) -> Iterator[tuple[dict, float]]:
    """(batch, seconds waited for it) from this worker's shard; loops over epochs in stored mode."""
    epoch = 0
    while True:
        got = 0
        it = iter(shard.iter_batches(batch_size=rows, batch_format="numpy", drop_last=True,
                                     prefetch_batches=PREFETCH_BATCHES,
                                     local_shuffle_buffer_size=shuffle_rows or None,
                                     local_shuffle_seed=(seed + epoch) if shuffle_rows else None))
        epoch += 1
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            got += 1
            yield batch, time.perf_counter() - t0
        if not epochs or got == 0:
            return


@dataclass
class Meter:
    """Timing and loss since the last report."""

    wait_s: float = 0.0
    busy_s: float = 0.0
    images: int = 0
    losses: list[float] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def report(self, step: int, lr: float, world: int) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"step": step, "loss": sum(self.losses) / max(1, len(self.losses)), "lr": lr,
                "images_per_s": self.images * world / elapsed,
                "data_wait_fraction": self.wait_s / max(self.wait_s + self.busy_s, 1e-9)}


# ----------------------------------------------------------------------------------- the loop
def train_step(engine, augment, batch: ImageBatch, cfg: TrainConfig, device: torch.device) -> float:
    loss = compute_loss(engine, augment, batch, cfg, device)
    engine.backward(loss)
    engine.step()
    logged = loss.detach().clone()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(logged)
        logged /= torch.distributed.get_world_size()
    return float(logged)


def export_model(model: nn.Module, directory: Path, cfg: TrainConfig, tokenizer: Any = None) -> None:
    """The backbone in transformers' format; for image-text training also the text tower and projection."""
    if cfg.loss == "clip":
        from synray.models.image_text import save_image_text

        save_image_text(model, tokenizer, directory, cfg.text.max_length)
    else:
        from synray.models.backbone import save_backbone

        save_backbone(model.encoder, directory)


def save_checkpoint(engine, step: int, cfg: TrainConfig, rank: int, metrics: dict[str, Any],
                    export: bool = False, tokenizer: Any = None) -> None:
    """All ranks write their DeepSpeed shards; Ray Train merges them into one persisted checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="synray-ckpt-") as tmp:
        ds_engine.save(engine, Path(tmp), step, cfg, rank)
        if export and rank == 0:
            export_model(_unwrap(engine), Path(tmp) / BACKBONE_DIR, cfg, tokenizer)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(engine, cfg: TrainConfig, resume_from: str | None) -> int:
    """Resume from Ray Train's latest checkpoint of this run (after a failure), else from resume_from."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            ds_engine.check_compatible(d, cfg)
            return ds_engine.load(engine, Path(d))
    if resume_from:
        ds_engine.check_compatible(resume_from, cfg)
        return ds_engine.load(engine, Path(resume_from))
    return 0


def _unwrap(engine) -> nn.Module:
    return getattr(engine, "module", engine)


def load_text(cfg: RunConfig) -> tuple[nn.Module, Any]:
    """The text tower and tokenizer of image-text training (tiny:* names are built into this node's cache)."""
    from synray.models.image_text import load_text_tower
    from synray.models.tiny import resolve_model

    return load_text_tower(resolve_model(cfg.train.text.model, cfg.model_cache))


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train per-worker entry: config = {"cfg": resolved run config, "per_caption", "num_classes", ...}."""
    import ray.train

    from synray.train.augment import build_augment

    cfg = RunConfig.model_validate(config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if t.use_gpu else torch.device("cpu")
    if not t.use_gpu:
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    per_caption = int(config["per_caption"])
    text_tower, tokenizer = load_text(cfg) if t.loss == "clip" else (None, None)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(t, int(config["num_classes"]), text_tower).to(device)
    if t.use_gpu:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # StableRep's synchronised BN
    views = 2 if t.loss == "simclr" else 1
    micro = ds_engine.images_per_step(t, per_caption, 1) // t.grad_accum
    lr = ds_engine.learning_rate(t, per_caption, world)
    engine, _, sched = ds_engine.build_engine(model, t, micro, world, lr)
    restarted = ray.train.get_checkpoint() is not None
    step = restore(engine, t, config.get("resume_from"))
    torch.manual_seed(cfg.seed * 7919 + rank * 104729 + step)  # augmentation stream per rank and restart
    rng = np.random.default_rng([cfg.seed, rank, step])  # LaCLIP caption and image picks
    augment = build_augment(t.augment, t.backbone.image_size, t.loss).to(device)
    shard = ray.train.get_dataset_shard("train")
    meter, last = Meter(), {}
    batches = shard_batches(shard, t.captions_per_worker, epochs=config.get("epochs", False),
                            shuffle_rows=cfg.data.shuffle_buffer_rows, seed=cfg.seed * 31 + rank)
    for rows, wait_s in batches:
        if step >= t.steps:
            break
        t0 = time.perf_counter()
        batch = (image_text_pairs(rows, rng, t.backbone.image_size, tokenizer, t.text.max_length)
                 if t.loss == "clip" else flatten_rows(rows, per_caption))
        t1 = time.perf_counter()
        loss = train_step(engine, augment, batch, t, device)
        meter.wait_s += wait_s + (t1 - t0)
        meter.busy_s += time.perf_counter() - t1
        meter.images += batch.num_images * views
        meter.losses.append(loss)
        if not engine.is_gradient_accumulation_boundary():
            continue
        step += 1
        if t.fail_at_step == step and not restarted and rank == world - 1:
            ray.train.get_all_reported_checkpoints()  # blocks until earlier checkpoints are registered
            log.warning("fault drill: worker %d exits at step %d", rank, step)
            os._exit(1)
        if step % t.log_every == 0 or step % t.checkpoint_every == 0 or step == t.steps:
            last = meter.report(step, float(sched.get_last_lr()[0]), world)
            meter = Meter()
            if step % t.checkpoint_every == 0 or step == t.steps:
                save_checkpoint(engine, step, t, rank, last, export=step == t.steps, tokenizer=tokenizer)
            else:
                ray.train.report(last)
    if step < t.steps:  # the stream ended before the step budget
        last = {**(meter.report(step, float(sched.get_last_lr()[0]), world) if meter.losses else last),
                "step": step, "ended_early": True}
        save_checkpoint(engine, step, t, rank, last, export=True, tokenizer=tokenizer)
    if rank == 0:
        log.info("worker finished at step %d (pid %d)", step, os.getpid())
