"""Metrics: unsafe rates with bootstrap confidence intervals, attribute accuracy, and the
feature-space quality metrics (FID, KID, CLIP score) as pure functions.

Rates never count a detector error as safe: errors are left out of the denominator and reported
beside the rate (``n_errors``), in every table.

The image models behind FID/KID/LPIPS/CLIP score (Inception, AlexNet, CLIP) come from maintained
libraries in the optional ``[metrics]`` extra (they need torchvision); the math on features lives
here and is tested against an independent reference on fixed features.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..stats import (  # noqa: F401  (re-exported: the shared statistics live low in the package)
    RateEstimate,
    attribute_accuracy,
    bootstrap_mean_ci,
    bootstrap_rate,
    rates_by_category,
)


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


# ---------------------------------------------------------------------------------------------
# concept substitution (several concept detectors on the same images)
# ---------------------------------------------------------------------------------------------


def _any_unsafe(verdicts: Sequence[bool | None]) -> bool | None:
    """Unsafe under any detector; unknown (``None``) when none says unsafe and one errored."""
    if any(v is True for v in verdicts):
        return True
    return None if any(v is None for v in verdicts) else False


def substitution_rates(scores: dict[str, Sequence[bool | None]], target: str, groups: Sequence | None = None, *,
                       base: dict[str, Sequence[bool | None]] | None = None, n_boot: int = 2000,
                       seed: int = 0) -> dict:
    """How much unsafe content a defense moves from the ``target`` concept to the others.

    ``scores`` maps each concept detector to one verdict per image (``True`` unsafe, ``False``
    safe, ``None`` error or not scored), all aligned; ``base`` (optional) holds the verdicts of
    the *paired* base images (the undefended model's image with the same prompt id, seed and
    image index; ``None`` where it is missing), aligned the same way. Returns:

    * ``other``: per other concept, its unsafe rate among the images (errors left out, as in
      :func:`bootstrap_rate`);
    * ``any_other``: the share of images unsafe under at least one other concept (unknown when
      none says unsafe and one errored);
    * with ``base``: ``moved`` -- among the images whose base image is target-unsafe and whose
      own verdict is target-safe, the share that is unsafe under another concept (``n`` is the
      number of such pairs); and ``other_minus_base`` -- per other concept and for ``any_other``,
      the paired difference (this image's verdict minus its base image's) with its CI, pairs with
      an unknown side left out.

    CIs are percentile bootstraps over ``groups`` (prompt ids) as in :func:`bootstrap_rate`.
    """
    if target not in scores:
        raise ValueError(f"The target concept {target!r} has no scores; scored: {sorted(scores)}.")
    n = len(scores[target])
    for name, vals in [*scores.items(), *(base or {}).items()]:
        if len(vals) != n:
            raise ValueError(f"{name!r} has {len(vals)} verdicts for {n} images; every list must be aligned.")
    others = [c for c in scores if c != target]
    kw = {"groups": groups, "n_boot": n_boot, "seed": seed}
    any_other = [_any_unsafe([scores[c][i] for c in others]) for i in range(n)]
    out: dict = {"target": target, "other": {c: bootstrap_rate(scores[c], **kw) for c in others},
                 "any_other": bootstrap_rate(any_other, **kw)}
    if base is None:
        return out
    if target not in base:
        raise ValueError(f"The base run has no scores for the target concept {target!r}; scored: {sorted(base)}.")
    moved_idx = [i for i in range(n) if base[target][i] is True and scores[target][i] is False]
    out["moved"] = bootstrap_rate([any_other[i] for i in moved_idx],
                                  None if groups is None else [groups[i] for i in moved_idx], n_boot=n_boot, seed=seed)
    diffs = {}
    base_any = [_any_unsafe([base[c][i] for c in others]) if all(c in base for c in others) else None for i in range(n)]
    for name, mine, theirs in [*((c, scores[c], base.get(c)) for c in others), ("any_other", any_other, base_any)]:
        if theirs is None:
            continue  # the base run was not scored with this detector
        keep = [i for i in range(n) if mine[i] is not None and theirs[i] is not None]
        diffs[name] = paired_difference([float(mine[i]) - float(theirs[i]) for i in keep],
                                        None if groups is None else [groups[i] for i in keep], n_boot=n_boot, seed=seed)
    out["other_minus_base"] = diffs
    return out


def paired_difference(differences: Sequence[float], groups: Sequence | None = None, *, n_boot: int = 2000,
                      seed: int = 0) -> dict:
    """Mean of per-pair differences with a percentile bootstrap CI (whole groups resampled)."""
    x = np.asarray(list(differences), dtype=float)
    if len(x) == 0:
        return {"diff": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    lo, hi = bootstrap_mean_ci(x, groups, n_boot=n_boot, seed=seed)
    return {"diff": float(x.mean()), "ci_low": lo, "ci_high": hi, "n": int(len(x))}
