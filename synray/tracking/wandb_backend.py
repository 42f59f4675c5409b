"""Weights & Biases as synray's experiment tracker: offline run files beside the run directories unless a W&B server
is named, a sweep's trials grouped under the sweep's run, the exported backbone as a model artifact."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import string
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from synray.config.tracking import TrackingConfig
from synray.tracking.base import RunRef, Tracker, TrackerError, writable_folder

__all__ = ["WandbTracker"]

#: the metric every logged value is plotted against: the training step, logged with each row (W&B's own `_step`
#: counts rows and must grow, but a resumed run logs steps again from its checkpoint)
STEP = "step"
#: the environment variable W&B's client reads its key from
API_KEY = "WANDB_API_KEY"


def _run_id() -> str:
    """A new run id as W&B makes them: 8 lowercase letters and digits."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _online(where: str) -> bool:
    return urlsplit(where).scheme in ("http", "https")


class WandbTracker(Tracker):
    name = "wandb"
    has_registry = True   # a model artifact, which W&B's registry links

    @classmethod
    def where(cls, cfg: TrackingConfig, output_root: str) -> str:
        if cfg.uri and not _online(cfg.uri) and "://" in cfg.uri:
            raise TrackerError(f"tracking.uri={cfg.uri}: W&B takes a server's address (https://api.wandb.ai, or "
                               "your own) or a local folder for offline runs")
        if cfg.uri:
            return cfg.uri
        if "://" in output_root:
            raise TrackerError(f"tracking.backend=wandb with output_root={output_root}: offline W&B runs need a "
                               "local folder; set tracking.uri to your W&B server")
        return str(Path(output_root).resolve())   # W&B keeps its runs in a `wandb` folder inside

    @classmethod
    def check(cls, cfg: TrackingConfig, output_root: str) -> str:
        """Offline: the folder can be written. Online: the key is in the environment and the server answers."""
        where = cls.where(cfg, output_root)
        if importlib.util.find_spec("wandb") is None:
            raise TrackerError("tracking.backend=wandb needs the wandb package (pip install 'synray[wandb]')")
        if not _online(where):
            writable_folder(where, "W&B's offline folder")
            return where
        if not os.environ.get(API_KEY):
            raise TrackerError(f"tracking.uri={where}: set {API_KEY} in the job's environment (W&B's key is never "
                               "a config key); or leave tracking.uri unset for offline runs")
        try:
            urllib.request.urlopen(where, timeout=cfg.timeout_s).close()
        except urllib.error.HTTPError:
            pass   # the server answered
        except OSError as e:
            raise TrackerError(f"tracking.uri={where}: the W&B server did not answer ({e}); or leave "
                               "tracking.uri unset for offline runs") from None
        return where

    @classmethod
    def start(cls, cfg: TrackingConfig, output_root: str, experiment: str, run_name: str, tags: Mapping[str, str],
              parent: RunRef | None = None) -> RunRef:
        """A run id and what opens the run (W&B starts it at the first call): its name, its group (a sweep's trials
        are grouped under the sweep's run id, as is the sweep's own run) and job type, its tags."""
        run_id = _run_id()
        opening = {"name": run_name, "group": parent.run_id if parent else run_id,
                   "job_type": "trial" if parent else "run", "tags": {**cfg.tags, **tags}}
        return RunRef(cls.name, parent.where if parent else cls.where(cfg, output_root), run_id,
                      parent.experiment if parent else experiment, cfg.timeout_s, cfg.retry_s, opening)

    def __init__(self, ref: RunRef) -> None:
        super().__init__(ref)
        self._run: Any = None

    @property
    def run(self) -> Any:
        """The W&B run, opened (or resumed: a continued run logs to the same id) at the first call."""
        if self._run is None:
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")   # no crash reports of users' runs to W&B
            import wandb

            online = _online(self.ref.where)
            settings = wandb.Settings(
                mode="online" if online else "offline", console="off", silent=True, x_disable_stats=True,
                disable_git=True, save_code=False, x_save_requirements=False, init_timeout=self.ref.timeout_s,
                reinit="create_new", **({"base_url": self.ref.where} if online else {}))
            o = self.ref.opening
            if not online:
                Path(self.ref.where).mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(project=self.ref.experiment, id=self.ref.run_id, name=o.get("name"),
                                   group=o.get("group"), job_type=o.get("job_type"), resume="allow",
                                   dir=None if online else self.ref.where, settings=settings,
                                   config={f"tag.{k}": v for k, v in (o.get("tags") or {}).items()})
            self._run.define_metric(STEP)
            self._run.define_metric("*", step_metric=STEP)
        return self._run

    def log_params(self, params: Mapping[str, str]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int, when: float | None = None) -> None:
        """One history row a call, with the step in it (W&B stamps the row's time itself)."""
        self.run.log({**{k: float(v) for k, v in metrics.items()}, STEP: int(step)})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.run.config.update({f"tag.{k}": str(v) for k, v in tags.items()}, allow_val_change=True)

    def log_artifact(self, path: Path, folder: str = "") -> None:
        """The file (or folder) among the run's files, under `folder`."""
        path, base = Path(path), Path(self.run.dir)
        if path.is_dir():
            target = base / (folder or path.name)
            shutil.copytree(path, target, dirs_exist_ok=True)
            files = [p for p in target.rglob("*") if p.is_file()]
        else:
            target = base / folder / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            files = [target]
        for f in files:
            self.run.save(str(f), base_path=self.run.dir, policy="now")

    def register_model(self, name: str, folder: str) -> None:
        """The run's files under `folder` as a new version of the model artifact `name` (W&B reads them where they are,
        the copies `log_artifact` made, which nothing changes: no third copy in its staging area)."""
        import wandb

        artifact = wandb.Artifact(name, type="model")
        artifact.add_dir(str(Path(self.run.dir) / folder), policy="immutable")
        self.run.log_artifact(artifact)

    def end(self, status: str = "FINISHED") -> None:
        if self._run is not None:
            self._run.finish(exit_code=0 if status == "FINISHED" else 1)
            self._run = None

    def refused(self, error: Exception) -> bool:
        from wandb.errors import UsageError

        return isinstance(error, UsageError)
