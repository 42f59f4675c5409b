"""A training worker group's size, fixed or an elastic range [min, max], and how the rows of one optimizer step split
over a group of any size in it: every step trains on the configured global batch, whatever the size.

The configured step is `captions_per_worker x max workers x grad_accum` rows. A group of `w` workers trains it as
`w` micro-batches of `b` rows, `a` micro-steps each, with `b x w x a` equal to it: the fewest micro-steps (at least
`grad_accum`) whose micro-batch is no larger than the configured one (which is what fits a worker's memory). The
learning rate, which synray derives from the images of a step, is then the same at every size. A contrastive loss
sees `b x w` rows per micro-step, fewer than at full size when `a` grows: its negatives shrink with the group.
"""

from __future__ import annotations

__all__ = ["WorkerCount", "bounds", "step_rows", "step_split", "unsplit_sizes", "splitting_rows"]

#: `train.num_workers`: a fixed count, or an elastic range (min, max)
WorkerCount = int | tuple[int, int]


def bounds(workers: WorkerCount) -> tuple[int, int]:
    """(min, max) of a worker count (equal for a fixed one)."""
    return (workers, workers) if isinstance(workers, int) else (int(workers[0]), int(workers[1]))


def step_rows(rows_per_worker: int, max_workers: int, grad_accum: int) -> int:
    """Rows of one optimizer step, as configured (at the largest size)."""
    return rows_per_worker * max_workers * grad_accum


def step_split(rows_per_worker: int, max_workers: int, grad_accum: int, world: int) -> tuple[int, int] | None:
    """(rows per worker micro-batch, micro-steps per optimizer step) that train the configured step on `world`
    workers; None when none is exact."""
    total = step_rows(rows_per_worker, max_workers, grad_accum)
    for accum in range(grad_accum, total // world + 1):
        if total % (world * accum) == 0 and total // (world * accum) <= rows_per_worker:
            return total // (world * accum), accum
    return None


def unsplit_sizes(rows_per_worker: int, workers: WorkerCount, grad_accum: int) -> list[int]:
    """The group sizes of the range whose workers cannot share the configured step evenly."""
    lo, hi = bounds(workers)
    return [w for w in range(lo, hi + 1) if step_split(rows_per_worker, hi, grad_accum, w) is None]


def splitting_rows(rows_per_worker: int, workers: WorkerCount, grad_accum: int, search: int = 4) -> int | None:
    """The micro-batch nearest `rows_per_worker` (from 1 to `search` times it) at which every size of the range splits
    the step evenly (a suggestion for a refused range), or None."""
    for rows in sorted(range(1, search * rows_per_worker + 1), key=lambda r: (abs(r - rows_per_worker), r)):
        if not unsplit_sizes(rows, workers, grad_accum):
            return rows
    return None
