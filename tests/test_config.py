"""Config loading, overrides and validation errors (fast, no Ray)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from synray.config import ConfigError, RunConfig, builtin_configs, builtin_names, load_config, with_overrides


def test_builtin_configs_validate():
    names = builtin_names()
    assert "local" in names
    for name, desc in builtin_configs():
        cfg = load_config(name)
        assert cfg.name == name
        assert desc, f"built-in config {name} needs a description"


def test_overrides_are_typed_and_nested():
    cfg = load_config("local", ["train.steps=3", "train.temperature=0.2", "images.per_caption=6",
                                "eval.protocols=[knn, linear]", "train.use_gpu=false", "train.lr=1e-3"])
    assert cfg.train.steps == 3 and isinstance(cfg.train.steps, int)
    assert cfg.train.temperature == pytest.approx(0.2)
    assert cfg.images.per_caption == 6
    assert cfg.eval.protocols == ["knn", "linear"]
    assert cfg.train.lr == pytest.approx(1e-3)


def test_yaml_file_roundtrip(tmp_path: Path):
    cfg = load_config("local", ["train.steps=7"])
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(str(path))
    assert again == cfg


def test_with_overrides_for_tune_trials():
    cfg = load_config("local")
    out = with_overrides(cfg, {"train.temperature": 0.05, "data.num_captions": 10})
    assert out.train.temperature == 0.05 and out.data.num_captions == 10
    assert cfg.train.temperature == 0.1


@pytest.mark.parametrize("override, needle", [
    ("train.steps=-1", "train.steps: -1 is not allowed"),
    ("no.such.key=1", "no: unknown key"),
    ("train.nope=1", "train.nope: unknown key"),
    ("train.steps=many", "train.steps: \"many\" is not allowed"),
    ("images.resolution=100", "must be divisible by 8"),
    ("images.per_caption=0", "images.per_caption: 0 is not allowed"),
    ("train.precision=bf16", "needs use_gpu=true"),
    ("images.dtype=float16", "needs device 'cuda'"),
    ("train.steps", "must look like key.path=value"),
    ("train.steps.x=1", "train.steps is a value, not a section"),
    ("captions.engine.batch_invariant=true", "batch_invariant needs GPU engines (num_gpus > 0)"),
    ("train.fail_at_step=5", "train.fail_at_step=5 must be after the first checkpoint (train.checkpoint_every=10"),
])
def test_invalid_overrides_name_the_key(override: str, needle: str):
    with pytest.raises(ConfigError) as e:
        load_config("local", [override])
    assert needle in str(e.value)


@pytest.mark.parametrize("overrides, needle", [
    (["train.synclr.global_crop_scale=[0.5, 0.2]"], "global_crop_scale must be (low, high) with 0 < low <= high"),
    (["train.synclr.ema_momentum_final=0.9"], "ema_momentum_final=0.9 is below ema_momentum=0.994"),
    (["train.synclr.prototypes=1"], "train.synclr.prototypes: 1 is not allowed"),
])
def test_bad_synclr_settings_name_the_key(overrides: list[str], needle: str):
    with pytest.raises(ConfigError) as e:
        load_config("local", ["train.loss=synclr", *overrides])
    assert needle in str(e.value)
    assert load_config("local", ["train.loss=synclr"]).train.synclr.local_crop_size(
        load_config("local").train.backbone) == 16   # 96/224 of 32 px, in whole 8-px patches


@pytest.mark.parametrize("local_size, needle", [
    (12, "train.synclr.local_size=12 must be a multiple of train.backbone.patch_size=8"),
    (40, "and at most train.backbone.image_size=32"),
])
def test_synclr_local_crops_must_be_whole_patches_inside_the_image(local_size: int, needle: str):
    from synray.plan import plan_run
    from synray.train.objectives import TrainSetupError

    with pytest.raises(TrainSetupError) as e:   # refused by the objective's check when the run is planned
        plan_run(load_config("local", ["train.loss=synclr", f"train.synclr.local_size={local_size}"]))
    assert needle in str(e.value)


def test_unknown_key_lists_allowed_keys(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"train": {"stepz": 3}}))
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    msg = str(e.value)
    assert "train.stepz: unknown key" in msg and "steps" in msg


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(str(scalar))
    with pytest.raises(ConfigError, match="unknown config 'nosuchconfig'"):
        load_config("nosuchconfig")


def test_an_empty_file_is_refused_and_a_folder_named_like_a_built_in_does_not_hide_it(tmp_path: Path, monkeypatch):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=f"config {empty} is empty; start from a built-in one"):
        load_config(str(empty))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").mkdir()            # a run's outputs, say
    assert load_config("shapes").name == "shapes"
    with pytest.raises(ConfigError, match="config shapes/ is a folder|config shapes is a folder"):
        load_config("shapes/")


def test_a_value_given_for_a_section_names_the_section_s_keys_not_pydantic_s_types():
    with pytest.raises(ConfigError) as e:
        load_config("local", ["train.backbone=vit"])
    msg = str(e.value)
    assert 'train.backbone: "vit" is not allowed: it is a section; set its keys (arch, size' in msg
    assert "instance of" not in msg and "BackboneConfig" not in msg


def test_batch_invariant_engines_get_the_vllm_switch():
    from synray.captions.llm import engine_env

    cfg = load_config("local", ["captions.engine.num_gpus=1", "captions.engine.batch_invariant=true"])
    assert engine_env(cfg.captions) == {"VLLM_BATCH_INVARIANT": "1"}
    assert engine_env(load_config("local").captions) == {}


def test_store_fingerprint_ignores_pool_sizes():
    from synray.generation.pipeline import store_fingerprint

    a = load_config("local")
    b = load_config("local", ["images.pool_size=3", "captions.engine.pool_size=2", "data.num_captions=5"])
    c = load_config("local", ["images.guidance_scale=4.0"])
    assert store_fingerprint(a) == store_fingerprint(b)
    assert store_fingerprint(a) != store_fingerprint(c)


def test_store_fingerprint_counts_only_what_the_backend_reads():
    from synray.generation.pipeline import store_fingerprint

    shapes = load_config("shapes")
    for key in ("images.steps=7", "images.guidance_scale=6.0", "images.scheduler=euler", "images.model=other"):
        assert store_fingerprint(load_config("shapes", [key])) == store_fingerprint(shapes), key
    assert store_fingerprint(load_config("shapes", ["images.resolution=64"])) != store_fingerprint(shapes)


def test_help_config_list_typos_and_a_missing_sweep_answer_without_loading_torch_or_ray():
    """The CLI's real process: `--help` and `config list` answer without importing torch, Ray or the models (each
    command imports its program when it runs), as the command's docstring promises."""
    code = ("import sys\nfrom synray.cli import main\ntry:\n    rc = main(sys.argv[1:])\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "print('heavy:', [m for m in ('torch', 'ray', 'vllm', 'diffusers') if m in sys.modules], file=sys.stderr)\n"
            "sys.exit(rc)")
    import tomllib

    release = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["version"]
    for args, needle in ((["--help"], "generate"), (["config", "list"], "shapes\t"),
                         (["--version"], f"synray {release}\n")):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and needle in r.stdout and "heavy: []" in r.stderr, (args, r.stderr[-2000:])
    # bad input that the schema alone refuses, and a sweep folder that is not there: refused in one line as fast
    for args, needle in ((["run", "local", "--set", "train.stepz=3"], "train.stepz: unknown key"),
                         (["plan", "shapes", "--set", "data.num_captions=-1"], "data.num_captions: -1 is not allowed"),
                         (["report", "/no/such/sweep"], "/no/such/sweep is not a sweep directory: it has no config.yaml")):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and needle in r.stderr and "heavy: []" in r.stderr, (args, r.stderr[-2000:])


