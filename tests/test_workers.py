"""`train.num_workers` as an elastic range: every size of the range trains the configured step (rows per micro-batch x
workers x micro-steps = captions_per_worker x max x grad_accum) where an exact split exists, else the most rows it can
split, found against an exhaustive search; a range some size of which would train more than 5% less is refused,
naming the sizes and a micro-batch that works."""

from __future__ import annotations

import itertools

import pytest

from synray.config import ConfigError, load_config
from synray.config.workers import short_sizes, splitting_rows, step_split, too_short


def exhaustive(rows: int, top: int, accum: int, world: int) -> tuple[int, int]:
    """Every (micro-batch, micro-steps) pair within the micro-batch bound whose rows do not exceed the step, at
    least `grad_accum` micro-steps: the one that trains the most rows, with the fewest micro-steps among those."""
    total = rows * top * accum
    pairs = [(b, a) for a in range(accum, total + 1) for b in range(1, rows + 1) if b * world * a <= total]
    return min(pairs, key=lambda p: (-p[0] * p[1], p[1]))


def test_the_split_of_every_size_is_the_exhaustive_searchs_largest_then_fewest_micro_steps():
    for rows, top, accum in itertools.product((1, 3, 4, 8, 12, 64), (1, 2, 3, 5, 8, 9), (1, 2, 3)):
        for world in range(1, top + 1):
            assert step_split(rows, top, accum, world) == exhaustive(rows, top, accum, world), (rows, top, accum, world)
    assert step_split(64, 8, 1, 8) == (64, 1)         # the full size trains as configured
    assert step_split(32, 16, 1, 8) == (32, 2)        # half the group: the same 512 rows in two micro-steps
    assert step_split(32, 16, 1, 9) == (28, 2)        # 9 x 28 x 2 = 504 of 512: no exact split


def test_an_elastic_range_takes_a_list_and_a_fixed_count_stays_a_number():
    t = load_config("local", ["train.num_workers=[1, 3]", "train.captions_per_worker=4"]).train
    assert (t.num_workers, t.min_workers, t.max_workers, t.elastic, t.step_rows) == ((1, 3), 1, 3, True, 12)
    assert [(t.at_size(w).captions_per_worker, t.at_size(w).grad_accum) for w in (1, 2, 3)] == [(4, 3), (3, 2), (4, 1)]
    assert load_config("local", ["train.num_workers=[2, 2]"]).train.num_workers == 2
    assert not load_config("local", ["train.num_workers=2"]).train.elastic


@pytest.mark.parametrize("value, needle", [
    ("[3, 1]", "train.num_workers: [3, 1] is not allowed: [3, 1] is not a worker count"),
    ("[0, 2]", "is not a worker count: a number >= 1, or a range [min, max] with 1 <= min <= max"),
    ("[1, 2, 3]", "train.num_workers"),
])
def test_a_range_that_is_not_one_is_refused(value, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_config("local", [f"train.num_workers={value}"])


def test_a_range_at_whole_node_sizes_trains_within_5_percent_between_them():
    """[8, 16] with synclr-vitb16's 32 captions a worker: 8 and 16 train the 512 rows exactly, the sizes between
    them 504-510 rows (what Ray Train starts when GPUs of a node are held elsewhere)."""
    t = load_config("local", ["train.num_workers=[8, 16]", "train.captions_per_worker=32"]).train
    short = short_sizes(32, (8, 16), 1)
    assert set(short) == set(range(9, 16)) and all(0.95 * 512 <= r < 512 for r in short.values()), short
    for w in range(8, 17):
        s = t.at_size(w)
        assert s.captions_per_worker <= 32 and s.captions_per_worker * w * s.grad_accum == short.get(w, 512)


def test_a_range_whose_sizes_train_much_less_than_the_step_is_refused_naming_them_and_a_micro_batch_that_can():
    with pytest.raises(ConfigError) as e:
        load_config("local", ["train.num_workers=[1, 4]", "train.captions_per_worker=2"])
    text = str(e.value)
    assert "a step of 8 rows (captions_per_worker=2 x 4 workers x grad_accum=1) splits evenly over 3 workers 6 rows " \
           "only, more than 5% short of it" in text and "captions_per_worker=3 splits its step over every size" in text
    assert too_short(3, (1, 4), 1) == {} and splitting_rows(2, (1, 4), 1) == 3
    with pytest.raises(ConfigError, match="narrow the range"):
        load_config("local", ["train.num_workers=[1, 64]", "train.captions_per_worker=1"])


def test_the_run_summary_counts_the_steps_each_group_size_trained():
    """Reports every 2 steps: steps 1-4 at 2 workers, a restart at 1 worker from step 2's checkpoint retrains 3-6,
    then 3 workers: steps 3-4 count for the size that trained them last."""
    from synray.programs.run import steps_by_world_size

    reports = [{"step": 2, "world_size": 2}, {"step": 4, "world_size": 2}, {"step": 4, "world_size": 1},
               {"step": 6, "world_size": 1}, {"step": 8, "world_size": 3}, {"event": "fit_start"}]
    assert steps_by_world_size(reports) == {"2": 2, "1": 4, "3": 2}
