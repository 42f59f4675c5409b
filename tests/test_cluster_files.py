"""The cluster definitions (cluster.yaml, the KubeRay RayJob) and the built-in configs that run on them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from synray.placement import load_cluster_file

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RAYJOB = ROOT / "k8s" / "rayjob.yaml"
GPU_CONFIGS = ("stablerep-vitb16", "synclr-vitb16", "laclip-vitb16", "scaling-supervised")
#: the custom resources that steer stages to node types (each node type of the cluster files declares one)
STAGE_RESOURCES = {"llm_node", "diffusion_node", "train_node", "cpu_node"}


def validated(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_validator_and_a_broken_copy_does_not():
    import jsonschema

    cfg = yaml.safe_load(CLUSTER.read_text())
    assert set(validated(cfg)["available_node_types"]) == {"head", "llm_gpu", "diffusion_gpu", "train_gpu",
                                                           "cpu_worker"}
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["train_gpu"]["max_worker"] = 2   # a typo Ray must catch
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validated(broken)


def test_cluster_yaml_scales_from_zero_opens_only_ssh_and_pins_its_image():
    import ray

    cfg = yaml.safe_load(CLUSTER.read_text())
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert all(v["min_workers"] == 0 and v["max_workers"] >= 1 for v in workers.values())
    assert cfg["idle_timeout_minutes"] > 0
    assert cfg["provider"]["security_group"]["IpPermissions"] == []   # Ray adds SSH + intra-cluster only
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert any("[gpu]" in c for c in cfg["setup_commands"])
    spot = {k for k, v in workers.items() if v["node_config"].get("InstanceMarketOptions", {}).get("MarketType")}
    assert "train_gpu" not in spot and {"llm_gpu", "diffusion_gpu"} <= spot   # restarts cost little there only
    declared = {k for v in cfg["available_node_types"].values() for k in v["resources"]} - {"CPU", "GPU"}
    assert declared == STAGE_RESOURCES


def test_rayjob_runs_the_pipeline_on_an_autoscaling_cluster_with_the_same_stage_resources():
    (job,) = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d and d.get("kind") == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"].split()[:2] == ["python", "/home/ray/synray/jobs/pipeline.py"]
    assert spec["entrypoint"].split()[2] in GPU_CONFIGS and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["rayVersion"] == "2.60.0"
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"   # nothing exposed outside the cluster
    groups = cluster["workerGroupSpecs"]
    assert all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in groups)
    spec_types = load_cluster_file(RAYJOB)
    for g, node_type in zip(groups, spec_types.node_types[1:]):
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert float(limits.get("nvidia.com/gpu", 0)) == node_type.resources.get("GPU", 0.0), g["groupName"]
    declared = {k for t in spec_types.node_types for k in t.resources} - {"CPU", "GPU"}
    assert declared == STAGE_RESOURCES
    launcher = {t.name.replace("_", "-"): dict(t.resources) for t in load_cluster_file(CLUSTER).node_types}
    assert {t.name: dict(t.resources) for t in spec_types.node_types} == launcher   # one shape on VMs and k8s


@pytest.mark.parametrize("cluster_file", [CLUSTER, RAYJOB], ids=["cluster.yaml", "rayjob"])
@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_configs_pack_on_the_cluster_files_with_stages_on_their_node_types(name: str, cluster_file: Path):
    from synray.plan import check_eval_protocols, load_run_config, run_plan_stages
    from synray.placement import pack

    cfg = load_run_config(name)
    stages = run_plan_stages(cfg, check_eval_protocols(cfg))
    cluster = load_cluster_file(cluster_file)
    kind = {t.name: next((k for k in t.resources if k in STAGE_RESOURCES), None) for t in cluster.node_types}
    for phase in {s.phase for s in stages}:
        placed = pack([s for s in stages if s.phase == phase], cluster, phase)
        for node, names in placed.stages_on.items():
            for stage in names:
                custom = next(s.custom for s in stages if s.stage == stage)
                assert not custom or set(custom) == {kind[node]}, (stage, node)
        assert not any(kind[n] == "train_node" for n in placed.nodes) or phase != "training" or \
            "training workers" in placed.stages_on[next(n for n in placed.nodes if kind[n] == "train_node")]


def test_every_built_in_config_validates_and_synray_plan_prints_its_plan(capsys, tiny_models):
    from synray.config import builtin_names
    from synray.plan import load_run_config
    from synray.programs.planview import plan_command

    for name, cluster_file in [(n, f) for n in builtin_names() for f in (CLUSTER, RAYJOB)]:
        rc = plan_command(load_run_config(name), cluster_file=str(cluster_file))
        out = capsys.readouterr().out
        assert rc == 0, (name, cluster_file, out)   # the storage check included: every built-in keeps it shared
        assert out.startswith(f"plan: {name}") and "data flow:" in out and "training phase" in out, name
        assert "nodes on" in out and "checks: ok" in out, name
        if load_run_config(name).data.mode == "stored":
            assert "to make first:" in out, name   # the store an earlier job writes


def test_synray_plan_refuses_a_bad_plan_and_names_the_setting(capsys, tiny_models):
    from synray.plan import load_run_config
    from synray.programs.planview import plan_command

    cfg = load_run_config("synclr-vitb16", ["train.num_workers=24"])   # 3 training nodes; the cluster has 2
    assert plan_command(cfg, cluster_file=str(CLUSTER)) == 2
    out = capsys.readouterr().out
    assert "refused:" in out and "16 of the 24 training workers (train.num_workers" in out
    assert "train_gpu (at most 2)" in out


# ------------------------------------------------------------------------------------ shared storage
def test_both_cluster_files_share_one_path_on_every_node():
    """cluster.yaml mounts EFS on every host (initialization_commands) and binds it into the container; the RayJob
    mounts a ReadWriteMany claim it declares in every Ray pod: both at /mnt/cluster_storage."""
    assert load_cluster_file(CLUSTER).shared_paths == ("/mnt/cluster_storage",)
    assert load_cluster_file(RAYJOB).shared_paths == ("/mnt/cluster_storage",)
    (claim,) = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d and d.get("kind") == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["metadata"]["name"] == "synray-storage"


def test_shared_paths_need_a_network_mount_on_every_node():
    from synray.sharedfs import kuberay_shared_paths, launcher_shared_paths

    mount = "mountpoint -q /mnt/s || sudo mount -t nfs4 -o nfsvers=4.1 fs-1.efs.x.amazonaws.com:/ /mnt/s"
    assert launcher_shared_paths({"initialization_commands": [mount]}) == ("/mnt/s",)
    assert launcher_shared_paths({"initialization_commands": [mount], "docker": {"image": "i"}}) == ()  # not bound
    bound = {"image": "i", "run_options": ["-v /mnt/s:/data"]}
    assert launcher_shared_paths({"initialization_commands": [mount], "docker": bound}) == ("/data",)
    local = {"image": "i", "run_options": ["-v /tmp/x:/data"]}
    assert launcher_shared_paths({"initialization_commands": [mount], "docker": local}) == ()   # a node's own disk
    assert launcher_shared_paths({"initialization_commands": ["sudo mount /dev/nvme1n1 /mnt/s"]}) == ()

    def group(volume: dict, path: str = "/mnt/s") -> dict:
        return {"template": {"spec": {"containers": [{"volumeMounts": [{"name": "v", "mountPath": path}]}],
                                      "volumes": [{"name": "v", **volume}]}}}

    rwx = [{"kind": "PersistentVolumeClaim", "metadata": {"name": "c"}, "spec": {"accessModes": ["ReadWriteMany"]}}]
    rwo = [{"kind": "PersistentVolumeClaim", "metadata": {"name": "c"}, "spec": {"accessModes": ["ReadWriteOnce"]}}]
    claim = {"persistentVolumeClaim": {"claimName": "c"}}
    spec = {"headGroupSpec": group(claim), "workerGroupSpecs": [group(claim)]}
    assert kuberay_shared_paths(rwx, spec) == ("/mnt/s",)
    assert kuberay_shared_paths(rwo, spec) == ()
    nfs = {"headGroupSpec": group({"nfs": {"server": "n", "path": "/"}}), "workerGroupSpecs": [group(claim)]}
    assert kuberay_shared_paths(rwx, nfs) == ("/mnt/s",)
    elsewhere = {"headGroupSpec": group(claim), "workerGroupSpecs": [group(claim, "/other")]}
    assert kuberay_shared_paths(rwx, elsewhere) == ()     # not at one path in every pod


@pytest.mark.parametrize("override, key", [
    ("output_root=runs", "output_root=runs is a relative path"),
    ("output_root=/home/ray/runs", "output_root=/home/ray/runs is not on storage"),
    ("data.store_dir=/tmp/store", "data.store_dir=/tmp/store is not on storage"),
    ("eval.dataset=datasets/val", "eval.dataset=datasets/val is a relative path"),
])
def test_synray_plan_refuses_node_local_storage_on_several_nodes(override: str, key: str, capsys, tiny_models):
    """A plan of several nodes that keeps a run, store or evaluation set where not every node sees it is refused,
    naming the key and the shared path; cloud URIs pass, and a plan on one node is not concerned."""
    from synray.plan import load_run_config
    from synray.programs.planview import plan_command

    for cluster_file in (CLUSTER, RAYJOB):
        assert plan_command(load_run_config("synclr-vitb16", [override]), cluster_file=str(cluster_file)) == 2
        out = capsys.readouterr().out
        assert f"refused: {key}" in out and "/mnt/cluster_storage" in out, out[-2000:]
    from synray.sharedfs import storage_problems

    uri = load_run_config("synclr-vitb16", ["output_root=s3://bucket/runs", "data.store_dir=gs://bucket/store"])
    assert storage_problems(uri, ("/mnt/cluster_storage",), "cluster.yaml", 12) == []   # (no bucket to reach here)
    assert plan_command(load_run_config("local", ["output_root=runs"]), cluster_file=str(CLUSTER)) == 0  # one node


def test_a_sweeps_storage_is_checked_too(capsys, tiny_models):
    from synray.plan import load_run_config
    from synray.programs.planview import plan_command

    cfg = load_run_config("scaling-supervised", ["tune.storage=sweeps/here"])
    assert plan_command(cfg, cluster_file=str(CLUSTER)) == 2
    assert "refused: tune.storage=sweeps/here is a relative path" in capsys.readouterr().out
