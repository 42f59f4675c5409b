"""Image stage backends: a diffusers text-to-image pipeline, or the procedural shapes world."""

from __future__ import annotations


def renderer_class(backend: str) -> type:
    """The Ray Data UDF class that renders m images per caption row for this backend."""
    if backend == "diffusers":
        from synray.images.diffusion import DiffusionRenderer

        return DiffusionRenderer
    if backend == "procedural":
        from synray.images.procedural import ProceduralRenderer

        return ProceduralRenderer
    raise ValueError(f"images.backend {backend!r} is not available; allowed: diffusers, procedural")
