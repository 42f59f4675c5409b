"""Session fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def synray_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A per-session model cache ($SYNRAY_CACHE), so tests never touch the user's ~/.cache/synray."""
    path = str(tmp_path_factory.mktemp("synray_cache"))
    old = os.environ.get("SYNRAY_CACHE")
    os.environ["SYNRAY_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("SYNRAY_CACHE", None)
    else:
        os.environ["SYNRAY_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_models(synray_cache: str) -> dict[str, str]:
    """The tiny models, built once per session: {"llm": dir, "sd": dir, "text": dir}.

    They are built through resolve_model into the session cache, so code under test that
    resolves `tiny:*` names gets these same directories without building again.
    """
    from synray.models.tiny import TINY_NAMES, resolve_model

    return {name.split(":", 1)[1]: resolve_model(name, cache_dir=synray_cache) for name in TINY_NAMES}
