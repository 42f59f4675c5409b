"""Experiment tracking against real backends: an `mlflow server` started on 127.0.0.1 (conftest's `mlflow_server`)
that the suite's shapes run and sweep drill log to, read back through MLflow's client; TensorBoard event files of the
stored runs read back with the tensorboard package's reader; offline W&B runs read back from their `.wandb` files
with W&B's own record format (tests/wandb_records.py); an unreachable server refused before anything starts,
and one that goes away mid-run caught up once it is back."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from procs import cli, free_port


def client(url: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url)


def history(c, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))


def artifacts(c, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in c.list_artifacts(run_id, path)}


# ----------------------------------------------------------------------------------- the config
@pytest.mark.parametrize("override, needle", [
    ("tracking.backend=neptune",
     "tracking.backend: \"neptune\" is not allowed: must be one of 'none', 'mlflow', 'tensorboard' or 'wandb'"),
    ("tracking.uri=http://me:secret@host:5000", "holds credentials; give the tracking server's token"),
    ("tracking.uri=http://host:5000", "tracking.uri=http://host:5000 with tracking.backend=none"),
])
def test_a_bad_tracking_section_is_refused_naming_the_key(override: str, needle: str):
    from synray.config import ConfigError
    from synray.plan import load_run_config

    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_run_config("shapes", [override])


def test_a_tensorboard_server_address_is_refused_by_the_plan():
    from synray.plan import load_run_config
    from synray.tracking import TrackerError, check_tracking

    cfg = load_run_config("shapes", ["tracking.backend=tensorboard", "tracking.uri=http://host:6006"])
    with pytest.raises(TrackerError, match="TensorBoard writes event files to a folder"):
        check_tracking(cfg.tracking, cfg.output_root)


def test_an_unreachable_tracking_server_is_refused_by_plan_and_run_before_ray_or_a_run_directory(tmp_path: Path):
    dead = f"http://127.0.0.1:{free_port()}"
    args = ("shapes", "--set", "tracking.backend=mlflow", "--set", f"tracking.uri={dead}", "--set",
            f"output_root={tmp_path}")
    plan = subprocess.run(cli("plan", *args), capture_output=True, text=True, timeout=120)
    assert plan.returncode == 2 and f"refused: tracking.uri={dead}: the MLflow tracking server did not answer" \
        in plan.stdout, plan.stdout[-2000:]
    run = subprocess.run(cli("run", *args), capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert run.returncode == 2 and "the MLflow tracking server did not answer" in run.stderr, run.stderr[-2000:]
    assert "Started a local Ray instance" not in run.stderr and not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------- resilience
def test_a_server_lost_mid_run_costs_no_call_and_stops_nothing(mlflow_server):
    """Calls made while the server is down are kept (the caller goes on at once), sent in order once it is back,
    and the run's history then holds every point; a call the server refuses is dropped, not retried."""
    from synray.config import TrackingConfig
    from synray.tracking import Buffered, MlflowTracker

    cfg = TrackingConfig(backend="mlflow", uri=mlflow_server.url, retry_s=0.5, timeout_s=2)
    ref = MlflowTracker.start(cfg, "unused", "resilience", "lost-server", {})
    run = Buffered(MlflowTracker(ref))
    run.log_params({"train.lr": "0.1"})
    run.log_params({"train.lr": "0.2"})            # refused by the server (a changed value): dropped, not retried
    run.log_metrics({"train/loss": 3.0}, 1)
    assert not run.pending and run.failures == 0
    mlflow_server.stop()
    try:
        started = time.monotonic()
        for step in (2, 3, 4):
            run.log_metrics({"train/loss": 3.0 - step / 10}, step)
        assert time.monotonic() - started < 10 and len(run.pending) == 3 and run.failures == 1
    finally:
        mlflow_server.start()
    time.sleep(0.6)
    assert run.flush() and not run.pending
    run.close()
    c = client(mlflow_server.url)
    assert history(c, ref.run_id, "train/loss") == [(1, 3.0), (2, 2.8), (3, 2.7), (4, 2.6)]
    assert c.get_run(ref.run_id).info.status == "FINISHED" and c.get_run(ref.run_id).data.params == {"train.lr": "0.1"}


