"""Run directories: `<output_root>/<name>-<UTC timestamp>/` with the resolved config, logs, metrics and summary.

`output_root` is a local (or mounted) directory, or a cloud URI. Under a URI the driver writes the
run into a local staging copy and uploads it (`sync`) as the run goes; Ray Train writes its
checkpoints to `<run>/train` under the URI itself, so a preempted run resumes from there.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from synray.config import RunConfig
from synray.data.files import atomic_write_text, write_json
from synray.data.storage import Location, copy_tree, is_uri

TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
TRAIN_DIR = "train"
#: Ray Train's own folder inside TRAIN_DIR (checkpoints): it stays where Ray Train wrote it, never staged
RAY_TRAIN_DIR = f"{TRAIN_DIR}/train"


@dataclass
class RunDir:
    """One run's output folder: `path` is where the driver writes; `remote`, when output_root is a URI, where the
    run lives (the driver's files are uploaded there by `sync`)."""

    path: Path
    remote: Location | None = None

    @classmethod
    def create(cls, cfg: RunConfig, root: str | None = None, now: datetime | None = None) -> "RunDir":
        stamp = (now or datetime.now(timezone.utc)).strftime(TIMESTAMP_FORMAT)
        where = Location.of(root or cfg.output_root)
        name, n = f"{cfg.name}-{stamp}", 1
        while where.join(name).exists():
            n += 1
            name = f"{cfg.name}-{stamp}-{n}"
        if not is_uri(where.uri):
            rd = cls(Path(root or cfg.output_root) / name)
            rd.path.mkdir(parents=True)
        else:
            rd = cls.at(where.join(name))
        atomic_write_text(rd.config_path, cfg.to_yaml())
        rd.sync()
        return rd

    @classmethod
    def unfinished(cls, cfg: RunConfig, root: str | None = None) -> "RunDir | None":
        """The latest run directory of this exact config that trained but wrote no summary (its driver died):
        `synray run` continues it, and Ray Train resumes from its latest checkpoint."""
        base = root or cfg.output_root
        text = cfg.to_yaml()
        if is_uri(base):
            found = [d for d in Location.of(base).children(f"{cfg.name}-") if d.join(TRAIN_DIR).is_dir()
                     and not d.join(SUMMARY_FILE).is_file() and d.join(CONFIG_FILE).is_file()
                     and d.join(CONFIG_FILE).read_text() == text]
            if not found:
                return None
            remote = max(found, key=lambda d: d.name)   # names carry the UTC start time
            rd = cls.at(remote)
            for f in remote.walk_files():   # the driver's own files come back; checkpoints stay in Ray Train's
                rel = f.path[len(remote.path) + 1:]
                if not rel.startswith(RAY_TRAIN_DIR + "/"):
                    (rd.path / rel).parent.mkdir(parents=True, exist_ok=True)
                    (rd.path / rel).write_bytes(f.read_bytes())
            return rd
        base_path = Path(base)
        local = [p for p in base_path.glob(f"{cfg.name}-*") if (p / TRAIN_DIR).is_dir()
                 and not (p / SUMMARY_FILE).exists() and (p / CONFIG_FILE).is_file()
                 and (p / CONFIG_FILE).read_text() == text]
        return cls(max(local, key=lambda p: p.stat().st_mtime)) if local else None

    @classmethod
    def at(cls, where: Location) -> "RunDir":
        """A run folder at `where`: written in place on a local or mounted disk; under a URI, staged in a fresh
        local folder on this node and uploaded by `sync`."""
        if not is_uri(where.uri):
            return cls(Path(where.path))
        return cls(Path(tempfile.mkdtemp(prefix=f"synray-{where.name}-")), where)

    @property
    def where(self) -> str:
        """The run directory as users find it: its URI, or its local path."""
        return self.remote.uri if self.remote is not None else str(self.path.resolve())

    @property
    def train_storage(self) -> str:
        """Ray Train's storage path for this run (checkpoints go straight there, also under a URI)."""
        return self.remote.join(TRAIN_DIR).uri if self.remote is not None else str((self.path / TRAIN_DIR).resolve())

    def locate(self, local: str | Path | None) -> str | None:
        """Where a file or folder the driver wrote into the run ends up (its URI under a remote run)."""
        if local is None or self.remote is None:
            return None if local is None else str(local)
        rel = Path(local).resolve().relative_to(self.path.resolve())
        return self.remote.join(*rel.parts).uri

    def sync(self, *parts: str) -> None:
        """Upload the driver's files (all, or only `parts`, relative to the run) to the remote run directory."""
        if self.remote is None:
            return
        for rel in parts or ("",):
            src = self.path / rel if rel else self.path
            if src.is_dir():
                copy_tree(src, self.remote.join(rel) if rel else self.remote)
            elif src.is_file():
                self.remote.join(rel).write_bytes(src.read_bytes())

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def log_path(self) -> Path:
        return self.path / "run.log"

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary_path, summary)
        self.sync()

    def attach_log(self, level: int = logging.INFO) -> logging.Handler:
        """Also send the `synray` loggers to run.log."""
        handler = logging.FileHandler(self.log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(level)
        logging.getLogger("synray").addHandler(handler)
        return handler

