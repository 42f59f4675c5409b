"""The shapes world end to end (the suite's shared shapes run, runs.py): template captions -> procedural images with
masks -> SynCLR's objective on 2 DeepSpeed workers reading the stream -> kNN, linear and segmentation probes
against the network at initialisation. The run is `shapes-synclr` shrunk to 6 steps, in plain `stream` mode,
with its last worker killed at step 3; its run directory is in the suite's S3 bucket (test_cloud_storage.py)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from procs import step_events, whole_share
from runs import SHAPES_SETS


def test_the_shapes_run_lowers_its_loss_and_reports_every_probe_on_both_sides(shapes_run):
    summary = shapes_run.summary()
    t = summary["train"]
    assert t["steps"] == 6 and summary["per_caption"] == 4 and not t["ended_early"]
    assert t["final_loss"] < t["first_loss"]   # the objective's loss went down
    ev = summary["eval"]
    assert ev["heldout_rows"] == 36
    for side in ("trained", "init"):
        r = ev[side]
        assert r["num_reference"] + r["num_query"] == 36 * 4 and r["num_classes"] == 9
        assert r["chance"] == pytest.approx(1 / 9)
        assert whole_share(r["knn_accuracy"], r["num_query"]) and whole_share(r["linear_accuracy"], r["num_query"])
        assert r["segmentation_num_classes"] == 10   # background + the 9 shape classes
        assert whole_share(r["segmentation_pixel_accuracy"], r["num_query"] * 32 * 32)   # a share of the query pixels
        present = [v for v in r["segmentation_iou_per_class"] if v is not None]
        assert r["segmentation_miou"] == pytest.approx(sum(present) / len(present), abs=1e-5)
    assert ev["trained"] != ev["init"]


def test_the_summary_holds_stage_rates_rejections_and_trainer_figures(shapes_run):
    summary = shapes_run.summary()
    losses = [r for r in shapes_run.metrics() if "loss" in r]
    for stage in ("plan", "captions", "images"):
        s = summary["stages"][stage]
        assert s["rows"] > 0 and s["rows_per_s"] == pytest.approx(s["rows"] / s["active_s"], rel=1e-2), stage
    assert summary["stages"]["images"]["rows"] >= 6 * 8   # every step's 8 captions were rendered
    assert all(isinstance(n, int) and n > 0 for reasons in summary["rejected"].values() for n in reasons.values())
    t = summary["train"]
    assert (t["first_loss"], t["final_loss"], t["steps"]) == (losses[0]["loss"], losses[-1]["loss"], 6)
    assert t["images_per_s"] == losses[-1]["images_per_s"] and t["worker_failures"] == 1
    steps = [r["step"] for r in losses]   # every train.log_every=2 steps, and at the checkpoints
    assert sorted(set(steps)) == steps and set(steps) == {2, 4, 6}
    # device-hours held while training: 2 workers for the fit's time, each stream pool for it too
    from synray.plan import load_run_config
    from synray.stages import TRAINING_WORKERS

    cfg = load_run_config("shapes-synclr", list(SHAPES_SETS))
    held, fit_h = t["device_hours"], t["elapsed_s"] / 3600
    assert held[TRAINING_WORKERS] == {"CPU": pytest.approx(2 * cfg.train.cpus_per_worker * fit_h, rel=0.02)}
    renderers = next(k for k in held if k.endswith("renderers"))
    assert held[renderers]["CPU"] == pytest.approx(cfg.images.pool_size * cfg.images.num_cpus * fit_h, rel=0.02)
    assert held["total"]["CPU"] == pytest.approx(sum(v["CPU"] for k, v in held.items() if k != "total"), abs=1e-3)


def test_synclr_logs_its_global_local_and_ibot_terms_which_add_up_to_its_loss(shapes_run):
    """Every logged step of the SynCLR run holds the three parts of its loss (averaged over micro-steps and ranks
    like the loss), and loss = global + local + ibot_weight x iBOT; the summary keeps the last step's parts."""
    from synray.plan import load_run_config

    weight = load_run_config("shapes-synclr", list(SHAPES_SETS)).train.synclr.ibot_weight
    losses = [r for r in shapes_run.metrics() if "loss" in r]
    for r in losses:
        assert min(r["loss_global"], r["loss_local"], r["loss_ibot"]) > 0, r
        assert r["loss"] == pytest.approx(r["loss_global"] + r["loss_local"] + weight * r["loss_ibot"], rel=1e-5)
    parts = shapes_run.summary()["train"]["final_loss_parts"]
    assert parts == {k: losses[-1][k] for k in ("loss_global", "loss_local", "loss_ibot")}
    header = shapes_run.read("metrics.csv").decode().splitlines()[0].split(",")
    assert {"loss_global", "loss_local", "loss_ibot"} <= set(header)


def test_the_run_log_opens_with_the_plan_and_samples_show_held_out_captions(shapes_run):
    from synray.plan import load_run_config, plan_run

    cfg = load_run_config("shapes-synclr", [*SHAPES_SETS, f"output_root=s3://{shapes_run.bucket}/runs"])
    described = plan_run(cfg).describe()
    lines = shapes_run.read("run.log").decode().splitlines()[:len(described)]
    assert [line.split(" synray.programs.run: ", 1)[1] for line in lines] == [f"plan: {d}" for d in described]
    with Image.open(io.BytesIO(shapes_run.read("samples.png"))) as im:
        assert im.format == "PNG" and im.size[1] > im.size[0] > 100   # 8 captions, one strip each


def test_a_plain_stream_restarts_from_its_checkpoint_and_trains_no_row_twice(shapes_run, tmp_path: Path):
    """The fault drill in `stream` mode (nothing stored): the last worker dies at step 3, the group restarts from the
    step-2 checkpoint (read back from the bucket) on a new execution of the stream, and the final checkpoint's
    record holds 8 distinct plan rows per step."""
    from synray.data.ledger import load_consumed
    from synray.data.storage import copy_tree

    assert step_events(shapes_run.metrics()) == [2, "worker_failure", 4, 6]
    summary = shapes_run.summary()
    copy_tree(summary["train"]["checkpoint"], tmp_path / "checkpoint")
    consumed = load_consumed(tmp_path / "checkpoint")
    assert len(consumed) == 6 * 8 and consumed.max() < 120 * 2   # plan rows (captions are oversampled)