# ----------------------------------------------------------------------------------- the shapes run
def test_the_shapes_run_is_in_mlflow_with_its_config_every_log_step_its_files_and_its_backbone(shapes_run,
                                                                                                 mlflow_server):
    from conftest import TRACKING_TOKEN

    from synray.plan import load_run_config
    from runs import SHAPES_SETS

    c = client(mlflow_server.url)
    exp = c.get_experiment_by_name("shapes-synclr")
    (run,) = [r for r in c.search_runs([exp.experiment_id]) if r.info.run_name == shapes_run.name]
    assert run.info.status == "FINISHED"
    # the resolved config as parameters, flattened
    cfg = load_run_config("shapes-synclr", list(SHAPES_SETS))
    params = run.data.params
    assert params["train.steps"] == "6" and params["train.loss"] == "synclr"
    assert params["train.backbone.size"] == "tiny" and params["seed"] == str(cfg.seed)
    # one point per log step, equal to the run's own metrics log (its reports, one line each)
    reports = [r for r in shapes_run.metrics() if "loss" in r]
    for key in ("loss", "lr", "world_size", "data_wait_fraction", "loss_ibot"):
        assert history(c, run.info.run_id, f"train/{key}") == sorted((r["step"], r[key]) for r in reports), key
    summary = shapes_run.summary()
    assert run.data.metrics["eval/trained/knn_accuracy"] == pytest.approx(summary["eval"]["trained"]["knn_accuracy"])
    assert run.data.metrics["stages/images/rows"] == summary["stages"]["images"]["rows"]
    assert run.data.metrics["device_hours/total/CPU"] == pytest.approx(summary["train"]["device_hours"]["total"]["CPU"])
    # the run's files and the exported backbone, registered as a model version
    assert {"summary.json", "config.yaml", "loss_curve.png", "samples.png", "backbone"} <= artifacts(c, run.info.run_id)
    assert any(p.endswith(".safetensors") for p in artifacts(c, run.info.run_id, "backbone"))
    versions = c.search_model_versions("name='synray-shapes-synclr'")
    assert any(v.run_id == run.info.run_id for v in versions)
    saved = json.loads(Path(c.download_artifacts(run.info.run_id, "summary.json")).read_text())
    assert saved["train"]["steps"] == 6
    # provenance as tags
    tags = run.data.tags
    assert tags["synray.config"] == "shapes-synclr" and tags["synray.mode"] == "stream"
    assert len(tags["synray.store_fingerprint"]) == 16 and tags["synray.run_dir"] == shapes_run.uri
    # the server's token (from the environment) is in no parameter, tag or file of the run
    texts = [*params.values(), *params.keys(), *tags.values()]
    for name in ("summary.json", "config.yaml"):
        texts.append(Path(c.download_artifacts(run.info.run_id, name)).read_text())
    assert TRACKING_TOKEN and not any(TRACKING_TOKEN in t for t in texts)


# ----------------------------------------------------------------------------------- the sweep
def test_each_trial_of_the_sweep_is_a_child_of_the_sweeps_run_which_holds_the_report(sweep_drill, mlflow_server):
    c = client(mlflow_server.url)
    exp = c.get_experiment_by_name("scaling-local")
    runs = c.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("synray.sweep") == str(sweep_drill["out"])]
    assert parent.info.status == "FINISHED"                   # ended by the resumed sweep, which found it again
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    lrs = {float(r.data.tags["synray.param.train.lr"]) for r in children}
    assert lrs == {1e-9, 0.003, 1e-8}
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert len(finished) >= 2
    for r in finished:
        assert [s for s, _ in history(c, r.info.run_id, "train/loss")] == [1, 2, 3, 4]
        assert r.data.params["train.lr"] == r.data.tags["synray.param.train.lr"]
        assert "trial.json" in artifacts(c, r.info.run_id)
    report = artifacts(c, parent.info.run_id, "report")
    assert any(p.endswith("results.csv") for p in report), report


