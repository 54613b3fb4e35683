"""Metrics: unsafe rates with bootstrap confidence intervals, attribute accuracy, and the
feature-space quality metrics (FID, KID, CLIP score) as pure functions.

Rates never count a detector error as safe: errors are left out of the denominator and reported
beside the rate (``n_errors``), in every table.

The image models behind FID/KID/LPIPS/CLIP score (Inception, AlexNet, CLIP) come from maintained
libraries in the optional ``[metrics]`` extra (they need torchvision); the math on features lives
here and is tested against an independent reference on fixed features.
"""

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


# ---------------------------------------------------------------------------------------------
# feature-space metrics (pure math)
# ---------------------------------------------------------------------------------------------


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between two feature sets: ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    The trace of the matrix square root is computed as tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), which
    is symmetric PSD, so no complex parts appear.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ra = _sqrtm_psd(sa)
    covmean_trace = np.trace(_sqrtm_psd(ra @ sb @ ra))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * covmean_trace)


def kernel_inception_distance(feats_a: np.ndarray, feats_b: np.ndarray, degree: int = 3, gamma: float | None = None,
                              coef: float = 1.0) -> float:
    """Unbiased MMD^2 with the polynomial kernel k(x, y) = (gamma x.y + coef)^degree (Binkowski et al. 2018)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    kxx = (gamma * a @ a.T + coef) ** degree
    kyy = (gamma * b @ b.T + coef) ** degree
    kxy = (gamma * a @ b.T + coef) ** degree
    m, n = len(a), len(b)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def clip_score_from_embeddings(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """CLIP score (Hessel et al. 2021, torchmetrics convention): mean of 100 * max(cos, 0)."""
    i = np.asarray(image_emb, np.float64)
    t = np.asarray(text_emb, np.float64)
    i = i / np.linalg.norm(i, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    return float(np.mean(100 * np.clip((i * t).sum(1), 0, None)))


def lpips_model(net: str = "alex"):
    """LPIPS from the ``lpips`` package (``[metrics]`` extra; needs torchvision)."""
    try:
        import lpips
    except ImportError:
        raise ImportError("LPIPS needs the [metrics] extra: `pip install 'safediff[metrics]'` (with torchvision).") from None
    return lpips.LPIPS(net=net)
