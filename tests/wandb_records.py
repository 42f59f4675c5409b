"""Reads an offline W&B run back: its `.wandb` file, a LevelDB log (W&B's header, then 32 KiB blocks of records with
a 7-byte header each: CRC, length, type), each record one of W&B's own protobuf `Record`s."""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: W&B's file header (":W&B", a key and a version), LevelDB's block size and record header
HEADER, BLOCK, RECORD_HEADER = 7, 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    """Every record of a `.wandb` file, in order, each checked against its CRC-32 (LevelDB's: over the type byte
    and the data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    out, pos, parts = [], HEADER, b""
    while pos + RECORD_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD_HEADER:      # a block's tail too short for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + RECORD_HEADER])
        if kind == 0 and length == 0:    # zeros to the end of the block
            pos += left
            continue
        if pos + RECORD_HEADER + length > len(data):   # still being written
            break
        chunk = data[pos + RECORD_HEADER:pos + RECORD_HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad CRC at byte {pos}"
        pos += RECORD_HEADER + length
        parts += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
            parts = b""
    return out


@dataclass
class OfflineRun:
    """What an offline run's files hold: its run record, config, history rows, summary, saved files, artifacts."""

    run: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    artifacts: list[Any] = field(default_factory=list)
    exit_code: int | None = None


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def ended(path: Path, timeout_s: float = 30.0) -> list[Any]:
    """The records of a run's file once they hold its exit: W&B's service process writes the file, and finishes
    writing it a moment after `wandb.finish` returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def read_run(folder: Path) -> OfflineRun:
    """An ended `offline-run-*` folder read back through its `.wandb` file."""
    (path,) = Path(folder).glob("run-*.wandb")
    found = OfflineRun()
    for r in ended(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            found.run = r.run
            found.config.update({_key(u): json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            found.config.update({_key(u): json.loads(u.value_json) for u in r.config.update})
        elif kind == "history":
            found.history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            found.summary.update({_key(u): json.loads(u.value_json) for u in r.summary.update})
        elif kind == "files":
            found.files += [f.path for f in r.files.files]
        elif kind == "artifact":
            found.artifacts.append(r.artifact)
        elif kind == "exit":
            found.exit_code = r.exit.exit_code
    return found


def offline_runs(root: Path, run_id: str) -> list[Path]:
    """The offline folders of one run id under a W&B root (a continued run opens one more), oldest first."""
    return sorted(p.parent for p in Path(root).glob(f"wandb/offline-run-*/run-{run_id}.wandb"))
