"""Tiny offline models by name (`tiny:llm`, `tiny:sd`, `tiny:text`): built once per seed into a cache."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from synray.language.corpus import caption_vocabulary_texts
from synray.models import tiny_specs as specs

TINY_VERSION = 1
TINY_NAMES = ("tiny:llm", "tiny:sd", "tiny:text")
COMPLETE_MARKER = ".synray-complete"


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelError(ValueError):
    """A model name or path that cannot be resolved."""


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """cache_dir, else $SYNRAY_CACHE, else ~/.cache/synray."""
    root = cache_dir or os.environ.get("SYNRAY_CACHE") or Path.home() / ".cache" / "synray"
    return Path(root).expanduser()


@functools.lru_cache(maxsize=8)
def tiny_fingerprint(seed: int = 0) -> str:
    """Hash of what the tiny builds depend on: version, architectures and the built-in corpus."""
    h = hashlib.sha256()
    settings = {
        "version": TINY_VERSION, "llm": specs.LLM_ARCH, "vocab": specs.LLM_VOCAB_SIZE,
        "train": [specs.TRAIN_STEPS, specs.TRAIN_BATCH_SIZE, specs.TRAIN_LR, specs.PROMPT_LOSS_WEIGHT],
        "unet": specs.UNET_CONFIG, "vae": specs.VAE_CONFIG, "sched": specs.SCHEDULER_CONFIG,
        "sd_text": specs.SD_TEXT_ARCH, "text": specs.TEXT_TOWER_ARCH, "gain": specs.DECODER_OUT_GAIN,
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for text in (*specs.default_corpus(seed), *caption_vocabulary_texts()):
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def _builders() -> dict[str, Callable[[Path, int], Path]]:
    from synray.models import tiny_llm, tiny_sd   # here: what a tiny model is needs no torch, building it does

    return {"llm": lambda d, s: tiny_llm.build_tiny_llm(d, seed=s), "sd": lambda d, s: tiny_sd.build_tiny_sd(d, seed=s),
            "text": lambda d, s: tiny_sd.build_tiny_text(d, seed=s)}


def build_tiny(kind: str, out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build one tiny model ("llm", "sd" or "text") into out_dir."""
    builders = _builders()
    if kind not in builders:
        raise ModelError(f"unknown tiny model kind {kind!r}; known: {', '.join(builders)}")
    return builders[kind](Path(out_dir), seed)


def build_all(out_dir: str | os.PathLike[str], seed: int = 0) -> dict[str, str]:
    """Build llm/, sd/ and text/ under out_dir; returns {"llm": path, "sd": path, "text": path}."""
    out = Path(out_dir)
    return {kind: str(build_tiny(kind, out / kind, seed)) for kind in ("llm", "sd", "text")}


def _build_cached(kind: str, root: Path, seed: int) -> Path:
    """The cached build of one tiny model; built under a file lock into a temp dir, then renamed."""
    final = root / f"tiny-v{TINY_VERSION}-seed{seed}-{tiny_fingerprint(seed)}" / kind
    if (final / COMPLETE_MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{kind}.lock")):
        if (final / COMPLETE_MARKER).is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-build-", dir=final.parent))
        try:
            start = time.monotonic()
            build_tiny(kind, tmp, seed)
            info = {"name": f"tiny:{kind}", "seed": seed, "version": TINY_VERSION,
                    "build_seconds": round(time.monotonic() - start, 2)}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(info) + "\n")
            if final.exists():  # an incomplete directory left by something else
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def is_hub_name(name: str) -> bool:
    """A model name that vLLM and diffusers take from the Hugging Face hub: not `tiny:*`, not a folder here, and
    shaped like `owner/name`."""
    return (not name.startswith("tiny:") and not Path(name).expanduser().exists()
            and bool(_HUB_ID.match(name)) and "/" in name)


def _looks_like_path(name: str) -> bool:
    if name.startswith(("/", ".", "~")):
        return True
    seps = [s for s in (os.sep, os.altsep) if s]
    return any(s in name for s in seps) and not _HUB_ID.match(name)


#: weight files that are Python pickles (loading one can run code); synray loads safetensors only
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_safetensors(path: Path) -> None:
    """ModelError for a model directory whose weights exist only as pickles (looked for two levels deep,
    where diffusers keeps its components)."""
    files = [p for p in list(path.glob("*")) + list(path.glob("*/*")) if p.is_file()]
    pickles = sorted(str(p.relative_to(path)) for p in files if p.suffix in PICKLE_SUFFIXES)
    if pickles and not any(p.suffix == ".safetensors" for p in files):
        raise ModelError(f"model directory {path} holds its weights only as pickle files ({', '.join(pickles[:3])}"
                         f"{', ...' if len(pickles) > 3 else ''}); synray loads safetensors only, since loading a "
                         "pickle can run code: save the model with save_pretrained(safe_serialization=True)")


def resolve_model(name: str, cache_dir: str | os.PathLike[str] | None = None, seed: int = 0,
                  build: bool = True) -> str:
    """A loadable model reference: a local dir for tiny names and paths, else the name (a hub id). With `build`
    off (a plan), a tiny name is checked and returned as it is: it is built where a run first resolves it."""
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model name must be a non-empty string, got {name!r}")
    if name.startswith("tiny:"):
        if name not in TINY_NAMES:
            raise ModelError(f"unknown tiny model {name!r}; known: {', '.join(TINY_NAMES)}")
        return str(_build_cached(name.split(":", 1)[1], default_cache_dir(cache_dir), seed)) if build else name
    path = Path(name).expanduser()
    if path.is_dir():
        check_safetensors(path)
        return str(path.resolve())
    if path.exists():
        raise ModelError(f"model path is not a directory: {name}")
    if _looks_like_path(name):
        raise ModelError(f"model path does not exist: {name}")
    return name


def localize(name: str, resolved: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """A model reference resolved on the driver, usable on this node: a `tiny:*` build missing here is
    built into this node's cache (cluster nodes do not share the driver's cache); anything else is kept."""
    if name.startswith("tiny:") and not Path(resolved).is_dir():
        return resolve_model(name, cache_dir)
    return resolved
