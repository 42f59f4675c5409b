"""A training worker group's size, fixed or an elastic range [min, max], and how the rows of one optimizer step split
over a group of any size in it: every step trains on the configured global batch, or as near it as the size allows.

The configured step is `captions_per_worker x max workers x grad_accum` rows. A group of `w` workers trains it as
`w` micro-batches of `b` rows, `a` micro-steps each: `b x w x a` equal to it where some split is exact, with the
fewest micro-steps (at least `grad_accum`) whose micro-batch is no larger than the configured one (which is what
fits a worker's memory). A size with no exact split (9 workers sharing 512 rows) trains the most rows it can split
evenly, fewer by less than `w x a` (504), so a range at whole-node sizes ([8, 16]) also runs at the sizes between
them, which Ray Train starts when a node has GPUs held by something else. A range one of whose sizes would train
less than `1 - MAX_SHORTFALL` of the step is refused. The learning rate, which synray derives from the configured
step's images, and its schedule are the same at every size. A contrastive loss sees `b x w` rows per micro-step,
fewer than at full size when `a` grows: its negatives shrink with the group.
"""

from __future__ import annotations

__all__ = ["MAX_SHORTFALL", "WorkerCount", "bounds", "short_sizes", "splitting_rows", "step_rows", "step_split",
           "too_short"]

#: `train.num_workers`: a fixed count, or an elastic range (min, max)
WorkerCount = int | tuple[int, int]
#: the largest share of the configured step that a size of an elastic range may leave untrained
MAX_SHORTFALL = 0.05


def bounds(workers: WorkerCount) -> tuple[int, int]:
    """(min, max) of a worker count (equal for a fixed one)."""
    return (workers, workers) if isinstance(workers, int) else (int(workers[0]), int(workers[1]))


def step_rows(rows_per_worker: int, max_workers: int, grad_accum: int) -> int:
    """Rows of one optimizer step, as configured (at the largest size)."""
    return rows_per_worker * max_workers * grad_accum


def step_split(rows_per_worker: int, max_workers: int, grad_accum: int, world: int) -> tuple[int, int]:
    """(rows per worker micro-batch, micro-steps per optimizer step) with which `world` workers train the configured
    step: an exact split with the fewest micro-steps where one exists, else the split that trains the most rows (the
    fewest micro-steps among equals); never a micro-batch above `rows_per_worker`."""
    total = step_rows(rows_per_worker, max_workers, grad_accum)
    best: tuple[int, int] | None = None
    for accum in range(grad_accum, max(grad_accum, total // world) + 1):
        micro = min(rows_per_worker, total // (world * accum))
        if micro < 1:
            break
        if micro * world * accum == total:
            return micro, accum
        if best is None or micro * world * accum > best[0] * world * best[1]:
            best = (micro, accum)
    assert best is not None, (rows_per_worker, max_workers, grad_accum, world)
    return best


def short_sizes(rows_per_worker: int, workers: WorkerCount, grad_accum: int) -> dict[int, int]:
    """{size: rows its step trains} for the sizes of the range that train fewer rows than configured."""
    lo, hi = bounds(workers)
    total = step_rows(rows_per_worker, hi, grad_accum)
    trained = {w: w * _product(step_split(rows_per_worker, hi, grad_accum, w)) for w in range(lo, hi + 1)}
    return {w: rows for w, rows in trained.items() if rows < total}


def too_short(rows_per_worker: int, workers: WorkerCount, grad_accum: int) -> dict[int, int]:
    """The sizes of `short_sizes` that leave more than MAX_SHORTFALL of the step untrained."""
    total = step_rows(rows_per_worker, bounds(workers)[1], grad_accum)
    return {w: r for w, r in short_sizes(rows_per_worker, workers, grad_accum).items()
            if r < (1 - MAX_SHORTFALL) * total}


def splitting_rows(rows_per_worker: int, workers: WorkerCount, grad_accum: int, search: int = 4) -> int | None:
    """The micro-batch nearest `rows_per_worker` (from 1 to `search` times it) at which every size of the range
    trains within MAX_SHORTFALL of its step (a suggestion for a refused range), or None."""
    for rows in sorted(range(1, search * rows_per_worker + 1), key=lambda r: (abs(r - rows_per_worker), r)):
        if not too_short(rows, workers, grad_accum):
            return rows
    return None


def _product(split: tuple[int, int]) -> int:
    return split[0] * split[1]
