"""Run-level checks that need no cluster: evaluation protocols the run cannot feed fail before anything starts."""

from __future__ import annotations

import pytest

from conftest import small_config


def test_zeroshot_needs_image_text_training():
    from synray.eval import EvalError
    from synray.pipeline import check_eval

    with pytest.raises(EvalError, match="zeroshot, which needs an image-text model"):
        check_eval(small_config("eval.protocols=[knn, zeroshot]"))
    check_eval(small_config("eval.protocols=[knn, zeroshot]", "train.loss=clip"))


def test_segmentation_needs_masks():
    from synray.eval import EvalError
    from synray.pipeline import check_eval

    with pytest.raises(EvalError, match="segmentation, which needs class masks"):
        check_eval(small_config("eval.protocols=[segmentation]"))
    check_eval(small_config("eval.protocols=[segmentation]", "images.backend=procedural",
                            "concepts.bank=builtin:shapes", "captions.backend=template", "captions.style=shapes"))
    check_eval(small_config("eval.protocols=[segmentation]", "eval.dataset=/data/with_masks"))


def test_unknown_protocol_is_refused_by_the_config():
    from synray.config import ConfigError

    with pytest.raises(ConfigError, match="eval.protocols"):
        small_config("eval.protocols=[knn, retrieval]")


def test_shapes_config_is_consistent():
    from synray.config import load_config
    from synray.pipeline import check_eval
    from synray.train.trainer import check_train_setup

    cfg = load_config("shapes")
    assert cfg.images.backend == "procedural" and cfg.images.per_caption == 4
    check_eval(cfg)
    check_train_setup(cfg, cfg.images.per_caption)
    rows_per_step = cfg.train.captions_per_worker * cfg.train.num_workers
    assert cfg.data.num_captions >= cfg.train.steps * rows_per_step  # the stream lasts the whole budget
