"""The built-in `shapes` and `shapes-synclr` configs end to end, shrunk: template captions -> procedural images with
masks -> DeepSpeed training on the stream -> kNN, linear and segmentation probes against the network at
initialisation."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["shapes", "shapes-synclr"])
def test_shapes_run_lowers_its_loss_and_reports_every_probe(ray_cluster: str, tmp_path, name: str):
    from synray.plan import load_run_config, plan_run
    from synray.programs.run import run

    cfg = load_run_config(name, [
        f"output_root={tmp_path}", "data.num_captions=120", "train.steps=6", "train.captions_per_worker=4",
        "train.warmup_steps=1", "train.log_every=2", "train.checkpoint_every=6", "train.backbone.size=tiny",
        "eval.heldout_captions=36", "eval.linear_epochs=5", "eval.segmentation_epochs=3"])
    rd, summary = run(plan_run(cfg))
    assert summary["train"]["steps"] == 6 and summary["per_caption"] == 4
    assert summary["train"]["final_loss"] < summary["train"]["first_loss"]  # the contrastive loss went down
    assert summary["stages"]["images"]["rows"] >= 48
    ev = json.loads(rd.summary_path.read_text())["eval"]
    assert ev["heldout_rows"] == 36
    for side in ("trained", "init"):
        r = ev[side]
        assert r["num_classes"] >= 2 and r["chance"] == pytest.approx(1 / r["num_classes"])
        for key in ("knn_accuracy", "linear_accuracy", "segmentation_miou", "segmentation_pixel_accuracy"):
            assert 0.0 <= r[key] <= 1.0, (side, key)
        assert r["segmentation_num_classes"] == 10  # background + the 9 shape classes
    assert (rd.path / "samples.png").exists() and (rd.path / "backbone" / "config.json").exists()
