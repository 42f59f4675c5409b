"""Training from a store, end to end (the stored runs of runs.py: CLIP on a LaCLIP store in the suite's S3 bucket):
a job that runs out of `train.max_failures`, `synray train --fresh`, the resubmitted job that continues the
unfinished run, what that run directory holds, both towers trained; `jobs/evaluate.py` against an independent kNN."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import small_config
from procs import job, metrics_log, ray_env, run, sets, step_events, stored_rows, whole_share
from runs import GENERATED_ROWS, STORED_EPOCH_STEPS

ROWS_PER_STEP = 8   # 2 workers x 4 pairs


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "train" / "train").glob("checkpoint_*") if p.is_dir())


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


# --------------------------------------------------------------------------- failures and resumes
def test_a_job_out_of_max_failures_raises_the_training_error_and_leaves_its_run_unfinished(stored_runs):
    """With train.max_failures=0 the worker's death ends the job: its main() re-raises Ray Train's error (so
    `python jobs/train.py` prints the traceback and exits 1), and the run directory has no summary: it is the
    unfinished run that the next submission continues."""
    from ray.train import TrainingFailedError

    failed = stored_runs.failed
    assert failed.code is None and isinstance(failed.error, TrainingFailedError), (failed.error, failed.err[-2000:])
    assert step_events(metrics_log(stored_runs.run_dir))[:3] == [1, 2, "worker_failure"]   # no restart then


def test_train_fresh_starts_a_new_run_instead_of_continuing_the_unfinished_one(stored_runs):
    """`synray train --fresh` of the same config, beside the unfinished run: it makes a new run directory and would
    train there (the fixture stops it at that point), and the unfinished one is left for the next submission."""
    fresh = stored_runs.fresh
    assert "continuing the unfinished run" not in fresh.log
    assert stored_runs.fresh_dir != stored_runs.run_dir and stored_runs.fresh_dir.parent == stored_runs.run_dir.parent
    assert (stored_runs.fresh_dir / "config.yaml").read_text() == (stored_runs.run_dir / "config.yaml").read_text()


def test_the_resubmitted_job_continues_the_unfinished_run_from_its_checkpoint(stored_runs):
    """`python jobs/train.py` submitted again continues the run that failed: Ray Train restores its step-2
    checkpoint, and steps 3 to 7 follow."""
    resumed, run_dir = stored_runs.resumed, stored_runs.run_dir
    assert f"continuing the unfinished run {run_dir}" in resumed.stderr
    assert f"run directory: {run_dir}" in resumed.stdout
    assert step_events(metrics_log(run_dir)) == [1, 2, "worker_failure", "fit_start", 3, 4, 5, 6, 7]
    summary = stored_runs.summary()
    assert summary["mode"] == "stored" and summary["per_caption"] == 1
    assert summary["train"]["steps"] == 7 and summary["train"]["worker_failures"] == 1


def test_the_restarted_epoch_trains_each_row_of_the_store_once(stored_runs, generated_store):
    """48 rows make an epoch of 6 steps: the continued run read the 32 rows its step-2 checkpoint had not trained
    on, so epoch 0 saw every row once; step 7 began epoch 1."""
    from synray.data.ledger import load_consumed, load_epoch

    kept = {load_epoch(c): load_consumed(c) for c in _checkpoints(stored_runs.run_dir) if any(c.glob("consumed-rank*"))}
    assert sorted(kept) == [0, 1]
    assert sorted(kept[0].tolist()) == sorted(r["row_id"] for r in stored_rows(generated_store.store, ["row_id"]))
    assert len(kept[0]) == GENERATED_ROWS == STORED_EPOCH_STEPS * ROWS_PER_STEP and len(kept[1]) == ROWS_PER_STEP


def test_backbone_init_is_kept_to_the_end_and_the_backbone_is_the_last_step(stored_runs):
    """Ray Train keeps 3 checkpoints: of the 5 this run wrote (init, 2, 4, 6, 7), the step-0 export survives with the
    two latest; backbone_init/ is that export, and backbone/ (which AutoModel loads) differs from it."""
    from transformers import AutoModel

    from synray.train.engine import read_meta

    kept = _checkpoints(stored_runs.run_dir)
    init = [c for c in kept if (c / "backbone_init").is_dir()]
    assert len(kept) == 3 and len(init) == 1
    assert sorted(read_meta(c)["step"] for c in kept if c not in init) == [6, 7]
    run_dir = stored_runs.run_dir
    exported = _safetensors(run_dir / "backbone_init")
    assert exported.keys() == _safetensors(init[0] / "backbone_init").keys()
    assert all(torch.equal(v, _safetensors(init[0] / "backbone_init")[k]) for k, v in exported.items())
    trained = _safetensors(run_dir / "backbone")
    assert trained.keys() == exported.keys() and any(not torch.equal(trained[k], exported[k]) for k in trained)
    assert AutoModel.from_pretrained(run_dir / "backbone").config.model_type == "vit"


# --------------------------------------------------------------------------------- run directory
def test_metrics_csv_has_every_logged_step_once_with_the_logs_figures(stored_runs):
    logged = {r["step"]: r for r in metrics_log(stored_runs.run_dir) if "loss" in r}
    with open(stored_runs.run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 8))   # train.log_every=1, across the restart
    for r in rows:
        for key in ("loss", "lr", "images_per_s", "data_wait_fraction"):
            assert float(r[key]) == pytest.approx(logged[int(r["step"])][key], rel=1e-12), key


def test_loss_curve_is_a_png_of_the_run(stored_runs):
    with Image.open(stored_runs.run_dir / "loss_curve.png") as im:
        assert im.format == "PNG" and im.size[0] == 700
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 5   # something is drawn


def test_run_log_opens_with_the_plan(stored_runs):
    from synray.plan import load_run_config, plan_run

    cfg = load_run_config("local", [*stored_runs.overrides, "data.mode=stored", f"data.store_dir={stored_runs.store}"])
    plan = plan_run(cfg, data_dir=stored_runs.store)
    lines = (stored_runs.run_dir / "run.log").read_text().splitlines()
    described = plan.describe()
    assert [line.split(" synray.programs.run: ", 1)[1] for line in lines[:len(described)]] == \
           [f"plan: {d}" for d in described]


def test_summary_json_holds_the_trainer_figures_and_the_evaluation(stored_runs, generated_store):
    """The summary the README lists: trainer figures, and the probes trained vs init on eval.dataset (the generated
    store's 144 images, split by caption into reference and query), each a share of the query images."""
    summary, log = stored_runs.summary(), [r for r in metrics_log(stored_runs.run_dir) if "loss" in r]
    t = summary["train"]
    assert (t["first_loss"], t["final_loss"]) == (log[0]["loss"], log[-1]["loss"])
    assert t["images_per_s"] == log[-1]["images_per_s"]
    assert t["data_wait_fraction"] == pytest.approx(np.mean([r["data_wait_fraction"] for r in log]))
    assert t["checkpoint"] == str(max(_checkpoints(stored_runs.run_dir), key=lambda c: c.stat().st_mtime))
    labels = {r["label"] for r in stored_rows(generated_store.store, ["label"])}
    ev = summary["eval"]
    for side in ("trained", "init"):   # kNN and zero-shot (through the exported / the initial text tower)
        r = ev[side]
        assert r["num_reference"] + r["num_query"] == 3 * GENERATED_ROWS and r["num_classes"] == len(labels)
        assert r["chance"] == pytest.approx(1 / len(labels)) and r["zeroshot_num_classes"] == len(labels)
        for key in ("knn_accuracy", "zeroshot_accuracy"):
            assert whole_share(r[key], r["num_query"]), key   # a count of query images
    assert summary["backbone_dir"] == str(stored_runs.run_dir / "backbone")


def test_checkpoint_of_another_config_is_refused(stored_runs):
    from synray.plan import plan_run

    ckpt = stored_runs.summary()["train"]["checkpoint"]
    cfg = small_config("train.loss=clip", "train.backbone.size=small", f"train.resume_from={ckpt}")
    with pytest.raises(ValueError, match="another config: it differs in train.backbone"):
        plan_run(cfg, data_dir=stored_runs.store)
    ok = plan_run(small_config("train.loss=clip", f"train.resume_from={ckpt}"), data_dir=stored_runs.store)
    assert ok.train.per_caption == 1 and ok.train.resume_step == 7


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


# ------------------------------------------------------------------- evaluation by the evaluate job
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _dino_knn_accuracy(ref: np.ndarray, ref_y: np.ndarray, query: np.ndarray, query_y: np.ndarray, k: int,
                       t: float, tol: float = 1e-6) -> tuple[float, int]:
    """DINO's weighted kNN (Caron et al. 2021, eval_knn.py): cosine similarity to the reference set, the k most
    similar vote for their class with weight exp(sim / T), the class with the most weight wins. Also the number of
    queries a float32 computation may decide otherwise: a k-th and (k+1)-th neighbour within `tol` of each other
    (which one votes depends on rounding and tie order), or two classes' votes within `tol` of each other."""
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    sim = query @ ref.T
    order = np.argsort(-sim, axis=1)
    top = order[:, :k]
    votes = np.zeros((len(query), int(ref_y.max()) + 1))
    for i, idx in enumerate(top):
        np.add.at(votes[i], ref_y[idx], np.exp(sim[i, idx] / t))
    rows = np.arange(len(query))
    boundary = sim[rows, order[:, k - 1]] - sim[rows, order[:, k]] < tol
    best = np.sort(votes, axis=1)
    close = best[:, -1] - best[:, -2] < tol * best[:, -1]
    return float((votes.argmax(1) == query_y).mean()), int((boundary | close).sum())


def test_the_evaluate_job_scores_a_split_dataset_as_an_independent_knn_does(stored_runs, generated_store, ray_cluster,
                                                                          tmp_path):
    """`jobs/evaluate.py` on the trained backbone and a Parquet set whose `split` column names reference (`train`)
    and query (`test`) images; the same figure from transformers' ViTModel and DINO's kNN written out here."""
    from transformers import AutoModel

    rows = stored_rows(generated_store.store, ["row_id", "label", "images"])
    images = [(img, r["label"], "train" if r["row_id"] % 2 else "test") for r in rows for img in r["images"]]
    (tmp_path / "eval").mkdir()
    pq.write_table(pa.table({"image": [i[0] for i in images], "label": [i[1] for i in images],
                             "split": [i[2] for i in images]}), tmp_path / "eval" / "part-0.parquet")
    backbone = stored_runs.run_dir / "backbone"
    r = run(job("evaluate.py", str(backbone), "--dataset", str(tmp_path / "eval"), "--protocol", "knn",
                "--out", str(tmp_path / "out"), *sets("eval.knn_k=5")), ray_env(ray_cluster))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{tmp_path / 'out'}" in r.stdout
    got = json.loads((tmp_path / "out" / "eval.json").read_text())["results"]

    model = AutoModel.from_pretrained(backbone).eval()
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(i[0])).convert("RGB"), dtype=np.float64) / 255
                       for i in images])
    pixels = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)
    with torch.no_grad():
        feats = model(pixel_values=torch.from_numpy(pixels).float()).last_hidden_state[:, 0].double().numpy()
    labels, split = np.array([i[1] for i in images]), np.array([i[2] for i in images])
    ref, query = split == "train", split == "test"
    expected, undecided = _dino_knn_accuracy(feats[ref], labels[ref], feats[query], labels[query], k=5, t=0.07)
    assert (got["num_reference"], got["num_query"]) == (int(ref.sum()), int(query.sum()))
    # the same count of query images, but for queries whose neighbours or votes tie to float32's precision
    assert abs(got["knn_accuracy"] - expected) * got["num_query"] <= undecided + 1e-6, (got, expected, undecided)
    assert undecided <= got["num_query"] // 10, undecided   # the comparison still decides nearly every query


