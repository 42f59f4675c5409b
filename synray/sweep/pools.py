"""Data pools of a sweep: one generated store per setting that changes the images, of the largest data scale
any trial asks for; a trial with N captions trains on the pool's first N rows (plan-row order) and the first
m images of each, so smaller scales are nested in larger ones and nothing is generated per trial."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from synray.config import ConfigError, RunConfig
from synray.generation.pipeline import store_fingerprint
from synray.plan import derive_config, heldout_config
from synray.sweep.rules import PER_CAPTION_KEY, POOLS_DIR, steps_rule, trial_steps
from synray.sweep.space import SCALE_KEY, SearchSpace, trial_overrides

__all__ = ["Pool", "SweepData", "plan_pools", "trial_config", "steps_rule", "PER_CAPTION_KEY", "POOLS_DIR"]

HELDOUT_DIR = "heldout"


@dataclass(frozen=True)
class Pool:
    """One generated store that trials sharing its image settings read nested subsets of."""

    fingerprint: str
    cfg: RunConfig                   # the generation config: the largest scale, the most images per caption
    path: str

    @property
    def captions(self) -> int:
        return self.cfg.data.num_captions

    @property
    def per_caption(self) -> int:
        return self.cfg.images.per_caption


@dataclass(frozen=True)
class SweepData:
    """Every pool of a sweep, and the held-out set all trials are scored on."""

    pools: dict[str, Pool]
    heldout_cfg: RunConfig | None    # generated once into heldout_path (None: eval.dataset, or no evaluation)
    heldout_path: str | None

    def pool_for(self, cfg: RunConfig) -> Pool:
        fp = store_fingerprint(_pool_config(cfg, 1, max(p.per_caption for p in self.pools.values())))
        if fp not in self.pools:
            raise ConfigError(f"no data pool for this trial's image settings (fingerprint {fp}): the trial's "
                              "config changes its images in a way the sweep did not plan for")
        return self.pools[fp]


def _pool_config(cfg: RunConfig, captions: int, per_caption: int) -> RunConfig:
    return derive_config(cfg, {"data.num_captions": captions, PER_CAPTION_KEY: per_caption, "data.mode": "stream",
                               "data.store_dir": None})


def _largest_scale(base: RunConfig, space: SearchSpace) -> int:
    """The most captions a trial can ask for; tune.pool_captions, when set, must hold it."""
    largest = max(int(v) for v in space.values_of(base, SCALE_KEY))
    wanted = base.tune.pool_captions
    if wanted is not None and wanted < largest:
        raise ConfigError(f"tune.pool_captions={wanted}, but a trial can ask for {largest} captions "
                          f"({SCALE_KEY}): a data scale cannot be larger than its pool")
    return wanted or largest


def _check_continuous(base: RunConfig, space: SearchSpace, per_caption: int) -> None:
    """A range over a setting that changes the images would need a pool per drawn value: refused."""
    for d in space.dims:
        if d.finite or d.key in (SCALE_KEY, PER_CAPTION_KEY):
            continue
        lo, hi = (store_fingerprint(_pool_config(derive_config(base, {d.key: v}), 1, per_caption)) for v in d.values)
        if lo != hi:
            raise ConfigError(f"tune.space.{d.key}: {d.kind} over a setting that changes the images needs a data "
                              "pool per drawn value; give it as grid or choice, so each value's pool is "
                              "generated once")


def plan_pools(base: RunConfig, space: SearchSpace, root: str) -> SweepData:
    """The pools the sweep's trials need (keyed by store fingerprint) and its held-out set."""
    if any(not float(v).is_integer() for v in space.values_of(base, PER_CAPTION_KEY)):
        raise ConfigError(f"{PER_CAPTION_KEY} must be an integer in a sweep")
    per_caption = max(int(v) for v in space.values_of(base, PER_CAPTION_KEY))
    captions = _largest_scale(base, space)
    _check_continuous(base, space, per_caption)
    pools: dict[str, Pool] = {}
    for params in space.finite_points():
        cfg = _pool_config(derive_config(base, trial_overrides(space, params)), captions, per_caption)
        fp = store_fingerprint(cfg)
        pools.setdefault(fp, Pool(fp, cfg, f"{root}/{POOLS_DIR}/{fp}"))
    heldout = None
    if base.eval.enabled and not base.eval.dataset:
        heldout = heldout_config(_pool_config(base, base.data.num_captions, per_caption))
    return SweepData(pools, heldout, f"{root}/{HELDOUT_DIR}" if heldout is not None else None)


def trial_config(base: RunConfig, space: SearchSpace, data: SweepData, params: dict[str, Any]) -> RunConfig:
    """The run config of one trial: its overrides, then stored mode on its pool's nested subset."""
    cfg = derive_config(base, trial_overrides(space, params))
    pool = data.pool_for(cfg)
    extra: dict[str, Any] = {"data.mode": "stored", "data.store_dir": pool.path,
                             "data.first_rows": cfg.data.num_captions, "data.first_images": cfg.images.per_caption,
                             "train.steps": trial_steps(cfg)}
    if data.heldout_path:
        extra["eval.dataset"] = data.heldout_path
    return derive_config(cfg, extra)
