"""Placement: a plan's phases packed on node types, and the refusals that name the settings to change."""

from __future__ import annotations

import pytest
from conftest import small_config

from synray.placement import ClusterSpec, NodeType, PlacementError, StageResources, pack


def one_gpu_machine() -> ClusterSpec:
    return ClusterSpec("one machine", (NodeType("box", {"CPU": 16, "GPU": 1}, existing=1, max_workers=1),))


def stream_stages(image_gpus: float, train_gpus: float, workers: int = 1) -> list[StageResources]:
    return [StageResources("diffusers renderers", 1, 1, image_gpus, keys=("images.pool_size", "images.num_cpus",
                                                                           "images.num_gpus")),
            StageResources("row preprocessing", 2, 1, keys=("data.preprocess_actors", "data.preprocess_cpus")),
            StageResources("training workers", workers, 2, train_gpus,
                           keys=("train.num_workers", "train.cpus_per_worker", "train.gpus_per_worker"))]


def test_one_gpu_stream_plan_is_refused_naming_the_settings():
    with pytest.raises(PlacementError) as e:
        pack(stream_stages(1.0, 1.0), one_gpu_machine())
    text = str(e.value)
    assert "holds 2 GPU at once" in text and "has at most 1 GPU" in text
    for key in ("images.num_gpus", "train.gpus_per_worker", "data.mode=stored"):
        assert key in text, key
    assert "train.num_workers=1 with images.num_gpus=0.5 and train.gpus_per_worker=0.5" in text  # a share that fits


def test_a_refusal_names_each_stage_with_the_settings_that_size_it_and_none_for_a_fixed_stage():
    stages = [*stream_stages(0, 0), StageResources("store writer", 1, 0.25)]
    with pytest.raises(PlacementError) as e:
        pack(stages, ClusterSpec("a small machine", (NodeType("box", {"CPU": 4}, existing=1, max_workers=1),)))
    text = str(e.value)
    assert ("holds 5.25 CPU at once (diffusers renderers: 1 x 1 (images.pool_size, images.num_cpus); row "
            "preprocessing: 2 x 1 (data.preprocess_actors, data.preprocess_cpus); training workers: 1 x 2 "
            "(train.num_workers, train.cpus_per_worker); store writer: 1 x 0.25)") in text, text


def test_gpu_advice_keeps_training_workers_on_whole_gpus():
    """With GPUs to spare, the advice gives the workers whole GPUs and shares the rest among the renderers, at
    shares that Ray places on one device each (3 renderers on 1 GPU: 0.33; 5 on 1: 0.2)."""
    for gpus, renderers, workers, want in [(4, 3, 4, "train.num_workers=3 on whole GPUs, and images.num_gpus=0.33"),
                                           (4, 5, 3, "train.num_workers=3 on whole GPUs, and images.num_gpus=0.2"),
                                           (2, 2, 2, "train.num_workers=1 on whole GPUs, and images.num_gpus=0.5")]:
        stages = stream_stages(1.0, 1.0, workers=workers)
        stages[0] = StageResources("diffusers renderers", renderers, 1, 1.0, keys=stages[0].keys)
        with pytest.raises(PlacementError) as e:
            box = NodeType("box", {"CPU": 64, "GPU": gpus}, existing=1, max_workers=1)
            pack(stages, ClusterSpec("a GPU box", (box,)))
        assert want in str(e.value), str(e.value)
        assert "train.gpus_per_worker=0." not in str(e.value)


def test_fractional_gpus_share_one_gpu():
    placed = pack(stream_stages(0.5, 0.5), one_gpu_machine())
    assert placed.nodes == {"box": 1}
    assert set(placed.stages_on["box"]) == {"diffusers renderers", "row preprocessing", "training workers"}
    with pytest.raises(PlacementError):  # three actors at 0.5 do not
        pack(stream_stages(0.5, 0.5, workers=2), one_gpu_machine())


def test_custom_resources_steer_stages_to_their_node_types():
    cluster = ClusterSpec("c", (
        NodeType("head", {"CPU": 8}, existing=1, max_workers=1),
        NodeType("diffusion", {"CPU": 16, "GPU": 4, "diffusion_node": 1}, max_workers=4),
        NodeType("train", {"CPU": 32, "GPU": 8, "train_node": 1}, max_workers=2)))
    stages = [StageResources("renderers", 6, 2, 1, {"diffusion_node": 0.001}),
              StageResources("workers", 8, 3, 1, {"train_node": 0.001}),
              StageResources("preprocessing", 8, 1, 0, {"train_node": 0.001}),
              StageResources("plan rows", 1, 0.25)]
    placed = pack(stages, cluster)
    assert placed.nodes == {"head": 1, "diffusion": 2, "train": 1}   # 6 renderers need 2 nodes of 4 GPUs
    assert set(placed.stages_on["train"]) == {"workers", "preprocessing"}  # preprocessing joins the workers' node
    assert placed.stages_on["head"] == ("plan rows",)


