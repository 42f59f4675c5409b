"""Helpers for tests that drive real processes: synray commands in subprocesses or in-process, Ray actors found by
their process title or by the task they are running, kills by pid, and waits on conditions (not collected)."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
#: how long a test waits for the point where it kills something, or for a command to end
WAIT_S = 600


def docs_text() -> str:
    """The README and every page of docs/, as one text: where the tests look for the figures and excerpts the
    documentation quotes."""
    return "\n\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sets(*overrides: str) -> list[str]:
    """`--set` arguments for a list of overrides."""
    return [a for o in overrides for a in ("--set", o)]


def cli(*args: str) -> list[str]:
    """The `synray` command, as a fresh process runs it."""
    return [sys.executable, "-m", "synray.cli", *args]


def job(script: str, *args: str) -> list[str]:
    """A `jobs/` entrypoint, as `ray job submit -- python jobs/<script>` runs it."""
    return [sys.executable, str(ROOT / "jobs" / script), *args]


def load_job(script: str):
    """A `jobs/` entrypoint as a module (its `main(argv)` is what `python jobs/<script>` runs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"synray_job_{script.removesuffix('.py')}", ROOT / "jobs" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Result:
    """What an in-process command returned and printed; `error` is what it raised (without its traceback, whose
    frames would keep the run's Ray objects alive), `trace` that traceback as text."""

    code: int | None
    out: str
    err: str
    log: str
    error: BaseException | None = None
    trace: str = ""


def in_process(main: Callable[[list[str]], int], argv: list[str]) -> Result:
    """`main(argv)` in this process (joining the suite's Ray), with its stdout, stderr and `synray` log records
    captured; an exception that main re-raises (anything but bad input) is returned, not raised."""
    out, err, log = io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("synray")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)   # as the command's own logging setup has it (pytest leaves the root at WARNING)
    error, trace = None, ""
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code: int | None = main(argv)
            except Exception as e:  # noqa: BLE001 - the caller asserts on it
                code, error, trace = None, e, traceback.format_exc()
                error.__traceback__ = None
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        # a failed run's datasets sit in reference cycles of its frames: collect them now, so that Ray Data shuts
        # their actor pools down (the suite's process stays the driver of everything run in-process)
        gc.collect()
    return Result(code, out.getvalue(), err.getvalue(), log.getvalue(), error, trace)


def synray_main(*args: str) -> Result:
    """`synray ARGS` in this process."""
    from synray.cli import main

    return in_process(main, list(args))


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A command in its own process group, its output to `log`."""
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=ROOT)


def run(cmd: list[str], env: dict[str, str], timeout_s: int = WAIT_S) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)


def ray_env(address: str) -> dict[str, str]:
    """This process's environment, joined to the Ray cluster at `address`."""
    return {**os.environ, "RAY_ADDRESS": address}


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a command started by `start` and everything it started (a driver dies)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def ray_processes(title: str) -> list[psutil.Process]:
    """Ray worker processes whose title (`ray::ClassName...`) contains `title`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if cmd.startswith("ray::") and title in cmd:
            found.append(proc)
    return found


@dataclass
class Busy:
    """A method call an actor was running when it was seen (Ray's state API)."""

    pid: int
    name: str
    task_id: str


def running_task(title: str) -> Busy | None:
    """A call that an actor whose name contains `title` is executing now (an actor task, not the actor's creation,
    in state RUNNING): the actor is up and busy with work. None if there is none."""
    from ray.util.state import list_tasks

    running = list_tasks(filters=[("state", "=", "RUNNING"), ("type", "=", "ACTOR_TASK")], limit=10_000,
                         raise_on_missing_output=False)
    for task in running:
        if title in task.name and task.worker_pid:
            return Busy(int(task.worker_pid), task.name, task.task_id)
    return None


def task_outcome(task_id: str) -> str | None:
    """FINISHED or FAILED once a task has ended (None before)."""
    from ray.util.state import list_tasks

    states = {t.state for t in list_tasks(filters=[("task_id", "=", task_id)], raise_on_missing_output=False)}
    return next((s for s in ("FAILED", "FINISHED") if s in states), None)


def kill_pid(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def wait_until(cond: Callable[[], object], proc: subprocess.Popen | None, what: str, timeout_s: float = WAIT_S,
               every_s: float = 0.2) -> object:
    """cond()'s first truthy value; fails when `proc` ends first or the time runs out (then with the stacks of the
    run's busiest Ray processes in the message)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if proc is not None:
            assert proc.poll() is None, f"the command ended (rc {proc.returncode}) before {what}"
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{ray_stacks()}")
        time.sleep(every_s)


#: the Ray processes whose stacks tell where a run waits
STACK_TITLES = ("RayTrainWorker", "TrainController", "SplitCoordinator", "StreamLedger")


def ray_stacks(titles: tuple[str, ...] = STACK_TITLES, lines: int = 25) -> str:
    """The innermost Python frames of each live Ray process whose title holds one of `titles` (py-spy, which
    Ray's default extra installs), for a test that timed out to say where a run was waiting."""
    spy = str(Path(sys.executable).parent / "py-spy")
    out = []
    for title in titles:
        for proc in ray_processes(title):
            try:
                dump = subprocess.run([spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True,
                                      timeout=30)
            except (OSError, subprocess.TimeoutExpired) as e:
                out.append(f"--- {title} pid {proc.pid}: no stack ({e})")
                continue
            out.append(f"--- {title} pid {proc.pid}\n" + "\n".join((dump.stdout + dump.stderr).splitlines()[:lines]))
    return "\n".join(out) or "(no Ray process of " + ", ".join(titles) + " alive)"


def stored_rows(store: str | Path, columns: list[str] | None = None) -> list[dict]:
    """Every row of a local store's shards, in shard order."""
    shards = sorted(Path(store).glob("shard-*.parquet"))
    return [r for s in shards for r in pq.read_table(s, columns=columns).to_pylist()]


def metrics_log(run_dir: Path) -> list[dict]:
    """A run's training log (train/metrics.jsonl), one dict per line."""
    return [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]


def step_events(log: list[dict]) -> list[object]:
    """The training log as steps and events: [1, 2, "worker_failure", "fit_start", 3, ...] (the step-0 export and
    the first fit_start left out)."""
    out: list[object] = []
    for i, r in enumerate(log):
        if "init_export" in r or (r.get("event") == "fit_start" and i == 0):
            continue
        out.append(r.get("event") or r["step"])
    return out


def whole_share(share: float, of: int) -> bool:
    """Whether `share` is a whole number of `of` items (an accuracy over `of` query images, say), up to float32's
    rounding of the share."""
    count = share * of
    return abs(count - round(count)) <= 1e-6 * of