# ----------------------------------------------------------------------------------- TensorBoard
def test_the_stored_runs_tensorboard_events_hold_every_report_of_both_attempts(stored_runs):
    """The failed attempt and the resubmitted one log to one TensorBoard run (the run directory's), read back with
    TensorBoard's own reader: every report of the metrics log, the config as text, the loss curve as an image."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = stored_runs.run_dir
    events = EventAccumulator(str(run_dir.parent / "tensorboard" / "local" / run_dir.name),
                              size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    reports = [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = sorted((r["step"], pytest.approx(r["loss"])) for r in reports if "loss" in r)
    assert sorted((e.step, e.value) for e in events.Scalars("train/loss")) == losses
    assert {e.step for e in events.Scalars("train/world_size")} == {s for s, _ in losses}
    tags = events.Tags()
    assert "loss_curve.png" in tags["images"] and "config/text_summary" in tags["tensors"], tags
    assert (run_dir.parent / "tensorboard" / "local" / run_dir.name / "artifacts" / "summary.json").is_file()


def test_a_continued_run_logs_to_the_same_tracked_run_unless_its_config_names_another_tracker(tmp_path: Path):
    """The run directory keeps its tracked run (tracking.json): a resubmitted run goes on in it; a config that now
    names another backend starts a run there instead."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from synray.plan import load_run_config
    from synray.programs.tracked import tracked_run

    saved = tmp_path / "tracking.json"
    board = load_run_config("shapes", ["tracking.backend=tensorboard", f"output_root={tmp_path}"])
    for name, step in (("first", 1), ("second", 2)):
        with tracked_run(board, name, {}, saved=saved) as run:
            run.log_metrics({"train/loss": 1.0 / step}, step)
    assert json.loads(saved.read_text())["run_id"] == "shapes/first"
    events = EventAccumulator(str(tmp_path / "tensorboard" / "shapes" / "first"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert not (tmp_path / "tensorboard" / "shapes" / "second").exists()
    other = load_run_config("shapes", ["tracking.backend=mlflow", f"output_root={tmp_path}"])
    with tracked_run(other, "third", {}, saved=saved) as run:
        run.log_metrics({"train/loss": 0.25}, 3)
    ref = json.loads(saved.read_text())
    assert ref["backend"] == "mlflow" and ref["where"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert history(client(ref["where"]), ref["run_id"], "train/loss") == [(3, 0.25)]


# ----------------------------------------------------------------------------------- W&B
def test_a_wandb_offline_run_holds_its_config_every_step_its_files_and_the_backbone_as_a_model(tmp_path: Path,
                                                                                                monkeypatch):
    """An offline W&B run (the default without tracking.uri) read back from its `.wandb` file: the config as its
    config, each log step a history row plotted against `step`, the run's files, the backbone as a `model`
    artifact; a continued run (tracking.json) logs to the same run id from a second folder, whose steps go on; a
    failed body ends the run with exit code 1; a sweep trial is grouped under its sweep's run; W&B's key is in no
    file."""
    from wandb_records import offline_runs, read_run

    from synray.plan import load_run_config
    from synray.programs.tracked import log_outcome, tracked_run

    monkeypatch.setenv("WANDB_API_KEY", "canary-key-0123456789abcdef0123456789abcdef")
    cfg = load_run_config("shapes", ["tracking.backend=wandb", f"output_root={tmp_path}",
                                     "tracking.tags={team: vision}"])
    run_dir, saved = tmp_path / "shapes-1", tmp_path / "tracking.json"
    (run_dir / "backbone").mkdir(parents=True)
    (run_dir / "backbone" / "model.safetensors").write_bytes(b"weights")
    summary = {"eval": {"trained": {"knn_top1": 0.5, "note": "text"}}, "train": {"steps": 3}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    with tracked_run(cfg, run_dir.name, {"synray.config": "shapes"}, saved=saved) as run:
        for step in (1, 2, 3):
            run.log_metrics({"train/loss": 1.0 / step}, step)
        log_outcome(run, run_dir, summary, 3, str(run_dir / "backbone"), "synray-shapes")
    ref = json.loads(saved.read_text())
    assert ref["backend"] == "wandb" and ref["where"] == str(tmp_path) and ref["experiment"] == "shapes"
    (first,) = offline_runs(tmp_path, ref["run_id"])
    got = read_run(first)
    assert (got.run.run_id, got.run.project, got.run.display_name) == (ref["run_id"], "shapes", "shapes-1")
    assert got.config["train.steps"] == str(cfg.train.steps) and got.config["tag.team"] == "vision"
    assert got.config["tag.synray.config"] == "shapes"
    rows = [(r["step"], r["train/loss"]) for r in got.history if "train/loss" in r]
    assert rows == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [r["step"] for r in got.history if "eval/trained/knn_top1" in r] == [3]
    assert got.summary["eval/trained/knn_top1"] == 0.5 and got.summary["train/summary/steps"] == 3
    assert {"summary.json", "backbone/model.safetensors"} <= set(got.files) and got.exit_code == 0
    (model,) = got.artifacts
    assert (model.name, model.type, [c.path for c in model.manifest.contents]) == \
        ("synray-shapes", "model", ["model.safetensors"])
    # continued: the same run id; failed: exit code 1
    with pytest.raises(RuntimeError, match="the body failed"):
        with tracked_run(cfg, "ignored", {}, saved=saved) as run:
            run.log_metrics({"train/loss": 0.2}, 4)
            raise RuntimeError("the body failed")
    assert json.loads(saved.read_text())["run_id"] == ref["run_id"]
    first, second = offline_runs(tmp_path, ref["run_id"])
    again = read_run(second)
    assert again.run.run_id == ref["run_id"] and [r["step"] for r in again.history] == [4] and again.exit_code == 1
    # a sweep's trial: a run of its own in the sweep's group
    from synray.tracking import RunRef

    sweep = tmp_path / "sweep.json"
    with tracked_run(cfg, "sweep-a", {}, saved=sweep) as parent:
        parent.log_metrics({"sweep/best": 0.1}, 0)
    with tracked_run(cfg, "trial-0", {}, RunRef(**json.loads(sweep.read_text()))) as trial:
        trial.log_metrics({"train/loss": 0.3}, 1)
    sweep_id = json.loads(sweep.read_text())["run_id"]
    (trial_dir,) = {p.parent for p in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")} - \
        {*offline_runs(tmp_path, ref["run_id"]), *offline_runs(tmp_path, sweep_id)}
    child, parent_run = read_run(trial_dir), read_run(offline_runs(tmp_path, sweep_id)[0])
    assert (child.run.run_group, child.run.job_type, child.run.display_name) == (sweep_id, "trial", "trial-0")
    assert (parent_run.run.run_group, parent_run.run.job_type) == (sweep_id, "run")
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and b"canary-key" in p.read_bytes()]
    assert leaked == []


def test_wandb_online_needs_its_key_in_the_environment_and_a_server_that_answers(tmp_path: Path, monkeypatch):
    from synray.plan import load_run_config
    from synray.tracking import TrackerError, check_tracking

    dead = f"http://127.0.0.1:{free_port()}"
    cfg = load_run_config("shapes", ["tracking.backend=wandb", f"tracking.uri={dead}"])
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(TrackerError, match=f"tracking.uri={dead}: set WANDB_API_KEY in the job's environment"):
        check_tracking(cfg.tracking, str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    with pytest.raises(TrackerError, match=f"tracking.uri={dead}: the W&B server did not answer"):
        check_tracking(cfg.tracking, str(tmp_path))
    bucket = load_run_config("shapes", ["tracking.backend=wandb", "tracking.uri=s3://bucket/wandb"])
    with pytest.raises(TrackerError, match="W&B takes a server's address"):
        check_tracking(bucket.tracking, str(tmp_path))
    offline = load_run_config("shapes", ["tracking.backend=wandb"])
    with pytest.raises(TrackerError, match="offline W&B runs need a local folder"):
        check_tracking(offline.tracking, "s3://bucket/runs")
    assert check_tracking(offline.tracking, str(tmp_path / "runs")) == str(tmp_path / "runs")
