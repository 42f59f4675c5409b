"""Run directories: `runs/<name>-<UTC timestamp>/` with the resolved config, logs, metrics and summary."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from synray.config import RunConfig
from synray.data.files import atomic_write_text, write_json

TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"


@dataclass
class RunDir:
    """One run's output folder."""

    path: Path

    @classmethod
    def create(cls, cfg: RunConfig, root: str | None = None, now: datetime | None = None) -> "RunDir":
        stamp = (now or datetime.now(timezone.utc)).strftime(TIMESTAMP_FORMAT)
        base = Path(root or cfg.output_root)
        path = base / f"{cfg.name}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = base / f"{cfg.name}-{stamp}-{n}"
        path.mkdir(parents=True)
        rd = cls(path)
        atomic_write_text(rd.config_path, cfg.to_yaml())
        return rd

    @classmethod
    def unfinished(cls, cfg: RunConfig, root: str | None = None) -> "RunDir | None":
        """The latest run directory of this exact config that trained but wrote no summary (its driver died):
        `synray run` continues it, and Ray Train resumes from its latest checkpoint."""
        base = Path(root or cfg.output_root)
        text = cfg.to_yaml()
        found = [p for p in base.glob(f"{cfg.name}-*") if (p / "train").is_dir() and not (p / "summary.json").exists()
                 and (p / "config.yaml").is_file() and (p / "config.yaml").read_text() == text]
        return cls(max(found, key=lambda p: p.stat().st_mtime)) if found else None

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def log_path(self) -> Path:
        return self.path / "run.log"

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary_path, summary)

    def attach_log(self, level: int = logging.INFO) -> logging.Handler:
        """Also send the `synray` loggers to run.log."""
        handler = logging.FileHandler(self.log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(level)
        logging.getLogger("synray").addHandler(handler)
        return handler
