"""The allocation fit (error(N, m) = a N^-k m^-g + c) on synthetic sweeps drawn from known laws, its best split of a
budget against the closed-form optimum, and the report it writes from a sweep folder (no Ray: the trials' records
are written as a sweep writes them)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize

from procs import docs_text
from synray.sweep.allocation import UnitCostRates, captions_within, fit_allocation, splits_for_budget
from synray.sweep.fit import ScalingFitError

N_GRID = (150, 300, 600, 1200)
M_GRID = (2, 4, 8)


def draw(rng, a, k, g, c, noise, trials=1):
    """One synthetic sweep: every (N, m) of the grid `trials` times, error = law x exp(noise draw)."""
    n, m = (np.repeat(v.ravel(), trials) for v in np.meshgrid(N_GRID, M_GRID))
    law = a * n ** -k * m ** -g + c
    return n, m, law * np.exp(rng.normal(0.0, noise, n.shape)), law


CASES = {"k0.35-g0.20-c0.20-2%": (10.0, 0.35, 0.20, 0.20, 0.02, 1),
         "k0.50-g0.40-c0.00-1%": (3.0, 0.50, 0.40, 0.0, 0.01, 1),
         "k0.30-g0.10-c0.30-3%x2": (5.0, 0.30, 0.10, 0.30, 0.03, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_the_fit_recovers_known_exponents_and_its_95_intervals_cover_them_85_to_99_percent(case):
    a, k, g, c, noise, trials = CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    ks, gs, cover = [], [], {"k": 0, "g": 0, "c": 0}
    sets = 200
    for _ in range(sets):
        n, m, err, _ = draw(rng, a, k, g, c, noise, trials)
        fit = fit_allocation(n, m, err)
        ks.append(fit.k)
        gs.append(fit.g)
        for name, truth in (("k", k), ("g", g), ("c", c)):
            lo, hi = fit.intervals[name]
            cover[name] += lo - 1e-9 <= truth <= hi + 1e-9
    assert abs(np.median(ks) - k) <= 0.1 * k, (np.median(ks), k)
    assert abs(np.median(gs) - g) <= 0.1 * g, (np.median(gs), g)
    for name, hits in cover.items():
        assert 0.85 <= hits / sets <= 0.99, (name, hits / sets)


def test_the_fit_equals_scipy_curve_fit_of_the_same_law_on_log_error():
    rng = np.random.default_rng(3)
    n, m, err, _ = draw(rng, 10.0, 0.35, 0.2, 0.2, 0.02)

    def log_law(x, log_a, k, g, c):
        return np.log(np.exp(log_a) * x[0] ** -k * x[1] ** -g + c)

    ours = fit_allocation(n, m, err)
    ref, _ = optimize.curve_fit(log_law, np.vstack([n, m]), np.log(err), p0=(math.log(ours.a), 0.3, 0.3, 0.1),
                                bounds=([-np.inf, 0, 0, 0], [np.inf, 5, 5, err.min()]), maxfev=20000)
    rss = lambda p: float(np.sum((log_law(np.vstack([n, m]), *p) - np.log(err)) ** 2))  # noqa: E731
    assert rss((math.log(ours.a), ours.k, ours.g, ours.c)) <= rss(ref) * (1 + 1e-6)
    assert ours.k == pytest.approx(ref[1], abs=2e-3) and ours.g == pytest.approx(ref[2], abs=2e-3)


def test_an_exact_law_is_recovered_exactly():
    n, m = (v.ravel() for v in np.meshgrid(N_GRID, M_GRID))
    fit = fit_allocation(n, m, 4.0 * n ** -0.4 * m ** -0.25 + 0.1)
    assert (fit.a, fit.k, fit.g, fit.c) == pytest.approx((4.0, 0.4, 0.25, 0.1), rel=1e-5)
    assert fit.beta == pytest.approx(0.25 / 0.4)


def test_too_few_caption_counts_or_images_per_caption_are_refused_with_the_counts():
    with pytest.raises(ScalingFitError, match="3 caption counts and 2 images-per-caption values, got 2 and 3"):
        fit_allocation([100, 200, 100, 200, 100, 200], [1, 2, 3, 1, 2, 3], [0.5] * 6)
    with pytest.raises(ScalingFitError, match="got 3 and 1"):
        fit_allocation([100, 200, 400], [2, 2, 2], [0.5] * 3)


def test_captions_within_is_the_largest_n_whose_cost_fits_as_a_scan_finds():
    for budget in (0.5, 1.0, 7.3, 1234.5, 99999.0):
        cost = lambda n: 0.7 * n + 3 * math.ceil(n / 16)  # noqa: E731  (steps every 16 captions)
        scan = max((n for n in range(0, 200000) if n == 0 or cost(n) <= budget), default=0)
        assert captions_within(budget, cost) == scan, budget


def test_the_best_split_of_an_epoch_budget_is_the_closed_form_optimum():
    """With an epoch budget a split's cost is N (t_c + m T) (T: rendering and training per image) and the law depends
    on N m^beta (beta = g / k), so at a budget B the error is least where m^beta / (t_c + m T) is largest: over real m
    at m* = beta t_c / ((1 - beta) T)."""
    k, g = 0.4, 0.24                                      # beta = 0.6
    n, m = (v.ravel() for v in np.meshgrid(N_GRID, M_GRID))
    fit = fit_allocation(n, m, 3.0 * n ** -k * m ** -g + 0.05)
    caption_s, image_s, view_s, epochs, views_per_image = 2.0, 0.1, 0.05, 4, 1
    rates = UnitCostRates(caption_s, image_s, view_s, "declared", "GPU")
    per_caption = list(range(1, 41))
    steps_of = lambda n: epochs * n  # noqa: E731   (one caption a step)
    views = {mm: mm * views_per_image for mm in per_caption}
    splits = splits_for_budget(fit, rates, 1e6, per_caption, steps_of, views, (150, 1200))
    big_t = image_s + epochs * views_per_image * view_s
    beta = g / k
    m_star = beta * caption_s / ((1 - beta) * big_t)      # 10
    best_discrete = max(per_caption, key=lambda mm: mm ** beta / (caption_s + mm * big_t))
    assert splits[0].per_caption == best_discrete
    assert abs(splits[0].per_caption - m_star) <= 1
    assert splits[0].cost["total"] <= 1e6 and not splits[0].inside   # N in the thousands: past the swept 1200
    assert [s.predicted for s in splits] == sorted(s.predicted for s in splits)


def test_prediction_and_contrast_intervals_cover_a_new_trial_and_the_true_ratio_85_to_99_percent():
    """The 95% prediction interval at a split holds a new trial's error there, and the interval on the ratio of two
    splits' errors holds the true law's ratio, each in 85-99% of synthetic sweeps."""
    rng = np.random.default_rng(11)
    a, k, g, c, noise = 10.0, 0.35, 0.2, 0.2, 0.02
    law = lambda n, m: a * n ** -k * m ** -g + c  # noqa: E731
    hits, ratio_hits, sets = 0, 0, 150
    for _ in range(sets):
        n, m, err, _ = draw(rng, a, k, g, c, noise)
        fit = fit_allocation(n, m, err)
        _, low, high = fit.predict(800, 6)
        hits += low <= law(800, 6) * math.exp(rng.normal(0, noise)) <= high
        _, r_low, r_high = fit.contrast((800, 6), (300, 2))
        ratio_hits += r_low <= law(300, 2) / law(800, 6) <= r_high
    assert 0.85 <= hits / sets <= 0.99, hits / sets
    assert 0.85 <= ratio_hits / sets <= 0.99, ratio_hits / sets


def _write_sweep(root: Path, law, rng, budgets: str = "") -> None:
    """A sweep folder as `synray sweep` leaves it: its config, one pool's stage summary and each trial's record,
    with errors drawn from `law` (kNN accuracy = 1 - error)."""
    from synray.plan import load_run_config

    cfg = load_run_config("allocation-local", [budgets] if budgets else [])
    (root / "pools" / "p0").mkdir(parents=True)
    (root / "config.yaml").write_text(cfg.to_yaml())
    (root / "pools" / "p0" / "_summary.json").write_text(json.dumps({
        "rows_total": 1500, "rows_written": 1200, "images_per_row": 8,   # 300 rows from an earlier invocation
        "stages": {"captions": {"rows": 1210, "busy_s": 6.0}, "images": {"rows": 1200, "busy_s": 19.2}}}))
    for i, (n, m) in enumerate((n, m) for n in N_GRID for m in M_GRID):
        steps = math.ceil(4 * n / 16)
        record = {"trial_id": f"t{i:02d}", "params": {"data.num_captions": n, "images.per_caption": m},
                  "captions": n, "images_per_caption": m, "workers": 1, "views_per_step": 16 * m, "steps": steps,
                  "work": {"captions": n, "images": n * m, "views": steps * 16 * m},
                  "train": {"images_per_s": 250.0, "final_loss": 1.0},
                  "trained": {"knn_accuracy": 1 - law(n, m) * math.exp(rng.normal(0, 0.01))}, "init": {}}
        (root / "trials" / record["trial_id"]).mkdir(parents=True)
        (root / "trials" / record["trial_id"] / "trial.json").write_text(json.dumps(record))


def test_the_report_measures_unit_costs_and_splits_each_budget_as_the_law_says(tmp_path):
    from synray.sweep.report import write_report

    _write_sweep(tmp_path, lambda n, m: 2.0 * n ** -0.3 * m ** -0.15 + 0.4, np.random.default_rng(5),
                 "tune.budgets=[100, 400]")
    report = write_report(tmp_path)
    rates = report.allocation["unit_costs"]
    # 6 s over 1,200 captions, 19.2 s over 1,200 x 8 images, 1 worker at 250 views/s
    assert (rates["caption_s"], rates["image_s"], rates["view_s"]) == pytest.approx((0.005, 0.002, 0.004))
    (group,) = report.allocation["groups"].values()
    points = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("trials/*/trial.json"))]
    direct = fit_allocation([t["captions"] for t in points], [t["images_per_caption"] for t in points],
                            [1 - t["trained"]["knn_accuracy"] for t in points])
    assert (group["fit"]["k"], group["fit"]["g"]) == pytest.approx((direct.k, direct.g))
    for budget in ("100", "400"):
        splits = group["budgets"][budget]
        assert [s["per_caption"] for s in splits] != [] and len(splits) == 3
        for s in splits:   # each split spends the budget: one more caption would not fit
            n, m = s["captions"], s["per_caption"]
            cost = lambda n, m=m: 0.005 * n + 0.002 * n * m + 0.004 * math.ceil(4 * n / 16) * 16 * m  # noqa: E731
            assert cost(n) <= float(budget) < cost(n + 1)
    md = (tmp_path / "report" / "allocation.md").read_text()
    assert md.splitlines() == report.allocation_lines
    assert "100 CPU-s: best N = " in md and (tmp_path / "report" / "allocation-all-trials.png").is_file()


def test_declared_unit_costs_replace_the_measured_ones_and_say_so(tmp_path):
    from synray.sweep.report import write_report

    _write_sweep(tmp_path, lambda n, m: 2.0 * n ** -0.3 * m ** -0.15 + 0.4, np.random.default_rng(6),
                 "tune.costs={caption_s: 0.2, image_s: 0.15, view_s: 0.0006, device: H100}")
    report = write_report(tmp_path)
    rates = report.allocation["unit_costs"]
    assert (rates["caption_s"], rates["image_s"], rates["view_s"]) == (0.2, 0.15, 0.0006)
    assert "declared in tune.costs (H100; not measured by this sweep)" in report.allocation_lines[0]
    assert "H100-s: best N = " in "\n".join(report.allocation_lines)


REPORT = Path(__file__).resolve().parent.parent / "tuning" / "reports" / "allocation-local"


@pytest.mark.parametrize("name", ["allocation", "allocation-linear"])
def test_the_stored_allocation_reports_and_the_readme_are_what_the_code_makes_of_their_trials(name):
    """allocation-local's reports (kNN and linear-probe error) refitted from their trials by the current code give
    their allocation.md line for line; the README quotes those lines."""
    from synray.plan import load_run_config
    from synray.sweep.budget import describe_allocation, plan_group

    saved = json.loads((REPORT / f"{name}.json").read_text())
    u = saved["unit_costs"]
    rates = UnitCostRates(u["caption_s"], u["image_s"], u["view_s"], u["source"], u["device"])
    (group_name, group), = saved["groups"].items()
    trials = [({"trial_id": t["trial"], "captions": t["captions"], "images_per_caption": t["images_per_caption"],
                "steps": t["steps"], "views_per_step": t["views_per_step"],
                "work": {"captions": t["captions"], "images": t["captions"] * t["images_per_caption"],
                         "views": t["steps"] * t["views_per_step"]}}, t["error"]) for t in group["trials"]]
    fit, _, plans = plan_group(load_run_config("allocation-local"), trials, rates)
    lines = (REPORT / f"{name}.md").read_text().splitlines()
    assert describe_allocation(group_name, fit, plans, rates.device) == lines[1:]
    readme = docs_text()
    quoted = [lines[1], *lines[5:8]]   # the law, and the median budget: its best split and the two others
    assert all(line.strip() in readme for line in quoted), "README's allocation excerpt is stale"
