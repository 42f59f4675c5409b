"""Stage rates: the bottleneck and idle shares, the balanced GPU split (against scipy's integer-programming solver),
and the GPU-hours of a stream against generating first, on cases with answers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import Bounds, LinearConstraint, milp

from synray.balance import balanced_split, stream_costs, stream_rates
from synray.stages import Rate, StageResources


def stage(name: str, actors: int, rows_per_s: float, gpus: float = 1.0) -> StageResources:
    return StageResources(name, actors, 1.0, gpus, keys=(f"{name}.pool_size",), rate=Rate(rows_per_s, "test"))


def test_the_bottleneck_is_the_slowest_stage_and_the_others_idle_for_the_rest():
    stages = [stage("captions", 2, 50.0), stage("renderers", 8, 0.5), stage("training workers", 4, 100.0)]
    rates = stream_rates(stages)
    assert rates.bottleneck.name == "renderers" and rates.bottleneck.rows_per_s == 4.0
    assert rates.of("captions").idle_share == pytest.approx(1 - 4 / 100)
    assert rates.of("training workers").idle_share == pytest.approx(1 - 4 / 400)
    # each row used 100 times: training needs 400 / 100 = 4 new rows/s, the renderers' pace: nobody idles
    replayed = stream_rates(stages, replay=100)
    assert replayed.of("training workers").rows_per_s == pytest.approx(4.0)
    assert replayed.of("training workers").idle_share == pytest.approx(0.0)
    assert stream_rates([*stages, StageResources("decoders", 2, 1.0)]).unrated == ("decoders",)


@pytest.mark.parametrize("per_gpu, budget, want", [((1.0, 2.0, 4.0), 7, (4, 2, 1)), ((1.0, 3.0), 8, (6, 2))])
def test_balanced_split_of_hand_worked_cases(per_gpu, budget, want):
    stages = [stage(f"s{i}", 1, r) for i, r in enumerate(per_gpu)]
    split = balanced_split(stages, budget)
    assert tuple(split.gpus.values()) == want
    assert split.rows_per_s == pytest.approx(min(n * r for n, r in zip(want, per_gpu)))


def milp_best_rate(per_gpu: np.ndarray, budget: int) -> float:
    """max t subject to n_i r_i >= t, sum n_i = budget, n_i >= 1 integer (scipy's HiGHS)."""
    k = len(per_gpu)
    c = np.zeros(k + 1)
    c[-1] = -1.0                                        # maximise t
    rows = np.hstack([-np.diag(per_gpu), np.ones((k, 1))])   # t - r_i n_i <= 0
    total = np.append(np.ones(k), 0.0)
    res = milp(c, constraints=[LinearConstraint(rows, -np.inf, 0.0), LinearConstraint(total[None], budget, budget)],
               integrality=np.append(np.ones(k), 0), bounds=Bounds(np.append(np.ones(k), 0), np.inf))
    assert res.success
    return -res.fun


def test_balanced_split_matches_an_integer_program_on_random_stages():
    rng = np.random.default_rng(0)
    for _ in range(40):
        k = int(rng.integers(2, 4))
        per_gpu = np.exp(rng.uniform(-3, 6, size=k))     # rates over nine orders of e: renderers to trainers
        budget = int(rng.integers(k, 40))
        # two actors of half a GPU each, r / 2 rows/s an actor: r rows/s a GPU
        split = balanced_split([stage(f"s{i}", 2, r / 2, gpus=0.5) for i, r in enumerate(per_gpu)], budget)
        assert sum(split.gpus.values()) == budget and min(split.gpus.values()) >= 1
        assert split.rows_per_s == pytest.approx(milp_best_rate(per_gpu, budget), rel=1e-7, abs=1e-6)  # HiGHS tol.


def test_gpu_hours_of_a_stream_and_of_generating_first():
    """4 renderers at 1 row/s each, 1 caption engine at 100, 2 training workers at 50: 3,600 rows in a stream take
    3,600 / 4 s = 0.25 h on 7 GPUs (1.75 GPU-h). Generated first on 7 GPUs split 1 engine + 6 renderers (6 rows/s):
    600 s, then 3,600 row uses on 2 workers at 100 rows/s: 36 s; GPU-h = (7 x 600 + 2 x 36) / 3600."""
    stages = [stage("captions", 1, 100.0), stage("renderers", 4, 1.0), stage("training workers", 2, 50.0)]
    costs = stream_costs(stages, rows=3600, train_row_uses=3600)
    assert costs.stream_h == pytest.approx(0.25) and costs.stream_gpu_h == pytest.approx(1.75)
    assert costs.stored_h == pytest.approx((600 + 36) / 3600)
    assert costs.stored_gpu_h == pytest.approx((7 * 600 + 2 * 36) / 3600)
    assert costs.stored_is_cheaper
    # a stream whose training keeps pace (replayed rows) and whose generation is balanced is not beaten
    balanced = [stage("captions", 1, 6.0), stage("renderers", 6, 1.0), stage("training workers", 1, 6.0)]
    even = stream_costs(balanced, rows=3600, train_row_uses=3600)
    assert not even.stored_is_cheaper


GPU_BUILTINS = {"gpu": True, "synclr-vitb16": True, "stablerep-vitb16": False, "laclip-vitb16": False}


@pytest.mark.parametrize("name, stream", GPU_BUILTINS.items())
def test_synray_plan_shows_rates_the_bottleneck_and_a_split_for_every_gpu_builtin(name: str, stream: bool):
    from synray.plan import load_run_config
    from synray.programs.planview import plan_view

    lines = plan_view(load_run_config(name), None, None).lines
    rates = lines[lines.index(next(x for x in lines if x.startswith("rates ("))):]
    assert sum("<- bottleneck" in x for x in rates) == 1
    assert any(x.strip().startswith("training workers:") and "idle" in x or "bottleneck" in x for x in rates)
    assert not any("no rate declared" in x for x in rates)
    if stream:   # generation and training share the GPUs: a split, and the GPU-hours of streaming vs stored
        assert any(x.strip().startswith("balanced split of these") for x in rates)
        assert any(x.strip().startswith("GPU-hours: stream") for x in rates)


def test_configured_rates_replace_the_reference_and_name_their_key():
    from synray.plan import load_run_config, run_plan_stages

    stages = run_plan_stages(load_run_config("gpu", ["rates.images=0.25", "rates.train=100"]), ())
    rates = {s.stage: s.rate for s in stages if s.rate is not None and s.phase == "training"}
    assert rates["diffusers renderers"] == Rate(0.25, "config: rates.images")
    assert rates["training workers"] == Rate(100.0, "config: rates.train")
    assert rates["vLLM engines"].source.startswith("reference:")