def test_config_show_and_the_plans_of_cpu_configs_load_no_torch_or_ray_and_build_no_model(tmp_path):
    """`synray config show` and `synray plan` of the CPU built-ins (a run, an image-text run, a sweep) answer without
    importing torch, Ray, transformers or DeepSpeed, and a plan builds none of the tiny models it names (an empty
    model cache stays empty): they are built by the run that first loads them."""
    code = ("import sys\nfrom synray.cli import main\nrc = main(sys.argv[1:])\n"
            "print('heavy:', [m for m in ('torch', 'ray', 'vllm', 'diffusers', 'transformers', 'deepspeed') "
            "if m in sys.modules], file=sys.stderr)\nsys.exit(rc)")
    cache = tmp_path / "models"
    env = {**os.environ, "SYNRAY_CACHE": str(cache)}
    for args, needle in ((["config", "show", "shapes"], "backbone:"), (["plan", "local"], "checks: ok"),
                         (["plan", "shapes"], "checks: ok"), (["plan", "scaling-local"], "checks: ok"),
                         (["plan", "local", "--set", "train.loss=clip"], "checks: ok")):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env,
                           cwd=tmp_path)
        assert r.returncode == 0 and needle in r.stdout and "heavy: []" in r.stderr, (args, r.stdout[-1500:],
                                                                                      r.stderr[-1500:])
    assert not cache.exists() or not any(cache.iterdir()), sorted(cache.rglob("*"))[:5]


def test_cli_config_show_prints_a_config_that_validates(capsys):
    from synray.cli import main

    assert main(["config", "show", "local", "--set", "train.steps=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["steps"] == 3
    RunConfig.model_validate(shown)


def test_cli_config_list(capsys):
    from synray.cli import main

    assert main(["config", "list"]) == 0
    out = capsys.readouterr().out
    names = [line.split("\t")[0] for line in out.splitlines()]
    assert {"local", "shapes", "shapes-synclr", "gpu", "scaling-local"} <= set(names)
    assert all("\t" in line and line.split("\t")[1] for line in out.splitlines())


@pytest.mark.parametrize("override, needle", [("train.steps=-1", "train.steps: -1 is not allowed"),
                                             ("no.such.key=1", "no: unknown key"),
                                             ("train.loss=dino", "train.loss: \"dino\" is not allowed")])
def test_cli_bad_override_exits_with_status_2(override: str, needle: str, capsys):
    from synray.cli import main

    assert main(["config", "show", "local", "--set", override]) == 2
    assert needle in capsys.readouterr().err


def test_store_fingerprint_changes_with_how_renders_become_bytes(monkeypatch):
    """A renderer that turns its renders into other bytes (its output_version) writes a store of another
    fingerprint, as does the safety check setting, which decides which renders are kept."""
    from synray.generation.pipeline import store_fingerprint
    from synray.images.diffusion import DiffusionRenderer

    cfg = load_config("local", [])
    before = store_fingerprint(cfg)
    assert store_fingerprint(load_config("local", ["images.safety_checker=false"])) != before
    monkeypatch.setattr(DiffusionRenderer, "output_version", DiffusionRenderer.output_version + 1)
    assert store_fingerprint(cfg) != before


def test_a_cuda_renderer_that_asks_ray_for_no_gpu_is_refused():
    with pytest.raises(ConfigError, match="device 'cuda' needs num_gpus > 0: Ray hides every GPU"):
        load_config("local", ["images.device=cuda", "images.num_gpus=0"])
    assert load_config("local", ["images.device=cuda", "images.num_gpus=0.5"]).images.num_gpus == 0.5
