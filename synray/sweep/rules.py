"""A sweep's fixed rules, with nothing heavy to import: where its config and pools live, how many steps a trial
trains, how many data scales a fit needs."""

from __future__ import annotations

import math
from typing import Callable

from synray.config import RunConfig

#: the swept key that sets how many images each caption of a pool has
PER_CAPTION_KEY = "images.per_caption"
#: the folder of a sweep's directory that holds its data pools
POOLS_DIR = "pools"
#: the sweep's own config in its directory (what `--resume` and `synray report` read)
SWEEP_CONFIG = "config.yaml"
#: data scales a power-law fit needs
MIN_SCALES = 3


def steps_rule(cfg: RunConfig) -> Callable[[int], int]:
    """The budget rule: a trial's steps as a function of its captions: train.steps (the same compute at every
    scale), or tune.epochs passes over its captions."""
    if cfg.tune.budget == "steps":
        return lambda captions: cfg.train.steps
    t = cfg.train
    rows_per_step = t.step_rows
    return lambda captions: max(1, math.ceil(cfg.tune.epochs * captions / rows_per_step))


def trial_steps(cfg: RunConfig) -> int:
    """A trial's steps under the budget rule."""
    return steps_rule(cfg)(cfg.data.num_captions)
