"""`synray bench`: ratios and goals, the plain reference loss, the simulated splits, the memory probe, the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from synray.bench.cluster import SPLITS
from synray.bench.report import BenchReport, Ratio
from synray.bench.training import plain_multi_positive
from synray.train.losses import multi_positive_contrastive


def test_a_ratio_holds_against_its_goal_in_its_direction():
    assert Ratio("x", "faster", 0.95, 0.9).holds and not Ratio("x", "faster", 0.85, 0.9).holds
    assert Ratio("y", "memory", 1.1, 1.2, higher_is_better=False).holds
    assert not Ratio("y", "memory", 1.3, 1.2, higher_is_better=False).holds


def test_report_table_and_json_carry_every_ratio_and_skip(tmp_path: Path):
    report = BenchReport("quick", None, [Ratio("a.x", "one", 1.5, 1.0), Ratio("e.y", "two", 2.0, 1.0, False)],
                         skipped={"c": "no LLM"})
    table = report.table()
    assert "| a.x | one | 1.500 | >= 1 | yes |" in table and "| e.y | two | 2.000 | <= 1 | no |" in table
    assert "| c | skipped: no LLM |" in table
    saved = json.loads(report.write(tmp_path / "bench.json").read_text())
    assert [r["holds"] for r in saved["ratios"]] == [True, False] and saved["machine"]["cpu_cores"] >= 1


def test_the_plain_reference_loss_equals_multi_positive_contrastive():
    features = torch.randn(24, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(6).repeat_interleave(4)
    a, b = features.clone().requires_grad_(True), features.clone().requires_grad_(True)
    ours, plain = multi_positive_contrastive(a, labels, 0.1, same_size=True), plain_multi_positive(b, labels, 0.1)
    ours.backward()
    plain.backward()
    assert torch.allclose(ours, plain, atol=1e-5) and torch.allclose(a.grad, b.grad, atol=1e-6)


def test_an_anchor_without_positive_contributes_zero_in_both_losses():
    features = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 0, 1, 1, 2])  # the last anchor has no positive
    ours = multi_positive_contrastive(features, labels, 0.1)
    assert torch.allclose(ours, plain_multi_positive(features, labels, 0.1), atol=1e-5)
    assert torch.isfinite(ours)


@pytest.mark.parametrize("split", SPLITS, ids=[s.name for s in SPLITS])
def test_each_split_is_bound_where_it_says_and_alone_keeps_one_cost(split):
    slowest = min(split.stages, key=lambda s: s.capacity)
    assert (slowest.name == "train") == (split.name == "training-bound")
    alone = split.only(slowest.name)
    assert [s.seconds_per_row() > 0 for s in alone.stages] == [s.name == slowest.name for s in alone.stages]
    assert [s.actors for s in alone.stages] == [s.actors for s in split.stages]


def test_peak_sampler_sees_an_object_put_in_the_store_and_a_process_growing(ray_cluster: str):
    import ray

    from synray.bench.memory import PeakSampler

    @ray.remote(num_cpus=0)
    class Holder:
        def pid(self) -> int:
            import os

            return os.getpid()

        def grow(self, mib: int) -> int:
            self.data = np.ones(mib * 2**20, dtype=np.uint8)   # touched pages: resident memory
            return int(self.data.sum())

    holder = Holder.remote()
    with PeakSampler(ray.get(holder.pid.remote())) as peaks:
        ref = ray.put(np.ones(16 * 2**20, dtype=np.uint8))
        ray.get(holder.grow.remote(64))
        time.sleep(1.0)
        del ref
    ray.kill(holder)
    assert peaks.store_peak >= 16 * 2**20
    assert peaks.rss_peak - peaks.rss_before >= 48 * 2**20   # the watched process's growth, not this one's


def test_stream_memory_at_4n_captions_stays_within_1_2x_of_n_with_a_slow_consumer(ray_cluster: str):
    """The shapes stream capped at 2 MiB (about 200 rows; the shapes config's own 4 MiB is bench (f)'s) read by a
    consumer slower than the stream, at 384 and 1536 captions: the object store's level and the consumer's resident
    memory (where the rows go) stay flat."""
    from synray.bench.memory import stream_peaks
    from synray.plan import load_run_config

    # the consumer (50 rows/s) is slower than the stream, so without a bound the backlog grows with N
    cfg = load_run_config("shapes", ["data.stream_buffer_mb=2"])
    small, large = stream_peaks(cfg, 384, s_per_row=0.02), stream_peaks(cfg, 1536, s_per_row=0.02)
    assert (small["rows_seen"], large["rows_seen"]) == (384, 1536)
    assert large["store_level_bytes"] <= 1.2 * small["store_level_bytes"], (small, large)
    assert large["store_peak_bytes"] <= 1.5 * small["store_peak_bytes"], (small, large)  # no single sample runs off
    assert large["consumer_rss_peak_bytes"] <= 1.2 * small["consumer_rss_peak_bytes"], (small, large)


@pytest.mark.slow   # ~8 s: it times both losses at 1024 x 4 for a while
def test_cli_bench_writes_the_loss_ratios(tmp_path: Path):
    from procs import synray_main

    out = tmp_path / "bench.json"
    r = synray_main("bench", "--quick", "--only", "e", "--out", str(out), "--set", "tracking.backend=wandb",
                    "--set", f"output_root={tmp_path}")
    assert r.code == 0, (r.error, r.err[-3000:])
    saved = json.loads(out.read_text())
    assert sorted(x["key"] for x in saved["ratios"]) == ["e.loss_1024x4", "e.loss_256x4"]
    for x in saved["ratios"]:
        d = x["detail"]
        assert abs(d["loss_ours"] - d["loss_plain"]) < 1e-4   # the two losses measured agree
        assert x["value"] == pytest.approx(d["ours_s"] / d["plain_s"], rel=1e-9) and x["goal"] == 1.0
    assert "| e.loss_256x4 |" in r.out and saved["mode"] == "quick" and not saved["skipped"]
    # the table in the tracker (an offline W&B run, read back from its .wandb file): each ratio a metric, the table
    # and bench.json among its files
    from wandb_records import read_run

    (folder,) = (tmp_path / "wandb").glob("offline-run-*")
    tracked = read_run(folder)
    assert tracked.run.project == "bench" and tracked.exit_code == 0
    (row,) = tracked.history
    assert {k: row[k] for k in row if k.startswith("bench/")} == \
        {f"bench/{x['key']}": pytest.approx(x["value"]) for x in saved["ratios"]}
    assert {"bench.json", "bench.md"} <= set(tracked.files)
    assert (folder / "files" / "bench.md").read_text().startswith("`synray bench --quick`")
