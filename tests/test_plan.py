"""The planning step: one pass resolves models and checks every stage without Ray; registries are the only
place an objective, an image backend or an evaluation protocol is chosen by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import small_config
from synray.config import EvalConfig, ImagesConfig, TrainConfig
from synray.captions.backends import CAPTION_BACKENDS
from synray.eval.registry import PROTOCOLS
from synray.images.registry import RENDERERS
from synray.tracking import TRACKERS
from synray.plan import plan_run
from synray.train.objectives import OBJECTIVES

SYNRAY = Path(__file__).resolve().parents[1] / "synray"


def test_stream_plan_resolves_models_and_lays_out_stages_without_ray(tiny_models: dict[str, str], monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("planning started Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    plan = plan_run(small_config())
    gen = plan.data.generation
    assert plan.data.mode == "stream" and gen.llm_path == tiny_models["llm"] and gen.t2i_path == tiny_models["sd"]
    assert gen.renderer is RENDERERS["diffusers"] and gen.wanted == 16
    assert plan.train.objective == "stablerep" and plan.train.per_caption == 2 and not plan.train.epochs
    assert plan.train.num_classes == 16  # concepts.max_concepts of the local config
    stages = {s.stage: s for s in plan.stages}
    assert stages["vLLM engines"].actors == 1 and stages["vLLM engines"].cpus == 1.0
    assert stages["diffusers renderers"].actors == 1
    assert (stages["training workers"].actors, stages["training workers"].cpus) == (2, 0.5)
    held = plan.heldout.generation
    assert held.cfg.seed != plan.cfg.seed and held.wanted == 12 and "masks" not in plan.heldout.columns
    assert any(line.startswith("training workers: 2 x (0.5 CPU)") for line in plan.describe())


def test_a_stored_plan_takes_images_per_caption_and_columns_from_the_store(generated_store):
    plan = plan_run(small_config(), data_dir=generated_store.dir)
    assert plan.data.mode == "stored" and plan.data.generation is None and plan.train.epochs
    assert plan.train.per_caption == 3  # from the rows, not from images.per_caption
    assert plan.train.columns == ("caption_id", "label", "caption", "images")
    assert [s.stage for s in plan.stages if s.phase == "training"] == [
        "file listing", "store reads", "consumed rows skipped", "columns training reads", "row preprocessing",
        "training workers"]
    # the store is part of the run's config: a crashed run on one store is never continued on another
    assert (plan.cfg.data.mode, plan.cfg.data.store_dir) == ("stored", generated_store.dir)
    assert plan.train.tracks_rows  # synray stores carry row_id: a restart skips what its epoch trained on


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_objective_is_a_complete_registry_entry(name: str):
    o = OBJECTIVES[name]
    assert o.name == name and o.views in (1, 2) and o.default_augment in ("strong", "crop", "none")
    assert o.images_per_row(4) in (1, 4)
    assert set(o.fingerprint(TrainConfig())) >= {"backbone", "head", "loss"}


@pytest.mark.parametrize("name", list(RENDERERS))
def test_every_renderer_is_a_complete_registry_entry(name: str):
    r = RENDERERS[name]
    assert r.name == name and set(r.reads) <= set(ImagesConfig.model_fields) and "backend" in r.reads
    assert r.params(ImagesConfig(backend=name))


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_every_protocol_is_a_complete_registry_entry(name: str):
    """Its function exists, its outputs are ones the feature actors make, its metrics are its own (prefixed by its
    name, unique across protocols) and each one's eval.md row renders from a result that has its figures."""
    from synray.eval.features import OUTPUTS

    p = PROTOCOLS[name]
    assert p.name == name and callable(p.runner()) and p.outputs and set(p.outputs) <= set(OUTPUTS)
    keys = [m.key for m in p.metrics]
    assert all(k.removeprefix("val_").startswith(f"{name}_") for k in keys)
    assert not set(keys) & {m.key for q in PROTOCOLS.values() if q is not p for m in q.metrics}
    assert any(m.headline for m in p.metrics) and any(m.tunable for m in p.metrics)
    assert all(m.validation in keys for m in p.metrics if m.validation)
    results = {"linear_weight_decay": 0.01, "zeroshot_num_classes": 3, "segmentation_num_classes": 4}
    assert all(m.row(results, EvalConfig().model_dump()) for m in p.metrics)


@pytest.mark.parametrize("name", list(CAPTION_BACKENDS))
def test_every_caption_backend_is_a_complete_registry_entry(name: str):
    """Its stages declare resources with the names Ray gives their operators, and a row's prompt and provenance come
    from it; a style it does not write is refused naming the backends that do."""
    from synray.concepts import load_bank, plan_row
    from synray.config import CaptionsConfig, ConceptsConfig

    b = CAPTION_BACKENDS[name]
    styles = b.styles or ("synclr",)
    cfg = CaptionsConfig(backend=name, style=styles[0], source="/x" if styles[0] == "file" else None)
    stages = b.stages(cfg, lambda: None, "training", "")
    assert stages and all(r.udf and r.stage for s in stages for r in s.resources)
    plan = plan_row(load_bank("builtin:everyday"), ConceptsConfig(), 0, 3)
    assert b.prompt(plan, cfg, 0, 3) and b.model_label(cfg) and b.sampling_json(cfg).startswith("{")
    assert b.describe(cfg)
    others = [s for s in ("synclr", "classname") if b.styles is not None and s not in b.styles]
    for style in others:
        with pytest.raises(ValueError, match=f"captions.style={style} needs captions.backend="):
            b.check(CaptionsConfig(backend=name, style=style))


#: attributes whose values share a name with an objective without meaning it ("synclr" is a caption style too)
OTHER_NAMESPACES = {"style"}


def _name_choices(path: Path) -> list[str]:
    """Comparisons in a module that pick an objective, an image backend or an evaluation protocol by name."""
    names = set(OBJECTIVES) | set(RENDERERS) | set(PROTOCOLS) | set(CAPTION_BACKENDS) | set(TRACKERS)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        attrs = {n.attr for n in operands if isinstance(n, ast.Attribute)}
        consts = {n.value for n in operands if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        if "loss" in attrs or (consts & names and not attrs & OTHER_NAMESPACES):
            found.append(f"{path.relative_to(SYNRAY)}:{node.lineno}")
    return found


def test_no_objective_backend_caption_backend_protocol_or_tracker_is_chosen_by_name_outside_the_registries():
    registries = {SYNRAY / "train" / "objectives.py", SYNRAY / "images" / "registry.py",
                  SYNRAY / "eval" / "registry.py", SYNRAY / "captions" / "backends.py",
                  SYNRAY / "tracking" / "__init__.py"}
    found = [hit for path in sorted(SYNRAY.rglob("*.py")) if path not in registries for hit in _name_choices(path)]
    assert found == []
