"""Run-level checks that need no cluster: evaluation protocols the run cannot feed fail before anything starts."""

from __future__ import annotations

import pytest

from conftest import small_config


def test_zeroshot_needs_image_text_training():
    from synray.eval.errors import EvalError
    from synray.plan import check_eval_protocols

    with pytest.raises(EvalError, match="zeroshot, which needs an image-text model"):
        check_eval_protocols(small_config("eval.protocols=[knn, zeroshot]"))
    assert check_eval_protocols(small_config("eval.protocols=[knn, zeroshot]", "train.loss=clip")) == ("knn", "zeroshot")


def test_segmentation_needs_masks():
    from synray.eval.errors import EvalError
    from synray.plan import check_eval_protocols

    with pytest.raises(EvalError, match="segmentation, which needs class masks"):
        check_eval_protocols(small_config("eval.protocols=[segmentation]"))
    check_eval_protocols(small_config("eval.protocols=[segmentation]", "images.backend=procedural",
                                      "concepts.bank=builtin:shapes", "captions.backend=template",
                                      "captions.style=shapes"))
    check_eval_protocols(small_config("eval.protocols=[segmentation]", "eval.dataset=/data/with_masks"))


def test_unknown_protocol_is_refused_by_the_config():
    from synray.config import ConfigError

    with pytest.raises(ConfigError, match="eval.protocols"):
        small_config("eval.protocols=[knn, retrieval]")


@pytest.mark.parametrize("key, bad", [("train.loss", "dino"), ("images.backend", "gan"),
                                      ("captions.backend", "gpt"), ("tune.metric", "knn_top5_accuracy")])
def test_an_unknown_registry_name_is_refused_naming_every_entry(key: str, bad: str):
    """pydantic's wording for a Literal, with the names the registry holds now (a new entry needs no edit here)."""
    from synray.config import ConfigError
    from synray.plan import registry_choices

    names = [repr(n) for n in registry_choices()[key]]
    with pytest.raises(ConfigError) as e:
        small_config(f"{key}={bad}")
    assert f'{key}: "{bad}" is not allowed: must be one of {", ".join(names[:-1])} or {names[-1]}' in str(e.value)
    assert bad not in registry_choices()[key] and len(names) >= 2


def test_shapes_config_is_consistent():
    from synray.plan import load_run_config, plan_run

    cfg = load_run_config("shapes")
    assert cfg.images.backend == "procedural" and cfg.images.per_caption == 4
    plan = plan_run(cfg)  # every check of the run passes, without Ray
    assert plan.protocols == ("knn", "linear", "segmentation") and plan.train.per_caption == 4
    assert "masks" in plan.heldout.columns and plan.data.generation.llm_path is None
    rows_per_step = cfg.train.captions_per_worker * cfg.train.num_workers
    assert cfg.data.num_captions >= cfg.train.steps * rows_per_step  # the stream lasts the whole budget
