"""The README's excerpts of `synray plan` are what the code prints: each is rendered here and compared line by line
(in order; `...` in an excerpt line stands for what the README leaves out of the printed line)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from procs import docs_text

ROOT = Path(__file__).resolve().parent.parent
README = docs_text()   # the README and docs/, where the excerpts are


def excerpt(after: str) -> list[str]:
    """The lines of the first code block after the text `after` in the README, or from the line holding `after` when
    it is inside a code block."""
    start = README.index(after)
    if README[:start].count("```") % 2:     # inside a block: from the start of its line
        block = README[README.rindex("\n", 0, start) + 1:]
    else:
        block = README[README.index("```\n", start) + 4:]
    return block[:block.index("```")].rstrip("\n").split("\n")


def pattern(line: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in line.rstrip().split("...")))


def assert_in_order(quoted: list[str], printed: list[str]) -> None:
    """Each quoted line matches a printed line, after the one the previous quoted line matched."""
    at = 0
    for line in quoted:
        p = pattern(line)
        found = next((i for i in range(at, len(printed)) if p.fullmatch(printed[i].rstrip())), None)
        assert found is not None, f"README line not printed (in this order): {line!r}\nprinted:\n" + "\n".join(printed)
        at = found + 1


def plan_lines(name: str, cluster: str | None, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from synray.plan import load_run_config
    from synray.programs.planview import plan_command

    monkeypatch.chdir(ROOT)       # the README runs from the repository root: "nodes on cluster.yaml"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        plan_command(load_run_config(name), cluster_file=cluster)
    return out.getvalue().splitlines()


def test_the_synclr_plan_excerpt_is_what_synray_plan_prints(monkeypatch):
    assert_in_order(excerpt("An excerpt of `synray plan\nsynclr-vitb16`"),
                    plan_lines("synclr-vitb16", "cluster.yaml", monkeypatch))


def test_the_rates_excerpt_is_what_synray_plan_prints(monkeypatch):
    assert_in_order(excerpt("An excerpt of `synray plan gpu`"), plan_lines("gpu", "cluster.yaml", monkeypatch))


def test_the_one_gpu_refusal_is_the_message_placement_gives():
    """The README's refusal of a stream on a 1-GPU Ray: the message of the placement check on such a node."""
    from synray.placement import ClusterSpec, NodeType, PlacementError, pack
    from synray.plan import load_run_config, run_plan_stages
    from synray.stages import by_phase

    quoted = excerpt("$ synray run local --set images.num_gpus=1")
    quoted = " ".join(quoted[1:]).removeprefix("synray: error: ")
    cfg = load_run_config("local", ["images.num_gpus=1", "train.use_gpu=true"])
    one_gpu = ClusterSpec("the Ray cluster at ...", (NodeType("node", {"CPU": 8, "GPU": 1}, existing=1,
                                                              max_workers=1),))
    with pytest.raises(PlacementError) as e:
        pack(by_phase(run_plan_stages(cfg, ()))["training"], one_gpu, "training")
    assert " ".join(quoted.split()) == " ".join(str(e.value).split()), textwrap.fill(str(e.value), 104)


def test_the_make_run_excerpt_is_what_print_summary_prints_of_its_figures(capsys):
    """The README's end of `make run` (a real run's figures) is what the run's summary printer writes of them: the
    figures are read back from the excerpt, printed by the code, and compared line by line."""
    from types import SimpleNamespace

    from synray.programs.run import print_summary

    quoted = excerpt("It ends with")
    train = re.match(r"  trained (\d+) steps: loss ([\d.]+) -> ([\d.]+), data-wait fraction ([\d.]+), (\d+) rows "
                     r"used ([\d.]+) times each", quoted[1])
    stages = {m[1]: {"rows": int(m[2]), "rows_per_s": float(m[3]), "steady_rows_per_s": float(m[4])}
              for m in (re.match(r" *(\w+): (\d+) rows, ([\d.]+) rows/s overall, ([\d.]+) rows/s after start-up", line)
                        for line in quoted[2:5])}
    held = re.match(r"  device-hours held while training: ([\d.]+) CPU \(by stage", quoted[5])
    knn = re.match(r"  knn_accuracy: trained ([\d.]+) vs init ([\d.]+) \(chance ([\d.]+)\)", quoted[6])
    top5 = re.match(r"  knn_top5_accuracy: trained ([\d.]+) vs init ([\d.]+)", quoted[7])
    summary = {"train": {"steps": int(train[1]), "first_loss": float(train[2]), "final_loss": float(train[3]),
                         "data_wait_fraction": float(train[4]), "rows_trained": int(train[5]),
                         "uses_per_row": float(train[6]), "device_hours": {"total": {"CPU": float(held[1])}}},
               "stages": stages,
               "eval": {"trained": {"knn_accuracy": float(knn[1]), "knn_top5_accuracy": float(top5[1]),
                                    "chance": float(knn[3])},
                        "init": {"knn_accuracy": float(knn[2]), "knn_top5_accuracy": float(top5[2])}}}
    where = quoted[0].removeprefix("run directory: ")
    rd = SimpleNamespace(where=where, summary_path=None,
                         locate=lambda _: quoted[-1].removeprefix("  summary: "))
    print_summary(rd, summary)
    assert capsys.readouterr().out.splitlines() == quoted
