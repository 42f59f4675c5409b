"""`synray sweep`: execute a SweepPlan with Ray Tune. The data pools and the held-out set are generated once, then
each trial (a Tune function) fits synray's TorchTrainer on its pool's nested subset and scores it."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from synray.config import ConfigError
from synray.data.files import write_json
from synray.data.store import ParquetStore
from synray.plan import plan_generation, plan_run
from synray.programs.generate import generate_to_store
from synray.programs.run import execute
from synray.programs.rundir import RunDir
from synray.programs.session import cluster_resources, session
from synray.sweep.planning import LOSS_METRIC, SweepPlan
from synray.sweep.pools import trial_config
from synray.sweep.report import SWEEP_CONFIG, START_FILE, TRIAL_FILE, TRIALS_DIR, SweepReport, write_report
from synray.sweep.space import trial_overrides
from synray.programs.tracked import TRACKING_FILE, open_run, outcome_metrics, tracked_run
from synray.tracking import Buffered, RunRef, check_tracking
from synray.train.engine import images_per_step
from synray.train.objectives import get_objective

__all__ = ["TUNE_DIR", "prepare_data", "run_trial", "sweep", "sweep_command"]

log = logging.getLogger(__name__)

#: Ray Tune's experiment folder inside the sweep directory (what --resume restores)
TUNE_DIR = "tune"


class TrainingReportCallback(TuneReportCallback):
    """Forwards rank 0's training reports to Tune, but not the step-0 export (it has no loss for a scheduler)."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and LOSS_METRIC in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def prepare_data(plan: SweepPlan) -> None:
    """Generate every pool and the held-out set once (resumable stores: a rerun only fills what is missing)."""
    todo = [(p.cfg, p.path) for p in plan.data.pools.values()]
    if plan.data.heldout_cfg is not None:
        todo.append((plan.data.heldout_cfg, plan.data.heldout_path))
    for cfg, path in todo:
        summary = generate_to_store(plan_generation(cfg, ParquetStore(path)), path)
        log.info("pool %s: %d rows (%d new)", path, summary["rows_total"], summary["rows_written"])


def _numbers(d: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_trial(params: dict[str, Any], plan: SweepPlan, parent: dict[str, Any] | None = None) -> None:
    """One trial (the Tune function): its config, its nested subset, fit with metrics forwarded to Tune, then
    its probes. The Train run lives at trials/<trial id>/train, so a restarted trial resumes its checkpoints.
    With a tracker, the trial is a child run of the sweep's run (`parent`)."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(plan.cfg, plan.space, plan.data, params)
    run_plan = plan_run(cfg, fresh=True)
    out = trial_dir(plan, trial_id)
    started = {"trial_id": trial_id, "params": params, "overrides": trial_overrides(plan.space, params),
               "captions": cfg.data.first_rows, "images_per_caption": run_plan.train.per_caption,
               "workers": cfg.train.max_workers, "views_per_step": views_per_step(cfg, run_plan),
               "ray_job_id": ray.get_runtime_context().get_job_id()}
    _write_json(out, START_FILE, started)
    tags = {"synray.trial_id": trial_id, **{f"synray.param.{k}": str(v) for k, v in params.items()}}
    with tracked_run(cfg, trial_id, tags, RunRef(**parent) if parent else None) as tracker:
        _trial_body(run_plan, out, started, tracker)


def _trial_body(run_plan: Any, out: RunDir, started: dict[str, Any], tracker: Any) -> None:
    done = execute(run_plan, out, callbacks=[TrainingReportCallback()], tracker=tracker)
    train = done.train
    record: dict[str, Any] = {**started, "steps": train["steps"], "train": train, "trained": {}, "init": {},
                              "work": trial_work(started, train["steps"])}
    final: dict[str, Any] = {"step": train["steps"], LOSS_METRIC: train["final_loss"]}
    if done.figures is not None:
        record["trained"], record["init"] = _numbers(done.figures["trained"]), _numbers(done.figures["init"])
        final.update(record["trained"])
    _write_json(out, TRIAL_FILE, record)
    if tracker is not None:
        tracker.log_metrics(outcome_metrics({"eval": {"trained": record["trained"], "init": record["init"]}}),
                            train["steps"])
        tracker.log_artifact(out.path / TRIAL_FILE)
    tune.report({k: v for k, v in final.items() if v is not None and not (isinstance(v, float) and math.isnan(v))})


def views_per_step(cfg: Any, run_plan: Any) -> int:
    """The images (augmented views) one optimizer step of this trial trains on, over all workers."""
    objective = get_objective(run_plan.train.objective)
    return images_per_step(cfg.train, objective.images_per_row(run_plan.train.per_caption), objective.views,
                           cfg.train.max_workers)


def trial_work(started: dict[str, Any], steps: int) -> dict[str, int]:
    """What a trial's data and training cost in units: captions generated, images rendered, views trained on."""
    return {"captions": started["captions"], "images": started["captions"] * started["images_per_caption"],
            "views": steps * started["views_per_step"]}


def trial_dir(plan: SweepPlan, trial_id: str) -> RunDir:
    """A trial's folder, trials/<trial id>: on shared storage, written in place; under a cloud URI, staged on the
    trial's node and uploaded, with Ray Train's checkpoints written to the URI directly."""
    return RunDir.at(plan.root.join(TRIALS_DIR, trial_id))


def _write_json(out: RunDir, name: str, record: dict[str, Any]) -> None:
    write_json(out.path / name, record)
    out.sync(name)


def _scheduler(plan: SweepPlan) -> Any:
    t = plan.cfg.tune
    if t.scheduler == "asha":
        # max_t past the last step: ASHA stops a trial that reaches max_t, before its evaluation would run
        return ASHAScheduler(time_attr="step", metric=LOSS_METRIC, mode="min", max_t=plan.cfg.train.steps + 1,
                             grace_period=t.asha_grace_steps, reduction_factor=t.asha_reduction_factor)
    return None


def _tuner(plan: SweepPlan, resume: bool, concurrency: int, parent: RunRef | None = None) -> tune.Tuner:
    t = plan.cfg.tune
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan,
                                                         parent=parent.to_dict() if parent else None),
                                    plan.resources.driver)
    path = plan.root.join(TUNE_DIR).uri
    if resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_errored=True)
    return tune.Tuner(
        trainable, param_space=plan.space.param_space(),
        tune_config=tune.TuneConfig(num_samples=t.num_samples, max_concurrent_trials=concurrency,
                                    scheduler=_scheduler(plan),
                                    search_alg=BasicVariantGenerator(max_concurrent=concurrency,
                                                                     random_state=plan.cfg.seed)),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=plan.root.uri,
                                  failure_config=tune.FailureConfig(max_failures=t.max_trial_failures)))


