"""The Parquet store (a local directory or a cloud URI): atomic shards, resume by caption id, Ray Dataset reads."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tarfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from synray.data.schema import ROW_SCHEMA, TRAIN_COLUMNS
from synray.data.stats import StatsClient
from synray.data.storage import TMP_PREFIX, Location

if TYPE_CHECKING:   # Ray is imported where a Dataset is built: plans read this module without it
    import ray.data

META_FILE = "_store.json"
SUMMARY_FILE = "_summary.json"
SHARD_PREFIX = "shard-"
#: the plan-row id column (see synray.data.ledger) and the per-image list columns a subset slices
ROW_ID = "row_id"
PER_IMAGE_COLUMNS = ("images", "masks")


class StoreError(ValueError):
    """A store directory that cannot be used as asked."""


class StoreMissingError(StoreError):
    """A store to read that holds no data yet (an earlier job, `synray generate` or `rewrite`, makes it)."""


class ParquetStore:
    """A directory of `shard-*.parquet` files, on a local disk or under a cloud URI (s3://, gs://), each written
    whole under a temporary name and moved into place (synray.data.storage)."""

    def __init__(self, root: str | os.PathLike | Location) -> None:
        self.root = Location.of(root)

    # ---------------------------------------------------------------- metadata
    @property
    def meta_path(self) -> Location:
        return self.root.join(META_FILE)

    def meta(self) -> dict[str, Any] | None:
        if not self.meta_path.is_file():
            return None
        return json.loads(self.meta_path.read_text())

    def check_writable(self, fingerprint: str) -> bool:
        """Whether the store exists already; StoreError when it cannot take this config's rows (nothing is written)."""
        if self.root.is_file():
            raise StoreError(f"output path {self.root} exists and is not a directory")
        meta = self.meta()
        if meta is None:
            if self.shards():
                raise StoreError(f"output directory {self.root} holds shards but no {META_FILE}; "
                                 "refusing to mix data of unknown origin")
            return False
        if meta.get("fingerprint") != fingerprint:
            raise StoreError(
                f"output directory {self.root} holds data of another config (fingerprint "
                f"{meta.get('fingerprint')} from config {meta.get('config_name')!r}; this config's is "
                f"{fingerprint}); choose another --out, or rerun with the config that wrote it")
        return True

    def open_for_writing(self, fingerprint: str, info: dict[str, Any]) -> None:
        """Create the store, or check that it holds this config's data; then drop stale temp files."""
        if not self.check_writable(fingerprint):
            self.root.mkdir()
            self.meta_path.write_text(json.dumps({"fingerprint": fingerprint, "created": time.time(), **info},
                                                 indent=2, sort_keys=True) + "\n")
        for tmp in self.root.children(TMP_PREFIX):
            tmp.delete()

    def write_summary(self, summary: dict[str, Any]) -> Location:
        path = self.root.join(SUMMARY_FILE)
        path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
        return path

    # ---------------------------------------------------------------- reading
    def shards(self) -> list[str]:
        """The committed shards, as paths or URIs that pyarrow and Ray Data read directly."""
        return [s.uri for s in self.root.children(SHARD_PREFIX, ".parquet")]

    def read_column(self, shard: str, column: str) -> list[Any]:
        """One column of one shard; StoreError naming the shard when it cannot be read."""
        try:
            return pq.read_table(shard, columns=[column]).column(0).to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise StoreError(corrupt_shard_message(shard, e)) from e

    def existing_ids(self) -> set[str]:
        ids: set[str] = set()
        for shard in self.shards():
            ids.update(self.read_column(shard, "caption_id"))
        return ids

    def existing_captions(self) -> list[str]:
        out: list[str] = []
        for shard in self.shards():
            out.extend(self.read_column(shard, "caption"))
        return out

    def first_rows(self, n: int) -> tuple[int, list[str]]:
        """The store's first n rows in plan-row order: the largest `row_id` among them, and the shards that hold
        some of them. StoreError when the store holds fewer than n rows."""
        ids = {shard: self.read_column(shard, ROW_ID) for shard in self.shards()}
        values = sorted(v for shard_ids in ids.values() for v in shard_ids)
        if len(values) < n:
            raise StoreError(f"store {self.root} holds {len(values)} rows; the first {n} were asked for "
                             "(a data scale larger than its pool)")
        bound = int(values[n - 1])
        return bound, [shard for shard, shard_ids in ids.items() if shard_ids and min(shard_ids) <= bound]

    def footer(self, shard: str) -> pq.FileMetaData:
        try:
            return pq.read_metadata(shard)
        except (OSError, pa.ArrowException) as e:
            raise StoreError(corrupt_shard_message(shard, e)) from e

    def num_rows(self) -> int:
        return sum(self.footer(s).num_rows for s in self.shards())

    def check_readable(self, required: tuple[str, ...] = TRAIN_COLUMNS) -> list[str]:
        """The shard list, after checking the store exists and has the columns training needs."""
        if not self.root.is_dir():
            raise StoreMissingError(f"dataset directory {self.root} does not exist")
        shards = self.shards()
        if not shards:
            raise StoreMissingError(f"dataset directory {self.root} holds no {SHARD_PREFIX}*.parquet shards")
        for shard in shards:  # every footer, so a damaged shard is named now, not mid-training
            self.footer(shard)
        names = set(pq.read_schema(shards[0]).names)
        missing = [c for c in required if c not in names]
        if missing:
            raise StoreError(f"dataset {self.root} lacks the columns {missing} (it has {sorted(names)})")
        return shards

    def read_dataset(self, columns: list[str] | None = None, num_cpus: float | None = None,
                     tasks: int | None = None):
        """The store as a Ray Dataset (only committed shards are read), by read tasks of `num_cpus` each, at most
        `tasks` at once (Ray Data's defaults when None)."""
        import ray.data

        shards = self.check_readable(tuple(columns) if columns else ())
        return ray.data.read_parquet(shards, columns=columns or None, num_cpus=num_cpus, concurrency=tasks)

    def read_subset(self, columns: list[str], shards: list[str], max_row_id: int | None,
                    first_images: int | None, passes: int = 1, num_cpus: float = 0.25,
                    tasks: int = 2) -> ray.data.Dataset:
        """A nested subset of the store as a Ray Dataset: from `shards` (those `first_rows` names), rows up to
        plan row `max_row_id`, the first `first_images` images (and masks) of each, read `passes` times in one
        execution (a small subset then feeds a whole step budget without restarting its pipeline). Each pass
        offsets `row_id` by the pass number x (max_row_id + 1), so every row a run trains on has its own id for
        the stream ledger. Read by tasks of `num_cpus` each, at most `tasks` at once."""
        import ray.data

        if passes > 1 and max_row_id is None:
            raise ValueError("reading a subset in passes needs its max_row_id (the ids of each pass are offset by it)")
        stride = 0 if max_row_id is None else max_row_id + 1
        work = [{"shard": str(s), "offset": k * stride} for k in range(passes) for s in shards]
        return ray.data.from_items(work, override_num_blocks=len(work)).map_batches(
            _read_subset_block, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus,
            compute=ray.data.TaskPoolStrategy(size=tasks),
            fn_kwargs={"columns": columns, "max_row_id": max_row_id, "first_images": first_images})

    # ---------------------------------------------------------------- writing
    def write_shard(self, table: pa.Table) -> str:
        """Write one shard atomically; its name is derived from the caption ids it holds."""
        ids = table.column("caption_id").to_pylist()
        name = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:20]
        final = self.root.join(f"{SHARD_PREFIX}{name}.parquet")
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        try:
            final.write_bytes(buf.getvalue())
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise StoreError(f"no space left writing a shard of {len(ids)} rows into {self.root} ({e.strerror}); "
                                 "the store holds only whole shards: free space and run the same command again "
                                 "to resume") from e
            raise
        return final.uri


