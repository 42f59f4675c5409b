"""The cluster definitions (cluster.yaml, the KubeRay RayJob) and the built-in configs that run on them."""

from __future__ import annotations

import copy
import gzip
import json
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from procs import docs_text
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
    # every node runs the project's image (the Dockerfile: the pinned Ray image plus synray's GPU and W&B extras),
    # and no node installs packages at start-up
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert cfg["docker"]["image"].endswith(f".amazonaws.com/synray:{version}")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile and "[gpu,wandb]" in dockerfile
    assert not any("pip install" in c for c in cfg.get("setup_commands") or [])
    registry = cfg["docker"]["image"].split("/")[0]
    assert any(f"docker login --username AWS --password-stdin {registry}" in c for c in cfg["initialization_commands"])
    spot = {k for k, v in workers.items() if v["node_config"].get("InstanceMarketOptions", {}).get("MarketType")}
    assert {"llm_gpu", "diffusion_gpu", "train_gpu"} <= spot   # stores resume by caption id; training is elastic
    declared = {k for v in cfg["available_node_types"].values() for k in v["resources"]} - {"CPU", "GPU"}
    assert declared == STAGE_RESOURCES


def test_rayjob_runs_the_pipeline_on_an_autoscaling_cluster_with_the_same_stage_resources():
    job, _ = rayjob_docs()
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
    pods = {t.name: dict(t.resources) for t in spec_types.node_types}
    assert set(pods) == set(launcher)
    for name, res in pods.items():   # one shape on VMs and k8s: the same GPUs and stage resources, the CPUs a pod
        vm = launcher[name]          # gets once the node's reservations are paid (below)
        assert {k: v for k, v in res.items() if k != "CPU"} == {k: v for k, v in vm.items() if k != "CPU"}, name
        assert vm["CPU"] - 4 <= res["CPU"] < vm["CPU"], name


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

    for name, cluster_file in [(n, f) for n in builtin_names() if n not in ONE_MACHINE for f in (CLUSTER, RAYJOB)]:
        rc = plan_command(load_run_config(name), cluster_file=str(cluster_file))
        out = capsys.readouterr().out
        assert rc == 0, (name, cluster_file, out)   # the storage check included: every built-in keeps it shared
        cfg = load_run_config(name)
        assert out.startswith(f"plan: {name}") and "training phase" in out, name
        assert ("sweep:" in out and "the largest trial" in out) if cfg.tune.space else "data flow:" in out, name
        assert "nodes on" in out and "checks: ok" in out, name
        if cfg.data.mode == "stored" and not cfg.tune.space:   # a sweep generates its own pools
            assert "to make first:" in out, name   # the store an earlier job writes


def test_synray_plan_refuses_a_bad_plan_and_names_the_setting(capsys, tiny_models):
    from synray.plan import load_run_config
    from synray.programs.planview import plan_command

    cfg = load_run_config("synclr-vitb16", ["train.num_workers=24"])   # 3 training nodes; the cluster has 2
    assert plan_command(cfg, cluster_file=str(CLUSTER)) == 2
    out = capsys.readouterr().out
    assert "refused:" in out and "16 of the 24 training workers (train.num_workers" in out
    assert "train_gpu (at most 2)" in out


