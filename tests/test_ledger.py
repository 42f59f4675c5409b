"""What a restarted stream skips and replays (synray.data.ledger); the store writer never writes an id twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synray.data.ledger import StreamLedger, decode_rows, encode_rows, load_consumed, replay_rows, save_consumed
from synray.data.store import ParquetStore, ShardWriter, to_row_table


def _rows(row_ids: list[int]) -> pa.Table:
    n = len(row_ids)
    return to_row_table({"row_id": row_ids, "caption_id": [f"{i:016x}" for i in row_ids],
                         "caption": [f"caption {i}" for i in row_ids], "label": [0] * n, "concept": ["c"] * n,
                         "images": [[b"x"]] * n, "seeds": [[1]] * n, "image_format": ["png"] * n})


def test_consumed_rows_round_trip_and_stay_small():
    ids = np.concatenate([np.arange(0, 50_000), np.arange(60_000, 60_010), [123_456]])
    data = encode_rows(np.random.default_rng(0).permutation(np.concatenate([ids, ids[:10]])))
    assert np.array_equal(decode_rows(data), ids)
    assert len(data) < 1_000  # a bitmap of dense plan rows, compressed: not 8 bytes a row
    assert decode_rows(encode_rows(np.zeros(0, np.int64))).size == 0
    with pytest.raises(ValueError, match=">= 0"):
        encode_rows(np.asarray([-1]))


def test_a_checkpoint_holds_the_union_of_every_ranks_rows(tmp_path: Path):
    save_consumed(tmp_path, 0, np.asarray([0, 2, 4]))
    save_consumed(tmp_path, 1, np.asarray([1, 3, 4]))
    assert load_consumed(tmp_path).tolist() == [0, 1, 2, 3, 4]
    assert load_consumed(None).size == 0 and load_consumed(tmp_path / "empty").size == 0


def test_ledger_skips_consumed_and_stored_rows_and_replays_stored_ones_not_consumed(tmp_path: Path):
    store = ParquetStore(tmp_path / "store")
    store.open_for_writing("fp", {})
    first = store.write_shard(_rows([0, 1, 2, 3]))    # consumed entirely: nothing to replay
    second = store.write_shard(_rows([4, 5, 6, 7]))   # 4 and 5 consumed: 6 and 7 replay
    ledger = StreamLedger(str(store.root))
    assert ledger.publish(np.asarray([0, 1, 2, 3, 4, 5, 9])) == 1
    view = ledger.view()
    assert view.skip_rows.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9]   # 9: consumed in stream mode, never stored
    assert view.replay_shards == [str(second)] and str(first) not in view.replay_shards
    assert sorted(view.stored_captions) == sorted(f"caption {i}" for i in range(8))
    assert view.remaining(12) == 3 and view.remaining(5) == 0
    assert replay_rows(str(second), view.consumed, ["row_id", "caption_id"]).column("row_id").to_pylist() == [6, 7]
    store.write_shard(_rows([8]))
    assert ledger.view() is view          # one snapshot per worker-group start ...
    ledger.publish(np.asarray([0]))
    assert 8 in ledger.view().skip_rows   # ... and a new one after the next


def test_ledger_without_a_store_skips_what_was_consumed():
    ledger = StreamLedger(None)
    assert ledger.view().skip_rows.size == 0   # a fresh stream
    ledger.publish(np.asarray([3, 1]))
    assert ledger.view().skip_rows.tolist() == [1, 3] and ledger.view().replay_shards == []


def test_shard_writer_never_writes_a_caption_id_twice(tmp_path: Path):
    store = ParquetStore(tmp_path / "store")
    store.open_for_writing("fp", {})
    store.write_shard(_rows([0, 1]))        # e.g. the last shard of a writer of the previous execution
    writer = ShardWriter(str(store.root), passthrough=True)
    out = writer(_rows([1, 2, 2, 3]))
    assert out.num_rows == 4                # passthrough: training still gets the batch
    writer(_rows([0, 3]))                   # everything known: no shard at all
    ids = [i for s in store.shards() for i in pq.read_table(s, columns=["caption_id"]).column(0).to_pylist()]
    assert sorted(ids) == [f"{i:016x}" for i in range(4)]
    assert writer.stats.local.rejected["store"]["already_stored"] == 4


def test_a_checkpoint_records_its_epoch_and_a_store_epoch_skips_what_it_consumed(tmp_path: Path):
    from synray.data.ledger import SkipConsumed, load_epoch, save_epoch

    assert load_epoch(tmp_path) == 0 and load_epoch(None) == 0   # a stream, or an older checkpoint
    save_epoch(tmp_path, 3)
    assert load_epoch(tmp_path) == 3
    skip = SkipConsumed.__new__(SkipConsumed)   # the actor's filter, with the set its ledger view would give
    skip.consumed = pa.array([1, 3], type=pa.int64())
    assert skip(_rows([0, 1, 2, 3])).column("row_id").to_pylist() == [0, 2]
    skip.consumed = pa.array([], type=pa.int64())
    assert skip(_rows([0, 1])).num_rows == 2