def sweep(plan: SweepPlan, resume: bool = False) -> SweepReport:
    """Generate the pools, run every trial (or the unfinished ones of an interrupted sweep), write the report."""
    root = plan.root
    if not resume and root.join(TUNE_DIR).exists():
        raise ConfigError(f"{root} holds a sweep already: continue it with `synray sweep --resume {root}`, "
                          "or set tune.storage to another folder")
    root.mkdir()
    if not root.join(SWEEP_CONFIG).is_file():
        root.join(SWEEP_CONFIG).write_text(plan.cfg.to_yaml())
    for line in plan.describe():
        log.info("plan: %s", line)
    check_tracking(plan.cfg.tracking, plan.cfg.output_root)   # an unreachable tracker: refused before Ray starts
    # the sweep's run, whose children the trials are; `--resume` finds it again in the sweep directory
    run = open_run(plan.cfg, f"sweep-{Path(plan.root.uri).name}", {"synray.config": plan.cfg.name,
                                                                  "synray.sweep": plan.root.uri},
                   saved=plan.root.join(TRACKING_FILE))
    parent = run.tracker.ref if run is not None else None
    with session(plan.cfg.ray):
        cluster = cluster_resources()
        missing = [k for k in plan.resources.driver if k not in cluster]
        if missing:
            raise ConfigError(f"tune.driver_resource={missing[0]}: no node of this cluster declares it (it has "
                              f"{', '.join(sorted(cluster))}); declare it on the CPU nodes, or unset it")
        prepare_data(plan)
        concurrency = plan.cfg.tune.max_concurrent_trials or plan.resources.concurrency(cluster)
        log.info("running up to %d trial(s) at once", concurrency)
        results = _tuner(plan, resume, concurrency, parent).fit()
    failed = [r for r in results if r.error is not None]
    for r in failed:
        log.error("trial %s failed: %s", Path(r.path).name, r.error)
    report = write_report(root)
    report.failed = len(failed)
    if failed:
        report.messages.append(f"{len(failed)} trial(s) failed; `synray sweep --resume {root}` retries them")
    if run is not None:
        log_report(run, report.files, failed=bool(failed))
    return report


def log_report(run: Buffered, files: list[Path | str], failed: bool) -> None:
    """The sweep's report (its table, fits and plots: those on a local or mounted path) on the sweep's run, which
    then ends."""
    for f in map(str, files):
        if "://" not in f and Path(f).is_file():
            run.log_artifact(Path(f), "report")
    run.close("FAILED" if failed else "FINISHED")


def sweep_command(plan: SweepPlan, resume: bool = False) -> int:
    report = sweep(plan, resume)
    print(f"sweep directory: {plan.root}")
    finished = sum(1 for r in report.rows if r["status"] == "finished")
    print(f"  {finished} finished trial(s), {len(report.rows) - finished} unfinished")
    for line in report.fit_lines():
        print(f"  {line}")
    for message in report.messages:
        print(f"  note: {message}")
    for path in report.files:
        print(f"  wrote {path}")
    return 1 if report.failed else 0
