"""The planning step of a sweep: the search space, the data pools, the trials' configs and what each trial asks of
the cluster, all checked before Ray starts (`synray sweep` executes the plan)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from synray.config import LOSS_METRIC, ConfigError, RunConfig
from synray.data.storage import Location, local_file
from synray.eval.registry import protocol_of
from synray.plan import check_eval_protocols, check_subset_fills_a_batch, load_run_config, run_plan_stages
from synray.stages import by_phase
from synray.sweep.pools import SweepData, plan_pools, trial_config
from synray.sweep.rules import MIN_SCALES, SWEEP_CONFIG
from synray.sweep.space import SCALE_KEY, SearchSpace, check_space

__all__ = ["SweepPlan", "TrialResources", "plan_sweep", "plan_sweep_command", "sweep_root", "LOSS_METRIC"]

#: how much of tune.driver_resource a trial's driver takes
DRIVER_RESOURCE_SHARE = 0.01


@dataclass(frozen=True)
class TrialResources:
    """What one trial holds while it runs: its driver (the Tune function), its training workers and data stages."""

    driver: dict[str, float]
    cpus: float
    gpus: float

    def concurrency(self, cluster: dict[str, float]) -> int:
        """Trials that fit on `cluster` (Ray's total resources) at once; at least 1."""
        fits = [cluster.get("CPU", 0.0) / self.cpus]
        if self.gpus:
            fits.append(cluster.get("GPU", 0.0) / self.gpus)
        return max(1, math.floor(min(fits) + 1e-9))


@dataclass(frozen=True)
class SweepPlan:
    """Everything `synray sweep` does, decided before Ray starts."""

    cfg: RunConfig
    space: SearchSpace
    data: SweepData
    root: Location
    resources: TrialResources
    trials: tuple[RunConfig, ...] = ()   # every grid trial's config, as it will run

    def describe(self) -> list[str]:
        t = self.cfg.tune
        lines = [f"sweep {self.cfg.name} -> {self.root}",
                 f"search: {t.num_samples} sample(s) of {self.space.count_grid()} grid point(s), "
                 f"scheduler {t.scheduler}, ranking {t.metric} ({t.mode})"]
        lines += [f"  {line}" for line in self.space.describe()]
        for p in self.data.pools.values():
            lines.append(f"pool {p.fingerprint}: {p.captions} captions x {p.per_caption} images -> {p.path}")
        if self.data.heldout_path:
            lines.append(f"held-out set: {self.cfg.eval.heldout_captions} captions -> {self.data.heldout_path}")
        r = self.resources
        lines.append(f"each trial: {r.cpus:g} CPU" + (f" + {r.gpus:g} GPU" if r.gpus else "")
                     + f" (its driver: {r.driver})")
        return lines


def sweep_root(cfg: RunConfig, root: str | None = None) -> Location:
    """`root`, tune.storage, or `<output_root>/sweeps/<name>`: a directory every node of the cluster sees, or a
    cloud URI."""
    return Location.of(root or cfg.tune.storage or f"{cfg.output_root.rstrip('/')}/sweeps/{cfg.name}")


def _check_metric(cfg: RunConfig) -> None:
    t = cfg.tune
    if t.metric == LOSS_METRIC:
        if t.mode != "min":
            raise ConfigError(f"tune.metric={LOSS_METRIC} is ranked with tune.mode=min")
        return
    protocols = check_eval_protocols(cfg)
    if not protocols:
        raise ConfigError(f"tune.metric={t.metric} is a probe figure, but eval.enabled is false; "
                          f"enable evaluation or rank by tune.metric={LOSS_METRIC}")
    protocol = protocol_of(t.metric)
    if protocol not in protocols:
        raise ConfigError(f"tune.metric={t.metric} comes from the {protocol} probe, which eval.protocols "
                          f"({', '.join(protocols)}) does not run")


def _check_scales(cfg: RunConfig, space: SearchSpace) -> None:
    """A swept data scale must give a fit at least MIN_SCALES points."""
    d = space.dim(SCALE_KEY)
    if d is None:
        return
    drawn = len(set(d.values)) if d.finite else cfg.tune.num_samples
    if drawn < MIN_SCALES:
        raise ConfigError(f"tune.space.{SCALE_KEY}: {drawn} data scale(s); a scaling fit needs at least "
                          f"{MIN_SCALES} (give more values, or drop {SCALE_KEY} from tune.space)")


def trial_resources(cfg: RunConfig, trials: list[RunConfig]) -> TrialResources:
    """A trial's driver and what its run holds in its busiest phase (synray.pipelines: the store's read tasks, the
    actor that skips consumed rows, the preprocessing actors and the training workers; then the held-out pass),
    the most any grid trial asks; tasks are counted too (a trial needs room for them while it runs)."""
    driver = {"CPU": cfg.tune.trial_cpus}
    if cfg.tune.driver_resource:
        driver[cfg.tune.driver_resource] = DRIVER_RESOURCE_SHARE
    cpus = gpus = 0.0
    for trial in trials:
        for held in by_phase(run_plan_stages(trial, check_eval_protocols(trial))).values():
            cpus = max(cpus, sum(s.actors * s.cpus for s in held))
            gpus = max(gpus, sum(s.actors * s.gpus for s in held))
    return TrialResources(driver, cfg.tune.trial_cpus + cpus, gpus)


def plan_sweep_command(config: str | None, overrides: list[str], out: str | None = None,
                       resume: str | None = None) -> SweepPlan:
    """The plan of `synray sweep CONFIG` / `jobs/sweep.py`: a config with overrides, or with `resume`, the
    sweep directory's own saved config (so every trial is the one it was)."""
    if resume:
        with local_file(Location.of(resume).join(SWEEP_CONFIG)) as saved:
            return plan_sweep(load_run_config(saved, overrides), root=resume)
    if not config:
        raise ConfigError("sweep needs a CONFIG, or --resume SWEEP_DIR")
    return plan_sweep(load_run_config(config, overrides), root=out)


def plan_sweep(cfg: RunConfig, root: str | None = None) -> SweepPlan:
    """Check a sweep (space, metric, scales, pools, every grid trial's config) without starting anything."""
    _check_metric(cfg)
    space = check_space(cfg)
    _check_scales(cfg, space)
    base = sweep_root(cfg, root)
    data = plan_pools(cfg, space, base.uri)
    trials = []
    for params in space.finite_points():
        try:  # every grid trial's config validates as it will run, and fills a batch
            trials.append(trial_config(cfg, space, data, params))
            check_subset_fills_a_batch(trials[-1])
        except ValueError as e:
            raise ConfigError(f"tune trial {params}: {e}") from None
    return SweepPlan(cfg, space, data, base, trial_resources(cfg, trials), tuple(trials))
