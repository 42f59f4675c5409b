"""Reuse of streamed rows (data echoing): each row that arrives is trained on up to `data.replay` times.

A stream renders rows far slower than a training GPU consumes them (an H100 renders ~7 SD-1.5 images/s, a ViT-B/16
worker trains on ~1,700), and the published runs see each image several times. Arrived rows enter a bounded buffer
on the worker's device with `uses` uses each; every batch is `rows` distinct rows drawn at random from the buffer
(a row is never twice in one batch, and each use gets a fresh augmentation because augmentation runs in the step);
the buffer takes a new arrival whenever it has room for one, so the worker waits for the stream only when the
buffer cannot make a batch. When the stream ends, the buffer drains until fewer than `rows` rows are left.

Every draw is chosen on the host (numpy) and applied with device index ops, so nothing waits for the device. Every
rank draws with the same generator (`replay_rng`): how many batches a buffer gives depends on its draws (a batch
needs that many distinct rows with uses left), and the ranks of a group must make the same number of steps, or at
the stream's end one rank saves its last checkpoint (a barrier) while another runs a step (an all-reduce) and both
wait for ever. Their rows differ; the pattern of slots drawn is the same. The
row ids a batch carries are those of the rows used for the first time; a reused row's id reads -1, so the worker's
record of trained rows (the ledger's "consumed") holds each row once: a restart re-streams the rows never used,
and the buffered uses of rows already trained are dropped with the buffer.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from synray.data.ledger import ROW_ID

__all__ = ["ReplayBuffer", "replayed", "replay_rng", "default_capacity"]

#: rows the buffer holds by default: this many batches per use, so that a row's uses spread over many steps
BATCHES_PER_USE = 4


def default_capacity(rows: int, uses: int) -> int:
    return BATCHES_PER_USE * uses * rows


class ReplayBuffer:
    """`capacity` row slots of preprocessed tensors on one device, each with the uses it has left."""

    def __init__(self, capacity: int, uses: int, rng: np.random.Generator) -> None:
        if uses < 1 or capacity < 1:
            raise ValueError(f"a replay buffer needs uses >= 1 and capacity >= 1; got {uses}, {capacity}")
        self.capacity, self.uses, self.rng = capacity, uses, rng
        self.left = np.zeros(capacity, dtype=np.int64)        # uses left per slot (0: free)
        self.slots: dict[str, torch.Tensor] = {}

    @property
    def filled(self) -> int:
        return int(np.count_nonzero(self.left))

    def room(self) -> int:
        return self.capacity - self.filled

    def put(self, batch: dict[str, torch.Tensor]) -> None:
        """Rows of an arrived batch into free slots, each with all its uses."""
        n = int(next(iter(batch.values())).shape[0])
        free = np.flatnonzero(self.left == 0)
        if n > free.size:
            raise ValueError(f"{n} rows do not fit the {free.size} free slots of the replay buffer")
        if not self.slots:
            self.slots = {k: torch.empty((self.capacity, *v.shape[1:]), dtype=v.dtype, device=v.device)
                          for k, v in batch.items()}
        where = free[:n]
        index = _on(torch.from_numpy(where), next(iter(batch.values())).device)
        for k, v in batch.items():
            self.slots[k].index_copy_(0, index, v)
        self.left[where] = self.uses

    def take(self, rows: int) -> tuple[dict[str, torch.Tensor], int]:
        """`rows` distinct filled slots drawn at random: their tensors (a reused row's id set to -1) and how many of
        them are used for the first time."""
        filled = np.flatnonzero(self.left > 0)
        if filled.size < rows:
            raise ValueError(f"the replay buffer holds {filled.size} rows, fewer than a batch of {rows}")
        picked = np.sort(self.rng.choice(filled, size=rows, replace=False))
        first = self.left[picked] == self.uses
        self.left[picked] -= 1
        device = next(iter(self.slots.values())).device
        index = _on(torch.from_numpy(picked), device)
        out = {k: v.index_select(0, index) for k, v in self.slots.items()}
        if ROW_ID in out:
            out[ROW_ID] = torch.where(_on(torch.from_numpy(first), device), out[ROW_ID],
                                      torch.full_like(out[ROW_ID], -1))
        return out, int(first.sum())


def _on(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the copy."""
    return host.to(device, non_blocking=True)


def replay_rng(seed: int, step: int) -> np.random.Generator:
    """The draws of a group's replay buffers from `step` on: the same on every rank (never the rank's own)."""
    return np.random.default_rng([seed, step, 1])


def replayed(batches: Iterator[tuple[dict[str, torch.Tensor], float, int]], uses: int, rows: int, capacity: int,
             rng: np.random.Generator) -> Iterator[tuple[dict[str, torch.Tensor], float, int]]:
    """(batch, seconds waited for the stream, rows used for the first time) with each streamed row used up to `uses`
    times through a buffer of `capacity` rows (at least one batch); `batches` yields the stream's (batch, wait,
    new rows)."""
    buffer = ReplayBuffer(max(capacity, rows), uses, rng)
    waited, ended = 0.0, False
    while True:
        while not ended and buffer.room() >= rows:
            try:
                batch, wait_s, _ = next(batches)
            except StopIteration:
                ended = True
                break
            waited += wait_s
            buffer.put(batch)
        if buffer.filled < rows:
            return
        batch, new = buffer.take(rows)
        yield batch, waited, new
        waited = 0.0