# --------------------------------------------------------------------------------------- CLIP
def test_clip_trains_both_towers_and_exports_them(stored_runs, tiny_models):
    """Both towers moved from where they started: the exported image encoder differs from backbone_init, the
    exported text tower from tiny:text, and the logit scale from its initial 1 / train.temperature."""
    from synray.models.image_text import load_image_text

    run_dir = stored_runs.run_dir
    image, init = _safetensors(run_dir / "backbone"), _safetensors(run_dir / "backbone_init")
    assert any(not torch.equal(image[k], init[k]) for k in init)
    text, start = _safetensors(run_dir / "backbone" / "text"), _safetensors(Path(tiny_models["text"]))
    assert text.keys() == start.keys() and any(not torch.equal(text[k], start[k]) for k in start)
    model, _, max_length = load_image_text(stored_runs.summary()["backbone_dir"])
    cfg = small_config("train.loss=clip")
    assert max_length == cfg.train.text.max_length
    assert float(model.logit_scale.exp()) != pytest.approx(1 / cfg.train.temperature, rel=1e-9)


def test_a_rewrite_store_is_refused_for_image_losses(stored_runs):
    from synray.data.store import StoreError
    from synray.plan import plan_run

    with pytest.raises(StoreError, match="lacks the columns"):  # image losses need caption rows with labels
        plan_run(small_config(), data_dir=stored_runs.store)
