"""A cluster of several Ray nodes on this machine, each declaring one of cluster.yaml's node types
(tests/cluster_rehearsal.py): `synray run shapes` in stream+store mode places each stage on the node type the plan
assigns it, and finishes after losing a diffusion node and then the training node that held the workers, with
every caption stored once and training resumed from its last checkpoint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster_rehearsal import EVERY, OVERRIDES, STEPS
from procs import ROOT, metrics_log, stored_rows

CLUSTER = ROOT / "cluster.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("cluster")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cluster_rehearsal.py"), str(out)],
                          capture_output=True, text=True, timeout=840, cwd=ROOT)
    assert (out / "report.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    log = (out / "run.log").read_text() if (out / "run.log").exists() else ""
    assert proc.returncode == 0 and report.get("rc") == 0, (proc.stderr[-3000:], log[-5000:], report.get("stacks"))
    (run_dir,) = report["run_dirs"]
    return {**report, "run_dir": Path(run_dir), "out": out}


def rehearsal_stages() -> list:
    """The stages of the rehearsal's run, as the plan lists them (training and evaluation)."""
    from synray.plan import check_eval_protocols, load_run_config, run_plan_stages

    cfg = load_run_config("shapes", [*OVERRIDES, "data.store_dir=/mnt/cluster_storage/s",
                                     "output_root=/mnt/cluster_storage/r"])
    return list(run_plan_stages(cfg, check_eval_protocols(cfg)))


def planned_types() -> dict[str, str]:
    """Each stage that asks for a node type's resource (by the class its actors run) and the node type the plan
    packs it on, among cluster.yaml's."""
    from synray.placement import load_cluster_file, pack

    stages = rehearsal_stages()
    cluster = load_cluster_file(CLUSTER)
    planned = {}
    for phase in {s.phase for s in stages}:
        placed = pack([s for s in stages if s.phase == phase], cluster, phase)
        for node_type, names in placed.stages_on.items():
            planned.update({s.udf: node_type for s in stages if s.stage in names and s.custom})
    return planned


def live_placement(log: str) -> dict[str, str]:
    """The custom resource of the node each stage was placed on, from the run's log of its placement on the live
    cluster (`placement (training): node 10.0.0.3 (diffusion_node) x1 (procedural renderers), ...`)."""
    placed = {}
    for line in log.splitlines():
        if "INFO synray.programs.run: placement (" in line:
            for resource, stages in re.findall(r"node \S+(?: \(([^)]*)\))? x\d+ \(([^)]*)\)", line.split("): ", 1)[1]):
                placed.update({stage: resource for stage in stages.split(", ")})
    return placed


def test_each_stage_ran_on_the_node_type_the_plan_assigned(rehearsal):
    """Ray's state API, read before each loss and at the end: every actor of a stage that asks for a node type's
    resource ran on a node of the type the plan packs it on (on cluster.yaml's node types, and in the run's own
    placement on the live cluster), the run's bookkeeping actors on the head with the driver; `synray plan` against
    the live cluster passed its checks."""
    from cluster_rehearsal import custom_resources

    assert rehearsal["plan"]["rc"] == 0 and "checks: ok" in rehearsal["plan"]["out"], rehearsal["plan"]
    planned = planned_types()
    assert set(planned) == {"ProceduralRenderer", "RowPreprocessor", "RayTrainWorker", "FeatureExtractor"}
    assert set(planned.values()) == {"diffusion_gpu", "train_gpu"}
    resource = custom_resources()
    live = live_placement((rehearsal["out"] / "run.log").read_text())
    for stage in rehearsal_stages():
        if stage.udf in planned:
            assert live[stage.stage] == resource[planned[stage.udf]], (stage.stage, live)
    nodes = rehearsal["nodes"]
    seen: dict[str, set[str]] = {}
    for snapshot in ("seen_before_loss", "seen_before_second_loss", "seen_at_end"):
        for actor in rehearsal[snapshot]:
            name = f"{actor['class']} {actor['repr']}"
            for udf in [u for u in planned if u in name] + [u for u in ("StreamLedger", "StageStats") if u in name]:
                seen.setdefault(udf, set()).add(nodes[actor["node"]])
    assert seen == {**{udf: {t} for udf, t in planned.items()}, "StreamLedger": {"head"}, "StageStats": {"head"}}


def test_the_run_finished_after_losing_a_diffusion_node_then_a_training_node(rehearsal):
    """Both nodes went with every process on them (a spot reclaim), in the middle of training, and the run still
    trained its steps, evaluated and wrote its summary; the renderer came back on the other diffusion node (Ray's
    actor list at the end, where a restarted actor keeps its id and shows its last node: every renderer on a
    diffusion node, one of them on another than the lost one)."""
    lost = rehearsal["lost"]
    assert [x["type"] for x in lost] == ["diffusion_gpu", "train_gpu"]
    assert 0 < lost[0]["step"] < lost[1]["step"] < STEPS
    summary = json.loads((rehearsal["run_dir"] / "summary.json").read_text())
    assert summary["train"]["steps"] == STEPS and summary["train"]["worker_failures"] >= 1
    assert "knn" in json.dumps(summary["eval"])
    nodes = rehearsal["nodes"]
    renderers = [a["node"] for a in rehearsal["seen_at_end"] if "ProceduralRenderer" in a["repr"]]
    assert {nodes[n] for n in renderers} == {"diffusion_gpu"}
    assert set(renderers) - {lost[0]["node"]}, (renderers, lost[0]["node"])


def test_training_resumed_from_the_last_checkpoint_before_the_training_node_went(rehearsal):
    log = metrics_log(rehearsal["run_dir"])
    (cut,) = [i for i, r in enumerate(log) if r.get("event") == "worker_failure"]
    before = [r["step"] for r in log[:cut] if "loss" in r]
    after = [r["step"] for r in log[cut + 1:] if "loss" in r]
    resumed = after[0] - 1
    assert resumed % EVERY == 0 and 0 <= before[-1] - resumed < EVERY, (before, after)
    assert after == list(range(after[0], STEPS + 1)), "steps after the restart not continuous"


def test_every_caption_id_is_stored_once_and_every_trained_row_is_stored(rehearsal):
    """The store across both losses: each caption id once (rows rendered again after a loss are not stored
    again), and the final checkpoint's record of trained rows is all stored rows."""
    from synray.data.ledger import load_consumed

    rows = stored_rows(rehearsal["store"], ["caption_id", "row_id"])
    ids = [r["caption_id"] for r in rows]
    assert ids and len(ids) == len(set(ids)), "a caption id stored twice"
    summary = json.loads((rehearsal["run_dir"] / "summary.json").read_text())
    consumed = set(load_consumed(Path(summary["train"]["checkpoint"])).tolist())
    assert consumed and consumed <= {r["row_id"] for r in rows}
