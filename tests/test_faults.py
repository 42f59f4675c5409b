"""Fault injection on the real pipeline: processes killed by pid in the middle of their work, then what survived.

The generate drill (the suite's generated store, runs.py) kills a vLLM engine actor and a diffusion actor while
each runs a batch, then the driver; the stream drill (runs.py) kills a training worker and then the driver of
`synray run` in stream+store mode, and submits the same run as a job to another Ray cluster. Each test checks the
store and the training log afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import small_config
from procs import metrics_log, stored_rows
from runs import (ENGINE, GENERATED_ROWS, RENDERER, STREAM_EVERY, STREAM_REPLAY, STREAM_ROWS_PER_STEP,
                  STREAM_STEPS)


# ------------------------------------------------------------------------------------ fast
def test_an_unfinished_run_of_the_same_config_is_continued(tmp_path: Path):
    from synray.programs.rundir import RunDir

    cfg = small_config(f"output_root={tmp_path}")
    first = RunDir.create(cfg)
    assert RunDir.unfinished(cfg) is None            # nothing trained yet
    (first.path / "train").mkdir()
    assert RunDir.unfinished(cfg).path == first.path  # trained, no summary: its driver died
    other = small_config(f"output_root={tmp_path}", "train.steps=5")
    assert RunDir.unfinished(other) is None           # another config never continues it
    first.write_summary({"done": True})
    assert RunDir.unfinished(cfg) is None             # finished


# ------------------------------------------------------------------------ the generate drill
def test_killed_engine_and_diffusion_actors_were_restarted_and_the_killed_driver_left_whole_shards(generated_store):
    """The engine actor and the diffusion actor were each killed while running a batch and came back under a new
    pid; the driver died in the middle of the work, leaving only whole shards (4 rows each)."""
    for actor in (ENGINE, RENDERER):
        assert generated_store.restarted[actor] != generated_store.killed[actor], actor
        assert not generated_store.tasks[actor].endswith("__init__"), generated_store.tasks   # busy, not starting
    assert 0 < generated_store.rows_before < GENERATED_ROWS, "the driver was to die in the middle of the work"
    assert generated_store.summary["rows_before"] == generated_store.rows_before


def test_every_caption_id_is_stored_once_across_the_kills(generated_store):
    ids = [r["caption_id"] for r in stored_rows(generated_store.store, ["caption_id"])]
    assert len(ids) == GENERATED_ROWS and len(set(ids)) == GENERATED_ROWS


def test_rows_from_both_sides_of_every_kill_regenerate_from_their_provenance(generated_store, vllm_engine):
    """Every caption comes back from its row's prompt, seed and sampling through a vLLM engine of its own (not the
    batches it was generated in), and a sample of rows renders its images again byte for byte."""
    from synray.captions.cleanup import clean_caption
    from synray.generation.regenerate import regenerate_caption, regenerate_images

    rows = stored_rows(generated_store.store)
    cleanup = generated_store.cfg.captions.cleanup
    again = [clean_caption(regenerate_caption(row, vllm_engine), cleanup)[0] for row in rows]
    assert again == [row["caption"] for row in rows]
    for row in rows[::8]:
        assert regenerate_images(row) == list(row["images"])


# -------------------------------------------------------------------------- the stream drill
def test_the_resubmitted_job_continues_the_unfinished_run_and_the_stream_ends_before_the_budget(stream_drill):
    """The pipeline job submitted with `ray job submit` continues the run its killed driver left unfinished (the
    run directory and the store are where the job finds them), until the stream of 60 captions runs out."""
    job = stream_drill.job
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    assert f"continuing the unfinished run {stream_drill.run_dir}" in job.stdout + job.stderr
    t = json.loads((stream_drill.run_dir / "summary.json").read_text())["train"]
    log = metrics_log(stream_drill.run_dir)
    (job_start,) = [i for i, r in enumerate(log) if r.get("event") == "fit_start"][1:]   # the job's fit
    killed_at = max(r["step"] for r in log[:job_start] if "loss" in r)   # where the killed driver's run got
    assert 5 <= killed_at < t["steps"], (killed_at, t["steps"])   # the job trained steps the killed run had not
    assert t["ended_early"] and t["steps"] < STREAM_STEPS and t["worker_failures"] >= 1


def test_after_each_failure_the_steps_go_on_from_the_last_checkpoint_before_it(stream_drill):
    log = metrics_log(stream_drill.run_dir)
    cuts = [i for i, r in enumerate(log) if r.get("event") == "worker_failure"]
    cuts += [i for i, r in enumerate(log) if r.get("event") == "fit_start"][1:]   # the driver's restart
    assert len(cuts) >= 2
    for cut in cuts:
        before = [r["step"] for r in log[:cut] if "loss" in r]
        after = next(r["step"] for r in log[cut + 1:] if "loss" in r)
        resumed = after - 1
        # a step's record is written after its checkpoint is registered: a driver killed in between leaves a
        # checkpoint one step past the last record, which the restart rightly resumes from
        assert resumed % STREAM_EVERY == 0 and resumed <= before[-1] + 1, (before, after)
        assert before[-1] - resumed < STREAM_EVERY, "resumed from the last checkpoint, not an older one"


def test_each_stored_row_is_trained_on_once_and_every_trained_row_is_stored_once(stream_drill):
    """Across a killed worker, a killed driver and the resubmitted job, each row used up to twice: the final
    checkpoint's record of trained rows holds one entry per first use of a row (none used anew after a restart),
    all of them stored rows, and the store holds each caption id once and every row trained on, but for a last
    partial batch; the summary's uses per row are the steps' rows over the rows trained."""
    from synray.data.ledger import load_consumed
    from synray.generation.regenerate import regenerate_images

    t = json.loads((stream_drill.run_dir / "summary.json").read_text())["train"]
    consumed = set(load_consumed(Path(t["checkpoint"])).tolist())
    assert len(consumed) == t["rows_trained"], "a row trained before a checkpoint was first used again"
    assert t["uses_per_row"] == pytest.approx(t["steps"] * STREAM_ROWS_PER_STEP / len(consumed))
    assert 1.2 < t["uses_per_row"] <= STREAM_REPLAY
    rows = stored_rows(stream_drill.store)
    ids = [r["caption_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a caption id stored twice"
    stored = {r["row_id"] for r in rows}
    assert consumed <= stored, "trained on a row the store does not hold"
    assert len(stored - consumed) < STREAM_ROWS_PER_STEP, "a stored row was never trained on"
    for row in rows[::6]:
        assert regenerate_images(row) == list(row["images"])


def _shown_rate(lines: list[str], stage: str, source: str) -> float:
    """The per-actor rate `synray plan` prints for a stage, after checking where it says it came from."""
    import re

    (line,) = [x for x in lines if x.strip().startswith(f"{stage}:") and "rows/s" in x]
    assert source in line, line
    return float(re.search(r": \d+ x ([\d.,e+-]+) =", line).group(1).replace(",", ""))


def test_synray_plan_takes_the_rates_a_run_and_a_store_measured(stream_drill, generated_store):
    """`synray plan --rates DIR`: the training workers' rate is a run's images/s with the data wait taken out, per
    worker and per row (stablerep: 2 images, one view each); the renderers' rate is a generated store's rows per
    busy second of its image stage."""
    from synray.plan import load_run_config
    from synray.programs.planview import plan_view

    t = json.loads((stream_drill.run_dir / "summary.json").read_text())["train"]
    images = json.loads((generated_store.store / "_summary.json").read_text())["stages"]["images"]
    cfg = load_run_config("local", ["captions.backend=template", "captions.style=concept_background"])  # the drill's
    run = plan_view(cfg, None, None, rates_from=str(stream_drill.run_dir)).lines
    want = t["images_per_s"] / (1 - t["data_wait_fraction"]) / 2 / 2
    assert _shown_rate(run, "training workers", f"measured by {stream_drill.run_dir}") == pytest.approx(want, rel=5e-3)
    store = plan_view(cfg, None, None, rates_from=str(generated_store.store)).lines
    want = images["rows"] / images["busy_s"]
    assert _shown_rate(store, "diffusers renderers", f"measured by {generated_store.store}") == pytest.approx(
        want, rel=5e-3)
