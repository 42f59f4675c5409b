"""Stores and run directories under a cloud URI, against a local S3 server (moto): the same atomic writes and
resumes as on a local disk, and a whole run whose outputs and checkpoints land in the bucket (the stored runs of
test_train.py read their LaCLIP store from the bucket too)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from conftest import S3_BUCKET, small_config

BUCKET = S3_BUCKET


@pytest.fixture
def s3(s3_server: dict[str, str]) -> dict[str, str]:
    """The suite's local S3 server (conftest): its endpoint and fake credentials are in the environment."""
    return s3_server


def objects(prefix: str) -> list[str]:
    fs = pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(i.path[len(BUCKET) + len(prefix) + 2:] for i in infos if i.type == pafs.FileType.File)


def rows(n: int, start: int = 0) -> pa.Table:
    from synray.data.store import to_row_table

    ids = range(start, start + n)
    return to_row_table({"caption_id": [f"c{i:04d}" for i in ids], "caption": [f"caption {i}" for i in ids],
                         "row_id": list(ids), "label": [i % 3 for i in ids], "concept": [f"c{i}" for i in ids],
                         "images": [[b"img"] for _ in ids], "seeds": [[i] for i in ids], "image_format": ["png"] * n})


def test_storage_paths_take_uris_and_paths_read_by_loaders_refuse_them():
    from synray.config import ConfigError

    cfg = small_config("output_root=s3://b/runs", "data.mode=stream+store", "data.store_dir=gs://b/store",
                       "eval.dataset=s3://b/eval", "tune.storage=s3://b/sweeps")
    assert cfg.output_root == "s3://b/runs" and cfg.data.store_dir == "gs://b/store"
    for key in ("captions.source", "captions.rewrite.source", "train.resume_from", "model_cache"):
        with pytest.raises(ConfigError, match=f"{key}: .* read from a local or mounted directory only"):
            small_config(f"{key}=s3://b/x")


def test_a_store_under_s3_writes_whole_shards_resumes_and_refuses_another_config(s3, monkeypatch):
    from synray.data.storage import TMP_PREFIX, Location
    from synray.data.store import ParquetStore, StoreError, StoreMissingError

    uri = f"s3://{BUCKET}/stores/a"
    store = ParquetStore(uri)
    with pytest.raises(StoreMissingError, match=f"dataset directory {uri} does not exist"):
        store.check_readable(("caption_id",))
    store.open_for_writing("fp1", {"config_name": "t"})
    first = store.write_shard(rows(4))
    assert first.startswith(f"{uri}/shard-") and first in store.shards()
    store.write_shard(rows(3, start=4))
    again = ParquetStore(uri)                                  # a rerun: what the store holds is read back
    assert again.check_writable("fp1") and again.num_rows() == 7
    assert again.existing_ids() == {f"c{i:04d}" for i in range(7)}
    assert again.first_rows(5)[0] == 4
    with pytest.raises(StoreError, match="holds data of another config"):
        ParquetStore(uri).open_for_writing("fp2", {"config_name": "other"})

    def lost_connection(fs, src, dest):                          # the upload is cut before the shard is moved in
        raise OSError("connection reset")

    monkeypatch.setattr("synray.data.storage._move", lost_connection)
    with pytest.raises(OSError, match="connection reset"):
        store.write_shard(rows(2, start=7))
    monkeypatch.undo()
    assert store.num_rows() == 7                                 # no half shard became visible
    assert not any(n.startswith(TMP_PREFIX) for n in objects("stores/a"))
    Location.of(uri).fs.open_output_stream(f"{BUCKET}/stores/a/{TMP_PREFIX}torn.parquet").close()
    store.open_for_writing("fp1", {})                            # a new writer drops stale temporary objects
    assert not any(n.startswith(TMP_PREFIX) for n in objects("stores/a"))


def test_an_unfinished_run_under_s3_is_found_and_its_files_come_back(s3, tmp_path: Path):
    from synray.data.storage import Location
    from synray.programs.rundir import RunDir

    cfg = small_config(f"output_root=s3://{BUCKET}/runs-u")
    rd = RunDir.create(cfg)
    assert rd.where.startswith(f"s3://{BUCKET}/runs-u/local-") and "config.yaml" in objects(f"runs-u/{rd.remote.name}")
    assert RunDir.unfinished(cfg) is None                       # nothing trained yet
    (rd.path / "train").mkdir()
    (rd.path / "train" / "metrics.jsonl").write_text('{"step": 1}\n')
    rd.sync()
    Location.of(rd.train_storage).join("train", "checkpoint_0", "x").write_text("ckpt")   # Ray Train's own files
    back = RunDir.unfinished(cfg)
    assert back is not None and back.remote.uri == rd.remote.uri and back.path != rd.path
    assert (back.path / "train" / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert not (back.path / "train" / "train").exists()          # checkpoints stay where Ray Train reads them
    back.write_summary({"done": True})
    assert RunDir.unfinished(cfg) is None                        # finished


def test_a_sweep_report_under_s3_reads_its_trials_there_and_uploads_the_report(s3, tmp_path: Path):
    from test_sweep import _fake_sweep

    from synray.data.storage import copy_tree
    from synray.sweep.report import write_report

    _fake_sweep(tmp_path / "s", [40, 80, 160, 320], 0.4)
    copy_tree(tmp_path / "s", f"s3://{BUCKET}/sweeps/s")
    report = write_report(f"s3://{BUCKET}/sweeps/s")
    assert len(report.rows) == 8 and report.fits["groups"]["a"]["law"]["k"] == pytest.approx(0.4, abs=0.02)
    files = objects("sweeps/s/report")
    assert {"results.csv", "results.md", "fits.json", "scaling.png", "scaling-a.png"} <= set(files)
    assert all(str(f).startswith(f"s3://{BUCKET}/sweeps/s/report/") for f in report.files)


def test_a_run_keeps_everything_under_s3(shapes_run):
    """The suite's shapes run (runs.py) had its run directory under s3://: outputs and checkpoints land in the
    bucket, and the Ray workers reach it like cluster nodes: Ray Train wrote its checkpoints there and restored
    one after the killed worker, and the evaluation's feature actors loaded both backbones from it."""
    name, bucket = shapes_run.name, shapes_run.bucket
    assert shapes_run.uri == f"s3://{bucket}/runs/{name}" and name.startswith("shapes-synclr-")
    assert f"summary: s3://{bucket}/runs/{name}/summary.json" in shapes_run.result.out
    files = objects(f"runs/{name}")
    for f in ("config.yaml", "summary.json", "metrics.csv", "run.log", "loss_curve.png", "samples.png",
              "backbone/config.json", "backbone_init/config.json", "train/metrics.jsonl"):
        assert f in files, f
    assert any(f.startswith("train/train/checkpoint_") for f in files)   # Ray Train wrote its checkpoints there
    saved = shapes_run.summary()
    assert saved["run_dir"] == shapes_run.uri and saved["backbone_dir"] == f"{shapes_run.uri}/backbone"
    assert saved["init_backbone_dir"] == f"{shapes_run.uri}/backbone_init"
    assert saved["train"]["checkpoint"].startswith(f"{shapes_run.uri}/train/train/checkpoint_")
    assert saved["train"]["worker_failures"] == 1 and saved["train"]["steps"] == 6
    assert saved["eval"]["heldout_rows"] == 36 and saved["eval"]["trained"] != saved["eval"]["init"]