def first_items(table: pa.Table, m: int) -> pa.Table:
    """The first m entries of each row's per-image list columns (images, masks)."""
    for name in PER_IMAGE_COLUMNS:
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, pc.list_slice(table.column(name), 0, m))
    return table


def _read_subset_block(work: pa.Table, columns: list[str], max_row_id: int | None,
                       first_images: int | None) -> pa.Table:
    """One (shard, pass) of `ParquetStore.read_subset`: filtered in the Parquet scan, sliced, ids offset."""
    shard, offset = work.column("shard")[0].as_py(), work.column("offset")[0].as_py()
    read = list(dict.fromkeys([*columns, ROW_ID]))
    table = pq.read_table(shard, columns=read, filters=None if max_row_id is None else [(ROW_ID, "<=", max_row_id)])
    if first_images is not None:
        table = first_items(table, first_images)
    if offset:
        ids = pc.add(table.column(ROW_ID), pa.scalar(offset, table.schema.field(ROW_ID).type))
        table = table.set_column(table.column_names.index(ROW_ID), ROW_ID, ids)
    return table.select([c for c in read if c in columns or c == ROW_ID])


def corrupt_shard_message(shard: str, error: Exception) -> str:
    return (f"store shard {shard} is not a readable Parquet file ({type(error).__name__}: {error}); shards are "
            f"only ever renamed into place whole, so it was damaged afterwards: delete it and run `synray generate` "
            f"with the same config again to regenerate its rows")


