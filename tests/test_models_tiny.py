"""Tests for the tiny offline models: formats, loaders (transformers, vLLM, diffusers), determinism, names."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from synray.models.tiny import (
    COMPLETE_MARKER,
    TINY_NAMES,
    ModelError,
    default_cache_dir,
    resolve_model,
)
from synray.models.tiny_llm import split_document
from synray.models.tiny_sd import CLIP_MAX_LENGTH, build_tiny_text


def _prompts(n: int, seed: int = 1) -> list[str]:
    """LLM-stage prompts the model was not trained on (another corpus seed)."""
    from synray.language.corpus import training_corpus

    return [split_document(doc)[0] for doc in training_corpus(seed, n)]


def _safetensors(root: str | Path) -> dict[str, bytes]:
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


def _weight_files(root: str | Path) -> list[str]:
    return sorted(p.name for p in Path(root).rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))


# ------------------------------------------------------------------------------------------- LLM
def test_llm_files_and_tokenizer(tiny_models: dict[str, str]) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    path = tiny_models["llm"]
    assert _safetensors(path) and not _weight_files(path)
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "llama" and cfg.hidden_size // cfg.num_attention_heads >= 32
    assert cfg.max_position_embeddings >= 1024
    tok = AutoTokenizer.from_pretrained(path)
    assert 400 <= len(tok) <= 1000
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (cfg.bos_token_id, cfg.eos_token_id,
                                                                      cfg.pad_token_id)
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    ids = tok("dog => a dog\n").input_ids
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == "dog => a dog\n"
    newline = tok("\n", add_special_tokens=False).input_ids
    assert len(newline) == 1  # a single token the model emits, so stop=["\n"] and first-line cuts work
    gen = GenerationConfig.from_pretrained(path)
    assert gen.eos_token_id == cfg.eos_token_id and gen.do_sample and 0 < gen.temperature <= 1


def test_llm_transformers_writes_captions(tiny_models: dict[str, str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from synray.captions.cleanup import clean_caption
    from synray.config import CleanupConfig

    path = tiny_models["llm"]
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = _prompts(16)
    enc = tok(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=60, do_sample=True, temperature=0.8, top_p=0.9)
    texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    good = [c for c, _ in (clean_caption(t, CleanupConfig()) for t in texts) if c]
    assert sum("\n" in t for t in texts) >= 14, texts  # ends its line: the LLM stage keeps the first line
    assert len(good) >= 12, texts
    assert all(c.isprintable() for c in good)


# ------------------------------------------------------------------------------------------ vLLM
def test_vllm_generates_captions(vllm_engine: Any) -> None:
    from vllm import SamplingParams

    from synray.captions.cleanup import clean_caption
    from synray.config import CleanupConfig

    prompts = _prompts(12)
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=100, seed=i) for i in range(len(prompts))]
    outs = vllm_engine.generate(prompts, params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].token_ids for o in outs)
    assert sum(o.outputs[0].finish_reason == "stop" for o in outs) >= 10, texts  # EOS after the newline
    good = [c for c, _ in (clean_caption(t, CleanupConfig()) for t in texts) if c]
    assert len(good) >= 9, texts


def test_vllm_stop_at_newline(vllm_engine: Any) -> None:
    from vllm import SamplingParams

    outs = vllm_engine.generate(_prompts(4), SamplingParams(temperature=0.8, top_p=0.9, max_tokens=100,
                                                            seed=3, stop=["\n"]), use_tqdm=False)
    assert all("\n" not in o.outputs[0].text and o.outputs[0].finish_reason == "stop" for o in outs)


def test_vllm_same_tokens_whatever_the_batch(vllm_engine: Any) -> None:
    """A per-request seed gives the same tokens alone, in a batch of 7 and in a batch of 40."""
    from vllm import SamplingParams

    def params(seed: int) -> Any:
        return SamplingParams(temperature=0.8, top_p=0.9, max_tokens=60, seed=seed)

    prompts = _prompts(40, seed=2)
    target, target_seed = prompts[0], 1234

    def tokens_in(batch: list[str]) -> list[int]:
        reqs = [target, *batch]
        outs = vllm_engine.generate(reqs, [params(target_seed)] + [params(i) for i in range(len(batch))],
                                    use_tqdm=False)
        return list(outs[0].outputs[0].token_ids)

    alone = tokens_in([])
    assert alone
    assert tokens_in(prompts[1:7]) == alone
    assert tokens_in(prompts[1:40]) == alone


# ----------------------------------------------------------------------------------- diffusion
@pytest.fixture(scope="module")
def sd_pipe(tiny_models: dict[str, str]) -> Any:
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(tiny_models["sd"], use_safetensors=True)


def test_sd_files(tiny_models: dict[str, str]) -> None:
    path = Path(tiny_models["sd"])
    files = _safetensors(path)
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors"} <= set(files)
    assert not _weight_files(path)


@pytest.mark.parametrize("size", [32, 64])
def test_sd_generates_requested_images(sd_pipe: Any, size: int) -> None:
    assert sd_pipe.vae_scale_factor == 8 and sd_pipe.safety_checker is None
    prompts = ["a red dog next to a river", "a photo of an old boat on a lake"]
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    out = sd_pipe(prompts, height=size, width=size, num_inference_steps=8, guidance_scale=2.5,
                  num_images_per_prompt=3, generator=gens)
    assert len(out.images) == 6 and all(im.size == (size, size) and im.mode == "RGB" for im in out.images)
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in out.images])
    assert np.isfinite(arr).all()
    assert all(a.max() > 10 for a in arr)  # not the all-black images a safety checker returns
    assert all(a.std() > 20 for a in arr)  # not flat either


def test_sd_images_depend_only_on_their_generator(sd_pipe: Any) -> None:
    kw: dict[str, Any] = dict(height=32, width=32, num_inference_steps=4, guidance_scale=2.5, output_type="np")
    alone = sd_pipe("a blue cup", generator=[torch.Generator().manual_seed(7)], **kw).images[0]
    batch = sd_pipe("a blue cup", num_images_per_prompt=3,
                    generator=[torch.Generator().manual_seed(s) for s in (1, 7, 2)], **kw).images
    np.testing.assert_allclose(batch[1], alone, atol=1e-5)
    assert np.abs(batch[0] - batch[1]).mean() > 1e-3


# ---------------------------------------------------------------------------------- text tower
def test_text_tower_loads(tiny_models: dict[str, str]) -> None:
    from transformers import AutoModel, AutoTokenizer, CLIPTextModelWithProjection

    path = tiny_models["text"]
    assert _safetensors(path) and not _weight_files(path)
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["a red dog next to a river", "a cat"], padding="max_length", max_length=CLIP_MAX_LENGTH,
              truncation=True, return_tensors="pt")
    assert enc.input_ids.shape == (2, CLIP_MAX_LENGTH)
    model = CLIPTextModelWithProjection.from_pretrained(path).eval()
    with torch.no_grad():
        emb = model(**enc).text_embeds
    assert emb.shape == (2, 64) and torch.isfinite(emb).all()
    assert not torch.allclose(emb[0], emb[1])
    base = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        assert base(**enc).pooler_output.shape == (2, 64)


# ----------------------------------------------------------------------------------- determinism
@pytest.mark.slow   # ~25 s: it builds all three again, the LLM's pre-training included
def test_synray_models_tiny_rebuilds_the_same_bytes_and_another_seed_does_not(tiny_models: dict[str, str],
                                                                             tmp_path: Path, capsys) -> None:
    """`synray models tiny DIR` builds the three models (the LLM with its seeded pre-training) byte for byte as the
    suite's session build did; a text tower of another seed has the same tensors with other values."""
    from synray.cli import main

    assert main(["models", "tiny", str(tmp_path / "again")]) == 0
    built = dict(line.split("\t") for line in capsys.readouterr().out.splitlines() if "\t" in line)
    assert set(built) == set(tiny_models)
    for kind, path in built.items():
        assert _safetensors(path) == _safetensors(tiny_models[kind]), kind
    assert (Path(built["llm"]) / "tokenizer.json").read_bytes() == \
        (Path(tiny_models["llm"]) / "tokenizer.json").read_bytes()
    other = _safetensors(build_tiny_text(tmp_path / "text1", seed=1))
    assert other.keys() == _safetensors(tiny_models["text"]).keys()
    assert other != _safetensors(tiny_models["text"])


