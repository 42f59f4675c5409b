"""What a restarted stream skips and replays: the plan rows training consumed up to its checkpoint, and a store's rows.

Rows are named by their `row_id` (the index in the run's generation plan; with the config it fixes the
caption id). Training workers record the rows they trained on and save them, cumulatively, in every
checkpoint (`save_consumed`). When a worker group starts (fresh, after a failure, or after a driver
restart), rank 0 publishes the restored set to the run's `StreamLedger` actor before any worker reads a
row; the stream's stages then ask the ledger once for a `StreamView`: the rows to skip (consumed or
already stored), the stored rows to replay into training (stored, not consumed), and how many rows are
still to be generated.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from synray.data.store import ROW_ID, ParquetStore

CONSUMED_PREFIX = "consumed-rank"
EPOCH_FILE = "stream-epoch.json"


# ------------------------------------------------------------------------------- consumed rows
def encode_rows(row_ids: np.ndarray) -> bytes:
    """A set of row ids as a zlib-compressed bitmap (plan rows are dense, so this stays small)."""
    ids = np.unique(np.asarray(row_ids, dtype=np.int64))
    if ids.size and ids[0] < 0:
        raise ValueError(f"row ids must be >= 0; got {ids[0]}")
    bits = np.zeros(int(ids[-1]) + 1 if ids.size else 0, dtype=bool)
    bits[ids] = True
    return np.int64(bits.size).tobytes() + zlib.compress(np.packbits(bits).tobytes(), 6)


def decode_rows(data: bytes) -> np.ndarray:
    """The sorted row ids of `encode_rows` output."""
    n = int(np.frombuffer(data[:8], dtype=np.int64)[0])
    bits = np.unpackbits(np.frombuffer(zlib.decompress(data[8:]), dtype=np.uint8), count=n).astype(bool)
    return np.flatnonzero(bits).astype(np.int64)


def save_consumed(directory: Path, rank: int, row_ids: np.ndarray) -> Path:
    """Write this rank's consumed rows into its part of a checkpoint."""
    path = Path(directory) / f"{CONSUMED_PREFIX}{rank}.bin"
    path.write_bytes(encode_rows(row_ids))
    return path


def save_epoch(directory: Path, epoch: int) -> Path:
    """The epoch a checkpoint's consumed rows belong to (a store is read in epochs; a stream is epoch 0)."""
    path = Path(directory) / EPOCH_FILE
    path.write_text(json.dumps({"epoch": int(epoch)}))
    return path


def load_epoch(directory: Path | None) -> int:
    path = Path(directory) / EPOCH_FILE if directory is not None else None
    return int(json.loads(path.read_text())["epoch"]) if path is not None and path.is_file() else 0


def load_consumed(directory: Path | None) -> np.ndarray:
    """The union of every rank's consumed rows in a checkpoint (empty for none, or an older checkpoint)."""
    if directory is None:
        return np.zeros(0, dtype=np.int64)
    parts = [decode_rows(p.read_bytes()) for p in sorted(Path(directory).glob(f"{CONSUMED_PREFIX}*.bin"))]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


# ------------------------------------------------------------------------------------- ledger
@dataclass
class StreamView:
    """What one execution of the stream works from (taken once, after the workers published)."""

    skip_rows: np.ndarray                  # row ids not to generate: consumed, or already in the store
    replay_shards: list[str] = field(default_factory=list)   # store shards holding rows to replay
    consumed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    stored_captions: list[str] = field(default_factory=list)  # for caption de-duplication
    generation: int = 0                    # how many times workers published (1 = the first start)

    def remaining(self, wanted: int) -> int:
        """Rows still to generate so that consumed + stored + new = wanted."""
        return max(0, wanted - len(self.skip_rows))


class StreamLedger:
    """The run's memory across worker-group restarts; a Ray actor (`ray.remote(StreamLedger)`) of the driver."""

    def __init__(self, store_dir: str | None = None) -> None:
        self.store_dir = store_dir
        self.consumed = np.zeros(0, dtype=np.int64)
        self.generation = 0
        self._view: StreamView | None = None

    def publish(self, consumed: np.ndarray) -> int:
        """A worker group starts from a checkpoint that consumed these rows (none: a fresh start)."""
        self.consumed = np.unique(np.asarray(consumed, dtype=np.int64))
        self.generation += 1
        self._view = None
        return self.generation

    def view(self) -> StreamView:
        """The skip and replay sets, read from the store once per published generation."""
        if self._view is None:
            self._view = self._snapshot()
        return self._view

    def _snapshot(self) -> StreamView:
        stored_rows = np.zeros(0, dtype=np.int64)
        shards: list[str] = []
        captions: list[str] = []
        store = ParquetStore(self.store_dir) if self.store_dir else None
        if store is not None and store.root.is_dir():
            for shard in store.shards():
                table = pq.read_table(shard, columns=["row_id", "caption"])
                rows = table.column("row_id").to_numpy().astype(np.int64)
                stored_rows = np.concatenate([stored_rows, rows])
                captions.extend(table.column("caption").to_pylist())
                if not np.isin(rows, self.consumed).all():
                    shards.append(str(shard))
        return StreamView(skip_rows=np.union1d(self.consumed, stored_rows), replay_shards=shards,
                          consumed=self.consumed, stored_captions=captions, generation=self.generation)


def replay_rows(shard: str, consumed: np.ndarray, columns: list[str] | None = None) -> pa.Table:
    """A stored shard's rows that training has not consumed (a pyarrow table)."""
    return without_rows(pq.read_table(shard, columns=columns), pa.array(consumed, type=pa.int64()))


def without_rows(table: pa.Table, row_ids: pa.Array) -> pa.Table:
    """The rows of `table` whose `row_id` is not among `row_ids`."""
    if not len(row_ids):
        return table
    return table.filter(pc.invert(pc.is_in(table.column(ROW_ID), value_set=row_ids)))


class SkipConsumed:
    """Ray Data UDF over stored rows read in epochs: drops the rows the restored checkpoint's epoch trained on.
    Built anew for every epoch's execution, it reads the ledger then (empty after the first epoch)."""

    def __init__(self, ledger: Any) -> None:
        import ray

        self.consumed = pa.array(ray.get(ledger.view.remote()).consumed, type=pa.int64())

    def __call__(self, batch: pa.Table) -> pa.Table:
        return without_rows(batch, self.consumed)