def test_cpu_stages_prefer_nodes_without_gpus():
    cluster = ClusterSpec("c", (NodeType("gpu", {"CPU": 32, "GPU": 8}, max_workers=2),
                                NodeType("cpu", {"CPU": 8}, max_workers=4)))
    placed = pack([StageResources("workers", 2, 4, 1), StageResources("light", 4, 1)], cluster)
    assert placed.stages_on == {"gpu": ("workers",), "cpu": ("light",)}


def test_a_stage_without_its_node_type_is_refused():
    cluster = ClusterSpec("c", (NodeType("head", {"CPU": 8}, existing=1, max_workers=1),))
    with pytest.raises(PlacementError, match="holds 0.001 llm_node at once"):
        pack([StageResources("vLLM engines", 1, 4, 0, {"llm_node": 0.001})], cluster)
    two = ClusterSpec("c", (NodeType("cpu", {"CPU": 8}, max_workers=2),))   # 16 CPUs, but 8 on a node
    with pytest.raises(PlacementError, match=r"one actor asks for 12 CPU \(train.num_workers, train.cpus_per_worker"
                                             r"\), which no node of c holds"):
        pack([StageResources("workers", 1, 12, keys=("train.num_workers", "train.cpus_per_worker"))], two)


def test_node_maximums_bound_the_packing():
    cluster = ClusterSpec("c", (NodeType("gpu", {"CPU": 16, "GPU": 2}, max_workers=2),))
    assert pack([StageResources("w", 4, 4, 1)], cluster).nodes == {"gpu": 2}
    with pytest.raises(PlacementError, match="has at most 4 GPU"):
        pack([StageResources("w", 5, 4, 1)], cluster)


def test_tasks_hold_nothing_but_need_a_node_that_fits():
    cluster = ClusterSpec("c", (NodeType("box", {"CPU": 2}, existing=1, max_workers=1),))
    stages = [StageResources("actors", 2, 1), StageResources("tasks", 4, 0.25, tasks=True)]
    assert pack(stages, cluster).nodes == {"box": 1}


def test_run_plan_phases_follow_the_data_mode():
    from synray.plan import run_plan_stages

    stream = run_plan_stages(small_config(), ("knn",))
    names = {s.phase: [x.stage for x in stream if x.phase == s.phase] for s in stream}
    assert "vLLM engines" in names["training"] and "training workers" in names["training"]
    assert "feature extractors" in names["evaluation"] and "held-out diffusers renderers" in names["evaluation"]
    stored = run_plan_stages(small_config("data.mode=stored", "data.store_dir=/nowhere", "eval.dataset=/nowhere"),
                             ("knn",))
    assert [s.stage for s in stored if s.phase == "training"] == [
        "file listing", "store reads", "consumed rows skipped", "columns training reads", "row preprocessing",
        "training workers"]
    assert [s.stage for s in stored if s.phase == "evaluation"] == [
        "file listing", "evaluation dataset reads", "columns evaluation reads", "feature extractors",
        "sample images kept"]
    fractional = run_plan_stages(small_config("train.use_gpu=true", "train.num_workers=1",
                                              "train.gpus_per_worker=0.25"), ())
    assert [s.gpus for s in fractional if s.stage == "training workers"] == [0.25]


def test_gpu_shares_and_custom_resources_are_validated():
    from synray.config import ConfigError

    with pytest.raises(ConfigError, match="a fraction of one GPU .* or a whole number"):
        small_config("train.use_gpu=true", "train.gpus_per_worker=1.5")
    with pytest.raises(ConfigError, match="gpus_per_worker=0.5 needs use_gpu=true"):
        small_config("train.gpus_per_worker=0.5")
    with pytest.raises(ConfigError, match="NCCL refuses two ranks on one device"):
        small_config("train.use_gpu=true", "train.num_workers=2", "train.gpus_per_worker=0.5")
    with pytest.raises(ConfigError, match="zero_stage=0 runs DeepSpeed's BF16_Optimizer"):
        small_config("train.use_gpu=true", "train.precision=bf16", "train.zero_stage=0")
    with pytest.raises(ConfigError, match="GPU is set by the stage's own num_cpus/num_gpus keys"):
        small_config("images.resources={GPU: 1}")
    assert small_config("images.resources={diffusion_node: 0.001}").images.resources == {"diffusion_node": 0.001}


