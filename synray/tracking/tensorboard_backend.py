"""TensorBoard as synray's experiment tracker: each run a folder of event files (scalars, its config and tags as text,
its plots as images), a sweep's trials as folders inside the sweep's."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from synray.config.tracking import TrackingConfig
from synray.tracking.base import RunRef, Tracker, TrackerError, writable_folder

__all__ = ["TensorBoardTracker"]

#: files a run keeps beside its event files (TensorBoard shows images and text, not files)
ARTIFACTS = "artifacts"


def _table(items: Mapping[str, str]) -> str:
    """A Markdown table, which TensorBoard's text tab renders."""
    return "| key | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in sorted(items.items()))


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    @classmethod
    def where(cls, cfg: TrackingConfig, output_root: str) -> str:
        if cfg.uri and cfg.uri.split("://")[0] in ("http", "https"):
            raise TrackerError(f"tracking.uri={cfg.uri}: TensorBoard writes event files to a folder (a path, or a "
                               "cloud URI its writer supports), not to a server")
        return cfg.uri or f"{output_root.rstrip('/')}/tensorboard"

    @classmethod
    def check(cls, cfg: TrackingConfig, output_root: str) -> str:
        where = cls.where(cfg, output_root)
        if "://" in where:
            return where     # a bucket: the writer reaches it when the run starts
        writable_folder(where, "TensorBoard's folder")
        return where

    @classmethod
    def start(cls, cfg: TrackingConfig, output_root: str, experiment: str, run_name: str, tags: Mapping[str, str],
              parent: RunRef | None = None) -> RunRef:
        where = parent.where if parent else cls.where(cfg, output_root)
        run_id = f"{parent.run_id}/{run_name}" if parent else f"{experiment}/{run_name}"
        ref = RunRef(cls.name, where, run_id, parent.experiment if parent else experiment, cfg.timeout_s,
                     cfg.retry_s)
        tracker = cls(ref)
        tracker.set_tags({**cfg.tags, **tags})
        tracker.end()
        return ref

    def __init__(self, ref: RunRef) -> None:
        super().__init__(ref)
        self._writer: Any = None

    @property
    def folder(self) -> str:
        return f"{self.ref.where.rstrip('/')}/{self.ref.run_id}"

    @property
    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.folder, flush_secs=10)
        return self._writer

    def log_params(self, params: Mapping[str, str]) -> None:
        self.writer.add_text("config", _table(params), 0)
        self.writer.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int, when: float | None = None) -> None:
        for key, value in sorted(metrics.items()):
            self.writer.add_scalar(key, float(value), int(step), walltime=when or time.time())
        self.writer.flush()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.writer.add_text("tags", _table({k: str(v) for k, v in tags.items()}), 0)
        self.writer.flush()

    def log_artifact(self, path: Path, folder: str = "") -> None:
        """A PNG as an image, JSON or YAML as text; every file (or folder) also copied next to the event files."""
        path = Path(path)
        name = f"{folder}/{path.name}" if folder else path.name
        if path.suffix == ".png":
            import numpy as np
            from PIL import Image

            self.writer.add_image(name, np.asarray(Image.open(path).convert("RGB")), 0, dataformats="HWC")
        elif path.suffix in (".json", ".yaml", ".txt", ".csv"):
            text = path.read_text()
            if path.suffix == ".json":
                text = json.dumps(json.loads(text), indent=2)
            self.writer.add_text(name, f"```\n{text}\n```", 0)
        self.writer.flush()
        if "://" not in self.folder:
            target = Path(self.folder) / ARTIFACTS / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, target, dirs_exist_ok=True)
            else:
                shutil.copy2(path, target)

    def end(self, status: str = "FINISHED") -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
