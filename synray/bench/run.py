"""`synray bench`: every measurement side by side in one run, printed as a table and written to bench.json.

Without a config it measures tiny models on the CPU: the `shapes` config's trainer (a), the `local`
config's diffusion and caption stages (b, c) and stream (f). With `--config` it measures that config's
own models and settings (on a GPU cluster: its GPU paths). (d) always runs on a local Ray with
declared GPUs, and (e) in this process.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from synray.bench.cluster import SIM_CPUS, SIM_GPUS, bench_cluster
from synray.bench.memory import bench_memory
from synray.bench.report import BenchReport, Ratio
from synray.bench.stages import bench_captions, bench_diffusion
from synray.bench.training import bench_loss, bench_trainer
from synray.config import RayConfig, RunConfig
from synray.images.diffusion import DiffusionRenderer
from synray.plan import load_run_config, plan_generation
from synray.programs.session import ray_address, session
from synray.programs.tracked import tracked_run
from synray.tracking import check_tracking

log = logging.getLogger(__name__)

__all__ = ["BenchSettings", "bench", "SECTIONS"]

#: the measurements, in the order they run
SECTIONS = ("a", "b", "c", "d", "e", "f")


@dataclass(frozen=True)
class BenchSettings:
    quick: bool = True
    config: str | None = None             # a config name or file whose models are measured (None: tiny models)
    overrides: tuple[str, ...] = ()
    only: tuple[str, ...] = SECTIONS      # the sections to run
    out: str = "bench.json"


def _configs(s: BenchSettings) -> tuple[RunConfig, RunConfig]:
    """(trainer config, generation config): the given config for both, else `shapes` and `local`."""
    if s.config:
        cfg = load_run_config(s.config, list(s.overrides))
        return cfg, cfg
    return load_run_config("shapes", list(s.overrides)), load_run_config("local", list(s.overrides))


def _section(report: BenchReport, key: str, fn: Callable[[], list[Ratio]]) -> None:
    start = time.perf_counter()
    log.info("bench (%s) ...", key)
    report.add(fn())
    log.info("bench (%s) took %.0f s", key, time.perf_counter() - start)


def bench(s: BenchSettings) -> BenchReport:
    """Run the selected sections; each runs in the Ray session it needs."""
    train_cfg, gen_cfg = _configs(s)
    report = BenchReport("quick" if s.quick else "full", s.config)
    start = time.perf_counter()
    gen = plan_generation(gen_cfg) if {"b", "c"} & set(s.only) else None
    with tempfile.TemporaryDirectory(prefix="synray-bench-") as tmp:
        work = Path(tmp)
        if {"a", "b", "c", "f"} & set(s.only):
            with session(gen_cfg.ray):
                if "a" in s.only:
                    _section(report, "a", lambda: bench_trainer(train_cfg, work, s.quick))
                if "b" in s.only:
                    if gen.t2i_path is None or not issubclass(gen.renderer, DiffusionRenderer):
                        report.skipped["b"] = f"images.backend={gen_cfg.images.backend} runs no diffusion model"
                    else:
                        _section(report, "b", lambda: bench_diffusion(gen_cfg, gen.t2i_path, s.quick))
                if "c" in s.only:
                    if gen.llm_path is None:
                        report.skipped["c"] = f"captions.backend={gen_cfg.captions.backend} runs no LLM"
                    else:
                        _section(report, "c", lambda: bench_captions(gen_cfg, gen.llm_path, s.quick))
                if "f" in s.only:
                    _section(report, "f", lambda: bench_memory(train_cfg, s.quick))
        if "d" in s.only:
            if ray_address(RayConfig()):
                report.skipped["d"] = "needs a local Ray with declared GPUs; run it without RAY_ADDRESS"
            else:
                with session(RayConfig(num_cpus=SIM_CPUS, num_gpus=SIM_GPUS, include_dashboard=False)):
                    _section(report, "d", lambda: bench_cluster(s.quick))
        if "e" in s.only:
            _section(report, "e", lambda: bench_loss(s.quick))
    report.ratios.sort(key=lambda r: r.key)
    report.elapsed_s = time.perf_counter() - start
    return report


def bench_command(s: BenchSettings) -> int:
    """Print the table and write bench.json, and log both to the config's tracker (experiment `bench`); exit 0 (a
    missed goal is a finding, not a failure)."""
    cfg = _configs(s)[0]
    check_tracking(cfg.tracking, cfg.output_root)
    report = bench(s)
    path = report.write(s.out)
    print(report.table())
    print(f"\nwrote {path}")
    tags = {"synray.bench.mode": report.mode, "synray.bench.config": report.config or "tiny models",
            "synray.bench.gpu": str(report.machine.get("gpu") or "none")}
    with tracked_run(cfg, f"bench-{report.date.replace(' ', '-')}", tags, experiment="bench") as tracker:
        if tracker is not None:
            tracker.log_metrics({f"bench/{r.key}": r.value for r in report.ratios}, 0)
            tracker.log_artifact(path)
            table = Path(path).with_suffix(".md")
            table.write_text(report.table() + "\n")
            tracker.log_artifact(table)
    return 0
