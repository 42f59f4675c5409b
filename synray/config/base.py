"""The base of every config section (unknown keys are errors) and the error a bad config raises."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from pydantic import BaseModel, ConfigDict, ValidationInfo


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the key and what is allowed."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# `train.loss` and `images.backend` name entries of registries that live above this module (the
# objectives of synray.train, the renderers of synray.images). Validation checks them when the caller
# passes the registries' names as `choices` (synray.plan.load_run_config does); see `validate`.


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
