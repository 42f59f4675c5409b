"""The loss-comparison and SynCLR-ablation programs: equal budgets, one setting per row, and the stored table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from procs import docs_text
from synray.plan import derive_config, load_run_config, plan_run
from synray.train.engine import images_per_step
from synray.train.objectives import get_objective


def _tuning(name: str):
    """A program of tuning/ (a script folder, not a package) loaded as a module."""
    path = Path(__file__).resolve().parents[1] / "tuning" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _program():
    return _tuning("compare_losses")


def test_variants_see_the_same_images_per_step():
    base = load_run_config("shapes")
    configs = {name: derive_config(base, o)
               for name, o in _program().variants(base, load_run_config("shapes-synclr")).items()}
    assert len(configs) == 5
    per_step = set()
    for cfg in configs.values():
        plan = plan_run(cfg)  # every check of a run passes
        objective = get_objective(cfg.train.loss)
        per_step.add(images_per_step(cfg.train, objective.images_per_row(plan.train.per_caption), objective.views,
                                     cfg.train.num_workers))
        assert cfg.train.steps == base.train.steps
        rows_per_step = cfg.train.captions_per_worker * cfg.train.num_workers
        assert cfg.data.num_captions >= cfg.train.steps * rows_per_step
    assert per_step == {64}
    assert {c.train.loss for c in configs.values()} == {"synclr", "stablerep", "simclr", "supervised"}
    full, ema_only = [c for c in configs.values() if c.train.loss == "synclr"]
    assert full.train.synclr == load_run_config("shapes-synclr").train.synclr   # the built-in's settings
    assert ema_only.train.synclr.local_crops == 0 and ema_only.train.synclr.ibot_weight == 0


def _ablations():
    return _tuning("ablate_synclr")


def test_each_synclr_ablation_row_changes_one_setting_of_the_row_it_names_and_all_plan():
    """"A with ..." differs from row "A: ..." in one train.synclr setting, "B with ..." from "B: ...", and each
    "with" row of a base changes another setting."""
    program = _ablations()
    configs = {v.name: derive_config(load_run_config(v.config), v.overrides) for v in program.VARIANTS}
    for cfg in configs.values():
        plan_run(cfg)  # every check of a run passes
    bases = {name[0]: cfg.train.synclr.model_dump() for name, cfg in configs.items() if name[1:3] == ": "}
    assert set(bases) == {"A", "B"}
    changed: dict[str, dict[str, set[str]]] = {}
    for name, cfg in configs.items():
        if name[0] in bases and name[1:].startswith(" with"):
            s, base = cfg.train.synclr.model_dump(), bases[name[0]]
            changed.setdefault(name[0], {})[name] = {k for k in s if s[k] != base[k]} - {"export"}
            assert cfg.train.steps == 1600 and cfg.images.per_caption == 4
    assert all(len(keys) == 1 for rows in changed.values() for keys in rows.values()), changed
    for rows in changed.values():
        assert len({k for keys in rows.values() for k in keys}) == len(rows)   # each a different setting
    assert sum(len(rows) for rows in changed.values()) >= 5


def test_the_shipped_shapes_synclr_is_a_row_the_ablation_table_measured():
    program = _ablations()
    shipped = program.config_hash(load_run_config("shapes-synclr"))
    measured = {program.config_hash(derive_config(load_run_config(v.config), v.overrides)): v.name
                for v in program.VARIANTS if v.overrides}
    assert shipped in measured


def test_the_readme_quotes_the_stored_synclr_ablation_table_which_the_program_renders_from_its_results():
    """tuning/reports/synclr-ablations holds the runs' figures (ablations.json) and the table the program renders
    from them (ablations.md); the README quotes that table's rows verbatim."""
    program = _ablations()
    report = Path(__file__).resolve().parents[1] / "tuning" / "reports" / "synclr-ablations"
    results = json.loads((report / "ablations.json").read_text())
    table = (report / "ablations.md").read_text()
    assert program.table(results, load_run_config("shapes")) == table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    readme = docs_text()
    assert len(rows) >= 10 and all(row in readme for row in rows), "README's SynCLR ablation table is stale"
