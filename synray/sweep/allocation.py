"""Cost-aware allocation from a sweep over captions N and images per caption m: the law error(N, m) =
a * N^-k * m^-g + c fitted to its trials, each trial's cost in device-seconds, and the split of a budget that the law
predicts is best, with its interval.

Law: a power law in each of N and m over a common floor c, so that N * m^(g/k) is the effective data scale (m images
of one caption are worth m^(g/k) captions of one image). Noise model, solver and intervals are the scaling fits'
(`synray.sweep.fit`): relative noise, least squares on log error, k, g in [0, K_MAX], c in [0, min error),
profile-t intervals.

Cost of a split (N, m): N captions generated, N * m images rendered, and steps(N) * views_per_step(m) views trained
on, with steps(N) the sweep's budget rule (`tune.budget`: fixed steps, or epochs over the N captions), each at its
device-seconds per unit (measured by the sweep's pools and trials, or declared in `tune.costs`).

The best split of a budget B: for each swept m, the most captions whose cost stays within B, the law's prediction
there with its CONFIDENCE prediction interval for one trial (delta method: s^2 (g^T (J^T J)^-1 g + 1), Student's t),
and the split of lowest predicted error. A split whose N lies outside the swept captions is flagged: the law is
extrapolated there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from synray.sweep.fit import CONFIDENCE, MIN_ERROR, LawFit, ScalingFitError, _law, _Problem, profile, solve_law

__all__ = ["ALLOCATION_FORM", "MIN_CAPTION_SCALES", "MIN_PER_CAPTION", "UnitCostRates", "AllocationFit", "Split",
           "fit_allocation", "splits_for_budget", "captions_within"]

ALLOCATION_FORM = "a * N^(-k) * m^(-g) + c"
#: distinct caption counts and images-per-caption values an allocation fit needs
MIN_CAPTION_SCALES, MIN_PER_CAPTION = 3, 2
#: theta = (log A, k, g, c)
K, G, C = 1, 2, 3


@dataclass(frozen=True)
class UnitCostRates:
    """Device-seconds per caption generated, per image rendered and per view trained on, and where they come from."""

    caption_s: float
    image_s: float
    view_s: float
    source: str                      # "measured: ..." or "declared in tune.costs"
    device: str                      # what a device-second is of

    def of(self, captions: float, images: float, views: float) -> dict[str, float]:
        """Device-seconds of each part of a trial's work, and their total."""
        parts = {"captions": captions * self.caption_s, "images": images * self.image_s,
                 "training": views * self.view_s}
        return {**parts, "total": sum(parts.values())}


@dataclass
class AllocationFit:
    """The law fitted through (N, m, error) points, its intervals, and what its predictions need."""

    a: float
    k: float
    g: float
    c: float
    intervals: dict[str, tuple[float, float]]    # k, g, c -> CONFIDENCE profile-t interval
    fit: LawFit
    x_ref: np.ndarray                            # the geometric means of N and m the law is centred at
    points: int
    rmse_log: float

    @property
    def beta(self) -> float:
        """m's exponent in the effective data scale N * m^beta (g / k; NaN where k = 0)."""
        return self.g / self.k if self.k > 0 else math.nan

    def __call__(self, n: Any, m: Any) -> np.ndarray:
        return self.a * np.power(np.asarray(n, dtype=float), -self.k) * np.power(np.asarray(m, dtype=float),
                                                                                 -self.g) + self.c

    def predict(self, n: float, m: float) -> tuple[float, float, float]:
        """The law at (n, m) and the CONFIDENCE prediction interval of one trial's error there."""
        return self.fit.prediction(np.log(np.array([n, m], dtype=float) / self.x_ref))

    def contrast(self, first: tuple[float, float], second: tuple[float, float]) -> tuple[float, float, float]:
        """The law's error at `second` over its error at `first` (N, m each), with its CONFIDENCE interval (delta
        method on the difference of log errors, which shares the fit's uncertainty: s^2 d^T (J^T J)^-1 d, d the
        difference of the two gradients)."""
        lx = np.log(np.array([first, second], dtype=float) / self.x_ref)
        value, grads = _law(self.fit.theta, lx)
        free = self.fit.free
        d = grads[1, free] - grads[0, free]
        half = self.fit.t * math.sqrt(max(float(d @ self.fit.cov[np.ix_(free, free)] @ d), 0.0))
        ratio = float(value[1] / value[0])
        return ratio, ratio * math.exp(-half), ratio * math.exp(half)

    def summary(self) -> str:
        pct = f"{100 * CONFIDENCE:.0f}%"
        (kl, kh), (gl, gh), (cl, ch) = self.intervals["k"], self.intervals["g"], self.intervals["c"]
        beta = f"{self.beta:.2f}" if math.isfinite(self.beta) else "undefined (k = 0)"
        return (f"error = {self.a:.4g} * N^-{self.k:.3f} * m^-{self.g:.3f} + {self.c:.4f} ({self.points} trials); "
                f"{pct} intervals: k in [{kl:.3f}, {kh:.3f}], g in [{gl:.3f}, {gh:.3f}], c in [{cl:.4f}, {ch:.4f}]; "
                f"effective scale N * m^{beta}")

    def to_dict(self) -> dict[str, Any]:
        return {"form": ALLOCATION_FORM, "a": self.a, "k": self.k, "g": self.g, "c": self.c,
                "beta": self.beta if math.isfinite(self.beta) else None, "points": self.points,
                "confidence": CONFIDENCE, "intervals": {k: list(v) for k, v in self.intervals.items()},
                "rmse_log": self.rmse_log, "dof": self.fit.dof, "summary": self.summary()}


