"""`synray eval`: evaluate a saved model on a dataset as planned; writes eval.json and eval.md and prints the table."""

from __future__ import annotations

from synray.config import RunConfig
from synray.eval.report import EvalPlan, default_out_dir, evaluate_dataset, format_table, write_report
from synray.programs.session import session


def eval_command(plan: EvalPlan, cfg: RunConfig, out_dir: str | None = None) -> int:
    with session(cfg.ray):
        report = evaluate_dataset(plan, cfg)
    json_path, md_path = write_report(report, out_dir or default_out_dir(cfg))
    print(format_table(report), end="")
    print(f"\nwrote {json_path} and {md_path}")
    return 0
