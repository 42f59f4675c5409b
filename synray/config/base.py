"""The base of every config section (unknown keys are errors) and the error a bad config raises."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the key and what is allowed."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


#: Ray's own resource names: a stage asks for them through its dedicated keys (num_cpus, num_gpus, ...)
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _custom_resources(v: dict[str, float]) -> dict[str, float]:
    builtin = sorted(set(v) & set(RAY_BUILTIN_RESOURCES))
    if builtin:
        raise ValueError(f"{', '.join(builtin)} {'is' if len(builtin) == 1 else 'are'} set by the stage's own "
                         "num_cpus/num_gpus keys; list custom resources only (those a cluster's node types declare)")
    bad = sorted(k for k, x in v.items() if not x > 0)
    if bad:
        raise ValueError(f"amounts must be > 0; not for {', '.join(bad)}")
    return v


#: custom Ray resources a stage's actors (or workers) ask for, each: the node types that declare them are the only
#: ones the stage lands on (cluster.yaml and the RayJob declare one per stage: llm_node, diffusion_node, ...)
CustomResources = Annotated[dict[str, float], AfterValidator(_custom_resources),
                            Field(default_factory=dict, description="custom Ray resources each actor asks for, "
                                  "e.g. {diffusion_node: 0.001}: the stage runs only on nodes that declare them")]


def _mounted_path(v: str | None) -> str | None:
    if v is not None and "://" in v:
        raise ValueError(f"{v}: this path is read from a local or mounted directory only (e.g. /mnt/cluster_storage "
                         "on EFS, Filestore or NFS); cloud URIs are taken by output_root, data.store_dir, "
                         "eval.dataset and tune.storage")
    return v


#: a file or directory path that every node must see: a local path or a shared mount, not a URI
MountedPath = Annotated[str, AfterValidator(_mounted_path)]


def check_gpu_share(v: float) -> float:
    """Ray places a fraction of one GPU (< 1) or whole GPUs; 1.5 can never be placed."""
    if v > 1 and v != int(v):
        raise ValueError(f"a GPU share is a fraction of one GPU (< 1) or a whole number of GPUs; not {v}")
    return v


# `train.loss`, `images.backend`, `captions.backend`, `eval.protocols` and `tune.metric` name entries of registries
# that live above this module (the objectives of synray.train, the renderers of synray.images, the caption backends
# of synray.captions, the protocols of synray.eval). Validation checks them when the caller passes the registries'
# names as `choices` (synray.plan.registry_choices; synray.plan.load_run_config does); see `validate`.


def _one_of(allowed: Collection[str]) -> str:
    """The names as pydantic words a Literal's choices: 'a', 'b' or 'c'."""
    names = [repr(a) for a in allowed]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _registered(key: str, value: str, info: ValidationInfo) -> str:
    """The value, after checking it against the registry names given in the validation context."""
    choices: Mapping[str, Collection[str]] = (info.context or {}).get("choices") or {}
    allowed = choices.get(key)
    if allowed is not None and value not in allowed:
        raise ValueError(f"must be one of {_one_of(allowed)}")
    return value
