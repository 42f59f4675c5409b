"""The per-worker training program: `setup` builds the worker's state, `train` runs the loop; one short function per step, log, checkpoint and export."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from synray.config import RunConfig
from synray.data.ledger import ROW_ID, load_consumed, load_epoch, save_consumed, save_epoch
from synray.models.backbone import enable_grad_checkpointing
from synray.train import engine as ds_engine
from synray.train.context import RayTrainContext, WorkerContext
from synray.train.objectives import ModelParts, Objective, get_objective
from synray.train.replay import default_capacity, replay_rng, replayed
from synray.train.spec import TrainPlan

log = logging.getLogger(__name__)

#: checkpoint folder of the exported trained model (save_pretrained format)
BACKBONE_DIR = "backbone"
#: checkpoint folder of the model as every worker built it at step 0 (the "init" comparison)
INIT_DIR = "backbone_init"
#: the metric Ray Train ranks checkpoints by when it keeps a few: the step, and the step-0 export above all
CHECKPOINT_SCORE = "checkpoint_score"
INIT_SCORE = float(2**62)


@dataclass
class WorkerState:
    """Everything `train` needs, built once by `setup`."""

    cfg: RunConfig
    plan: TrainPlan
    objective: Objective
    ctx: WorkerContext
    device: torch.device
    parts: ModelParts
    engine: Any
    scheduler: Any
    augment: nn.Module                                  # the objective's on-device augmentation
    batches: Iterator[tuple[dict[str, torch.Tensor], float, int]]   # (batch, seconds waited, rows new to training)
    rng: np.random.Generator
    step: int
    restarted: bool
    consumed: np.ndarray                                # rows of this epoch trained on up to the last checkpoint
    pending_rows: list[torch.Tensor] = field(default_factory=list)   # rows trained on since (device tensors)
    epoch: int = 0                                      # the epoch of a store being read (a stream: 0)
    rows_trained: int = 0                               # rows trained on at least once, over all ranks
    last_metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Meter:
    """Timing and loss since the last report; the loss stays a device tensor until a report (no per-step sync)."""

    wait_s: float = 0.0
    busy_s: float = 0.0
    images: int = 0
    new_rows: int = 0                           # rows of this rank used for the first time (a host count)
    micro_steps: int = 0
    loss_sum: torch.Tensor | None = None        # [1 + parts]: the loss, then each of its logged parts
    part_names: tuple[str, ...] = ()
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor] | None = None) -> None:
        """One micro-step's loss and its parts (an objective's named terms), summed on the device."""
        parts = parts or {}
        values = torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())])
        self.part_names = tuple(parts)
        self.loss_sum = values if self.loss_sum is None else self.loss_sum + values
        self.micro_steps += 1

    def report(self, step: int, lr: float, world: int) -> tuple[dict[str, Any], int]:
        """The metrics since the meter started (the mean loss and parts over micro-steps and ranks), and the rows
        all ranks used for the first time (one all-reduce)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        if self.loss_sum is None:
            return {"step": step, "loss": float("nan"), "lr": lr, "world_size": world}, self.new_rows
        values = torch.cat(
            [self.loss_sum, torch.tensor([float(self.new_rows)], device=self.loss_sum.device)])
        *sums, new_rows = means_over_ranks(values, 2 + len(self.part_names))
        means = [v / max(1, self.micro_steps) for v in sums]
        return {"step": step, "loss": means[0], **dict(zip(self.part_names, means[1:])), "lr": lr, "world_size": world,
                "images_per_s": self.images * world / elapsed,
                "data_wait_fraction": self.wait_s / max(self.wait_s + self.busy_s, 1e-9)}, round(new_rows * world)


