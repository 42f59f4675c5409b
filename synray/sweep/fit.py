"""Scaling-law fits: error(N) = a * N^(-k) (+ c) through a sweep's points, with a bootstrap interval on k.

With 4 or more data scales the offset c (the error no amount of this data removes) is fitted too, by
profiling it over [0, min error) and regressing log(error - c) on log N; with 3 scales c is 0 and the fit is
the log-log line. The interval on k resamples the trials within each scale when every scale has replicates,
and otherwise the fit's residuals (in log space), so it reflects how well the points lie on the curve.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["MIN_SCALES", "PowerLaw", "ScalingFitError", "fit_power_law", "bootstrap_exponent", "fit_scaling"]

#: data scales a fit needs
MIN_SCALES = 3
#: scales from which the offset c is fitted as well
OFFSET_MIN_SCALES = 4
#: errors are clipped to this before taking logs (a probe at 100% accuracy)
MIN_ERROR = 1e-4
OFFSET_GRID = 200
BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95


class ScalingFitError(ValueError):
    """Too few data scales (or unusable points) for a power-law fit."""


@dataclass(frozen=True)
class PowerLaw:
    """error(N) = a * N^(-k) + c."""

    a: float
    k: float
    c: float
    rmse_log: float                  # root-mean-square residual of log(error)

    def __call__(self, n: np.ndarray | float) -> np.ndarray:
        return self.a * np.power(np.asarray(n, dtype=float), -self.k) + self.c


@dataclass
class ScalingFit:
    """One group's fit, its interval on k and the points behind it (what the report's JSON holds)."""

    law: PowerLaw
    form: str
    k_low: float
    k_high: float
    interval: str                    # how the interval was drawn
    scales: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["law"] = asdict(self.law)
        out["confidence"] = CONFIDENCE
        out["points"] = len(self.scales)
        out["residual_dof"] = len(self.scales) - (3 if self.law.c > 0 or "+ c" in self.form else 2)
        return out


def _lines(x: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares ys[j] = b0[j] + b1[j] x for every row j of ys -> (b0, b1, rmse), in closed form."""
    xc = x - x.mean()
    b1 = (ys - ys.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
    b0 = ys.mean(axis=1) - b1 * x.mean()
    rmse = np.sqrt(np.mean((b0[:, None] + b1[:, None] * x[None, :] - ys) ** 2, axis=1))
    return b0, b1, rmse


def fit_power_law(n: np.ndarray, err: np.ndarray, offset: bool | None = None) -> PowerLaw:
    """Fit error(N) = a * N^(-k) + c; `offset` None: fit c only with OFFSET_MIN_SCALES scales or more."""
    n, err = np.asarray(n, dtype=float), np.maximum(np.asarray(err, dtype=float), MIN_ERROR)
    if len(np.unique(n)) < MIN_SCALES:
        raise ScalingFitError(f"a power-law fit needs at least {MIN_SCALES} data scales, got {len(np.unique(n))}")
    if offset is None:
        offset = len(np.unique(n)) >= OFFSET_MIN_SCALES
    x = np.log(n)
    offsets = np.linspace(0.0, err.min() * (1 - 1e-3), OFFSET_GRID) if offset else np.zeros(1)
    b0, b1, rmse = _lines(x, np.log(err[None, :] - offsets[:, None]))  # one least-squares line per offset
    i = int(np.argmin(rmse))
    return PowerLaw(a=float(np.exp(b0[i])), k=float(-b1[i]), c=float(offsets[i]), rmse_log=float(rmse[i]))


def bootstrap_exponent(n: np.ndarray, err: np.ndarray, law: PowerLaw, offset: bool, seed: int = 0,
                       samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float, str]:
    """(low, high, method) of a CONFIDENCE interval on k."""
    n, err = np.asarray(n, dtype=float), np.maximum(np.asarray(err, dtype=float), MIN_ERROR)
    rng = np.random.default_rng(seed)
    scales = np.unique(n)
    groups = [np.flatnonzero(n == s) for s in scales]
    replicated = all(len(g) >= 2 for g in groups)
    fitted = np.log(np.maximum(law(n), MIN_ERROR))
    residuals = np.log(err) - fitted
    ks = []
    for _ in range(samples):
        if replicated:
            idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
            bn, be = n[idx], err[idx]
        else:
            bn, be = n, np.exp(fitted + rng.choice(residuals, size=len(n), replace=True))
        ks.append(fit_power_law(bn, be, offset).k)
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(ks, [tail, 1 - tail])
    method = "trials resampled within each scale" if replicated else "residuals resampled (log space)"
    return float(low), float(high), f"{method}, {samples} samples"


def fit_scaling(n: list[float], err: list[float], seed: int = 0) -> ScalingFit:
    """The fit of one group of trials (data scale -> error) with its interval on k."""
    n_arr, e_arr = np.asarray(n, dtype=float), np.asarray(err, dtype=float)
    if not np.all(np.isfinite(e_arr)) or np.any(n_arr <= 0):
        raise ScalingFitError("scaling points need positive data scales and finite errors")
    law = fit_power_law(n_arr, e_arr)
    offset = law.c > 0 or len(np.unique(n_arr)) >= OFFSET_MIN_SCALES
    low, high, method = bootstrap_exponent(n_arr, e_arr, law, offset, seed)
    return ScalingFit(law, "a * N^(-k) + c" if offset else "a * N^(-k)", low, high, method,
                      [float(v) for v in n_arr], [float(v) for v in e_arr])
