"""The Parquet store: atomic shards, config fingerprint guard, resume ids, WebDataset export (no Ray)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from synray.data.schema import ROW_SCHEMA, caption_id, caption_label_id, image_seed, prompt_seed
from synray.data.store import TMP_PREFIX, ParquetStore, ShardWriter, StoreError, export_webdataset, to_row_table


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _rows(n: int, start: int = 0, m: int = 2) -> dict[str, list]:
    ids = [caption_id(0, i, f"prompt {i}") for i in range(start, start + n)]
    return {
        "caption_id": ids, "row_id": list(range(start, start + n)), "label": [i % 3 for i in range(n)],
        "concept": [f"c{i}" for i in range(n)], "caption": [f"a caption number {i}" for i in range(n)],
        "images": [[_png(10 * i + k) for k in range(m)] for i in range(n)],
        "seeds": [[image_seed(0, cid, k) for k in range(m)] for cid in ids], "image_format": ["png"] * n,
    }


def test_ids_and_seeds_are_stable_and_distinct():
    assert caption_id(0, 1, "p") == caption_id(0, 1, "p")
    assert len({caption_id(0, i, "p") for i in range(100)}) == 100
    assert caption_id(0, 1, "p") != caption_id(1, 1, "p") != caption_id(0, 1, "q")
    seeds = {image_seed(0, "abc", k) for k in range(50)}
    assert len(seeds) == 50 and all(0 <= s < 2**63 for s in seeds)
    assert 0 <= prompt_seed(5, 7) < 2**31
    assert caption_label_id("ffffffffffffffff") < 2**63


def test_row_table_has_the_schema_and_fills_missing_columns():
    table = to_row_table(_rows(3))
    assert table.schema == ROW_SCHEMA
    assert table.column("prompt").null_count == 3


def test_write_shard_is_atomic_and_resume_reads_ids(tmp_path: Path):
    store = ParquetStore(tmp_path / "s")
    store.open_for_writing("fp1", {"config_name": "t"})
    path = store.write_shard(to_row_table(_rows(4)))
    assert Path(path).name.startswith("shard-") and Path(path).exists()
    assert not list(Path(store.root.path).glob(f"{TMP_PREFIX}*"))
    store.write_shard(to_row_table(_rows(3, start=4)))
    assert store.num_rows() == 7
    assert store.existing_ids() == set(_rows(7)["caption_id"])
    assert len(store.existing_captions()) == 7


def test_crash_mid_write_leaves_no_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = ParquetStore(tmp_path / "s")
    store.open_for_writing("fp1", {})

    def broken_write(table, where, **kwargs):
        where.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        store.write_shard(to_row_table(_rows(2)))
    assert store.shards() == []
    assert not list(Path(store.root.path).glob(f"{TMP_PREFIX}*"))


def test_stale_temp_files_are_removed_and_never_read(tmp_path: Path):
    store = ParquetStore(tmp_path / "s")
    store.open_for_writing("fp1", {})
    (Path(store.root.path) / f"{TMP_PREFIX}dead.parquet").write_bytes(b"PAR1 torn")
    assert store.shards() == []
    store.open_for_writing("fp1", {})
    assert not list(Path(store.root.path).glob(f"{TMP_PREFIX}*"))


def test_store_of_another_config_is_refused(tmp_path: Path):
    store = ParquetStore(tmp_path / "s")
    store.open_for_writing("fp1", {"config_name": "one"})
    with pytest.raises(StoreError, match="holds data of another config"):
        ParquetStore(tmp_path / "s").open_for_writing("fp2", {"config_name": "two"})
    (tmp_path / "loose").mkdir()
    pq.write_table(to_row_table(_rows(1)), tmp_path / "loose" / "shard-x.parquet")
    with pytest.raises(StoreError, match="no _store.json"):
        ParquetStore(tmp_path / "loose").open_for_writing("fp1", {})
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        ParquetStore(tmp_path / "file").open_for_writing("fp1", {})


def test_check_readable_names_missing_columns(tmp_path: Path):
    with pytest.raises(StoreError, match="does not exist"):
        ParquetStore(tmp_path / "nope").check_readable()
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="holds no shard"):
        ParquetStore(tmp_path / "empty").check_readable()
    (tmp_path / "bad").mkdir()
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "bad" / "shard-a.parquet")
    with pytest.raises(StoreError, match="lacks the columns"):
        ParquetStore(tmp_path / "bad").check_readable()


def test_shard_writer_passthrough_and_metadata(tmp_path: Path):
    root = tmp_path / "s"
    ParquetStore(root).open_for_writing("fp", {})
    batch = pa.table({k: v for k, v in _rows(3).items()})
    meta = ShardWriter(str(root))(batch)
    assert meta.column("rows").to_pylist() == [3]
    tee = ShardWriter(str(root), passthrough=True)(pa.table({k: v for k, v in _rows(2, start=3).items()}))
    assert tee.num_rows == 2
    assert ParquetStore(root).num_rows() == 5


def test_webdataset_export(tmp_path: Path):
    store = ParquetStore(tmp_path / "s")
    store.open_for_writing("fp", {})
    store.write_shard(to_row_table(_rows(5, m=2)))
    tars = export_webdataset(store, tmp_path / "wds", samples_per_tar=4)
    assert [t.name for t in tars] == ["000000.tar", "000001.tar", "000002.tar"]
    names = []
    for t in tars:
        with tarfile.open(t) as tar:
            for member in tar.getmembers():
                names.append(member.name)
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    assert {"caption", "caption_id", "label", "seed"} <= meta.keys()
                if member.name.endswith(".png"):
                    Image.open(io.BytesIO(tar.extractfile(member).read())).verify()
    assert len(names) == 5 * 2 * 3  # image + txt + json per image


def test_a_damaged_shard_is_named_before_anything_reads_it(tmp_path: Path):
    store = ParquetStore(tmp_path)
    store.open_for_writing("fp", {})
    store.write_shard(to_row_table(_rows(2)))
    bad = Path(store.write_shard(to_row_table(_rows(2, start=2))))
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])   # damaged after it was committed
    for read in (store.check_readable, store.existing_ids, store.num_rows):
        with pytest.raises(StoreError, match=f"store shard {bad} is not a readable Parquet file.*delete it"):
            read()


def test_a_parquet_read_on_a_local_ray_starts_two_footer_readers(ray_cluster: str, tmp_path: Path):
    """synray's local Ray gives Ray Data's Parquet reads LOCAL_FOOTER_ACTORS footer readers (Ray's default starts 32
    actors, each a Python process, for every read: some 30 CPU-seconds a read on a laptop)."""
    import ray
    from ray.util.state import list_actors

    from synray.programs.session import LOCAL_FOOTER_ACTORS

    def footer_readers() -> set[str]:
        return {a.actor_id for a in list_actors(filters=[("class_name", "=", "FooterReader")], limit=10000,
                                                raise_on_missing_output=False)}

    files = []
    for i in range(3):
        files.append(str(tmp_path / f"shard-{i}.parquet"))
        pq.write_table(pa.table({"x": list(range(10 * i, 10 * i + 10))}), files[-1])
    before = footer_readers()
    assert sorted(r["x"] for r in ray.data.read_parquet(files).take_all()) == list(range(30))
    assert len(footer_readers() - before) == int(LOCAL_FOOTER_ACTORS["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"]) == 2