# ------------------------------------------------------------------------------------ spot training
def test_training_nodes_are_spot_in_both_files_with_on_demand_one_line_away():
    """The training node type is spot on VMs (InstanceMarketOptions) and on EKS (the managed node group's capacity
    label); without that one line (ON_DEMAND on EKS) the file is still valid for Ray's validator and KubeRay's
    schema."""
    import jsonschema

    cfg = yaml.safe_load(CLUSTER.read_text())
    assert cfg["available_node_types"]["train_gpu"]["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    on_demand = copy.deepcopy(cfg)
    del on_demand["available_node_types"]["train_gpu"]["node_config"]["InstanceMarketOptions"]
    validated(on_demand)
    job, _ = rayjob_docs()
    (train,) = [g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "train-gpu"]
    assert train["template"]["spec"]["nodeSelector"]["eks.amazonaws.com/capacityType"] == "SPOT"
    with gzip.open(ROOT / "tests" / "data" / "kuberay-1.6.0-rayjob-schema.json.gz") as f:
        schema = strict(json.load(f)["schema"])
    flipped = copy.deepcopy(job)
    (group,) = [g for g in flipped["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "train-gpu"]
    group["template"]["spec"]["nodeSelector"]["eks.amazonaws.com/capacityType"] = "ON_DEMAND"
    jsonschema.validate(flipped, schema)


def test_a_spot_reclaim_drains_the_training_node_within_ec2s_notice_on_both_files():
    """VMs: every worker node starts the spot watcher after `ray start`, detached (it outlives the command), the
    head does not (on demand). EKS: the training pods' SIGTERM drain (Ray's own, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S)
    ends before the pod's grace period, and both within EC2's 120 s notice (test_spotwatch.py runs both drains)."""
    cfg = yaml.safe_load(CLUSTER.read_text())
    start = cfg["worker_start_ray_commands"]
    ray_start = next(i for i, c in enumerate(start) if "ray start" in c)
    (watch,) = [c for c in start if "synray.spotwatch" in c]
    assert start.index(watch) > ray_start and watch.startswith("setsid nohup ") and watch.rstrip().endswith("&")
    assert not any("spotwatch" in c for c in cfg["head_start_ray_commands"])
    job, _ = rayjob_docs()
    (train,) = [g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "train-gpu"]
    pod = train["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    drain_s = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
    assert 60 <= drain_s < pod["terminationGracePeriodSeconds"] <= 120


def test_the_gpu_built_ins_train_elastically_and_plan_at_both_sizes(capsys, tiny_models):
    """The 16-worker built-ins are [8, 16]: both sizes train the configured step exactly, and `synray plan` on each
    cluster file places the group at 16 (two training nodes) and at 8 (one)."""
    from synray.plan import load_run_config
    from synray.programs.planview import plan_command

    for name in ("stablerep-vitb16", "synclr-vitb16", "laclip-vitb16"):
        t = load_run_config(name).train
        assert (t.min_workers, t.max_workers) == (8, 16), name
        for w in (8, 16):
            s = t.at_size(w)
            assert s.captions_per_worker * w * s.grad_accum == t.step_rows, (name, w)
        for cluster_file in (CLUSTER, RAYJOB):
            assert plan_command(load_run_config(name), cluster_file=str(cluster_file)) == 0
            out = capsys.readouterr().out
            assert f"8-16 workers x {t.captions_per_worker} captions ({t.step_rows} rows a step" in out, name
            at_most = next(line for line in out.splitlines() if line.strip().startswith("training:"))
            smallest = next(line for line in out.splitlines() if "at its smallest (training workers: 8)" in line)
            train_type = "train_gpu" if cluster_file == CLUSTER else "train-gpu"
            assert f"{train_type} x2 (training workers" in at_most and f"{train_type} x1 (training workers" in smallest


# ------------------------------------------------------------------------------------ shared storage
def test_both_cluster_files_share_one_path_on_every_node():
    """cluster.yaml mounts EFS on every host (initialization_commands) and binds it into the container; the RayJob
    mounts a ReadWriteMany claim it declares in every Ray pod: both at /mnt/cluster_storage."""
    assert load_cluster_file(CLUSTER).shared_paths == ("/mnt/cluster_storage",)
    assert load_cluster_file(RAYJOB).shared_paths == ("/mnt/cluster_storage",)
    _, claim = rayjob_docs()
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


# ------------------------------------------------------------------------------------ cluster.yaml's nodes
def test_every_node_boots_one_pinned_current_ami_that_ray_keeps():
    """Without an ImageId, Ray's launcher fills in its default AMI (an Ubuntu 18.04 / CUDA 11 Deep Learning AMI);
    every node type names one pinned AMI, and Ray's own AMI step leaves it as it is."""
    from ray.autoscaler._private.aws.config import DEFAULT_AMI, _check_ami

    cfg = yaml.safe_load(CLUSTER.read_text())
    amis = {name: t["node_config"].get("ImageId") for name, t in cfg["available_node_types"].items()}
    (ami,) = set(amis.values())
    assert ami and ami.startswith("ami-") and len(ami) == 21 and ami not in DEFAULT_AMI.values(), amis
    checked = copy.deepcopy(cfg)
    _check_ami(checked)
    assert {n: t["node_config"]["ImageId"] for n, t in checked["available_node_types"].items()} == amis
    unpinned = copy.deepcopy(cfg)
    del unpinned["available_node_types"]["train_gpu"]["node_config"]["ImageId"]
    _check_ami(unpinned)     # what the file had before: Ray's default for the region
    assert unpinned["available_node_types"]["train_gpu"]["node_config"]["ImageId"] == DEFAULT_AMI["us-west-2"]
    text = CLUSTER.read_text()
    assert "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)" in text   # which AMI it is, in the file
    readme = docs_text()
    assert "aws ec2 describe-images" in readme and ami in readme                  # and how to find it elsewhere


def test_workers_get_an_instance_profile_of_their_own():
    """Ray's launcher gives its default instance profile to the head only (`config["head_node"]`); workers then
    have no credentials for S3 outputs or the image registry. Every worker type names a profile, and the head names
    one too, so Ray's IAM step changes nothing (it would otherwise create and attach its own)."""
    from ray.autoscaler._private.aws.config import _configure_iam_role

    cfg = yaml.safe_load(CLUSTER.read_text())
    head = cfg["head_node_type"]
    profiles = {n: t["node_config"].get("IamInstanceProfile") for n, t in cfg["available_node_types"].items()}
    assert all(profiles.values()), profiles
    assert len({p["Name"] for n, p in profiles.items() if n != head}) == 1         # one worker profile
    assert profiles[head]["Name"] != profiles["train_gpu"]["Name"]                  # the head's also launches nodes
    prepared = {**copy.deepcopy(cfg), "head_node": {}}
    assert _configure_iam_role(prepared)["head_node"] == {}                         # no AWS call, nothing added
    readme = docs_text()
    assert all(p["Name"] in readme for p in profiles.values()) and "iam:PassRole" in readme


#: published instance sizes (vCPU, memory GiB) of the node types in both files
INSTANCES = {"m6i.4xlarge": (16, 64), "g5.12xlarge": (48, 192), "p4d.24xlarge": (96, 1152)}


def ray_default_object_store(memory_bytes: float) -> float:
    from ray._private.ray_constants import DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES, \
        DEFAULT_OBJECT_STORE_MEMORY_PROPORTION

    return min(memory_bytes * DEFAULT_OBJECT_STORE_MEMORY_PROPORTION, DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES)


def test_each_node_types_shared_memory_is_sized_by_ray_for_its_object_store():
    """The container's /dev/shm caps Ray's object store. With no --shm-size in the run options, Ray's launcher sizes
    it on each node from that node's /proc/meminfo (DockerCommandRunner._auto_configure_shm); a fixed 32g would have
    capped every node type at 32 GB. Ray's own function, fed each instance's meminfo, gives each node type at least
    the object store Ray sizes for it."""
    from ray.autoscaler._private.command_runner import DockerCommandRunner

    cfg = yaml.safe_load(CLUSTER.read_text())
    options = cfg["docker"]["run_options"]
    assert not any("--shm-size" in o for o in options)
    for name, node_type in cfg["available_node_types"].items():
        cpus, gib = INSTANCES[node_type["node_config"]["InstanceType"]]
        available_kb = int(gib * 0.95 * 2**20)      # a booted node's MemAvailable: a little below its size
        ssh = SimpleNamespace(run=lambda cmd, with_output=False, kb=available_kb:
                              f"MemTotal: {kb} kB\nMemAvailable: {kb} kB\n".encode())
        runner = SimpleNamespace(docker_config=cfg["docker"], ssh_command_runner=ssh)
        (shm,) = [o for o in DockerCommandRunner._auto_configure_shm(runner, list(options)) if "--shm-size" in o]
        size = float(shm.split("=")[1].strip("'b"))
        assert size >= ray_default_object_store(available_kb * 1024), (name, shm)
        assert size > 32e9 or gib <= 100, (name, shm)  # the GPU types get more than the old fixed cap


# ------------------------------------------------------------------------------------ the RayJob
def strict(schema: dict) -> dict:
    """A CRD schema as the API server's strict field validation applies it (`kubectl apply --validate=strict`):
    an object that lists its properties and does not keep unknown fields refuses any other field."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and \
                not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def rayjob_docs() -> tuple[dict, dict]:
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    return job, claim


def test_rayjob_passes_kuberays_own_schema_strictly_and_a_broken_copy_does_not():
    """KubeRay 1.6's RayJob CRD schema (tests/data, taken from the operator's release) validates the file with
    unknown fields refused; a misspelt deadline or an authentication mode KubeRay does not know is refused."""
    import jsonschema

    with gzip.open(ROOT / "tests" / "data" / "kuberay-1.6.0-rayjob-schema.json.gz") as f:
        schema = strict(json.load(f)["schema"])
    job, _ = rayjob_docs()
    jsonschema.validate(job, schema)
    typo = copy.deepcopy(job)
    typo["spec"]["activeDeadlineSecond"] = typo["spec"].pop("activeDeadlineSeconds")
    with pytest.raises(jsonschema.ValidationError, match="activeDeadlineSecond"):
        jsonschema.validate(typo, schema)
    mode = copy.deepcopy(job)
    mode["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    with pytest.raises(jsonschema.ValidationError, match="tokens"):
        jsonschema.validate(mode, schema)


def test_rayjob_has_deadlines_and_token_authentication():
    """A job whose pods never schedule ends (preRunningDeadlineSeconds, activeDeadlineSeconds); Ray's token
    authentication is on through KubeRay (which needs Ray 2.52 or later for it)."""
    import ray
    from packaging.version import Version

    job, _ = rayjob_docs()
    spec = job["spec"]
    assert 0 < spec["preRunningDeadlineSeconds"] <= 3600
    assert spec["activeDeadlineSeconds"] >= 24 * 3600
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert Version(cluster["rayVersion"]) >= Version("2.52.0") and cluster["rayVersion"] == ray.__version__


def quantity(text: str | int) -> float:
    """A Kubernetes quantity (\"500m\", \"52Gi\", \"16\") as a number (CPUs or bytes)."""
    text = str(text)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text)


def eks_allocatable(instance: str) -> tuple[float, float]:
    """CPUs and bytes a pod can request on an EKS node of this type (the EKS AMI's bootstrap): capacity less
    kubeReserved (CPU: 6% of the first core, 1% of the second, 0.5% of the next two, 0.25% of the rest; memory:
    11 MiB per pod of the instance's max pods + 255 MiB) and the eviction threshold (memory.available 100Mi)."""
    max_pods = {"m6i.4xlarge": 234, "g5.12xlarge": 737, "p4d.24xlarge": 737}[instance]   # eni-max-pods.txt
    cpus, gib = INSTANCES[instance]
    mc = cpus * 1000
    reserved_mc = 0.06 * min(mc, 1000) + 0.01 * max(0, min(mc, 2000) - 1000) + \
        0.005 * max(0, min(mc, 4000) - 2000) + 0.0025 * max(0, mc - 4000)
    capacity = gib * 2**30 * 0.96          # the kernel keeps some: a node's reported capacity is below its size
    return cpus - reserved_mc / 1000, capacity - (11 * max_pods + 255) * 2**20 - 100 * 2**20


#: what DaemonSets (VPC CNI, kube-proxy, EBS/EFS CSI nodes, NVIDIA device plugin, a log agent) request per node
DAEMONSETS = (1.0, 2 * 2**30)


def test_rayjob_pods_fit_their_node_types_allocatable_with_room_for_system_pods():
    """Requests at an instance's full vCPU count stay Pending for ever: each pod (and the head's autoscaler
    sidecar) requests no more than its node type's allocatable resources less the DaemonSets, limits equal requests
    (Guaranteed QoS), and Ray is told the pod's CPUs."""
    job, _ = rayjob_docs()
    cluster = job["spec"]["rayClusterSpec"]
    sidecar = cluster["autoscalerOptions"]["resources"]["requests"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    for name, group in groups:
        pod = group["template"]["spec"]
        instance = pod["nodeSelector"]["node.kubernetes.io/instance-type"]
        cpu_left, mem_left = eks_allocatable(instance)
        (ray_container,) = pod["containers"]
        res = ray_container["resources"]
        assert res["limits"] == res["requests"], name
        cpu, mem = quantity(res["requests"]["cpu"]), quantity(res["requests"]["memory"])
        if name == "head":
            cpu, mem = cpu + quantity(sidecar["cpu"]), mem + quantity(sidecar["memory"])
        assert cpu <= cpu_left - DAEMONSETS[0] and mem <= mem_left - DAEMONSETS[1], (name, cpu, cpu_left, mem / 2**30)
        assert cpu >= 0.85 * INSTANCES[instance][0], name                    # and not wasting the node
        assert float(group["rayStartParams"]["num-cpus"]) == quantity(res["requests"]["cpu"]), name
        gpus = res["requests"].get("nvidia.com/gpu")
        assert group["rayStartParams"].get("num-gpus") == gpus, name


def test_every_ray_pod_has_a_memory_backed_dev_shm_for_its_object_store():
    """Without it a pod's /dev/shm is 64 MiB and Ray puts the object store in /tmp: every Ray pod mounts a memory
    emptyDir at /dev/shm at least 10% larger than the object store Ray sizes from the pod's memory, and within it."""
    job, _ = rayjob_docs()
    cluster = job["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory"
        memory = quantity(container["resources"]["limits"]["memory"])
        size = quantity(volume["emptyDir"]["sizeLimit"])
        assert 1.1 * ray_default_object_store(memory) <= size <= 0.5 * memory, (group.get("groupName"), size)


#: the built-ins for one machine, with the CPUs and GPUs of the machine each is sized for
ONE_MACHINE = {"one-gpu": (16, 1), "one-node": (96, 8)}


@pytest.mark.parametrize("name", sorted(ONE_MACHINE))
def test_the_one_machine_built_ins_plan_cleanly_on_their_machine_and_not_on_a_smaller_one(name, tiny_models):
    """Checked as `synray plan NAME` checks this machine (its counts given as ray.num_cpus/num_gpus): the generation
    job, training and evaluation each fit the machine, a machine with fewer GPUs refuses them, and a cluster file
    refuses their local paths once a phase spans nodes."""
    from procs import sets, synray_main

    cpus, gpus = ONE_MACHINE[name]
    r = synray_main("plan", name, *sets(f"ray.num_cpus={cpus}", f"ray.num_gpus={gpus}"))
    assert r.code == 0 and "checks: ok" in r.out, (r.error, r.out[-3000:])
    for phase in ("generation job", "training", "evaluation"):
        assert f"  {phase}: this machine x1 (" in r.out, phase
    assert "`synray generate CONFIG`" in r.out and "to make first:" in r.out
    smaller = synray_main("plan", name, *sets(f"ray.num_cpus={cpus}", f"ray.num_gpus={gpus // 2}"))
    assert smaller.code == 2 and "refused: the generation job phase" in smaller.out, smaller.out[-3000:]
    on_cluster = synray_main("plan", name, "--cluster", str(CLUSTER))
    assert on_cluster.code == 2 and "output_root" in on_cluster.out


def test_every_node_gets_hf_token_from_a_secret_and_no_file_holds_one(tmp_path):
    """Gated hub models need HF_TOKEN on every node. The RayJob takes it into every Ray container from the Secret
    synray-hf-token (optional: public models run without it). On VMs, the host's initialization writes it from AWS
    Secrets Manager into a file only its user reads, and docker passes that file into the container: the command
    runs here against a stand-in `aws` that prints a token, then one that fails (no secret: an empty file)."""
    import os
    import stat
    import subprocess

    job, _ = rayjob_docs()
    cluster = job["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        (token,) = [e for e in container["env"] if e["name"] == "HF_TOKEN"]
        assert token == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": "synray-hf-token", "key": "token", "optional": True}}}
        assert not [e for e in container["env"] if "value" in e and any(
            w in e["name"].upper() for w in ("TOKEN", "SECRET", "PASSWORD", "KEY"))]

    spec = yaml.safe_load(CLUSTER.read_text())
    (env_file,) = [o.split()[1] for o in spec["docker"]["run_options"] if o.startswith("--env-file")]
    (write,) = [c for c in spec["initialization_commands"] if env_file in c and "secretsmanager" in c]
    bin_dir, out = tmp_path / "bin", tmp_path / "secrets.env"
    bin_dir.mkdir()
    for answer, want in (("echo hf_canary123", "HF_TOKEN=hf_canary123\n"), ("exit 255", "")):
        (bin_dir / "aws").write_text(f"#!/bin/sh\n{answer}\n")
        (bin_dir / "aws").chmod(0o755)
        out.unlink(missing_ok=True)
        subprocess.run(["bash", "-c", write.replace(env_file, str(out))], check=True,
                       env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
        assert out.read_text() == want and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "hf_" not in CLUSTER.read_text() and "hf_" not in RAYJOB.read_text()


def test_synray_plan_notes_a_one_actor_preprocessing_pool_feeding_workers_on_several_nodes(capsys, tiny_models):
    """A drained node that holds the whole pool starves the group (the rehearsal found it): the plan says so when the
    workers span nodes and the pool has one actor, and not with two (Ray Data spreads them over the nodes)."""
    from synray.plan import load_run_config
    from synray.programs.planview import plan_command

    base = ["output_root=/mnt/cluster_storage/runs", "train.num_workers=2", "train.resources={train_node: 0.6}",
            "data.preprocess_resources={train_node: 0.001}"]
    for actors, noted in ((1, True), (2, False)):
        assert plan_command(load_run_config("shapes", [*base, f"data.preprocess_actors={actors}"]),
                            cluster_file=str(CLUSTER)) == 0
        out = capsys.readouterr().out
        assert "train_gpu x2 (row preprocessing, training workers)" in out
        assert ("note: data.preprocess_actors=1 feeds training workers on 2 nodes" in out) == noted, out[-1500:]
    assert plan_command(load_run_config("shapes", [*base, "train.num_workers=1", "data.preprocess_actors=1"]),
                        cluster_file=str(CLUSTER)) == 0
    assert "note: data.preprocess_actors" not in capsys.readouterr().out     # one node: nothing to note
