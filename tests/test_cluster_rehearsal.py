"""A cluster of several Ray nodes on this machine, each declaring one of cluster.yaml's node types
(tests/cluster_rehearsal.py): `synray run shapes` in stream+store mode places each stage on the node type the plan
assigns it, and finishes after losing a diffusion node, then a training node given a spot interruption notice,
which its spot watcher turns into a drain: its elastic training group checkpoints at the notice, goes on at 2
workers, grows back to 3 when a node is added, and every caption is stored once and every step's rows trained
once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster_rehearsal import OVERRIDES, STEP_ROWS, STEPS
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
    assert proc.returncode == 0 and report.get("rc") == 0, (report.get("error"), proc.stderr[-3000:], log[-5000:],
                                                             report.get("stacks"))
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
    from synray.placement import load_cluster_file
    from synray.programs.planview import elastic_placements

    stages = rehearsal_stages()
    cluster = load_cluster_file(CLUSTER)
    planned = {}
    for phase in {s.phase for s in stages}:   # the elastic group at its largest where it fits, else its smallest
        largest, smallest, _ = elastic_placements([s for s in stages if s.phase == phase], cluster, phase)
        for node_type, names in (largest or smallest).stages_on.items():
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
    """Both nodes went with every process on them (a spot reclaim; the training node at its drain's deadline), in
    the middle of training, and the run still trained its steps, evaluated and wrote its summary; the renderer came
    back on the other diffusion node (Ray's actor list at the end, where a restarted actor keeps its id and shows
    its last node: every renderer on a diffusion node, one of them on another than the lost one)."""
    lost = rehearsal["lost"]
    assert [x["type"] for x in lost] == ["diffusion_gpu", "train_gpu"]
    assert lost[1]["node"] == rehearsal["drained"]["node"]
    assert 0 < lost[0]["step"] < rehearsal["drained"]["step"] < STEPS
    summary = json.loads((rehearsal["run_dir"] / "summary.json").read_text())
    assert summary["train"]["steps"] == STEPS
    assert "knn" in json.dumps(summary["eval"])
    nodes = rehearsal["nodes"]
    renderers = [a["node"] for a in rehearsal["seen_at_end"] if "ProceduralRenderer" in a["repr"]]
    assert {nodes[n] for n in renderers} == {"diffusion_gpu"}
    assert set(renderers) - {lost[0]["node"]}, (renderers, lost[0]["node"])


def training_log(rehearsal: dict) -> list[dict]:
    return [r for r in metrics_log(rehearsal["run_dir"]) if "loss" in r]


def test_the_drained_nodes_workers_saved_a_checkpoint_at_the_notice_and_the_group_went_on_from_it(rehearsal):
    """The instance-metadata notice became a drain through the node's spot watcher; the notice reached the workers at
    the report after the drain: its checkpoint carries it, and the group that went on after the node was removed
    started at the step after that checkpoint (nothing trained after it was lost: the group held until it was
    stopped)."""
    assert "spot interruption notice: terminate" in rehearsal["drained"]["watcher"]
    log = training_log(rehearsal)
    (notice,) = [i for i, r in enumerate(log) if r.get("preemption")]
    assert log[notice]["step"] >= rehearsal["drained"]["step"] and log[notice]["world_size"] == 3
    assert log[notice]["time"] < rehearsal["drained"]["time"] + rehearsal["drained"]["deadline_s"]
    later = [r for r in log if r["time"] > rehearsal["lost"][1]["time"]]
    assert later[0]["step"] == log[notice]["step"] + 1 and later[0]["world_size"] == 2, later[:2]


def test_the_elastic_group_shrank_to_2_workers_and_grew_back_to_3_with_continuous_steps(rehearsal):
    """The sizes in the order the log reports them: 3 until the drained node went, 2, then 3 once a training node was
    added; each group's steps go on from the checkpoint its predecessor left (a restart may retrain the steps after
    the last checkpoint, never skip one), and the last group trains to the end. The summary counts each size's
    steps."""
    log = training_log(rehearsal)
    sizes = [r["world_size"] for r in log]
    runs = [w for i, w in enumerate(sizes) if i == 0 or w != sizes[i - 1]]
    assert runs == [3, 2, 3], runs
    steps = [r["step"] for r in log]
    for prev, nxt in zip(steps, steps[1:]):
        assert nxt == prev + 1 or nxt <= prev, (prev, nxt)   # on, or back to a checkpoint after a restart
    assert steps[-1] == STEPS and set(steps) == set(range(1, STEPS + 1))
    grown = next(r for r in log if r["time"] > rehearsal["added"]["time"] and r["world_size"] == 3)
    assert grown["step"] > rehearsal["added"]["step"] - 2
    summary = json.loads((rehearsal["run_dir"] / "summary.json").read_text())
    by_size = summary["train"]["steps_by_world_size"]
    assert set(by_size) == {"2", "3"} and sum(by_size.values()) == STEPS, by_size
    # the group's device-hours: between 2 and 3 workers' worth of the fit (it held 2 while shrunk)
    from synray.stages import TRAINING_WORKERS

    (workers,) = [s for s in rehearsal_stages() if s.stage == TRAINING_WORKERS]
    cpus = summary["train"]["device_hours"][TRAINING_WORKERS]["CPU"]
    fit_h, each = summary["train"]["elapsed_s"] / 3600, workers.cpus
    assert 2 * each * fit_h < cpus < 3 * each * fit_h, (cpus, fit_h, each)


def test_every_caption_id_is_stored_once_and_every_steps_rows_were_trained_once(rehearsal):
    """The store across the losses and resizes: each caption id once (rows rendered again after a loss are not
    stored again); the final checkpoint's record of trained rows is made of stored rows, one per row each step
    trained (STEPS x 12 distinct rows: no row trained at two steps of the final history)."""
    from synray.data.ledger import load_consumed

    rows = stored_rows(rehearsal["store"], ["caption_id", "row_id"])
    ids = [r["caption_id"] for r in rows]
    assert ids and len(ids) == len(set(ids)), "a caption id stored twice"
    summary = json.loads((rehearsal["run_dir"] / "summary.json").read_text())
    consumed = set(load_consumed(Path(summary["train"]["checkpoint"])).tolist())
    assert consumed <= {r["row_id"] for r in rows}
    assert len(consumed) == STEPS * STEP_ROWS
