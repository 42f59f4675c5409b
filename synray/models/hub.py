"""Model names checked against the Hugging Face hub before a run, where the hub is reachable from here."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from synray.models.tiny import is_hub_name

__all__ = ["HubCheck", "check_hub_names"]

#: how long one question to the hub may take before the hub counts as unreachable
HUB_TIMEOUT_S = 5.0


@dataclass
class HubCheck:
    """What the hub said: names it does not have (problems) and what to know about the others (notes)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_hub_names(models: Mapping[str, str], timeout_s: float = HUB_TIMEOUT_S,
                    endpoint: str | None = None) -> HubCheck:
    """Ask the hub (huggingface_hub at `endpoint`, else $HF_ENDPOINT; $HF_TOKEN) about each hub name among `models`
    ({config key: name}): a name it does not have is a problem; a gated one a note (the nodes need a token with
    access); an unreachable hub, or HF_HUB_OFFLINE, a note that the names went unchecked."""
    out = HubCheck()
    names = {key: name for key, name in models.items() if is_hub_name(name)}
    if not names:
        return out
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        out.notes.append(f"hub names not checked (HF_HUB_OFFLINE is set): {', '.join(names.values())}")
        return out
    api = HfApi(endpoint=endpoint)
    for key, name in names.items():
        try:
            api.model_info(name, timeout=timeout_s)
        except GatedRepoError:
            out.notes.append(f"{key}: {name} is gated on the hub: every node needs HF_TOKEN of an account that "
                             "accepted its licence (docs/real-models.md)")
        except RepositoryNotFoundError:
            out.problems.append(f"{key}: {name} is not a model on the Hugging Face hub (a private one needs "
                                "HF_TOKEN here too)")
        except Exception as e:  # noqa: BLE001 - any other answer, or none: the hub's HTTP errors, offline mode,
            # and the transport's own errors (requests, httpx or httpx2 by huggingface_hub's version) mean the same
            out.notes.append(f"hub names not checked: the Hugging Face hub did not answer from here "
                             f"({type(e).__name__}); the nodes that load {', '.join(names.values())} must reach it")
            break
    return out
