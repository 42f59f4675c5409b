"""The replay buffer: each streamed row used up to `uses` times, never twice in a batch, its id recorded once."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from synray.data.ledger import ROW_ID
from synray.train.replay import ReplayBuffer, replay_rng, replayed


def stream(arrivals: int, rows: int, log: list[int] | None = None):
    """Batches of `rows` rows whose payload is the row's id (so a batch's rows can be told apart), 1 s waited each."""
    for a in range(arrivals):
        if log is not None:
            log.append(a)
        ids = torch.arange(a * rows, (a + 1) * rows)
        yield {ROW_ID: ids.clone(), "payload": ids.float()[:, None].repeat(1, 3)}, 1.0, rows


@pytest.mark.parametrize("uses, rows, capacity, arrivals", [(1, 4, 4, 10), (2, 4, 8, 10), (3, 4, 48, 30),
                                                          (5, 3, 20, 17), (4, 8, 8, 6)])
def test_each_row_is_used_up_to_uses_times_and_its_id_recorded_once(uses, rows, capacity, arrivals):
    batches = list(replayed(stream(arrivals, rows), uses, rows, capacity, np.random.default_rng(0)))
    total = arrivals * rows
    used = Counter()
    first_ids: list[int] = []
    for batch, _, new in batches:
        payload = batch["payload"][:, 0].long().tolist()
        assert len(payload) == rows and len(set(payload)) == rows        # distinct rows in a batch
        used.update(payload)
        ids = batch[ROW_ID].tolist()
        assert all(i in (p, -1) for i, p in zip(ids, payload))          # the row's own id, or -1 for a reuse
        first_ids += [i for i in ids if i >= 0]
        assert new == sum(i >= 0 for i in ids)
    assert max(used.values()) <= uses
    assert len(first_ids) == len(set(first_ids)) == len(used)            # each row's id once, at its first use
    assert total - len(used) < rows                                      # all but less than a batch are used
    assert len(batches) * rows == sum(used.values())
    assert sum(used.values()) > uses * total - capacity                 # only the last buffer's uses may be cut


def test_the_stream_is_read_only_when_the_buffer_has_room_and_waits_are_passed_on():
    pulled: list[int] = []
    it = replayed(stream(20, 4, pulled), uses=3, rows=4, capacity=12, rng=np.random.default_rng(1))
    _, waited, new = next(it)
    assert len(pulled) == 3 and waited == 3.0 and new == 4     # the first batch: after filling the buffer only
    waits = [w for _, w, _ in it]
    assert sum(waits) + waited == 20.0                          # every arrival's wait is reported once


def test_a_buffer_refuses_rows_beyond_its_capacity_and_batches_beyond_its_rows():
    buffer = ReplayBuffer(capacity=6, uses=2, rng=np.random.default_rng(0))
    batch, _, _ = next(stream(1, 4))
    buffer.put(batch)
    with pytest.raises(ValueError, match="do not fit"):
        buffer.put(batch)
    with pytest.raises(ValueError, match="fewer than a batch"):
        buffer.take(5)
    assert buffer.room() == 2 and buffer.filled == 4



#: (uses, rows, capacity, arrivals): a rank's replay settings and its share of the stream
GROUP_SETTINGS = [(2, 2, 8, 15), (2, 4, 16, 10), (3, 4, 48, 30), (5, 3, 20, 17), (2, 8, 64, 7), (4, 2, 8, 9),
                  (2, 2, 4, 30), (3, 2, 6, 25)]


def test_every_rank_of_a_group_gets_the_same_number_of_batches_from_its_replay_buffer():
    """The ranks of a group read equal shares of the stream (Ray Train's equal split, whole batches) and must make
    the same number of steps: at the stream's end a rank with one batch fewer would save its last checkpoint (a
    barrier) while another runs a step (an all-reduce), and both would wait for ever. Ranks 0-3 with the group's
    generator get equal counts in every setting; with a generator of each rank's own (as the worker drew before),
    the counts differ in some settings, since how long the buffer drains depends on its draws."""
    def count(rng: np.random.Generator, rank: int, uses: int, rows: int, capacity: int, arrivals: int) -> int:
        shard = (({k: v + 1000 * rank for k, v in b.items()}, w, n) for b, w, n in stream(arrivals, rows))
        return sum(1 for _ in replayed(shard, uses, rows, capacity, rng))

    own_split = []
    for setting in GROUP_SETTINGS:
        shared = {count(replay_rng(7, 3), rank, *setting) for rank in range(4)}
        assert len(shared) == 1, (setting, shared)
        own = {count(np.random.default_rng([7, rank, 3, 1]), rank, *setting) for rank in range(4)}
        own_split.append(len(own) > 1)
    assert any(own_split), "no setting shows the divergence the group's generator prevents"
