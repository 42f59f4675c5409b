"""A sweep's search space: `tune.space` (config path -> distribution) and `tune.variants`, checked against the run
config before anything starts, and turned into Ray Tune's param space and each trial's config."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from synray.config import ConfigError, RunConfig, SpaceSpec

__all__ = ["Dimension", "SearchSpace", "VARIANT_KEY", "FORBIDDEN_PREFIXES", "SCALE_KEY", "check_space",
           "method_name", "file_slug", "trial_overrides"]

#: the trial parameter naming its variant (a named group of overrides from tune.variants)
VARIANT_KEY = "variant"
#: the config path that sets a trial's data scale
SCALE_KEY = "data.num_captions"
#: config paths a sweep may not vary: the sweep itself, the Ray connection, where runs land
FORBIDDEN_PREFIXES = ("tune", "ray", "name", "description", "output_root", "model_cache")
#: grid combinations checked one by one before a sweep starts
MAX_CHECKED_COMBINATIONS = 4096
#: where inside a real-valued range a value is checked (not an integer for any sensible bounds)
FRACTIONAL_PROBE = 0.3719


@dataclass(frozen=True)
class Dimension:
    """One swept config path and its distribution."""

    key: str
    kind: str                        # grid, choice, uniform, loguniform, randint
    values: tuple[Any, ...]          # the values (grid, choice) or the bounds (lo, hi)

    @classmethod
    def from_spec(cls, key: str, spec: SpaceSpec) -> "Dimension":
        kind, values = spec.kind()
        return cls(key, kind, tuple(values))

    @property
    def finite(self) -> bool:
        return self.kind in ("grid", "choice")

    def probes(self) -> tuple[Any, ...]:
        """The values checked against the config: every value, or a range's bounds (and, for a real-valued
        range, a fractional value inside it, so an integer key refuses uniform and loguniform)."""
        if self.kind in ("uniform", "loguniform"):
            lo, hi = self.values
            return (lo, hi, lo + (hi - lo) * FRACTIONAL_PROBE)
        return self.values

    def largest(self) -> Any:
        return max(self.values)

    def tune_domain(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        return tune.randint(self.values[0], self.values[1] + 1)  # tune's upper bound is exclusive

    def describe(self) -> str:
        return f"{self.key}: {self.kind} {list(self.values)}"


@dataclass(frozen=True)
class SearchSpace:
    """The swept dimensions and the named variants, as checked."""

    dims: tuple[Dimension, ...]
    variants: dict[str, dict[str, Any]]

    def dim(self, key: str) -> Dimension | None:
        return next((d for d in self.dims if d.key == key), None)

    def param_space(self) -> dict[str, Any]:
        """Ray Tune's param space: one entry per config path (and `variant` when there are variants)."""
        space = {d.key: d.tune_domain() for d in self.dims}
        if self.variants:
            from ray import tune

            space[VARIANT_KEY] = tune.grid_search(sorted(self.variants))
        return space

    def finite_points(self) -> list[dict[str, Any]]:
        """Every combination of the finite dimensions and variants, as trial params ([{}] when there are none)."""
        axes = [[(d.key, v) for v in d.values] for d in self.dims if d.finite]
        if self.variants:
            axes.append([(VARIANT_KEY, name) for name in sorted(self.variants)])
        return [dict(c) for c in itertools.product(*axes)]

    def count_grid(self) -> int:
        n = math.prod(len(d.values) for d in self.dims if d.kind == "grid")
        return n * max(1, len(self.variants))

    def values_of(self, cfg: RunConfig, key: str) -> list[Any]:
        """Every value trials can give `key`: from the space, the variants, or the base config."""
        out: list[Any] = []
        d = self.dim(key)
        if d is not None:
            out += list(d.values)
        out += [v[key] for v in self.variants.values() if key in v]
        if d is None and (not self.variants or any(key not in v for v in self.variants.values())):
            out.append(_get_path(cfg.to_dict(), key))
        return out

    def describe(self) -> list[str]:
        lines = [d.describe() for d in self.dims]
        lines += [f"variant {name}: {o}" for name, o in sorted(self.variants.items())]
        return lines


def method_name(params: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """A trial's method: its variant and swept values other than the data scale and the keys in `ignore`."""
    parts = [str(params[VARIANT_KEY])] if VARIANT_KEY in params else []
    parts += [f"{k}={params[k]}" for k in sorted(params) if k not in (VARIANT_KEY, SCALE_KEY, *ignore)]
    return ", ".join(parts) or "all trials"


def file_slug(name: str) -> str:
    """A method's name as part of a file name."""
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()[:60]


def trial_overrides(space: SearchSpace, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's config-path overrides: its variant's group, then its sampled values."""
    out = dict(space.variants.get(params.get(VARIANT_KEY), {}))
    out.update({k: v for k, v in params.items() if k != VARIANT_KEY})
    return out


def _get_path(d: dict[str, Any], key: str) -> Any:
    node: Any = d
    for part in key.split("."):
        node = node[part]
    return node


def _check_key(base: RunConfig, key: str, where: str) -> None:
    top = key.split(".")[0]
    if top in FORBIDDEN_PREFIXES:
        raise ConfigError(f"{where}: {key} cannot be swept (the sweep does not vary {', '.join(FORBIDDEN_PREFIXES)})")
    try:
        _get_path(base.to_dict(), key)
    except (KeyError, TypeError):
        from synray.plan import derive_config   # checking a space needs the registries; reading a sweep does not

        try:  # the config's own message names the unknown key and what the section has
            derive_config(base, {key: None})
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        raise ConfigError(f"{where}: {key} is not a key of the run config") from None


def _check_values(base: RunConfig, overrides: dict[str, Any], where: str) -> RunConfig:
    from synray.plan import derive_config   # checking a space needs the registries; reading a sweep does not

    try:
        return derive_config(base, overrides)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def check_space(base: RunConfig) -> SearchSpace:
    """The checked search space of `base.tune`: every key exists in the run config, every value (a range's
    bounds) is allowed for its key, and every combination of grid values and variants makes a valid config."""
    t = base.tune
    dims = tuple(Dimension.from_spec(k, s) for k, s in t.space.items())
    for d in dims:
        _check_key(base, d.key, f"tune.space.{d.key}")
        for v in d.probes():
            _check_values(base, {d.key: v}, f"tune.space.{d.key}={v!r}")
    for name, overrides in t.variants.items():
        if VARIANT_KEY in overrides or not overrides:
            raise ConfigError(f"tune.variants.{name}: give config-path overrides (e.g. train.loss: simclr)")
        for key in overrides:
            _check_key(base, key, f"tune.variants.{name}.{key}")
            if any(d.key == key for d in dims):
                raise ConfigError(f"tune.variants.{name}.{key}: {key} is also in tune.space; sweep it in one place")
        _check_values(base, overrides, f"tune.variants.{name}")
    space = SearchSpace(dims, dict(t.variants))
    points = space.finite_points()
    if len(points) > MAX_CHECKED_COMBINATIONS:
        raise ConfigError(f"tune.space: {len(points)} grid combinations; at most {MAX_CHECKED_COMBINATIONS} "
                          "(use choice or ranges with tune.num_samples for large spaces)")
    for p in points:
        _check_values(base, trial_overrides(space, p), f"tune trial {p}")
    return space