# -------------------------------------------------------------------------------------- setup
def setup(cfg: RunConfig, plan: TrainPlan, ctx: WorkerContext) -> WorkerState:
    """Model, DeepSpeed engine, restored step, augmentation and the data iterator of this worker. The train config
    is taken at the group's size: its step's rows split over the workers there are (an elastic group's size varies)."""
    configured = cfg.train
    cfg = cfg.model_copy(update={"train": configured.at_size(ctx.world_size)})
    t = cfg.train
    objective = get_objective(plan.objective)
    device = torch.device("cuda", torch.cuda.current_device()) if t.use_gpu else torch.device("cpu")
    if not t.use_gpu:
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    parts = objective.build(cfg, plan.num_classes, plan.text_model)
    if t.grad_checkpointing:
        enable_grad_checkpointing(parts.model)
    model = parts.model.to(device)  # its BatchNorm layers already span ranks (CrossRankBatchNorm1d), on any device
    images_per_row = objective.images_per_row(plan.per_caption)
    images_per_step = ds_engine.images_per_step(t, images_per_row, objective.views, ctx.world_size)
    micro_batch = images_per_step // (ctx.world_size * t.grad_accum)  # images (views) per worker per forward
    # the lr of the configured step at every size (a size that cannot split it exactly trains a few rows fewer)
    lr = ds_engine.learning_rate(t, ds_engine.images_per_step(configured, images_per_row, objective.views,
                                                              configured.max_workers))
    with ctx.latest_checkpoint() as checkpoint:
        restarted = checkpoint is not None
        if not restarted:
            export_initial(model, objective, parts, cfg, ctx)
        source = state_to_load(checkpoint, plan)
        resized = source is not None and ds_engine.saved_world_size(source) not in (None, ctx.world_size)
        engine, _, scheduler = ds_engine.build_engine(model, t, micro_batch, ctx.world_size, lr, objective.grad_clip(t),
                                                      load_universal=resized)
        objective.after_engine(engine)
        step = restore(engine, source, objective, cfg, ctx, resized)
        consumed, epoch = load_consumed(checkpoint), load_epoch(checkpoint)
    ctx.start_stream(consumed)  # the data skips what the restored epoch trained on (before any row is read)
    torch.manual_seed(cfg.seed * 7919 + ctx.rank * 104729 + step)  # augmentation stream per rank and restart
    augment = objective.augmentation(t).to(device)
    state = WorkerState(cfg, plan, objective, ctx, device, parts, engine, scheduler, augment, iter(()),
                        rng=np.random.default_rng([cfg.seed, ctx.rank, step]), step=step, restarted=restarted,
                        consumed=consumed, epoch=epoch, rows_trained=int(consumed.size))
    state.batches = timed_batches(ctx, t.captions_per_worker, plan.epochs, cfg.data.shuffle_buffer_rows,
                                  cfg.seed * 31 + ctx.rank, first_epoch=epoch,
                                  on_new_epoch=lambda e: start_epoch(state, e))
    if cfg.data.replay > 1 and not plan.epochs:
        d = cfg.data
        state.batches = replayed(state.batches, d.replay, t.captions_per_worker,
                                 d.replay_buffer_rows or default_capacity(t.captions_per_worker, d.replay),
                                 replay_rng(cfg.seed, step))
    return state


def start_epoch(state: WorkerState, epoch: int) -> None:
    """A new epoch of a store: nothing of it is consumed yet, and its execution must skip nothing."""
    state.epoch, state.consumed = epoch, np.zeros(0, dtype=np.int64)
    state.pending_rows.clear()
    state.ctx.start_stream(state.consumed)


def state_to_load(checkpoint: Path | None, plan: TrainPlan) -> Path | None:
    """The training state to start from: this run's latest checkpoint (after a failure or a resize), else
    `train.resume_from`, else none (a fresh run, or a restart before the first training checkpoint)."""
    if checkpoint is not None and ds_engine.has_state(checkpoint):
        return checkpoint
    return Path(plan.resume_from) if plan.resume_from else None


def restore(engine: Any, source: Path | None, objective: Objective, cfg: RunConfig, ctx: WorkerContext,
            resized: bool) -> int:
    """Load `source` (checked to be this model's and loss's) and return its step; 0 with none. A checkpoint that a
    group of another size wrote (`resized`) loads through DeepSpeed's universal form: ZeRO's optimizer state is
    partitioned by the group's size. One worker of each node converts it, into a folder named by the checkpoint's
    id, and the others wait for it."""
    if source is None:
        return 0
    ds_engine.check_compatible(source, objective.fingerprint(cfg.train))
    if not resized:
        return ds_engine.load(engine, source)
    universal = Path(tempfile.gettempdir()) / f"synray-universal-{ds_engine.read_meta(source)['id']}"
    if ctx.local_rank == 0 and not universal.is_dir():
        log.info("resized group (%d workers, the checkpoint's %s): converting %s to a universal checkpoint",
                 ctx.world_size, ds_engine.saved_world_size(source), source)
        ds_engine.to_universal(source, universal.with_name(universal.name + f".{os.getpid()}")).rename(universal)
    barrier()
    step = ds_engine.load(engine, universal)
    barrier()
    if ctx.local_rank == 0:
        shutil.rmtree(universal, ignore_errors=True)
    return step


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def timed_batches(ctx: WorkerContext, rows: int, epochs: bool, shuffle_rows: int, seed: int,
                  first_epoch: int = 0, on_new_epoch: Callable[[int], None] | None = None,
                  ) -> Iterator[tuple[dict[str, torch.Tensor], float, int]]:
    """(batch, seconds waited for it, its rows) from this worker's rows; loops over epochs when training on a
    store, from `first_epoch` (a restored checkpoint's), calling `on_new_epoch` before each later one."""
    epoch = first_epoch
    while True:
        got = 0
        if epoch != first_epoch and on_new_epoch is not None:
            on_new_epoch(epoch)
        it = ctx.batches(rows, epoch, shuffle_rows, seed)
        epoch += 1
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            got += 1
            yield batch, time.perf_counter() - t0, rows
        if not epochs or got == 0:
            return


