"""The scaling-law fit against laws it was not tuned to: data sets drawn from error = (a * N^-k + c) * (1 + e),
e ~ N(0, noise^2), at 3-6 data scales with and without replicate trials, relative noise 0.5-5%, with and without a
floor c. Each test draws its own data sets; the estimator is also compared with scipy's `curve_fit` written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize

from procs import docs_text
from synray.sweep.fit import WITH_C, WITHOUT_C, ScalingFitError, extrapolation_check, fit_law, fit_scaling

#: (data scales, trials per scale, relative noise, a, k, c); the scales run from 12.5k to 400k as in a sweep over
#: 5 doublings. In each the power term falls by more than the noise across the scales (where it does not, no fit
#: can see k). The issue's case (5 x 3, 2%, c = 0.2) has its own test below.
CELLS = [
    (3, 1, 0.02, 10.0, 0.35, 0.0),
    (3, 3, 0.02, 10.0, 0.35, 0.2),
    (4, 1, 0.02, 10.0, 0.35, 0.2),
    (4, 2, 0.05, 10.0, 0.35, 0.0),
    (5, 1, 0.02, 10.0, 0.35, 0.2),
    (5, 3, 0.05, 10.0, 0.35, 0.2),
    (5, 2, 0.01, 1.0, 0.10, 0.0),
    (6, 1, 0.005, 3.0, 0.20, 0.1),
    (6, 2, 0.05, 10.0, 0.35, 0.2),
]
SETS = 200


def draw(rng: np.random.Generator, scales: int, reps: int, noise: float, a: float, k: float, c: float,
         lo: float = 12.5e3, hi: float = 400e3) -> tuple[np.ndarray, np.ndarray]:
    n = np.repeat(np.geomspace(lo, hi, scales), reps)
    return n, (a * n ** -k + c) * (1 + rng.normal(0.0, noise, n.size))


@pytest.mark.slow   # ~1 min: 1,800 fits with profile intervals
@pytest.mark.parametrize("cell", CELLS, ids=lambda c: "{}x{}-noise{}-a{}-k{}-c{}".format(*c))
def test_the_fit_recovers_known_laws_and_its_95_intervals_cover_them_85_to_99_percent(cell):
    scales, reps, noise, a, k, c = cell
    rng = np.random.default_rng(hash(cell) % 2**32)
    ks, covered_k, covered_c = [], 0, 0
    for _ in range(SETS):
        fit = fit_scaling(*draw(rng, *cell))
        ks.append(fit.law.k)
        covered_k += fit.k_low <= k <= fit.k_high
        covered_c += fit.c_low <= c <= fit.c_high
    assert abs(np.median(ks) / k - 1) <= 0.10, np.median(ks)
    assert 0.85 <= covered_k / SETS <= 0.99, covered_k / SETS
    if scales * reps >= 4:   # c is fitted
        assert 0.85 <= covered_c / SETS <= 0.99, covered_c / SETS


def test_a_floor_under_2_percent_noise_with_3_trials_per_scale_gives_the_true_exponent():
    """The case where fitting c by a line through log(error - c) returned half the exponent and c = 0."""
    rng = np.random.default_rng(23)
    fits = [fit_scaling(*draw(rng, 5, 3, 0.02, 10.0, 0.35, 0.2)) for _ in range(60)]
    assert abs(np.median([f.law.k for f in fits]) / 0.35 - 1) <= 0.10
    assert abs(np.median([f.law.c for f in fits]) / 0.2 - 1) <= 0.10
    assert all(f.form == WITH_C for f in fits)
    assert sum(f.k_low <= 0.35 <= f.k_high for f in fits) >= 0.85 * len(fits)


def test_an_exact_law_is_recovered_exactly_with_and_without_its_floor():
    n = np.geomspace(1e3, 6.4e4, 5)
    with_floor = fit_law(n, 2.0 * n ** -0.3 + 0.05, offset=True).law
    assert (with_floor.a, with_floor.k, with_floor.c) == pytest.approx((2.0, 0.3, 0.05), rel=1e-5)
    plain = fit_law(n, 3.0 * n ** -0.5, offset=False).law
    assert (plain.a, plain.k, plain.c) == pytest.approx((3.0, 0.5, 0.0), rel=1e-6)


def test_the_fit_reaches_the_least_squares_optimum_that_curve_fit_finds():
    """scipy's curve_fit of log(a N^-k + c) on log error, from a grid of starts, finds no lower residual."""
    def log_law(n, log_a, k, c):
        return np.log(np.exp(log_a) * n ** -k + c)

    rng = np.random.default_rng(7)
    for _ in range(20):
        n, err = draw(rng, 5, 2, 0.03, 10.0, 0.35, 0.2)
        ours = fit_law(n, err, offset=True)
        best = math.inf
        for k0 in (0.1, 0.3, 0.6, 1.0):
            for c0 in (0.0, 0.5 * err.min(), 0.9 * err.min()):
                a0 = math.log(max(err.max() - c0, 1e-3)) + k0 * math.log(n.min())
                try:
                    p, _ = optimize.curve_fit(log_law, n, np.log(err), p0=(a0, k0, c0), maxfev=20000,
                                              bounds=([-np.inf, 0, 0], [np.inf, 5, err.min()]))
                except RuntimeError:
                    continue
                best = min(best, float(np.sum((log_law(n, *p) - np.log(err)) ** 2)))
        assert ours.rss <= best * (1 + 1e-6) + 1e-12, (ours.rss, best)


