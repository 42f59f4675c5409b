"""Training end to end: Ray Train + DeepSpeed workers on a generated store, a killed worker, the main job."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import small_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stored_run(generated_store: dict, tmp_path_factory: pytest.TempPathFactory):
    from synray.plan import plan_run
    from synray.programs.run import run

    cfg = small_config(f"output_root={tmp_path_factory.mktemp('runs')}", "images.per_caption=3",
                       "train.steps=5", "train.checkpoint_every=2", "train.fail_at_step=3",
                       "eval.dataset=" + generated_store["dir"])
    return run(plan_run(cfg, data_dir=generated_store["dir"]))


def test_train_from_store_writes_the_run_directory(stored_run):
    rd, summary = stored_run
    assert summary["mode"] == "stored" and summary["per_caption"] == 3
    assert summary["train"]["steps"] == 5
    for name in ("config.yaml", "summary.json", "metrics.csv", "loss_curve.png", "samples.png", "backbone"):
        assert (rd.path / name).exists(), name
    saved = json.loads(rd.summary_path.read_text())
    assert 0.0 <= saved["train"]["data_wait_fraction"] <= 1.0
    assert saved["eval"]["trained"]["knn_accuracy"] >= 0.0 and "init" in saved["eval"]
    from transformers import AutoModel

    assert AutoModel.from_pretrained(saved["backbone_dir"]).config.model_type == "vit"


def test_killed_worker_restarts_from_checkpoint(stored_run):
    """The fault drill (`train.fail_at_step=3`, a checkpoint every 2 steps): the worker exits at step 3, the
    group restarts from the step-2 checkpoint, steps 3, 4, 5 follow, and the epoch goes on where it stopped."""
    rd, summary = stored_run
    log = [json.loads(line) for line in (rd.path / "train" / "metrics.jsonl").read_text().splitlines()]
    events = [r.get("event") or r["step"] for r in log if r.get("event") != "fit_start" and "init_export" not in r]
    assert events == [1, 2, "worker_failure", 3, 4, 5], events  # step 3 died before its report
    assert summary["train"]["worker_failures"] == 1 and summary["train"]["steps"] == 5
    # the store's 16 rows make an epoch of 4 steps: the restarted group read the 8 rows the step-2 checkpoint
    # had not trained on, so epoch 0 saw every row once; step 5 began epoch 1
    from synray.data.ledger import load_consumed, load_epoch

    kept = {load_epoch(c): load_consumed(c) for c in (rd.path / "train" / "train").glob("checkpoint_*")
            if any(c.glob("consumed-rank*"))}
    assert sorted(kept) == [0, 1] and len(kept[0]) == 16 and len(kept[1]) == 4


def test_checkpoint_of_another_config_is_refused(stored_run, generated_store: dict):
    from synray.plan import plan_run

    ckpt = stored_run[1]["train"]["checkpoint"]
    cfg = small_config("train.backbone.size=small", f"train.resume_from={ckpt}")
    with pytest.raises(ValueError, match="another config: it differs in train.backbone"):
        plan_run(cfg, data_dir=generated_store["dir"])
    ok = plan_run(small_config(f"train.resume_from={ckpt}"), data_dir=generated_store["dir"])
    assert ok.train.per_caption == 3 and ok.train.resume_step == 5


def test_bad_training_input_fails_before_training(tmp_path: Path):
    from synray.data.store import StoreError
    from synray.plan import plan_run
    from synray.train.objectives import TrainSetupError

    with pytest.raises(TrainSetupError, match="at least 2 images per caption"):
        plan_run(small_config("images.per_caption=1"))
    with pytest.raises(TrainSetupError, match="cannot fill one global batch"):
        plan_run(small_config("data.num_captions=3", "train.captions_per_worker=2"))
    (tmp_path / "bad").mkdir()
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "bad" / "shard-0.parquet")
    with pytest.raises(StoreError, match="lacks the columns"):
        plan_run(small_config(), data_dir=str(tmp_path / "bad"))


def test_clip_training_on_a_laclip_rewrite_store(generated_store: dict, tmp_path: Path):
    """train.loss=clip on a store in the layout `synray rewrite` writes (image, caption, rewrites):
    DeepSpeed workers train the image encoder and the text tower; the export holds both."""
    from synray.data.store import ParquetStore
    from synray.models.image_text import load_image_text
    from synray.plan import plan_run
    from synray.programs.run import run

    rows = [r for s in ParquetStore(generated_store["dir"]).shards()
            for r in pq.read_table(s, columns=["caption_id", "caption", "images"]).to_pylist()]
    store = ParquetStore(tmp_path / "laclip")
    store.open_for_writing("test-rewrite", {"source": "generated_store"})
    store.write_shard(pa.table({
        "caption_id": [r["caption_id"] for r in rows], "image": [r["images"][0] for r in rows],
        "caption": [r["caption"] for r in rows],
        "rewrites": [[f"a picture of {r['caption']}", "x"] for r in rows]}))
    cfg = small_config("train.loss=clip", "train.steps=3", "train.checkpoint_every=3", f"output_root={tmp_path}",
                       "eval.dataset=" + generated_store["dir"], "eval.protocols=[knn, zeroshot]")
    rd, summary = run(plan_run(cfg, data_dir=str(tmp_path / "laclip")))
    assert summary["per_caption"] == 1 and summary["train"]["steps"] == 3
    assert summary["train"]["final_loss"] is not None and summary["train"]["final_loss"] > 0
    assert 0 <= summary["eval"]["trained"]["knn_accuracy"] <= 1
    for side in ("trained", "init"):  # zero-shot through the exported / the initial text tower
        assert 0 <= summary["eval"][side]["zeroshot_accuracy"] <= 1
    model, tokenizer, max_length = load_image_text(summary["backbone_dir"])
    assert max_length == cfg.train.text.max_length and float(model.logit_scale) > 0
    from synray.data.store import StoreError

    with pytest.raises(StoreError, match="lacks the columns"):  # image losses need caption rows with labels
        plan_run(small_config(), data_dir=str(tmp_path / "laclip"))