# --------------------------------------------------------------------------------- resolve_model
def test_resolve_tiny_names_use_the_cache(tiny_models: dict[str, str], synray_cache: str) -> None:
    for name in TINY_NAMES:
        path = Path(resolve_model(name))  # $SYNRAY_CACHE from the session fixture
        assert str(path) == tiny_models[name.split(":")[1]]
        assert path.is_relative_to(synray_cache) and (path / COMPLETE_MARKER).is_file()
        assert "seed0" in path.parent.name
    assert default_cache_dir() == Path(synray_cache)
    marker = Path(tiny_models["text"]) / COMPLETE_MARKER
    before = marker.stat().st_mtime_ns
    assert resolve_model("tiny:text", cache_dir=synray_cache) == tiny_models["text"]
    assert marker.stat().st_mtime_ns == before  # reused, not rebuilt


def test_resolve_other_names(tmp_path: Path) -> None:
    local = tmp_path / "my_model"
    local.mkdir()
    assert resolve_model(str(local)) == str(local.resolve())
    assert resolve_model("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    assert resolve_model("gpt2") == "gpt2"
    for missing in (str(tmp_path / "nope"), "./nope", "~/definitely/not/here", "a/b/c"):
        with pytest.raises(ModelError, match="model path does not exist"):
            resolve_model(missing)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelError, match="not a directory"):
        resolve_model(str(tmp_path / "file.txt"))
    with pytest.raises(ModelError, match="unknown tiny model"):
        resolve_model("tiny:gpt")
    with pytest.raises(ModelError):
        resolve_model("")
    assert issubclass(ModelError, ValueError)


def _resolve_text(cache: str) -> str:
    return resolve_model("tiny:text", cache_dir=cache, seed=3)


def test_concurrent_resolve_builds_once(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    with mp.get_context("spawn").Pool(2) as pool:
        paths = pool.map(_resolve_text, [cache, cache])
    assert paths[0] == paths[1]
    parent = Path(paths[0]).parent
    assert sorted(p.name for p in parent.iterdir() if not p.name.endswith(".lock")) == ["text"]
    assert (Path(paths[0]) / COMPLETE_MARKER).is_file()


def test_pickle_only_model_directories_are_refused(tiny_models: dict[str, str], tmp_path: Path) -> None:
    import shutil

    from synray.captions.llm import engine_kwargs
    from synray.config import CaptionsConfig

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_models["llm"], pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelError, match="only as pickle files \\(model.bin\\); synray loads safetensors only"):
        resolve_model(str(pickled))
    assert resolve_model(tiny_models["llm"]) == tiny_models["llm"]     # safetensors: fine
    assert resolve_model(tiny_models["sd"]) == tiny_models["sd"]       # components one level down
    assert engine_kwargs(CaptionsConfig())["load_format"] == "safetensors"  # vLLM never unpickles either
