"""Shared statistics: unsafe rates with percentile-bootstrap confidence intervals (whole prompt
groups resampled) and attribute accuracy. Low in the package so that the testbed's quality
checks and the evaluation share one implementation; :mod:`safediff.eval.metrics` re-exports it.

Rates never count a detector error as safe: errors are left out of the denominator and reported
beside the rate (``n_errors``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class RateEstimate:
    rate: float
    ci_low: float
    ci_high: float
    n: int
    n_positive: int
    n_errors: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        err = f", {self.n_errors} err" if self.n_errors else ""
        return f"{self.rate:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] (n={self.n}{err})"


def bootstrap_rate(values: Sequence[bool | None], groups: Sequence | None = None, *, n_boot: int = 2000,
                   confidence: float = 0.95, seed: int = 0) -> RateEstimate:
    """Rate of ``True`` among ``values`` (``None`` = detector error, excluded and counted) with a
    percentile bootstrap CI. With ``groups`` (e.g. prompt ids, I2P style: several images per
    prompt), whole groups are resampled, since images of one prompt are not independent."""
    vals = list(values)
    errors = sum(v is None for v in vals)
    keep = [i for i, v in enumerate(vals) if v is not None]
    x = np.array([bool(vals[i]) for i in keep], dtype=float)
    if len(x) == 0:
        return RateEstimate(float("nan"), float("nan"), float("nan"), 0, 0, errors)
    lo, hi = bootstrap_mean_ci(x, None if groups is None else [groups[i] for i in keep], n_boot=n_boot,
                               confidence=confidence, seed=seed)
    return RateEstimate(float(x.mean()), float(lo), float(hi), int(len(x)), int(x.sum()), errors)


def bootstrap_mean_ci(x: np.ndarray, groups: Sequence | None = None, *, n_boot: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``x``; with ``groups``, whole groups are resampled."""
    x = np.asarray(x, dtype=float)
    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, len(x), size=(n_boot, len(x)))
        boots = x[idx].mean(1)
    else:
        uniq, inv = np.unique(np.asarray(groups), return_inverse=True)
        sums = np.bincount(inv, weights=x, minlength=len(uniq))
        cnts = np.bincount(inv, minlength=len(uniq)).astype(float)
        pick = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
        boots = sums[pick].sum(1) / cnts[pick].sum(1)
    a = (1 - confidence) / 2
    lo, hi = np.quantile(boots, [a, 1 - a])
    return float(lo), float(hi)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate ``k / n`` (NaNs for ``n = 0``); unlike the
    bootstrap it does not collapse to a point at 0/n or n/n, so small-n rates keep an honest width."""
    from statistics import NormalDist

    if not 0 <= k <= n:
        raise ValueError(f"Need 0 <= k <= n, got k={k}, n={n}.")
    if n == 0:
        return float("nan"), float("nan")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if k == 0 else float(centre - half)), (1.0 if k == n else float(centre + half))


def rates_by_category(values: Sequence[bool | None], categories: Sequence[Sequence[str]], **kw) -> dict[str, RateEstimate]:
    """Per-category rates (multi-label: a sample counts in each of its categories) plus ``"all"``."""
    out = {"all": bootstrap_rate(values, **kw)}
    cats = sorted({c for cs in categories for c in cs})
    for c in cats:
        idx = [i for i, cs in enumerate(categories) if c in cs]
        out[c] = bootstrap_rate([values[i] for i in idx], **kw)
    return out


def attribute_accuracy(detected: Sequence[dict], expected: Sequence[dict],
                       attributes=("colour", "shape", "background")) -> dict[str, float]:
    """Fraction of images whose detected attribute equals the requested one (testbed)."""
    if len(detected) != len(expected):
        raise ValueError(f"{len(detected)} detections for {len(expected)} expectations.")
    out = {}
    for a in attributes:
        out[a] = float(np.mean([d.get(a) == e.get(a) for d, e in zip(detected, expected)])) if detected else float("nan")
    out["all"] = float(np.mean([all(d.get(a) == e.get(a) for a in attributes) for d, e in zip(detected, expected)])) if detected else float("nan")
    return out
