"""The package order of pyproject.toml's import-linter contracts holds, and the contracts do catch a violation."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]


def _lint(project: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(project), "PATH": "/usr/bin:/bin"}
    return subprocess.run([*LINT, "--config", str(project / "pyproject.toml"), "--no-cache"], cwd=project,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_are_kept():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


def test_an_upward_import_breaks_the_layer_contract(tmp_path: Path):
    shutil.copytree(ROOT / "synray", tmp_path / "synray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    backbone = tmp_path / "synray" / "models" / "backbone.py"
    backbone.write_text(backbone.read_text() + "\nfrom synray.train import worker  # a model importing the trainer\n")
    r = _lint(tmp_path)
    assert r.returncode != 0
    assert "BROKEN" in r.stdout and "synray.models.backbone -> synray.train.worker" in r.stdout
