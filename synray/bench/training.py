"""Bench (a) the trainer fed from a store vs the same step on in-memory tensors, and (e) the loss vs a plain one.

(a) trains the config's model with one worker on a store of the shapes world (procedural images at
the model's image size, so any config can be measured without its text-to-image model): once as
`synray train` does (Ray Train, rows preprocessed by Ray Data actors) and once through the same worker
code on tensors already in memory (`LocalContext` in one process). Each side's images/s is the mean
over its reports after the first (the first holds start-up).
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
import torch.distributed as dist
import torch.nn.functional as F

from synray.bench.report import Ratio
from synray.config import RunConfig
from synray.data.store import ParquetStore
from synray.plan import derive_config, plan_generation, plan_run
from synray.programs.generate import generate_to_store
from synray.pipelines import training_input
from synray.train.context import LocalContext
from synray.train.losses import multi_positive_contrastive
from synray.train.preprocess import RowPreprocessor
from synray.train.spec import TrainPlan
from synray.train.trainer import fit
from synray.train.worker import setup, train

__all__ = ["bench_trainer", "bench_loss", "shapes_store_config"]

#: goals of the issue that asked for these figures
TRAINER_GOAL, DATA_WAIT_GOAL, LOSS_GOAL = 0.9, 0.05, 1.0
#: loss shapes measured: captions x images per caption
LOSS_SHAPES = ((256, 4), (1024, 4))
LOSS_DIM = 256


def shapes_store_config(cfg: RunConfig, captions: int) -> RunConfig:
    """The config's training setup over a store of the shapes world at the model's image size."""
    size = cfg.train.backbone.image_size
    return derive_config(cfg, {
        "concepts.bank": "builtin:shapes", "concepts.kinds": None, "concepts.max_concepts": None,
        "captions.backend": "template", "captions.style": "shapes", "captions.cleanup.dedupe": False,
        "images.backend": "procedural", "images.resolution": size, "images.output_size": size,
        "images.pool_size": 1, "images.num_gpus": 0, "images.device": "cpu", "data.num_captions": captions,
        "data.mode": "stored", "data.store_dir": None, "eval.enabled": False})


def _steady(reports: list[dict[str, Any]]) -> dict[str, float]:
    """Mean images/s and data-wait over the reports after the first (which holds start-up)."""
    rows = [r for r in reports if "images_per_s" in r and r.get("step", 0) > 0][1:]
    if not rows:
        raise RuntimeError("too few reports to measure a steady state; raise the step count")
    return {"images_per_s": float(np.mean([r["images_per_s"] for r in rows])),
            "data_wait_fraction": float(np.mean([r["data_wait_fraction"] for r in rows])), "reports": len(rows)}


def _store_rows(store_dir: str, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    table = pq.ParquetDataset([str(s) for s in ParquetStore(store_dir).shards()]).read(columns=list(columns))
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}


def _preprocessed(cfg: RunConfig, plan: TrainPlan, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    pre, n, step = RowPreprocessor(cfg, plan), len(next(iter(rows.values()))), cfg.data.preprocess_batch_rows
    parts = [pre({k: v[i:i + step] for k, v in rows.items()}) for i in range(0, n, step)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def train_in_memory(cfg: RunConfig, plan: TrainPlan, store_dir: str, root: str) -> list[dict[str, Any]]:
    """The worker's setup and loop on one process over the store's rows, preprocessed beforehand into memory
    (run in a Ray task of its own, `max_calls=1`: the process group and environment die with it)."""
    with socket.socket() as s:  # a free port for the one-process group DeepSpeed expects
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    backend = "nccl" if cfg.train.use_gpu else "gloo"   # as Ray Train's TorchConfig picks for the other side
    dist.init_process_group(backend, rank=0, world_size=1, timeout=timedelta(minutes=5))
    try:
        rows = _preprocessed(cfg, plan, _store_rows(store_dir, plan.columns))
        train(setup(cfg, plan, LocalContext(0, 1, rows, root)))
    finally:
        dist.destroy_process_group()
    return LocalContext.read_reports(root, 0)


def bench_trainer(cfg: RunConfig, work: Path, quick: bool) -> list[Ratio]:
    """(a): Ray Train from a store vs in-memory tensors, same model, step and batch size."""
    steps, every = (64, 16) if quick else (300, 25)
    t = cfg.train
    captions = (steps + every) * t.captions_per_worker  # one epoch: a new epoch restarts the shard's pipeline
    store_cfg = shapes_store_config(cfg, captions)
    store = str(work / "trainer-store")
    generate_to_store(plan_generation(store_cfg, ParquetStore(store)), store)
    run_cfg = derive_config(store_cfg, {"train.num_workers": 1, "train.steps": steps, "train.log_every": every,
                                        "train.checkpoint_every": steps, "train.fail_at_step": None,
                                        "train.resume_from": None})
    plan = plan_run(run_cfg, data_dir=store)
    dataset = training_input(plan.cfg, plan.data, plan.train, None)[0]
    result = fit(run_cfg, plan.train, dataset, work / "trainer-stored" / "train")
    stored = _steady(result.metrics)
    task = ray.remote(num_cpus=run_cfg.train.cpus_per_worker, num_gpus=1 if t.use_gpu else 0, max_calls=1)
    memory = _steady(ray.get(task(train_in_memory).remote(run_cfg, plan.train, store,
                                                          str(work / "trainer-memory"))))
    detail = {"stored": stored, "in_memory": memory, "steps": steps, "images_per_step":
              t.captions_per_worker * plan.train.per_caption * plan.objective.views, "model": t.backbone.model_dump()}
    return [Ratio("a.trainer", "trainer images/s, stored mode / same step on in-memory tensors",
                  stored["images_per_s"] / memory["images_per_s"], TRAINER_GOAL, detail=detail),
            Ratio("a.data_wait", "data-wait fraction of the trainer in stored mode", stored["data_wait_fraction"],
                  DATA_WAIT_GOAL, higher_is_better=False, detail=detail)]


# ------------------------------------------------------------------------------------------- (e)
def plain_multi_positive(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """The multi-positive loss written plainly on one process: the full N x N matrix, the diagonal masked."""
    z = F.normalize(features.float(), dim=-1)
    logits = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    positives = (labels[:, None] == labels[None, :]) & ~eye
    target = positives.float() / positives.sum(1, keepdim=True).clamp(min=1)
    log_p = F.log_softmax(logits, dim=1).masked_fill(eye, 0.0)
    return -(target * log_p).sum(1).mean()


def _time_fwd_bwd(fn, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    x = features.detach().clone().requires_grad_(True)
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = fn(x, labels, 0.1)
    loss.backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, float(loss.detach())


def bench_loss(quick: bool) -> list[Ratio]:
    """(e): synray's multi_positive_contrastive forward+backward / the plain version, alternated, medians."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = 5 if quick else 20
    out = []
    gen = torch.Generator().manual_seed(0)
    for captions, m in LOSS_SHAPES:
        features = torch.randn(captions * m, LOSS_DIM, generator=gen).to(device)
        labels = torch.arange(captions).repeat_interleave(m).to(device)
        ours, plain = [], []
        for i in range(repeats + 1):  # the first pair warms up
            a, loss_ours = _time_fwd_bwd(lambda x, y, t: multi_positive_contrastive(x, y, t, same_size=True),
                                         features, labels)
            b, loss_plain = _time_fwd_bwd(plain_multi_positive, features, labels)
            if i:
                ours.append(a)
                plain.append(b)
        detail = {"ours_s": float(np.median(ours)), "plain_s": float(np.median(plain)), "device": str(device),
                  "loss_ours": loss_ours, "loss_plain": loss_plain, "threads": torch.get_num_threads()}
        out.append(Ratio(f"e.loss_{captions}x{m}", f"multi_positive_contrastive fwd+bwd time / plain full-matrix "
                         f"version, {captions} x {m}", detail["ours_s"] / detail["plain_s"], LOSS_GOAL,
                         higher_is_better=False, detail=detail))
    return out

