"""The loss-comparison program's variants keep the images (views) per step and the step budget equal."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from synray.config import load_config, with_overrides


def _program():
    path = Path(__file__).resolve().parents[1] / "tuning" / "compare_losses.py"
    spec = importlib.util.spec_from_file_location("compare_losses", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_see_the_same_images_per_step():
    from synray.train.engine import images_per_step
    from synray.train.trainer import check_train_setup

    base = load_config("shapes")
    configs = {name: with_overrides(base, o) for name, o in _program().variants(base).items()}
    assert len(configs) == 3
    per_step = set()
    for cfg in configs.values():
        check_train_setup(cfg, cfg.images.per_caption)
        per_step.add(images_per_step(cfg.train, cfg.images.per_caption, cfg.train.num_workers))
        assert cfg.train.steps == base.train.steps
        rows_per_step = cfg.train.captions_per_worker * cfg.train.num_workers
        assert cfg.data.num_captions >= cfg.train.steps * rows_per_step
    assert per_step == {64}
    assert {c.train.loss for c in configs.values()} == {"stablerep", "simclr", "supervised"}