#: (GPUs on the node, one actor's GPU share, actors asked for): shares that add up under the node's GPUs but do
#: not all fit on single devices (3 x 0.66 on 2 GPUs: one per device; 7 x 0.4 on 3: two per device), and some that do
DEVICE_CASES = [(2, 0.66, 3), (2, 0.5, 4), (3, 0.4, 7), (1, 0.33, 3), (2, 1.0, 3)]

RAY_PLACES = """
import json, sys, ray
cases, packed = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ray.init(num_cpus=4, num_gpus=max(g for g, _, _ in cases), include_dashboard=False, log_to_driver=False)
class Holder:
    def ping(self):
        return 1
out = []
for (gpus, share, n), expected in zip(cases, packed):
    # the node's other GPUs held by a blocker, so that this case sees `gpus` free devices
    others = int(ray.cluster_resources()["GPU"]) - gpus
    blockers = [ray.remote(num_cpus=0, num_gpus=1)(Holder).remote() for _ in range(others)]
    ray.get([b.ping.remote() for b in blockers])
    actors = [ray.remote(num_cpus=0, num_gpus=share)(Holder).remote() for _ in range(n)]
    refs = [a.ping.remote() for a in actors]
    ready, _ = ray.wait(refs, num_returns=min(expected, n), timeout=120)   # what packing says: not a minute more
    ready, _ = ray.wait(refs, num_returns=n, timeout=5)   # and whatever else Ray places within 5 s
    out.append(len(ready))
    for a in actors + blockers:
        ray.kill(a)
print(json.dumps(out))
"""


def test_a_share_that_fits_the_gpus_sum_but_not_single_devices_is_refused_saying_so():
    two = ClusterSpec("a 2-GPU box", (NodeType("box", {"CPU": 16, "GPU": 2}, existing=1, max_workers=1),))
    with pytest.raises(PlacementError) as e:
        pack([StageResources("diffusers renderers", 3, 1, 0.66, keys=("images.pool_size", "", "images.num_gpus"))],
             two)
    assert "2 of the 3 diffusers renderers" in str(e.value)
    assert "a GPU holds 1 share of 0.66, whatever the node's GPUs add up to" in str(e.value)
    assert pack([StageResources("diffusers renderers", 4, 1, 0.5)], two).nodes == {"box": 1}


