"""The `synray` command: parses arguments, plans, and dispatches to a program; no logic of its own.

Each command imports its program when it runs, so `synray --help` and `synray config list` answer
without loading torch, Ray and the models; the library modules themselves import at the top.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import version

from synray.config import ConfigError, builtin_configs
from synray.eval.registry import protocol_names, tune_metrics
from synray.programs.errors import exit_status, job_logging


def _add_config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        p.add_argument("config", nargs="?", default="local", help="built-in config name or YAML file (default: local)")
    else:
        p.add_argument("config", help="built-in config name or YAML file")
    _add_overrides(p)


def _add_overrides(p: argparse.ArgumentParser, example: str = "train.steps=3") -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help=f"override a config value (repeatable), e.g. --set {example}")


def cmd_config_show(args: argparse.Namespace) -> int:
    from synray.plan import load_run_config

    print(load_run_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def cmd_config_list(args: argparse.Namespace) -> int:
    for name, desc in builtin_configs():
        print(f"{name}\t{desc}")
    return 0


def cmd_models_tiny(args: argparse.Namespace) -> int:
    from synray.models.tiny import build_all

    paths = build_all(args.dir, seed=args.seed)
    for kind, path in paths.items():
        print(f"{kind}\t{path}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from synray.plan import load_run_config
    from synray.programs.planview import plan_command

    return plan_command(load_run_config(args.config, args.overrides), args.cluster, args.address, args.rates)


def cmd_generate(args: argparse.Namespace) -> int:
    from synray.data.store import ParquetStore
    from synray.plan import load_run_config, plan_generation
    from synray.programs.generate import generate_command

    cfg = load_run_config(args.config, args.overrides)
    out = args.out or cfg.data.store_dir
    if not out:
        raise ConfigError("generate needs --out (the store directory): the config sets no data.store_dir")
    return generate_command(plan_generation(cfg, ParquetStore(out)), out)


def cmd_rewrite(args: argparse.Namespace) -> int:
    from synray.plan import load_run_config, plan_rewrite
    from synray.programs.rewrite import rewrite_command

    cfg = load_run_config(args.config, args.overrides)
    return rewrite_command(plan_rewrite(cfg, args.source, args.out))


def cmd_samples(args: argparse.Namespace) -> int:
    from synray.viz import sample_grid_from_store

    print(sample_grid_from_store(args.dir, args.out, rows=args.rows))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from synray.plan import load_run_config, plan_run
    from synray.programs.run import run_command

    return run_command(plan_run(load_run_config(args.config, args.overrides), fresh=args.fresh))


def cmd_train(args: argparse.Namespace) -> int:
    from synray.plan import load_run_config, plan_run
    from synray.programs.run import run_command

    cfg = load_run_config(args.config, args.overrides + ([] if args.data else ["data.mode=stored"]))
    return run_command(plan_run(cfg, data_dir=args.data, fresh=args.fresh))


def cmd_eval(args: argparse.Namespace) -> int:
    from synray.plan import load_run_config, plan_eval
    from synray.programs.evaluate import eval_command

    cfg = load_run_config(args.config, args.overrides)
    return eval_command(plan_eval(cfg, args.model_dir, args.dataset, args.protocols), cfg, args.out)


def cmd_bench(args: argparse.Namespace) -> int:
    from synray.bench.run import SECTIONS, BenchSettings, bench_command

    only = tuple(args.only or SECTIONS)
    return bench_command(BenchSettings(quick=args.quick, config=args.config, overrides=tuple(args.overrides),
                                       only=only, out=args.out))


def cmd_sweep(args: argparse.Namespace) -> int:
    from synray.programs.sweep import sweep_command
    from synray.sweep.planning import plan_sweep_command

    plan = plan_sweep_command(args.config, args.overrides, out=args.out, resume=args.resume)
    return sweep_command(plan, resume=bool(args.resume))


def cmd_report(args: argparse.Namespace) -> int:
    from synray.data.storage import Location
    from synray.sweep.rules import SWEEP_CONFIG

    where = Location.of(args.sweep_dir)
    if where.is_local and not where.join(SWEEP_CONFIG).is_file():   # before scipy and matplotlib are imported
        raise ConfigError(f"{args.sweep_dir} is not a sweep directory: it has no {SWEEP_CONFIG} (`synray sweep` "
                          "writes one)")
    from synray.sweep.report import write_report

    report = write_report(args.sweep_dir, args.metric)
    for line in report.table_lines() if report.rows else []:
        print(line)
    for line in report.fit_lines():
        print(line)
    for message in report.messages:
        print(f"note: {message}")
    for path in report.files:
        print(f"wrote {path}")
    return 0 if report.rows else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synray",
        description="Train visual representations on synthetic data: LLM captions -> diffusion images -> "
                    "distributed contrastive training, on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"synray {version('synray')}",
                        help="print synray's version (the installed package's) and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="show or list run configs").add_subparsers(dest="action", required=True)
    show = cfg.add_parser("show", help="print a resolved config as YAML")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)
    cfg.add_parser("list", help="list the built-in configs").set_defaults(func=cmd_config_list)

    models = sub.add_parser("models", help="model utilities").add_subparsers(dest="action", required=True)
    tiny = models.add_parser("tiny", help="build the tiny offline models (LLM, SD, text tower) into DIR")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_models_tiny)

    plan = sub.add_parser("plan", help="print a run's stages, resources, data flow, storage and the nodes it needs, "
                                       "checked (against a running cluster too), without starting anything")
    _add_config_args(plan, optional=True)
    plan.add_argument("--cluster", help="a Ray cluster-launcher YAML or KubeRay RayJob/RayCluster manifest to pack the "
                                        "stages on (default: ./cluster.yaml when present)")
    plan.add_argument("--address", help="also check against this running cluster (default: ray.address, "
                                        "$RAY_ADDRESS)")
    plan.add_argument("--rates", metavar="RUN_DIR", help="take the stage rates a finished run measured (its "
                                                         "renderers' and training workers') instead of the "
                                                         "reference figures")
    plan.set_defaults(func=cmd_plan)

    gen = sub.add_parser("generate", help="concepts -> captions -> images -> Parquet store (resumable)")
    _add_config_args(gen)
    gen.add_argument("--out", help="store directory, on storage every node sees (default: the config's "
                                    "data.store_dir)")
    gen.set_defaults(func=cmd_generate)

    rewrite = sub.add_parser("rewrite", help="LaCLIP: add k LLM rewrites per caption of an image-text dataset")
    _add_config_args(rewrite)
    rewrite.add_argument("--source", help="Parquet (image, caption) or WebDataset tar shards")
    rewrite.add_argument("--out", required=True, help="output store directory")
    rewrite.set_defaults(func=cmd_rewrite)

    samples = sub.add_parser("samples", help="draw a grid of stored images with their captions")
    samples.add_argument("dir", help="store directory written by `synray generate`")
    samples.add_argument("--out", required=True, help="PNG file to write")
    samples.add_argument("--rows", type=int, default=8, help="captions to show")
    samples.set_defaults(func=cmd_samples)

    run = sub.add_parser("run", help="the main job: generate -> train -> evaluate, into a run directory")
    _add_config_args(run, optional=True)
    run.add_argument("--fresh", action="store_true", help="start a new run even if one of this config is unfinished")
    run.set_defaults(func=cmd_run)

    train = sub.add_parser("train", help="train from a stored dataset written by `synray generate`")
    _add_config_args(train)
    train.add_argument("--data", help="store directory (default: the config's data.store_dir)")
    train.add_argument("--fresh", action="store_true",
                       help="start a new run even if one of this config is unfinished")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a saved backbone on a dataset: kNN, linear, zero-shot, segmentation")
    ev.add_argument("model_dir", help="a saved backbone, e.g. runs/<run>/backbone")
    ev.add_argument("--dataset", required=True,
                    help="Parquet file/directory (image, label [, mask, class_name, split]), a synray store, "
                         "or an image folder root/<class>/<image>")
    ev.add_argument("--protocol", dest="protocols", action="append", choices=protocol_names(), default=[],
                    help="repeatable (default: eval.protocols of the config)")
    ev.add_argument("--config", default="local", help="built-in config name or YAML file for ray/eval settings "
                                                      "(default: local)")
    _add_overrides(ev, "eval.knn_k=10")
    ev.add_argument("--out", help="output directory (default: <output_root>/eval-<UTC timestamp>)")
    ev.set_defaults(func=cmd_eval)

    sweep = sub.add_parser("sweep", help="Ray Tune sweep over the config's tune.space (data scale, loss, ...), "
                                         "then its report")
    sweep.add_argument("config", nargs="?", help="built-in config name or YAML file with a tune section")
    _add_overrides(sweep, "tune.num_samples=2")
    sweep.add_argument("--out", help="sweep directory (default: tune.storage, else <output_root>/sweeps/<name>)")
    sweep.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted sweep from its directory")
    sweep.set_defaults(func=cmd_sweep)

    report = sub.add_parser("report", help="a sweep's results table, scaling plots and power-law fits")
    report.add_argument("sweep_dir", help="a directory written by `synray sweep`")
    report.add_argument("--metric", choices=tune_metrics(), help="the figure to fit (default: the sweep's tune.metric)")
    report.set_defaults(func=cmd_report)

    bench = sub.add_parser("bench", help="throughput and memory ratios measured side by side -> bench.json")
    bench.add_argument("--quick", action="store_true", help="short measurements (minutes on a laptop CPU)")
    bench.add_argument("--config", help="measure this config's models and settings (default: tiny models)")
    _add_overrides(bench, "images.batch_size=8")
    bench.add_argument("--only", action="append", choices=["a", "b", "c", "d", "e", "f"],
                       help="run only these measurements (repeatable)")
    bench.add_argument("--out", default="bench.json", help="JSON file to write (default: bench.json)")
    bench.set_defaults(func=cmd_bench)
    return parser


def check_config(args: argparse.Namespace) -> None:
    """The config and its `--set` overrides against the schema alone (unknown keys, types, ranges), before a
    command imports the registries, torch and Ray to check the rest: a typo is refused in a second."""
    from synray.config import load_config

    if isinstance(getattr(args, "config", None), str) and hasattr(args, "overrides"):
        load_config(args.config, args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    job_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func

    def command() -> int:
        check_config(args)
        return func(args)

    return exit_status(command)  # bad input is reported in one line (exit 2), anything else re-raised


if __name__ == "__main__":
    sys.exit(main())
