"""Bounded streaming: with a slow consumer, the object store and the driver hold as much at 4N captions as at N."""

from __future__ import annotations

import pytest
import ray

pytestmark = pytest.mark.slow

#: captions of the short stream; the long one has 4 times as many
N = 256
#: Ray Data's object-store budget for the test, so that the short stream already fills it behind the slow consumer
BUDGET_BYTES = 4 * 2**20
#: growth below this counts as this much (the driver's RSS moves by a few MiB on its own)
FLOOR_BYTES = {"store": 2**20, "driver_rss": 16 * 2**20}


def test_stream_memory_stays_flat_when_the_stream_is_4x_longer(ray_cluster: str):
    from ray.data import DataContext, ExecutionResources

    from synray.bench.memory import stream_peaks
    from synray.plan import load_run_config

    cfg = load_run_config("shapes", ["train.captions_per_worker=8"])
    ctx = DataContext.get_current()
    old = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = ExecutionResources(object_store_memory=BUDGET_BYTES)
    try:
        short, long = stream_peaks(cfg, N), stream_peaks(cfg, 4 * N)
    finally:
        ctx.execution_options.resource_limits = old
    assert long["rows_seen"] >= 3.5 * short["rows_seen"] > 0   # the long stream really went through

    def growth(r: dict, key: str) -> int:
        return max(r[f"{key}_peak_bytes"] - r[f"{key}_before_bytes"], FLOOR_BYTES[key])

    print({k: (growth(short, k), growth(long, k)) for k in ("store", "driver_rss")})
    assert growth(long, "store") <= 1.2 * growth(short, "store")
    assert growth(long, "driver_rss") <= 1.2 * growth(short, "driver_rss")
