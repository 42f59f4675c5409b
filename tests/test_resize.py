"""A checkpoint written by a group of 2 workers resumes in a group of 1 and of 3 (what Ray Train does to an elastic
run whose nodes come and go): the same weights and Adam state of every parameter, the same step, learning rate and
schedule; each step trains the configured 12 rows at every size; no row of the stream is trained twice or skipped.
Real DeepSpeed (ZeRO-1) on gloo processes, its universal checkpoint in between."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
import torch.multiprocessing as mp

import resize_harness as harness
from procs import free_port

SIZES = (1, 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """The first group (2 workers), then a group of each of SIZES from a copy of its checkpoints."""
    root = tmp_path_factory.mktemp("resize")

    def group(phase: str, world: int) -> list[dict[str, Any]]:
        mp.spawn(harness.run, args=(world, phase, free_port(), str(root)), nprocs=world, join=True)
        return [json.loads((root / f"{phase}-rank{r}.json").read_text()) for r in range(world)]

    out = {"first": group("first", 2)}
    for world in SIZES:
        shutil.copytree(root / "first", root / f"resumed{world}")
        out[f"resumed{world}"] = group(f"resumed{world}", world)
    return out


def logged(rank: dict[str, Any]) -> list[tuple[int, int]]:
    """(step, world size) of each training report (a resumed group's log continues the copied one)."""
    return [(r["step"], r["world_size"]) for r in rank["reports"] if "loss" in r and not r.get("ended_early")]


def test_the_first_group_trains_4_steps_of_12_rows_on_2_workers(runs):
    first = runs["first"][0]
    assert (first["rows_per_batch"], first["grad_accum"]) == (3, 2)   # 3 rows x 2 workers x 2 micro-steps
    assert first["final_step"] == 4 and logged(first) == [(1, 2), (2, 2), (3, 2), (4, 2)]


@pytest.mark.parametrize("world", SIZES)
def test_a_resized_group_restores_every_parameters_weights_and_adam_state(runs, world):
    first = runs["first"]
    for rank in runs[f"resumed{world}"]:
        assert rank["start_step"] == 4
        assert rank["restored"] == first[0]["final"]       # fp32 weights, exp_avg, exp_avg_sq of every parameter
        assert rank["adam_steps"] == first[0]["final_adam_steps"] == [4.0]
        assert rank["lr"] == first[0]["final_lr"] and rank["scheduler_steps"] == first[0]["final_scheduler_steps"] == 4


@pytest.mark.parametrize("world, split", [(1, (4, 3)), (3, (4, 1))])
def test_a_resized_group_trains_the_same_step_and_reports_continuous_steps(runs, world, split):
    ranks = runs[f"resumed{world}"]
    assert (ranks[0]["rows_per_batch"], ranks[0]["grad_accum"]) == split   # rows x workers x micro-steps = 12
    assert split[0] * world * split[1] == 12
    assert logged(ranks[0]) == [(step, 2 if step <= 4 else world) for step in range(1, 10)]
    assert ranks[0]["final_step"] == 9
    assert ranks[0]["final"] != ranks[0]["restored"]   # it trained


@pytest.mark.parametrize("world", SIZES)
def test_each_row_of_the_stream_is_trained_once_across_the_resize(runs, world):
    before = [row for rank in runs["first"] for batch in rank["trained"] for row in batch]
    after = [row for rank in runs[f"resumed{world}"] for batch in rank["trained"] for row in batch]
    assert len(before) == 4 * 12 and len(after) == 5 * 12
    assert sorted(before + after) == list(range(harness.POOL))