def test_aicc_of_each_law_is_the_textbook_formula():
    rng = np.random.default_rng(3)
    n, err = draw(rng, 5, 2, 0.02, 10.0, 0.35, 0.2)
    fit = fit_scaling(n, err)
    for form, p in ((WITHOUT_C, 2), (WITH_C, 3)):
        f = fit_law(n, err, offset=form == WITH_C)
        m = len(n)
        expected = m * math.log(f.rss / m) + 2 * p + 2 * p * (p + 1) / (m - p - 1)
        assert fit.aicc[form] == pytest.approx(expected, rel=1e-9)


def test_the_extrapolation_check_holds_on_the_law_and_fails_where_the_largest_scale_leaves_it():
    """Fitted without the largest scale: the measured error there lies in the 95% prediction interval in 85-99% of
    data sets drawn from the law, and outside it in nearly all where the last two doublings of data gained nothing
    (a plateau the law does not have: the largest scale measures what the third largest did). A plateau after one
    doubling (a 9% drop missing under 2% noise) is flagged in about 80%: the check's power, not a guarantee."""
    rng = np.random.default_rng(11)
    holds, breaks = 0, 0
    for _ in range(SETS):
        n, err = draw(rng, 5, 2, 0.02, 10.0, 0.35, 0.2)
        holds += extrapolation_check(n, err).holds
        flat = err.copy()
        flat[n == n.max()] = err[n == np.unique(n)[-3]]
        breaks += not extrapolation_check(n, flat).holds
    assert 0.85 <= holds / SETS <= 0.99, holds / SETS
    assert breaks / SETS >= 0.95, breaks / SETS


def test_every_fit_from_4_scales_carries_its_extrapolation_check_and_3_scales_say_why_not():
    rng = np.random.default_rng(5)
    four = fit_scaling(*draw(rng, 4, 2, 0.02, 10.0, 0.35, 0.2)).to_dict()
    assert four["extrapolation"]["held_out"] == 400e3 and "extrapolates" in four["extrapolation"]["summary"]
    three = fit_scaling(*draw(rng, 3, 1, 0.02, 10.0, 0.35, 0.0)).to_dict()
    assert three["extrapolation"] is None and any("4 data scales" in note for note in three["notes"])
    assert three["form"] == WITHOUT_C and "c is not fitted" in three["chosen"]


def test_fewer_than_three_scales_or_bad_points_are_refused():
    with pytest.raises(ScalingFitError, match="at least 3"):
        fit_scaling([100, 400, 100], [0.5, 0.4, 0.5])
    with pytest.raises(ScalingFitError, match="finite"):
        fit_scaling([100, 400, 1600], [0.5, float("nan"), 0.3])


def test_the_readme_quotes_the_fit_of_the_scaling_local_trials():
    """The README's figures for `scaling-local` are this fit of the trials in its results.csv (kNN error)."""
    import csv
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    groups: dict[str, tuple[list, list]] = {}
    with open(root / "tuning" / "reports" / "scaling-local" / "results.csv") as f:
        for row in csv.DictReader(f):
            n, e = groups.setdefault(row["variant"], ([], []))
            n.append(float(row["captions"]) * float(row["images_per_caption"]))
            e.append(1 - float(row["knn_accuracy"]))
    simclr, multi = fit_scaling(*groups["SimCLR m=1"]), fit_scaling(*groups["multi-positive m=4"])
    readme_text = docs_text()
    readme = " ".join(readme_text.split())
    assert (f"SimCLR k = {simclr.law.k:.3f} (95% interval {simclr.k_low:.3f}-{simclr.k_high:.3f}), multi-positive "
            f"k = {multi.law.k:.3f} ({multi.k_low:.3f}-{multi.k_high:.3f})") in readme
    # the report's fits.md is what this fit says of those trials, and the README quotes its lines
    from synray.sweep.report import describe_fit

    lines = describe_fit("SimCLR m=1", simclr.to_dict()) + describe_fit("multi-positive m=4", multi.to_dict())
    report = (root / "tuning" / "reports" / "scaling-local" / "fits.md").read_text().splitlines()
    assert report[:len(lines)] == lines and report[len(lines)].startswith("selection on val_knn_accuracy")
    assert lines[0] in readme_text.splitlines() and lines[3] in readme_text.splitlines()
