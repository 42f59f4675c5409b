"""The registry of image backends: `images.backend` names a Renderer subclass here, and nowhere else."""

from __future__ import annotations

from typing import Any

from synray.images.base import Renderer, RendererError
from synray.images.diffusion import DiffusionRenderer
from synray.images.procedural import ProceduralRenderer

__all__ = ["RENDERERS", "get_renderer", "renderer_for_row", "renderer_names"]

#: images.backend -> renderer class; a new backend is one entry here (a Renderer subclass) plus its settings in
#: ImagesConfig; its stage's resources and the plan follow from the entry
RENDERERS: dict[str, type[Renderer]] = {cls.name: cls for cls in (DiffusionRenderer, ProceduralRenderer)}


def renderer_names() -> tuple[str, ...]:
    return tuple(RENDERERS)


def get_renderer(name: str) -> type[Renderer]:
    """The renderer class of an `images.backend` value."""
    try:
        return RENDERERS[name]
    except KeyError:
        raise RendererError(f"images.backend {name!r} is not available; allowed: {', '.join(RENDERERS)}") from None


def renderer_for_row(row: dict[str, Any]) -> type[Renderer]:
    """The renderer that wrote a stored row, found from its provenance (`t2i_model`, `t2i_params`)."""
    for cls in RENDERERS.values():
        if cls.claims(row):
            return cls
    raise RendererError(f"row {row.get('caption_id')} was rendered by {row.get('t2i_model')!r}, which no image "
                        f"backend claims (known: {', '.join(RENDERERS)})")