# --------------------------------------------------------------------------------------- loop
def train(state: WorkerState) -> int:
    """Optimizer steps until the step budget (or the data) ends; returns the last step."""
    t = state.cfg.train
    meter = Meter()
    for rows, wait_s, new_rows in state.batches:
        if state.step >= t.steps:
            break
        stepped = train_step(state, rows, wait_s, meter, new_rows)
        if not stepped:
            continue
        state.step += 1
        fault_drill(state)
        if state.step % t.log_every == 0 or checkpoint_due(state):
            meter = log_and_checkpoint(state, meter)
    if state.step < t.steps:  # the data ended before the step budget
        finish_early(state, meter)
    if state.ctx.rank == 0:
        log.info("worker finished at step %d (pid %d)", state.step, os.getpid())
    return state.step


def train_step(state: WorkerState, tensors: dict[str, torch.Tensor], wait_s: float, meter: Meter,
               new_rows: int | None = None) -> bool:
    """One micro-step on a ready batch; True when it applied an optimizer update (the end of a `grad_accum`
    window). Nothing here waits for the device: the loss is only read at reports."""
    t0 = time.perf_counter()
    if ROW_ID in tensors:
        state.pending_rows.append(tensors[ROW_ID])
    batch = state.objective.make_batch(tensors, state.rng).to(state.device)
    engine = state.engine
    loss, parts = loss_and_parts(state.objective.loss(engine, state.augment, batch, state.cfg.train, state.step))
    boundary = engine.is_gradient_accumulation_boundary()  # asked before step(): afterwards it is the next one's
    engine.backward(loss)
    engine.step()
    if boundary:
        state.objective.after_update(engine, state.step, state.cfg.train)
    meter.add(loss, parts)
    meter.wait_s += wait_s
    meter.busy_s += time.perf_counter() - t0
    meter.images += batch.num_images * state.objective.views
    meter.new_rows += int(next(iter(tensors.values())).shape[0]) if new_rows is None else new_rows
    return bool(boundary)


def means_over_ranks(values: torch.Tensor | None, count: int = 1) -> list[float]:
    """Per-rank sums [count] averaged over ranks, as numbers (one all-reduce and a host sync: reports only)."""
    if values is None:
        return [float("nan")] * count
    logged = values.detach().clone()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(logged)
        logged /= torch.distributed.get_world_size()
    return [float(v) for v in logged.reshape(-1).tolist()]