def to_row_table(batch: pa.Table | dict[str, Any]) -> pa.Table:
    """A batch (pyarrow or dict of columns) as a table with exactly the row schema."""
    if isinstance(batch, dict):
        batch = pa.table({k: list(v) if not isinstance(v, (pa.Array, pa.ChunkedArray)) else v
                          for k, v in batch.items() if k in ROW_SCHEMA.names})
    cols = [batch.column(n).cast(ROW_SCHEMA.field(n).type) if n in batch.column_names
            else pa.nulls(batch.num_rows, ROW_SCHEMA.field(n).type) for n in ROW_SCHEMA.names]
    return pa.Table.from_arrays(cols, schema=ROW_SCHEMA)


class ShardWriter:
    """Ray Data UDF: writes each batch as one shard; passes rows on (tee) or returns shard metadata.

    A row whose caption id the store holds already is not written again (counted as `already_stored`): after a
    restart, a writer of the previous execution may have committed a last shard after the new one was planned.
    """

    def __init__(self, root: str, passthrough: bool = False, stats_actor: Any | None = None) -> None:
        self.store = ParquetStore(root)
        self.passthrough = passthrough
        self.stats = StatsClient(stats_actor)
        self.known_shards: set[str] = set()
        self.known_ids: set[str] = set()

    def _refresh(self) -> None:
        for shard in self.store.shards():
            if shard not in self.known_shards:
                self.known_ids.update(self.store.read_column(shard, "caption_id"))
                self.known_shards.add(shard)

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.time()
        table = to_row_table(batch)
        self._refresh()
        fresh, seen = [], set()
        for i, cid in enumerate(table.column("caption_id").to_pylist()):
            if cid not in self.known_ids and cid not in seen:
                fresh.append(i)
                seen.add(cid)
        if len(fresh) < table.num_rows:
            self.stats.reject("store", {"already_stored": table.num_rows - len(fresh)})
            table = table.take(pa.array(fresh, type=pa.int64()))
        path = self.store.write_shard(table) if table.num_rows else None
        if path is not None:
            self.known_shards.add(path)
            self.known_ids.update(table.column("caption_id").to_pylist())
        self.stats.record("store", table.num_rows, start)
        if self.passthrough:
            return batch
        return pa.table({"shard": [str(path)], "rows": [table.num_rows]})


def export_webdataset(store: ParquetStore, out_dir: str | os.PathLike, samples_per_tar: int = 1000) -> list[Path]:
    """Write open_clip-style tar shards: one sample per image (`{id}_{i}.{ext}`, `.txt`, `.json`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    buf: list[tuple[str, bytes, str, dict[str, Any]]] = []

    def flush() -> None:
        if not buf:
            return
        final = out / f"{len(written):06d}.tar"
        tmp = out / f"{TMP_PREFIX}{uuid.uuid4().hex}.tar"
        with tarfile.open(tmp, "w") as tar:
            for key, img, ext, meta in buf:
                for suffix, data in ((ext, img), ("txt", meta["caption"].encode()),
                                     ("json", json.dumps(meta, sort_keys=True).encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    info.mtime = 0
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, final)
        written.append(final)
        buf.clear()

    cols = ["caption_id", "label", "concept", "caption", "images", "seeds", "image_format"]
    for shard in store.shards():
        for row in pq.read_table(shard, columns=cols).to_pylist():
            ext = {"jpeg": "jpg"}.get(row["image_format"] or "png", row["image_format"] or "png")
            for i, (img, seed) in enumerate(zip(row["images"], row["seeds"])):
                meta = {"caption": row["caption"], "caption_id": row["caption_id"], "label": row["label"],
                        "concept": row["concept"], "seed": seed, "image_index": i}
                buf.append((f"{row['caption_id']}_{i}", img, ext, meta))
                if len(buf) >= samples_per_tar:
                    flush()
    flush()
    return written
