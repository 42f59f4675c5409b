"""Every `synray` command the README and docs/ show is one the CLI takes: it parses with the CLI's own parser, and
a built-in config with its `--set` overrides validates (placeholders such as `<stamp>` stand for paths a run makes).
The light ones (`synray config`, `synray plan`) run here as shown; those that run a job for minutes run, on smaller
settings, in the suite's shared runs and the tests of each command."""

from __future__ import annotations

import re
import shlex

import pytest

from procs import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands() -> list[tuple[str, str]]:
    """(page, command) for each `synray ...` line of a bash block (continuation lines joined, comments cut)."""
    found, fence, held = [], None, ""
    for page in PAGES:
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                fence = None if fence is not None else line[3:].strip()
                continue
            if fence != "bash":
                continue
            line = f"{held} {line.strip()}" if held else line
            held = line.rstrip()[:-1] if line.rstrip().endswith("\\") else ""
            code = re.split(r"\s+#\s", line)[0].strip().removeprefix("$ ")
            if not held and code.startswith("synray "):
                found.append((page.name, code))
    return found


COMMANDS = shown_commands()


def test_the_docs_show_the_commands_of_every_page():
    pages = {page for page, _ in COMMANDS}
    assert {"README.md", "cluster.md", "evaluation.md", "generation.md", "sweeps.md", "training.md"} <= pages
    assert len(COMMANDS) >= 30


@pytest.mark.parametrize("page, command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_each_synray_command_in_the_docs_parses_and_its_config_validates(page, command):
    from synray.cli import build_parser
    from synray.config import builtin_names
    from synray.plan import load_run_config

    argv = shlex.split(command)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{page}: `{command}` does not parse (exit {e.code})")
    config = getattr(args, "config", None)
    if config in builtin_names():
        load_run_config(config, getattr(args, "overrides", None) or [])


LIGHT = [(p, c) for p, c in COMMANDS if c.split()[1] in ("config", "plan") and "--address" not in c]


@pytest.mark.parametrize("page, command", LIGHT, ids=[f"{p}:{c[:60]}" for p, c in LIGHT])
def test_each_config_and_plan_command_in_the_docs_runs_as_shown(page, command, monkeypatch, capsys, tmp_path):
    """Run from the repository root, as the docs do: it prints what it is for, and a plan refuses nothing but a
    placement on this machine (a GPU config planned here, without --cluster) or inputs an earlier job makes."""
    from synray.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SYNRAY_CACHE", str(tmp_path / "models"))   # a plan builds no model
    rc = main(shlex.split(command)[1:])
    out = capsys.readouterr().out
    if command.split()[1] == "config":
        assert rc == 0 and out.strip(), command
        return
    assert out.startswith("plan: ") and "stages:" in out or "sweep:" in out, out[:500]
    refused = [line for line in out.splitlines() if line.startswith("refused: ")]
    assert rc == (2 if refused else 0), (rc, refused)
    assert all("but this machine (a local Ray" in line for line in refused), refused
    assert "--cluster" not in command or not refused, refused
