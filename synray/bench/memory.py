"""Bench (f): peak object-store memory and peak memory of the stream's reader in stream mode, at N and 4N captions.

The stream is synray's own (planned rows -> captions -> images -> row preprocessing) of the config's
generation setup, read by a training-speed consumer actor through `streaming_split` as a Ray Train worker
reads it. A thread on the driver samples the object stores' bytes in use and the consumer's resident memory
(the rows go there, not through the driver). Bounded streaming means both peaks stay flat when the stream
is 4 times longer: the consumer is slower than the stream, and `data.stream_buffer_mb` caps what Ray Data
holds ahead of it (without a cap, the backlog grows with N up to Ray Data's default share of the object store).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np
import psutil
import ray

from synray.bench.report import Ratio
from synray.config import RunConfig
from synray.plan import derive_config, plan_run
from synray.pipelines import training_input
from synray.programs.session import ObjectStoreProbe
from synray.train.preprocess import ingest_options

__all__ = ["bench_memory"]

GOAL = 1.2
SAMPLE_S = 0.2
#: the quantile of the object-store samples reported as the stream's peak level
PEAK_LEVEL = 0.99
#: the consumer's time per row: slower than the shapes stream on 2 cores, so that the stream backs up behind it
CONSUMER_S_PER_ROW = 0.02
#: data.stream_buffer_mb when the config sets none
BENCH_BUFFER_MB = 4.0
#: object-store bytes in use that count as drained between two measurements, and how long to wait for it
DRAINED_BYTES = 2**20
DRAIN_TIMEOUT_S = 20.0


class PeakSampler:
    """Samples object-store bytes and a process's RSS (`pid`, by default this one) in a thread; keeps the peaks and
    the store's samples.

    `store_level` is the PEAK_LEVEL quantile of the samples: the most the store held for at least 1% of the
    run. A capped stream's use fluctuates by the blocks in flight, and the single highest sample of a run
    4 times longer is higher only because it draws more samples; the level compares like with like.
    """

    def __init__(self, pid: int | None = None) -> None:
        self.probe, self.proc = ObjectStoreProbe(), psutil.Process(pid)
        self.store_before = self.probe.used_bytes()
        self.rss_before = self.proc.memory_info().rss
        self.store_peak = self.rss_peak = 0
        self.store_samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            used = self.probe.used_bytes()
            self.store_samples.append(used)
            self.store_peak = max(self.store_peak, used)
            self.rss_peak = max(self.rss_peak, self.proc.memory_info().rss)
            self._stop.wait(SAMPLE_S)

    @property
    def store_level(self) -> float:
        return float(np.quantile(self.store_samples, PEAK_LEVEL)) if self.store_samples else 0.0

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


@ray.remote(num_cpus=0.5)
class Consumer:
    """Reads a training shard as a worker does (tensor batches of fixed size) at a training-like pace."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, shard: Any, rows: int, s_per_row: float = CONSUMER_S_PER_ROW) -> int:
        seen = 0
        for batch in shard.iter_torch_batches(batch_size=rows, drop_last=True, prefetch_batches=2):
            n = len(next(iter(batch.values())))
            time.sleep(s_per_row * n)
            seen += n
        return seen


def wait_for_store_to_drain(probe: ObjectStoreProbe, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Wait (up to timeout_s) until the blocks of a previous measurement are freed, so peaks do not add up."""
    deadline = time.monotonic() + timeout_s
    while probe.used_bytes() > DRAINED_BYTES and time.monotonic() < deadline:
        time.sleep(SAMPLE_S)


def stream_peaks(cfg: RunConfig, captions: int, s_per_row: float = CONSUMER_S_PER_ROW) -> dict[str, Any]:
    run_cfg = derive_config(cfg, {"data.num_captions": captions, "data.mode": "stream", "data.store_dir": None,
                                  "train.num_workers": 1, "eval.enabled": False})
    plan = plan_run(run_cfg)
    ds, _ = training_input(plan.cfg, plan.data, plan.train, None)
    ds.context.execution_options = ingest_options(run_cfg.data)  # as Ray Train's DataConfig sets it
    wait_for_store_to_drain(ObjectStoreProbe())
    consumer = Consumer.remote()
    pid = ray.get(consumer.pid.remote())   # the consumer's process, on this node (a local Ray)
    start = time.perf_counter()
    with PeakSampler(pid) as peaks:
        seen = ray.get(consumer.run.remote(ds.streaming_split(1, equal=True)[0], run_cfg.train.captions_per_worker,
                                           s_per_row))
    ray.kill(consumer)
    return {"captions": captions, "rows_seen": seen, "elapsed_s": time.perf_counter() - start,
            "store_peak_bytes": peaks.store_peak, "store_level_bytes": peaks.store_level,
            "store_before_bytes": peaks.store_before,
            "consumer_rss_peak_bytes": peaks.rss_peak, "consumer_rss_before_bytes": peaks.rss_before}


def bench_memory(cfg: RunConfig, quick: bool) -> list[Ratio]:
    """(f): peaks at 4N / peaks at N in stream mode, under the config's data.stream_buffer_mb (else
    BENCH_BUFFER_MB), with a consumer slower than the stream."""
    n = 768 if quick else 1024
    buffer_mb = cfg.data.stream_buffer_mb or BENCH_BUFFER_MB
    cfg = derive_config(cfg, {"data.stream_buffer_mb": buffer_mb})
    small, large = stream_peaks(cfg, n), stream_peaks(cfg, 4 * n)
    detail = {"n": small, "4n": large, "stream_buffer_mb": buffer_mb, "consumer_s_per_row": CONSUMER_S_PER_ROW}
    return [Ratio("f.object_store", f"peak object-store level (p99 of samples) in stream mode, {4 * n} / {n} "
                  "captions", large["store_level_bytes"] / max(1, small["store_level_bytes"]), GOAL,
                  higher_is_better=False, detail=detail),
            Ratio("f.consumer_memory", f"peak RSS of the stream's reader in stream mode, {4 * n} / {n} captions",
                  large["consumer_rss_peak_bytes"] / max(1, small["consumer_rss_peak_bytes"]), GOAL,
                  higher_is_better=False, detail=detail)]
