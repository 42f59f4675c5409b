"""What every experiment tracker does for synray (a run, its metrics, artifacts, tags), and the buffer that keeps a
run going when the tracker stops answering."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from synray.config.tracking import SECRET_ENV, TrackingConfig

__all__ = ["TrackerError", "RunRef", "Tracker", "Buffered", "flat_params", "numeric", "writable_folder"]

log = logging.getLogger(__name__)


class TrackerError(ValueError):
    """The tracker cannot be used (unreachable, refused, not installed): raised before any resource is requested."""


@dataclass(frozen=True)
class RunRef:
    """A tracked run as another process reaches it (Ray Train's controller, a Tune trial): plain, serialisable."""

    backend: str
    where: str            # the tracking URI or the event-file folder
    run_id: str           # the backend's run id (TensorBoard: the run's folder below `where`)
    experiment: str
    timeout_s: float = 10.0
    retry_s: float = 30.0
    #: what the backend needs to open the run in another process (W&B: its name, group, job type and tags)
    opening: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flat_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as {"train.lr": "0.0005", ...}: the parameters a tracker records (lists as their YAML-ish
    text, None as "null")."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = "null" if value is None else str(value)
    return out


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row (booleans and text left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def writable_folder(where: str, what: str) -> None:
    """Make the local folder a tracker writes to and write a file there once; a TrackerError naming it, and `what`
    it is, when that fails."""
    try:
        Path(where).mkdir(parents=True, exist_ok=True)
        probe = Path(where) / ".synray-write-check"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrackerError(f"tracking.uri={where}: {what} cannot be written ({e})") from None


class Tracker:
    """A backend: `start` a run (or a child of one), then log to it from any process through its RunRef."""

    name: ClassVar[str]
    has_registry: ClassVar[bool] = False

    @classmethod
    def where(cls, cfg: TrackingConfig, output_root: str) -> str:
        """The URI or folder the config's runs go to."""
        raise NotImplementedError

    @classmethod
    def check(cls, cfg: TrackingConfig, output_root: str) -> str:
        """Reach the tracker once, quickly; a TrackerError naming the setting and what failed. Returns `where`."""
        raise NotImplementedError

    @classmethod
    def start(cls, cfg: TrackingConfig, output_root: str, experiment: str, run_name: str, tags: Mapping[str, str],
              parent: RunRef | None = None) -> RunRef:
        """A new run in `experiment` (a child of `parent`, in the parent's experiment, where given)."""
        raise NotImplementedError

    def __init__(self, ref: RunRef) -> None:
        self.ref = ref

    def log_params(self, params: Mapping[str, str]) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: Mapping[str, float], step: int, when: float | None = None) -> None:
        raise NotImplementedError

    def set_tags(self, tags: Mapping[str, str]) -> None:
        raise NotImplementedError

    def log_artifact(self, path: Path, folder: str = "") -> None:
        raise NotImplementedError

    def register_model(self, name: str, folder: str) -> None:
        """Register the artifacts under `folder` as a version of model `name` (backends with a model registry)."""

    def end(self, status: str = "FINISHED") -> None:
        raise NotImplementedError

    def refused(self, error: Exception) -> bool:
        """True when the tracker answered and refused the call (sending it again cannot help); False when it
        could not be reached (the call is kept and sent again)."""
        return False


class Buffered:
    """A tracker whose calls never raise: a call that fails is kept, with every later one, and the whole queue is
    sent again in order once `retry_s` has passed (the run goes on meanwhile); `close` sends what it can and says
    how much it could not. Each outage is logged once, when it starts, and once when it ends."""

    def __init__(self, tracker: Tracker, clock: Callable[[], float] = time.monotonic) -> None:
        self.tracker, self.clock = tracker, clock
        self.pending: list[tuple[str, tuple, dict]] = []
        self.retry_at = 0.0
        self.failures = 0

    def __getattr__(self, method: str) -> Callable[..., None]:
        if method not in ("log_params", "log_metrics", "set_tags", "log_artifact", "register_model"):
            raise AttributeError(method)

        def call(*args: Any, **kwargs: Any) -> None:
            self.pending.append((method, args, kwargs))
            self.flush()
        return call

    def flush(self, force: bool = False) -> bool:
        """Send the queue if the tracker is due to be asked again; True when nothing is left."""
        if not self.pending:
            return True
        if not force and self.clock() < self.retry_at:
            return False
        while self.pending:
            method, args, kwargs = self.pending[0]
            try:
                getattr(self.tracker, method)(*args, **kwargs)
            except Exception as e:   # any failure of the tracker: never the run's
                if self.tracker.refused(e):
                    log.warning("the experiment tracker refused %s (%s); it is left out", method,
                                _without_secrets(e))
                    self.pending.pop(0)
                    continue
                self.failures += 1
                if self.retry_at <= 0 or self.failures == 1:
                    log.warning("the experiment tracker (%s at %s) failed: %s; the run goes on, %d calls kept, "
                                "asked again in %g s", self.tracker.ref.backend, self.tracker.ref.where,
                                _without_secrets(e), len(self.pending), self.tracker.ref.retry_s)
                self.retry_at = self.clock() + self.tracker.ref.retry_s
                return False
            self.pending.pop(0)
        if self.failures:
            log.warning("the experiment tracker answers again: the kept calls were sent")
            self.failures = 0
        self.retry_at = 0.0
        return True

    def close(self, status: str = "FINISHED") -> None:
        """Send the queue (one more try), then end the run; what cannot be sent is named, not raised."""
        if not self.flush(force=True):
            log.warning("the experiment tracker did not take %d calls (%s); the run directory holds the same "
                        "metrics and files", len(self.pending), ", ".join(sorted({m for m, _, _ in self.pending})))
            return
        try:
            self.tracker.end(status)
        except Exception as e:
            log.warning("the experiment tracker could not end the run: %s", _without_secrets(e))


def _without_secrets(error: Exception) -> str:
    """An error's text with any credential from the environment blanked out."""
    import os

    text = str(error)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value:
            text = text.replace(value, "***")
    return text


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
