"""Sweeps: search-space checks, data pools and nested subsets, and the report (the fit itself: test_scaling_fit.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synray.config import ConfigError
from synray.plan import load_run_config
from synray.sweep.planning import plan_sweep
from synray.sweep.pools import trial_config
from synray.sweep.report import SWEEP_CONFIG, TRIAL_FILE, TRIALS_DIR, write_report
from synray.sweep.space import check_space, trial_overrides

SCALES = "tune.space={data.num_captions: {grid: [40, 80, 160]}}"


def sweep_config(*overrides: str):
    return load_run_config("scaling-local", list(overrides))


# ------------------------------------------------------------------------------------ space
@pytest.mark.parametrize("override, needle", [
    ("tune.space={train.temprature: {grid: [0.1]}}", "tune.space.train.temprature: invalid configuration"),
    ("tune.space={train.temperature: {grid: [0.1, -1]}}", "tune.space.train.temperature=-1"),
    ("tune.space={ray.num_cpus: {grid: [2, 4]}}", "ray.num_cpus cannot be swept"),
    ("tune.space={train.lr: {loguniform: [0.1, 0.01]}}", "loguniform needs low < high"),
    ("tune.space={train.lr: {grid: [0.1], choice: [0.2]}}", "give exactly one of"),
    ("tune.space={train.steps: {loguniform: [100, 1000]}}", "tune.space.train.steps="),
    ("tune.space={data.num_captions: {grid: [40, 80, 160]}, train.loss: {grid: [stablerep, dino]}}",
     'tune.space.train.loss=\'dino\''),
])
def test_a_bad_search_space_is_refused_naming_its_key(override, needle):
    with pytest.raises(ConfigError) as e:
        plan_sweep(sweep_config(override), root="/nonexistent/sweep")
    assert needle in str(e.value)


def test_a_range_over_a_setting_that_changes_the_images_is_refused():
    cfg = sweep_config("tune.space={images.jpeg_quality: {randint: [50, 90]}}")
    with pytest.raises(ConfigError, match="changes the images needs a data pool per drawn value"):
        plan_sweep(cfg, root="/nonexistent/sweep")


def test_fewer_than_3_data_scales_and_a_pool_smaller_than_a_scale_are_refused():
    with pytest.raises(ConfigError, match="2 data scale.*at least 3"):
        plan_sweep(sweep_config("tune.space={data.num_captions: {grid: [40, 80]}}"), root="/x")
    with pytest.raises(ConfigError, match="cannot be larger than its pool"):
        plan_sweep(sweep_config(SCALES, "tune.pool_captions=100"), root="/x")


def test_a_cloud_uri_as_sweep_directory_puts_pools_and_held_out_set_under_it():
    plan = plan_sweep(sweep_config(SCALES), root="s3://bucket/sweeps")
    assert plan.root.uri == "s3://bucket/sweeps" and not plan.root.is_local
    assert all(p.path.startswith("s3://bucket/sweeps/pools/") for p in plan.data.pools.values())
    assert plan.data.heldout_path == "s3://bucket/sweeps/heldout"


def test_the_tune_param_space_is_keyed_by_config_paths_with_a_variant_grid():
    space = check_space(sweep_config("tune.space={data.num_captions: {grid: [40, 80, 160]}, "
                                     "train.lr: {loguniform: [0.0001, 0.01]}}"))
    param = space.param_space()
    assert param["data.num_captions"] == {"grid_search": [40, 80, 160]}
    assert param["variant"] == {"grid_search": ["SimCLR m=1", "multi-positive m=4"]}
    assert param["train.lr"].lower == 0.0001 and param["train.lr"].upper == 0.01


def test_a_probe_metric_needs_its_probe():
    with pytest.raises(ConfigError, match="eval.enabled is false"):
        plan_sweep(sweep_config(SCALES, "eval.enabled=false"), root="/x")
    with pytest.raises(ConfigError, match="segmentation probe"):
        plan_sweep(sweep_config(SCALES, "tune.metric=segmentation_miou", "eval.protocols=[knn]"), root="/x")


def test_variants_and_grid_make_one_trial_config_per_point_with_its_overrides():
    cfg = sweep_config(SCALES)
    space = check_space(cfg)
    points = space.finite_points()
    assert len(points) == 3 * len(cfg.tune.variants) == space.count_grid()
    for p in points:
        o = trial_overrides(space, p)
        assert o["data.num_captions"] == p["data.num_captions"]
        assert {k: v for k, v in o.items() if k != "data.num_captions"} == cfg.tune.variants[p["variant"]]


def test_one_pool_per_image_setting_of_the_largest_scale_and_trials_read_nested_subsets(tmp_path: Path):
    cfg = sweep_config("tune.space={data.num_captions: {grid: [40, 80, 160]}, "
                       "images.image_format: {grid: [png, jpeg]}}")
    plan = plan_sweep(cfg, root=str(tmp_path))
    pools = list(plan.data.pools.values())
    assert len(pools) == 2 and {p.captions for p in pools} == {160}
    assert {p.per_caption for p in pools} == {max(cfg.images.per_caption, 1)}
    trials = [trial_config(cfg, plan.space, plan.data, p) for p in plan.space.finite_points()]
    for t in trials:
        assert t.data.mode == "stored" and t.data.first_rows == t.data.num_captions
        assert t.data.store_dir in {p.path for p in pools} and t.train.steps == cfg.train.steps
        assert t.eval.dataset == plan.data.heldout_path
    simclr = [t for t in trials if t.train.loss == "simclr"]
    assert simclr and all(t.data.first_images == 1 for t in simclr)


def test_the_built_in_sweeps_plan_one_pool_per_seed_or_guidance_scale_of_the_largest_scale(tmp_path: Path):
    local = plan_sweep(sweep_config(), root=str(tmp_path / "local"))   # 4 scales x 2 seeds x 2 variants
    assert sorted(p.cfg.seed for p in local.data.pools.values()) == [0, 1] and local.space.count_grid() == 16
    assert {p.captions for p in local.data.pools.values()} == {2400}
    gpu = plan_sweep(load_run_config("scaling-supervised"), root=str(tmp_path / "gpu"))
    pools = sorted(gpu.data.pools.values(), key=lambda p: p.cfg.images.guidance_scale)
    assert [p.cfg.images.guidance_scale for p in pools] == [2.0, 7.5]
    assert {p.captions * p.per_caption for p in pools} == {4_000_000} and gpu.space.count_grid() == 12
    assert gpu.resources.gpus == 8 and gpu.resources.driver == {"CPU": 0.25, "cpu_node": 0.01}


def test_an_epoch_budget_gives_each_scale_its_own_steps_and_a_step_budget_the_same(tmp_path: Path):
    from synray.sweep.pools import trial_steps

    fixed = sweep_config(SCALES)
    assert {trial_steps(derive(fixed, n)) for n in (40, 160)} == {fixed.train.steps}
    epochs = sweep_config(SCALES, "tune.budget=epochs", "tune.epochs=2")
    per_step = epochs.train.captions_per_worker * epochs.train.num_workers
    assert [trial_steps(derive(epochs, n)) for n in (40, 160)] == [-(-80 // per_step), -(-320 // per_step)]


def derive(cfg, captions: int):
    from synray.plan import derive_config

    return derive_config(cfg, {"data.num_captions": captions})


# ----------------------------------------------------------------------------------- report
def _fake_sweep(root: Path, scales: list[int], k: float) -> None:
    cfg = sweep_config(SCALES)
    root.mkdir(parents=True)
    (root / SWEEP_CONFIG).write_text(cfg.to_yaml())
    for i, (variant, n) in enumerate((v, n) for v in ("a", "b") for n in scales):
        d = root / TRIALS_DIR / f"t{i:02d}"
        d.mkdir(parents=True)
        err = 3.0 * (n * 4) ** -(k if variant == "a" else k / 2)
        linear_err = 2.0 * (n * 4) ** -(1.5 * k)   # another law for the linear probe
        d.joinpath(TRIAL_FILE).write_text(json.dumps({
            "trial_id": d.name, "params": {"variant": variant, "data.num_captions": n}, "captions": n,
            "images_per_caption": 4, "steps": 10,
            "trained": {"knn_accuracy": 1 - err, "linear_accuracy": 1 - linear_err},
            "init": {"knn_accuracy": 0.1, "linear_accuracy": 0.1}}))


def test_report_writes_the_table_plots_and_fits_per_method(tmp_path: Path):
    _fake_sweep(tmp_path / "s", [40, 80, 160, 320], 0.4)
    report = write_report(tmp_path / "s")
    names = {p.name for p in report.files}
    assert {"results.csv", "results.md", "fits.json", "scaling.png", "scaling-a.png", "scaling-b.png"} <= names
    assert len(report.rows) == 8 and not report.messages
    assert report.fits["groups"]["a"]["law"]["k"] == pytest.approx(0.4, abs=0.02)
    assert report.fits["groups"]["b"]["law"]["k"] == pytest.approx(0.2, abs=0.02)
    assert (tmp_path / "s" / "report" / "results.csv").read_text().count("\n") == 9


def test_synray_report_metric_fits_the_named_probe(tmp_path: Path, capsys):
    """`synray report DIR --metric linear_accuracy` fits the linear probe's error (exponent 1.5 k here) instead of
    the sweep's tune.metric (kNN, exponent k)."""
    from synray.cli import main

    _fake_sweep(tmp_path / "s", [40, 80, 160, 320], 0.4)
    assert main(["report", str(tmp_path / "s"), "--metric", "linear_accuracy"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 's' / 'report' / 'fits.json'}" in out
    fits = json.loads((tmp_path / "s" / "report" / "fits.json").read_text())
    assert fits["groups"]["a"]["law"]["k"] == pytest.approx(0.6, abs=0.02)
    # what it prints of each fit is fits.md: the law, its intervals, why this law, the extrapolation check
    described = (tmp_path / "s" / "report" / "fits.md").read_text().splitlines()
    assert described and all(line in out.splitlines() for line in described)
    assert described[0].startswith("a: error = 2 * N^-0.600") and "k in [0.600, 0.600]" in described[1]
    assert "fitted without N = 1280, it predicts" in described[3] and "the law extrapolates" in described[3]
    assert main(["report", str(tmp_path / "s")]) == 0
    fits = json.loads((tmp_path / "s" / "report" / "fits.json").read_text())
    assert fits["groups"]["a"]["law"]["k"] == pytest.approx(0.4, abs=0.02)


def test_synray_report_prints_the_table_and_refuses_a_metric_no_trial_has(tmp_path: Path, capsys):
    """The table (results.md) is printed before the fits; a metric without values exits 2 naming the figures the
    trials have, and leaves the last report as it was."""
    from synray.cli import main

    _fake_sweep(tmp_path / "s", [40, 80, 160, 320], 0.4)
    assert main(["report", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out.splitlines()
    table = (tmp_path / "s" / "report" / "results.md").read_text().splitlines()
    assert len(table) == 2 + 8 and out[:len(table)] == table
    before = {p.name: p.read_bytes() for p in (tmp_path / "s" / "report").iterdir()}
    assert main(["report", str(tmp_path / "s"), "--metric", "zeroshot_accuracy"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == ("synray: no finished trial has a value of zeroshot_accuracy (--metric, else tune.metric); "
                    "they have: knn_accuracy, linear_accuracy, loss")
    assert {p.name: p.read_bytes() for p in (tmp_path / "s" / "report").iterdir()} == before


def test_trials_that_differ_by_seed_are_replicates_of_one_method(tmp_path: Path):
    _fake_sweep(tmp_path / "s", [40, 80, 160, 320], 0.4)
    for d in sorted((tmp_path / "s" / TRIALS_DIR).iterdir()):   # a second seed of every trial, 2% off
        record = json.loads((d / TRIAL_FILE).read_text())
        record["params"]["seed"] = 1
        record["trained"]["knn_accuracy"] = 1 - (1 - record["trained"]["knn_accuracy"]) * 1.02
        twin = d.parent / f"{d.name}-seed1"
        twin.mkdir()
        (twin / TRIAL_FILE).write_text(json.dumps({**record, "trial_id": twin.name}))
        record = json.loads((d / TRIAL_FILE).read_text())
        record["params"]["seed"] = 0
        (d / TRIAL_FILE).write_text(json.dumps(record))
    report = write_report(tmp_path / "s")
    assert set(report.fits["groups"]) == {"a", "b"}
    assert report.fits["groups"]["a"]["points"] == 8 and report.fits["groups"]["a"]["dof"] == 5


def test_the_report_says_when_the_law_does_not_reach_the_largest_scale(tmp_path: Path, capsys):
    """A sweep whose largest scale gains nothing over the one before (a plateau the law through the smaller ones
    does not have): the report's extrapolation check says the law does not extrapolate."""
    from synray.cli import main

    _fake_sweep(tmp_path / "s", [40, 80, 160, 320, 640], 0.4)
    for d in (tmp_path / "s" / TRIALS_DIR).iterdir():   # the largest scale measures what the one before did
        record = json.loads((d / TRIAL_FILE).read_text())
        if record["captions"] == 640:
            record["trained"]["knn_accuracy"] = 1 - 3.0 * (320 * 4) ** -(0.4 if record["params"]["variant"] == "a"
                                                                           else 0.2)
            (d / TRIAL_FILE).write_text(json.dumps(record))
    assert main(["report", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    fits = json.loads((tmp_path / "s" / "report" / "fits.json").read_text())
    for group in ("a", "b"):
        check = fits["groups"][group]["extrapolation"]
        assert check["held_out"] == 2560 and not check["holds"]
        assert check["measured"] > check["high"]
    assert out.count("the law does NOT extrapolate") == 2


def test_report_lists_a_trial_stopped_early_with_its_last_step_and_fits_only_finished_ones(tmp_path: Path):
    from synray.sweep.report import START_FILE

    _fake_sweep(tmp_path / "s", [40, 80, 160], 0.4)
    d = tmp_path / "s" / TRIALS_DIR / "t99"
    (d / "train").mkdir(parents=True)
    params = {"variant": "a", "data.num_captions": 320}
    d.joinpath(START_FILE).write_text(json.dumps({"trial_id": "t99", "params": params, "captions": 320,
                                                  "images_per_caption": 4}))
    d.joinpath("train", "metrics.jsonl").write_text('{"event": "fit_start"}\n{"step": 7, "loss": 3.5}\n')
    report = write_report(tmp_path / "s")
    stopped = [r for r in report.rows if r["trial"] == "t99"]
    assert stopped == [{**stopped[0], "status": "unfinished", "steps": 7, "final_loss": 3.5}]
    assert "knn_accuracy" not in stopped[0] and report.fits["groups"]["a"]["points"] == 3


def test_report_with_two_scales_says_why_and_still_writes_the_table(tmp_path: Path):
    _fake_sweep(tmp_path / "s", [40, 80], 0.4)
    report = write_report(tmp_path / "s")
    assert {p.name for p in report.files} == {"results.csv", "results.md", "fits.json"}
    assert report.fits["groups"] == {} and len(report.rows) == 4
    assert any("2 data scale(s)" in m and "at least 3" in m for m in report.messages)


# ---------------------------------------------------------------------------------- subsets
def test_nested_subsets_are_the_first_n_rows_in_plan_order_with_the_first_m_images(generated_store):
    import pyarrow.parquet as pq

    from synray.data.store import ParquetStore, StoreError

    store = ParquetStore(generated_store.dir)
    stored = {r["row_id"]: r for s in store.shards() for r in pq.read_table(s).to_pylist()}
    order = sorted(stored)

    def read(n: int, m: int, passes: int = 1) -> list[dict]:
        bound, shards = store.first_rows(n)
        return store.read_subset(["caption_id", "images"], shards, bound, m, passes).take_all()

    small, large = read(6, 2), read(12, 2)
    assert sorted(r["row_id"] for r in small) == order[:6] and sorted(r["row_id"] for r in large) == order[:12]
    for r in large:
        assert list(r["images"]) == list(stored[r["row_id"]]["images"][:2])
    thrice = read(6, 1, passes=3)
    stride = order[5] + 1
    assert len({r["row_id"] for r in thrice}) == 18
    assert sorted(r["row_id"] % stride for r in thrice) == sorted(order[:6] * 3)
    with pytest.raises(StoreError, match="larger than its pool"):
        store.first_rows(len(order) + 1)


def test_the_report_chooses_each_methods_trial_on_the_validation_figure_not_the_query_one(tmp_path: Path):
    """In each method the trial best on the query side is not the one best on validation: the report picks the
    latter and reports its query figure (the query side takes no part in the choice)."""
    from synray.sweep.report import selection

    trials = [{"trial_id": f"{v}{n}", "status": "finished", "params": {"variant": v, "data.num_captions": n},
               "trained": {"knn_accuracy": q, "val_knn_accuracy": val}}
              for v, n, q, val in [("a", 40, 0.50, 0.41), ("a", 80, 0.45, 0.44), ("b", 40, 0.60, 0.30),
                                   ("b", 80, 0.40, 0.35)]]
    lines = selection(trials, "knn_accuracy")
    assert lines[0].startswith("selection on val_knn_accuracy")
    picked = {line.split(":")[0].strip(): line for line in lines[1:]}
    assert "trial a80 " in picked["a"] and "knn_accuracy 0.4500" in picked["a"]
    assert "trial b80 " in picked["b"] and "knn_accuracy 0.4000" in picked["b"]
    assert "trial a80 " in picked["all trials"]
    assert "no trial is chosen" in selection(trials, "segmentation_miou")[0]


def test_synray_plan_of_a_sweep_shows_its_trials_pools_and_held_out_set_not_the_base_run(caplog):
    """`synray plan scaling-local`: the sweep's search, its pools and held-out set, the largest trial's stages
    placed at tune.max_concurrent_trials at once; no word on the base config's stream (trials read the pools)."""
    from procs import synray_main

    r = synray_main("plan", "scaling-local")
    assert r.code == 0 and "checks: ok" in r.out, (r.error, r.out[-3000:])
    assert "search: 1 sample(s) of 16 grid point(s)" in r.out and "data.num_captions: grid [150, 400, 1000, 2400]" \
        in r.out
    assert r.out.count("captions x 4 images -> ") == 2 and "held-out set: 200 captions -> " in r.out
    assert "the largest trial (2400 captions; tune.max_concurrent_trials=2 at once):" in r.out
    assert "2 trial(s) at once: training: this machine x1" in r.out
    assert "stream mode" not in r.log and "data flow:" not in r.out