def fit_allocation(n: Any, m: Any, err: Any) -> AllocationFit:
    """The fit of error(N, m) = a * N^-k * m^-g + c through the points, with profile-t intervals on k, g and c."""
    n, m, err = (np.asarray(v, dtype=float) for v in (n, m, err))
    if not (n.shape == m.shape == err.shape and n.ndim == 1):
        raise ScalingFitError("allocation points need one caption count, images per caption and error each")
    if not (np.all(np.isfinite(err)) and np.all(n > 0) and np.all(m > 0)):
        raise ScalingFitError("allocation points need positive scales and finite errors")
    if len(np.unique(n)) < MIN_CAPTION_SCALES or len(np.unique(m)) < MIN_PER_CAPTION:
        raise ScalingFitError(f"an allocation fit needs {MIN_CAPTION_SCALES} caption counts and {MIN_PER_CAPTION} "
                              f"images-per-caption values, got {len(np.unique(n))} and {len(np.unique(m))}")
    err = np.maximum(err, MIN_ERROR)
    if len(err) < 5:
        raise ScalingFitError(f"an allocation fit has 4 parameters and needs 5 trials or more, got {len(err)}")
    prob = _Problem(np.column_stack([n, m]), err)
    theta, rss, cov = solve_law(prob, offset=True)
    fit = LawFit(None, ALLOCATION_FORM, rss, len(err), 4, theta, cov, prob.n_ref)
    intervals = {name: profile(prob, fit, index) for name, index in (("k", K), ("g", G), ("c", C))}
    a = float(math.exp(theta[0]) * prob.x_ref[0] ** theta[K] * prob.x_ref[1] ** theta[G])
    return AllocationFit(a, float(theta[K]), float(theta[G]), float(theta[C]), intervals, fit, prob.x_ref,
                         len(err), fit.rmse_log)


@dataclass
class Split:
    """One way to spend a budget: N captions, m images each, the steps the budget rule gives N, its cost and the
    law's prediction with its interval."""

    captions: int
    per_caption: int
    steps: int
    cost: dict[str, float]
    predicted: float
    low: float
    high: float
    inside: bool                     # N within the swept caption counts (else the law is extrapolated)
    vs_best: tuple[float, float, float] | None = None   # its error over the best split's, with its interval

    @property
    def worse_than_best(self) -> bool | None:
        """Whether the law says this split's error is above the best's (its interval of the ratio above 1)."""
        return None if self.vs_best is None else self.vs_best[1] > 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "worse_than_best": self.worse_than_best}

    def sentence(self) -> str:
        where = "" if self.inside else " (N outside the swept range: extrapolated)"
        text = (f"N = {self.captions} captions x m = {self.per_caption} images, {self.steps} steps: predicted "
                f"{self.predicted:.4f} [{self.low:.4f}, {self.high:.4f}]{where}")
        if self.vs_best is not None:
            ratio, low, high = self.vs_best
            verdict = "worse than the best" if self.worse_than_best else "not told apart from the best"
            text += f"; {ratio:.3f}x the best's error [{low:.3f}, {high:.3f}]: {verdict}"
        return text


def captions_within(budget: float, cost_of: Callable[[int], float], most: int = 10 ** 9) -> int:
    """The most captions N (up to `most`) whose cost stays within the budget; 0 where even one caption does not fit.
    `cost_of` must not decrease with N."""
    if cost_of(1) > budget:
        return 0
    lo, hi = 1, 2
    while hi < most and cost_of(hi) <= budget:
        lo, hi = hi, min(2 * hi, most)
    if cost_of(hi) <= budget:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost_of(mid) <= budget else (lo, mid)
    return lo


def splits_for_budget(fit: AllocationFit, rates: UnitCostRates, budget: float, per_caption: list[int],
                      steps_of: Callable[[int], int], views_per_step: dict[int, float],
                      swept: tuple[float, float]) -> list[Split]:
    """For each swept m, the split with the most captions the budget pays for; the list ordered by predicted error
    (the first is the best), each after the first with its error over the best's (`AllocationFit.contrast`)."""
    out = []
    for m in sorted(per_caption):
        def cost_of(n: int, m: int = m) -> float:
            return rates.of(n, n * m, steps_of(n) * views_per_step[m])["total"]

        n = captions_within(budget, cost_of)
        if n == 0:
            continue
        predicted, low, high = fit.predict(n, m)
        steps = steps_of(n)
        out.append(Split(n, m, steps, rates.of(n, n * m, steps * views_per_step[m]), predicted, low, high,
                         swept[0] <= n <= swept[1]))
    out.sort(key=lambda s: s.predicted)
    for s in out[1:]:
        s.vs_best = fit.contrast((out[0].captions, out[0].per_caption), (s.captions, s.per_caption))
    return out
