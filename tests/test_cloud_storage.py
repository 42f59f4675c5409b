"""Stores and run directories under a cloud URI, against a local S3 server (moto): the same atomic writes and
resumes as on a local disk, and a whole run whose outputs and checkpoints land in the bucket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from conftest import small_config

BUCKET = "synray-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """A local S3 endpoint with one bucket; the environment pyarrow, Ray Data and Ray Train read it from."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


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


@pytest.mark.slow
def test_a_run_and_a_training_job_keep_everything_under_s3(s3, tmp_path: Path):
    """`synray run shapes` with its run directory and its stream+store store under s3://, then `synray train` from
    that store with the same store as its evaluation set: outputs, checkpoints and shards all land in the bucket."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # a local Ray of its own, with the env
    small = ["train.steps=6", "train.captions_per_worker=4", "train.log_every=2", "train.checkpoint_every=3",
             "data.num_captions=64", "eval.heldout_captions=48", "eval.protocols=[knn]", "ray.num_cpus=6"]
    sets = [a for s in small for a in ("--set", s)]
    store = f"s3://{BUCKET}/shapes-store"
    r = subprocess.run([sys.executable, "-m", "synray.cli", "run", "shapes", *sets, "--set",
                        f"output_root=s3://{BUCKET}/runs", "--set", "data.mode=stream+store", "--set",
                        f"data.store_dir={store}"], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    (run,) = {p.split("/")[0] for p in objects("runs")}
    assert f"run directory: s3://{BUCKET}/runs/{run}" in r.stdout
    files = objects(f"runs/{run}")
    for name in ("config.yaml", "summary.json", "metrics.csv", "run.log", "loss_curve.png", "samples.png",
                 "backbone/config.json", "backbone_init/config.json", "train/metrics.jsonl"):
        assert name in files, name
    assert any(f.startswith("train/train/checkpoint_") for f in files)   # Ray Train wrote its checkpoints there
    fs = pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]
    with fs.open_input_stream(f"{BUCKET}/runs/{run}/summary.json") as f:
        summary = json.loads(f.read())
    assert summary["run_dir"] == f"s3://{BUCKET}/runs/{run}" and summary["train"]["steps"] == 6
    assert summary["backbone_dir"] == f"s3://{BUCKET}/runs/{run}/backbone"
    assert summary["train"]["checkpoint"].startswith(f"s3://{BUCKET}/runs/{run}/train/train/checkpoint_")
    assert 0 <= summary["eval"]["trained"]["knn_accuracy"] <= 1
    shards = [f for f in objects("shapes-store") if f.startswith("shard-")]
    assert shards and "_store.json" in objects("shapes-store")

    r = subprocess.run([sys.executable, "-m", "synray.cli", "train", "shapes", "--data", store, *sets, "--set",
                        f"output_root=s3://{BUCKET}/runs2", "--set", f"eval.dataset={store}"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    (run2,) = {p.split("/")[0] for p in objects("runs2")}
    with fs.open_input_stream(f"{BUCKET}/runs2/{run2}/summary.json") as f:
        trained = json.loads(f.read())
    assert trained["mode"] == "stored" and trained["train"]["steps"] == 6
    assert trained["eval"]["heldout_rows"] >= 48                   # the S3 store, read as the evaluation set
