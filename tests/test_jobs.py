"""The `jobs/` entrypoints: what `ray job submit` of the pipeline to the suite's Ray leaves behind, plans checked
against that Ray (one GPU), and every job's exit status for bad input.

Each job also runs for real elsewhere: pipeline.py is the resubmitted job of the stream drill (runs.py), generate.py
of the generate drill, train.py of the stored runs, evaluate.py in test_train.py, sweep.py in test_sweep_run.py."""

from __future__ import annotations

import json

import pytest

from conftest import CANARY
from procs import ROOT, in_process, load_job, sets, synray_main


def test_the_submitted_pipeline_job_succeeds_and_prints_its_run_directory(stream_drill):
    """`ray job submit --working-dir . -- python jobs/pipeline.py local ...` on a head with token authentication:
    the job succeeds and prints the run directory it wrote (summary, backbone)."""
    job = stream_drill.job
    assert job.returncode == 0 and "succeeded" in job.stdout, (job.stdout + job.stderr)[-4000:]
    assert f"run directory: {stream_drill.run_dir}" in job.stdout
    summary = json.loads((stream_drill.run_dir / "summary.json").read_text())
    assert summary["mode"] == "stream+store" and summary["run_dir"] == str(stream_drill.run_dir)
    assert (stream_drill.run_dir / "backbone" / "model.safetensors").is_file()


def test_secrets_in_the_clusters_environment_reach_no_output(stream_drill, ray_jobs):
    """HF_TOKEN and AWS_SECRET_ACCESS_KEY are set in the suite's Ray (as a cluster node has them): their value is in
    no output of the job: not what `ray job submit` printed, the run directory, the store, nor any file Ray wrote
    (its logs, the job driver's log, the workers' logs)."""
    job = stream_drill.job
    assert CANARY not in job.stdout + job.stderr
    searched = [p for root in (stream_drill.run_dir, stream_drill.store, ray_jobs.session_dir)
                for p in root.rglob("*") if p.is_file()]
    assert any(p.name.startswith("job-driver-") for p in searched)   # the job's own log is among them
    leaked = [p for p in searched if CANARY.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_one_gpu_stream_plan_is_refused_before_anything_starts(ray_cluster, tmp_path):
    """On a cluster with one GPU (the suite's Ray), a stream with diffusion and training each on whole GPUs can never
    be placed: `synray run` exits 2 before any run directory exists, and `synray plan --address` says the same."""
    one_gpu = sets("images.num_gpus=1", "train.use_gpu=true", f"output_root={tmp_path}")
    r = synray_main("run", "local", *one_gpu)
    assert r.code == 2, (r.error, r.trace, r.err[-3000:])
    assert "has at most 1 GPU" in r.err
    for key in ("images.num_gpus", "train.gpus_per_worker", "data.mode=stored"):
        assert key in r.err, key
    assert not list(tmp_path.iterdir())   # no run directory, nothing generated
    r = synray_main("plan", "local", *one_gpu, "--address", ray_cluster)
    assert r.code == 2 and "refused: the training phase holds 3 GPU at once" in r.out, r.out[-3000:]


def test_fractional_gpus_make_the_same_plan_fit_one_gpu(ray_cluster):
    shared = sets("images.num_gpus=0.5", "train.use_gpu=true", "train.num_workers=1", "train.gpus_per_worker=0.5")
    r = synray_main("plan", "local", *shared, "--address", ray_cluster)
    assert r.code == 0, (r.error, r.trace, r.out[-3000:])
    assert "nodes on the Ray cluster at" in r.out and "checks: ok" in r.out
    assert "training workers: 1 x (0.5 CPU + 0.5 GPU)" in r.out


# ----------------------------------------------------------------------------- bad input, every job
@pytest.mark.parametrize("script, args, needle", [
    ("pipeline.py", ["local", *sets("train.steps=-1")], "train.steps: -1 is not allowed"),
    ("generate.py", ["local", "--out", "OUT", *sets("images.per_caption=0")], "images.per_caption"),
    ("train.py", ["local", "--data", "/no/such/store"], "dataset directory /no/such/store does not exist"),
    ("evaluate.py", ["/no/such/model", "--dataset", "/no/such/data"], "model directory"),
    ("sweep.py", ["scaling-local", *sets("tune.space={data.num_captions: {grid: [40, 80]}}")], "at least 3"),
])
def test_every_job_exits_2_on_bad_input_with_a_message_and_no_traceback(script, args, needle, tmp_path, monkeypatch):
    """Each entrypoint's own main(), as `python jobs/<script>` calls it: status 2, the message on stderr, and nothing
    started: no Ray and no output directory."""
    import synray.programs.session as session

    def no_ray(*a, **k):
        raise AssertionError("bad input reached Ray")

    monkeypatch.setattr(session, "init", no_ray)
    r = in_process(load_job(script).main, [a.replace("OUT", str(tmp_path / "out")) for a in args])
    assert r.code == 2, (r.error, r.err)
    assert needle in r.err and r.err.startswith("synray: ") and "Traceback" not in r.err
    assert not (tmp_path / "out").exists()



# ----------------------------------------------------------------------------- jobs are the CLI's commands
JOB_COMMANDS = {"pipeline.py": "run", "generate.py": "generate", "train.py": "train", "evaluate.py": "eval",
                "sweep.py": "sweep"}


def _help(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("script, command", JOB_COMMANDS.items())
def test_each_job_takes_the_same_arguments_and_defaults_as_its_synray_command(script, command, capsys):
    """`python jobs/<script> --help` prints what `synray <command> --help` prints: one parser, so the same arguments,
    defaults and choices (the jobs/ folder holds no other entrypoint)."""
    from synray.cli import main

    assert sorted(p.name for p in (ROOT / "jobs").glob("*.py")) == sorted(JOB_COMMANDS)
    job_help = _help(load_job(script).main, ["--help"], capsys)
    assert job_help == _help(main, [command, "--help"], capsys)
    assert "--set KEY.PATH=VALUE" in job_help


def test_without_out_or_data_the_configs_store_is_used_and_its_absence_named(tmp_path):
    """`synray generate` / jobs/generate.py without --out write to data.store_dir (here a file, which is refused
    naming that path); `synray train` / jobs/train.py without --data read it; with neither set, status 2 naming the
    flag and the key."""
    r = synray_main("generate", "local")
    assert r.code == 2 and "--out" in r.err and "data.store_dir" in r.err, (r.err, r.error)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    r = in_process(load_job("generate.py").main, ["local", *sets(f"data.store_dir={not_a_dir}")])
    assert r.code == 2 and f"output path {not_a_dir} exists and is not a directory" in r.err, (r.err, r.error)
    r = in_process(load_job("train.py").main, ["local"])
    assert r.code == 2 and "--data" in r.err and "data.store_dir" in r.err, (r.err, r.error)
    r = synray_main("train", "local", *sets(f"data.store_dir={tmp_path / 'none'}"))
    assert r.code == 2 and f"{tmp_path / 'none'}" in r.err, (r.err, r.error)
