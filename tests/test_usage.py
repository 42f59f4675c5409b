"""Device-hours a run held, by stage (`summary.json` train.device_hours): worked out by hand for an elastic group
that shrank and grew back beside a stream's pools, against `synray.programs.usage.device_hours`."""

from __future__ import annotations

import pytest

from synray.stages import EVAL_PHASE, TRAINING_WORKERS, StageResources


def test_an_elastic_group_is_charged_its_reported_size_between_reports_and_pools_the_whole_fit():
    from synray.programs.usage import device_hours

    stages = [StageResources(TRAINING_WORKERS, 16, 4.0, 1.0, min_actors=8),
              StageResources("diffusers renderers", 32, 4.0, 1.0),
              StageResources("row preprocessing", 16, 1.0),
              StageResources("plan row ids", 1, 1.0, tasks=True),               # a task: holds nothing
              StageResources("feature extractors", 4, 1.0, 1.0, phase=EVAL_PHASE)]   # not during the fit
    start = 1_000_000.0
    # 16 workers report at 1 h and 2 h; a node goes: 8 workers report at 2.5 h; 16 again at 4 h; the fit ends at 4.5 h
    reports = [{"time": start + 3600 * h, "world_size": w} for h, w in ((1, 16), (2, 16), (2.5, 8), (4, 16))]
    reports.append({"time": start - 60, "world_size": 16})                  # an earlier fit of a continued run
    got = device_hours(stages, reports, start, start + 4.5 * 3600)
    worker_h = 16 * 1 + 16 * 1 + 8 * 0.5 + 16 * 1.5 + 16 * 0.5             # 68 worker-hours
    assert got[TRAINING_WORKERS] == {"GPU": pytest.approx(worker_h), "CPU": pytest.approx(4 * worker_h)}
    assert got["diffusers renderers"] == {"GPU": pytest.approx(32 * 4.5), "CPU": pytest.approx(128 * 4.5)}
    assert got["row preprocessing"] == {"CPU": pytest.approx(16 * 4.5)}
    assert set(got) == {TRAINING_WORKERS, "diffusers renderers", "row preprocessing", "total"}
    assert got["total"] == {"GPU": pytest.approx(68 + 144), "CPU": pytest.approx(272 + 576 + 72)}


def test_a_fit_with_no_report_is_charged_its_largest_group_for_its_whole_time():
    from synray.programs.usage import device_hours

    got = device_hours([StageResources(TRAINING_WORKERS, 2, 1.0)], [], 0.0, 1800.0)
    assert got[TRAINING_WORKERS] == {"CPU": pytest.approx(1.0)} and got["total"] == {"CPU": pytest.approx(1.0)}


def test_the_docs_spot_and_on_demand_training_prices_follow_from_the_measured_rate_and_the_published_prices():
    """docs/cluster.md prices training per million images seen: 10^6 / (images/s per GPU x 3600) GPU-hours, times an
    8-GPU instance's hourly price / 8; its table's figures are that arithmetic on the figures it quotes."""
    import re

    from procs import ROOT

    text = (ROOT / "docs" / "cluster.md").read_text()
    rate = float(re.search(r"\| ([\d,]+) images/s per GPU \|", text).group(1).replace(",", ""))
    rows = re.findall(r"\| (on demand|spot \(an average\)) \| \$([\d.]+) an hour \| \$([\d.]+) \| \$([\d.]+) \|", text)
    assert [r[0] for r in rows] == ["on demand", "spot (an average)"]
    for _, hourly, per_gpu, per_million in rows:
        assert float(per_gpu) == pytest.approx(float(hourly) / 8, abs=0.005)
        assert float(per_million) == pytest.approx(1e6 / (rate * 3600) * float(hourly) / 8, abs=0.005)
    assert "read 2026-12-07" in text and "published" in text