def loss_and_parts(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An objective's loss: a tensor, or (the tensor, its named parts to log)."""
    return (out, {}) if isinstance(out, torch.Tensor) else out


def checkpoint_due(state: WorkerState) -> bool:
    t = state.cfg.train
    return state.step % t.checkpoint_every == 0 or state.step == t.steps


def window_metrics(state: WorkerState, meter: Meter) -> dict[str, Any]:
    """The meter's metrics; in a stream also the rows trained on so far (over ranks) and the uses of each."""
    metrics, new_rows = meter.report(state.step, current_lr(state), state.ctx.world_size)
    if not state.plan.epochs:
        t = state.cfg.train
        state.rows_trained += new_rows
        row_uses = state.step * t.captions_per_worker * state.ctx.world_size * t.grad_accum
        metrics.update(rows_trained=state.rows_trained, uses_per_row=row_uses / max(1, state.rows_trained))
    return metrics


def log_and_checkpoint(state: WorkerState, meter: Meter) -> Meter:
    """Report the metrics since the last report, with a checkpoint when one is due or a node of the group is being
    preempted (saved once a notice, before the node goes); a fresh meter follows."""
    state.last_metrics = window_metrics(state, meter)
    notice = state.ctx.preemption()
    if checkpoint_due(state) or notice:
        metrics = {**state.last_metrics, **({"preemption": notice} if notice else {})}
        save_checkpoint(state, metrics, export=state.step == state.cfg.train.steps)
    else:
        state.ctx.report(state.last_metrics, None)
    if notice:
        hold_for_preemption(state, notice)
    return Meter()


#: seconds between a held group's questions whether its node's preemption still stands
PREEMPTION_POLL_S = 1.0


def hold_for_preemption(state: WorkerState, notice: dict[str, Any]) -> None:
    """A node of the group is being preempted and the checkpoint of this step is saved: the group trains no further
    row (it would be trained again after the restart) and waits, asking every PREEMPTION_POLL_S, until Ray Train
    stops it when the node goes (at the notice's deadline at the latest) and restarts it from that checkpoint,
    counted against train.max_preemptions, not max_failures. A notice that is withdrawn (the drain was cancelled)
    lets it go on."""
    if state.ctx.rank == 0:
        log.warning("a node of the training group is being preempted (ranks %s, deadline %s): checkpoint saved at "
                    "step %d, holding until the group is restarted", notice.get("ranks"), notice.get("deadline_ms"),
                    state.step)
    while state.ctx.preemption() is not None:   # every rank asks as often: the question is a barrier of the group
        time.sleep(PREEMPTION_POLL_S)


def finish_early(state: WorkerState, meter: Meter) -> None:
    """The stream ran out before the step budget: a last checkpoint with the export, marked as ended early."""
    metrics = window_metrics(state, meter) if meter.micro_steps else state.last_metrics
    save_checkpoint(state, {**metrics, "step": state.step, "ended_early": True}, export=True)


def fault_drill(state: WorkerState) -> None:
    """`train.fail_at_step`: the last worker exits at that step, unless its group restarted from a checkpoint."""
    ctx = state.ctx
    if state.cfg.train.fail_at_step == state.step and not state.restarted and ctx.rank == ctx.world_size - 1:
        ctx.wait_for_checkpoints()  # earlier checkpoints are registered before the group fails
        log.warning("fault drill: worker %d exits at step %d", ctx.rank, state.step)
        os._exit(1)


def current_lr(state: WorkerState) -> float:
    return float(state.scheduler.get_last_lr()[0])


# ------------------------------------------------------------------------- checkpoint, export
def save_checkpoint(state: WorkerState, metrics: dict[str, Any], export: bool = False) -> None:
    """Every rank writes its DeepSpeed shards (and rank 0 the export); the context merges them into one checkpoint."""
    rank = state.ctx.rank
    if state.pending_rows:  # the one device-to-host copy of the row ids: at checkpoints only
        ids = torch.cat(state.pending_rows).cpu().numpy()
        state.consumed = np.union1d(state.consumed, ids[ids >= 0])   # -1: a replayed use of a row
        state.pending_rows.clear()
    with tempfile.TemporaryDirectory(prefix="synray-ckpt-") as tmp:
        ds_engine.save(state.engine, Path(tmp), state.step, state.objective.fingerprint(state.cfg.train), rank,
                       state.ctx.world_size)
        save_consumed(Path(tmp), rank, state.consumed)
        if rank == 0:
            save_epoch(Path(tmp), state.epoch)
        if export:
            with master_weights(state.engine) as module:   # a collective in mixed precision: every rank
                if rank == 0:
                    state.objective.export(module, Path(tmp) / BACKBONE_DIR, state.parts, state.cfg.train)
        state.ctx.report({**metrics, CHECKPOINT_SCORE: float(state.step)}, Path(tmp))


def export_initial(model: nn.Module, objective: Objective, parts: ModelParts, cfg: RunConfig,
                   ctx: WorkerContext) -> None:
    """Report the step-0 weights as the run's first checkpoint (kept to the end): the "init" comparison."""
    with tempfile.TemporaryDirectory(prefix="synray-init-") as tmp:
        if ctx.rank == 0:
            objective.export(model, Path(tmp) / INIT_DIR, parts, cfg.train)
        ctx.report({"step": 0, "init_export": True, CHECKPOINT_SCORE: INIT_SCORE},
                   Path(tmp) if ctx.rank == 0 else None)


def unwrap(engine: Any) -> nn.Module:
    return getattr(engine, "module", engine)


@contextlib.contextmanager
def master_weights(engine: Any) -> Iterator[nn.Module]:
    """The trained module with the optimizer's float32 master weights in its parameters while inside (bf16/fp16
    training keeps them in the optimizer, partitioned in ZeRO: assembling each is a collective, so every rank
    enters); the module itself in fp32 training. The export is then float32, as the step-0 export is."""
    module = unwrap(engine)
    swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
    if any(p.dtype != torch.float32 for p in module.parameters()):
        from deepspeed.utils import safe_get_full_fp32_param

        for p in module.parameters():
            master = safe_get_full_fp32_param(p)
            if master is not None:
                swapped.append((p, p.data))
                p.data = master.detach().view(p.shape)
    try:
        yield module
    finally:
        for p, data in swapped:
            p.data = data


# ---------------------------------------------------------------------------------- Ray Train
def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: config = {"cfg": the run config as a dict, "plan": a TrainPlan,
    "ledger": the stream's StreamLedger actor, or None}."""
    cfg = RunConfig.model_validate(config["cfg"])
    ctx = RayTrainContext(cfg.train.prefetch_batches, pin_memory=cfg.train.use_gpu, ledger=config.get("ledger"))
    train(setup(cfg, config["plan"], ctx))