@pytest.mark.slow
def test_gpu_shares_are_packed_per_device_as_rays_raylet_places_them():
    """How many actors of each share `pack` places on one node agrees with how many a real Ray starts on a node with
    that many GPUs (where the GPUs' sum would admit more)."""
    import json
    import subprocess
    import sys

    def packed(gpus: int, share: float, n: int) -> int:
        node = ClusterSpec("box", (NodeType("box", {"CPU": 64, "GPU": gpus}, existing=1, max_workers=1),))
        fits = [k for k in range(1, n + 1) if _packs([StageResources("renderers", k, 0.1, share)], node)]
        return max(fits, default=0)

    expected = [packed(*case) for case in DEVICE_CASES]
    r = subprocess.run([sys.executable, "-c", RAY_PLACES, json.dumps(DEVICE_CASES), json.dumps(expected)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    started = json.loads(r.stdout.strip().splitlines()[-1])
    assert started == expected
    assert started[0] == 2 and started[2] == 6        # fewer than the GPUs' sum admits (3 x 0.66 <= 2, 7 x 0.4 <= 3)


def _packs(stages: list[StageResources], cluster: ClusterSpec) -> bool:
    try:
        pack(stages, cluster)
    except PlacementError:
        return False
    return True


def test_with_no_cluster_file_or_address_synray_plan_checks_this_machine_and_says_so(monkeypatch):
    """From the repository root too (where cluster.yaml lies): a plan is checked against the local Ray the run would
    start, with the config's CPU and GPU counts, GPU shares per device."""
    from procs import ROOT, sets, synray_main

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    r = synray_main("plan", "local", *sets("ray.num_gpus=0"))
    assert r.code == 0 and "nodes on this machine (a local Ray with 8 CPU, 0 GPU;" in r.out, r.out[-2000:]
    assert "cluster.yaml" not in r.out
    r = synray_main("plan", "local", *sets("ray.num_gpus=0", "train.use_gpu=true"))
    assert r.code == 2 and "but this machine (a local Ray with 8 CPU, 0 GPU;" in r.out and "at most 0 GPU" in r.out
    shares = sets("ray.num_gpus=2", "images.num_gpus=0.66", "images.pool_size=3")
    r = synray_main("plan", "local", *shares)
    assert r.code == 2 and "a GPU holds 1 share of 0.66" in r.out, r.out[-2000:]
    r = synray_main("plan", "local", *sets("ray.num_gpus=2", "images.num_gpus=0.5", "images.pool_size=4"))
    assert r.code == 0 and "checks: ok" in r.out, r.out[-2000:]


def gpu_box(tmp_path, gpus: int, cpus: int = 16):
    """A cluster-launcher file of one fixed node with `gpus` GPUs (a workstation, a 2-GPU box, an 8-GPU node)."""
    import yaml

    path = tmp_path / f"box-{gpus}gpu.yaml"
    path.write_text(yaml.safe_dump({
        "cluster_name": f"box{gpus}", "max_workers": 0,
        "provider": {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
        "available_node_types": {"box": {"resources": {"CPU": cpus, "GPU": gpus}, "node_config": {},
                                         "min_workers": 0, "max_workers": 0}},
        "head_node_type": "box"}))
    return str(path)


def advised(message: str) -> list[str]:
    """The settings a refusal's advice gives (`key=value` pairs of its GPU split)."""
    import re

    split = message.split("Generation and training run at the same time in the stream modes: ")[1]
    return re.findall(r"((?:train|images)\.[a-z_]+=[0-9.]+)", split.split(", or generate first")[0])


@pytest.mark.parametrize("gpus, refused", [
    (1, ["images.num_gpus=1", "train.use_gpu=true"]),
    (2, ["images.num_gpus=1", "train.use_gpu=true"]),
    (2, ["images.num_gpus=1", "images.pool_size=3", "train.use_gpu=true"]),
    (8, ["images.num_gpus=1", "images.pool_size=8", "train.use_gpu=true", "train.num_workers=4"]),
])
def test_the_advice_of_a_gpu_refusal_plans_cleanly_on_1_2_and_8_gpu_cluster_files(tmp_path, gpus, refused):
    """`synray plan --cluster FILE` of a stream that holds more GPUs than the file's node has: the refusal's split
    (training workers on whole GPUs, renderers sharing the others, or one worker sharing a GPU) is taken as it is
    written and planned again on the same file: it fits, per device."""
    from procs import sets, synray_main

    cluster = gpu_box(tmp_path, gpus, cpus=16 * gpus)
    r = synray_main("plan", "local", "--cluster", cluster, *sets(*refused))
    assert r.code == 2 and "refused: the training phase holds" in r.out, r.out[-2000:]
    advice = advised(r.out)
    assert advice, r.out[-2000:]
    again = synray_main("plan", "local", "--cluster", cluster, *sets(*refused, *advice))
    assert again.code == 0 and "checks: ok" in again.out, (advice, again.err[-1000:], again.out[-2000:])


@pytest.mark.parametrize("name, gpus", [("one-gpu", 1), ("one-node", 8)])
def test_the_one_machine_built_ins_plan_cleanly_on_a_cluster_file_of_their_machine(tmp_path, name, gpus):
    from procs import synray_main

    r = synray_main("plan", name, "--cluster", gpu_box(tmp_path, gpus, cpus=16 if gpus == 1 else 96))
    assert r.code == 0 and "checks: ok" in r.out, r.out[-2000:]


def test_an_elastic_group_is_placed_at_its_largest_and_smallest_and_refused_only_when_its_smallest_cannot_fit():
    """Training workers as an elastic range of 1-3 (2 CPU each): a node with room for 3 places both sizes; one with
    room for 2 places the smallest and notes that the group cannot grow to 3 there; one with room for none refuses."""
    from synray.programs.planview import cluster_lines

    stages = [StageResources("row preprocessing", 1, 1), StageResources("training workers", 3, 2, min_actors=1,
                                                                         keys=("train.num_workers",))]

    def on(cpus: int) -> tuple[list[str], list[str]]:
        return cluster_lines(stages, ClusterSpec("a box", (NodeType("box", {"CPU": cpus}, existing=1,
                                                                             max_workers=1),)))
    lines, problems = on(8)
    assert not problems and any(line.startswith("  training: box x1") for line in lines)
    assert any(line.startswith("  training, at its smallest (training workers: 1): box x1") for line in lines), lines
    lines, problems = on(5)
    assert not problems and not any(line.startswith("  training: ") for line in lines)
    assert any("the training phase only fits below its largest size here: the training phase holds 7 CPU" in line
               for line in lines), lines
    lines, problems = on(2)
    assert len(problems) == 1 and "holds 7 CPU at once" in problems[0], problems
    assert StageResources("training workers", 3, 2, min_actors=1).describe() == "training workers: 1-3 x (2 CPU)"
