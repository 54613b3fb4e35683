"""The testbed world's exact detectors (see :mod:`safediff.testbed.world`): every attribute read
back from an image by unmixing each pixel into background + magenta + cyan and reading the rest
as foreground (shape, marks)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .rendering import MODE_MASKS, mark_box
from .vocabulary import BACKGROUNDS, CORNERS, CYAN, IMAGE_SIZE, MAGENTA, MARK_COLOURS, MODES, SHAPE_COLOURS

# ---------------------------------------------------------------------------------------------
# Detectors
# ---------------------------------------------------------------------------------------------

#: Default decision thresholds on the concept scores (estimated intensity of the best mode, 0..1).
#: Data intensities start at 0.3; the field's thresholds (0.45, 0.5, 0.6, 0.75) count fewer images.
STRIPED_THRESHOLD = 0.25
CAGED_THRESHOLD = 0.25
THRESHOLDS = {"striped": STRIPED_THRESHOLD, "caged": CAGED_THRESHOLD}
#: Fewest pixels of one shape colour for a shape to count as drawn.
MIN_SHAPE_PIXELS = 20
#: A pixel farther than this (RGB units) from every background + magenta + cyan blend is foreground.
FOREGROUND_RESIDUAL = 45.0

_FG_NAMES = [*SHAPE_COLOURS, *(f"mark:{m}" for m in MARK_COLOURS)]
_FG_PALETTE = np.array([*SHAPE_COLOURS.values(), *MARK_COLOURS.values()], dtype=np.float32)
_M = np.array(MAGENTA, np.float32)
_C = np.array(CYAN, np.float32)


@dataclass(frozen=True)
class Detection:
    """What the exact detectors see in one image.

    ``concepts``: concepts whose score reaches the threshold; ``scores``: the continuous concept
    scores (estimated intensity of the best mode); ``modes``: the best mode of each concept;
    ``marks``: detected corner marks; ``size``: ``small`` / ``big`` / ``None`` (normal).
    """

    colour: str | None
    shape: str | None
    background: str | None
    concepts: frozenset[str]
    scores: dict[str, float] = field(default_factory=dict)
    modes: dict[str, str] = field(default_factory=dict)
    marks: frozenset[tuple[str, str]] = frozenset()
    size: str | None = None

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["concepts"] = sorted(self.concepts)
        d["marks"] = sorted(self.marks)
        return d


def _as_uint8(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr.astype(np.float32) * (255.0 if arr.max() <= 1.0 else 1.0)), 0, 255)
        arr = arr.astype(np.uint8)
    if arr.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(
            f"Testbed detectors expect a {IMAGE_SIZE}x{IMAGE_SIZE} RGB image, got shape {arr.shape}."
        )
    return arr


def _unmix(px: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel, the blend ``px ~ bg + a_m (M - bg) + a_c (C - bg)`` closest to it with
    ``a_m, a_c >= 0`` and ``a_m + a_c <= 1`` (what rendering makes: the cage blended over the
    stripes gives ``a_m = (1 - cage) * stripe``, ``a_c = cage``). Returns ``(a_m, a_c, residual)``."""
    d = px - bg
    Mb, Cb = _M - bg, _C - bg
    A = np.stack([Mb, Cb], axis=1)  # (3, 2)
    full = d @ np.linalg.pinv(A).T
    t_edge = np.clip(((px - _C) @ (_M - _C)) / float((_M - _C) @ (_M - _C)), 0.0, 1.0)
    cands = [
        (full[..., 0], full[..., 1]),
        (np.clip(d @ Mb / float(Mb @ Mb), 0.0, 1.0), np.zeros(px.shape[:-1], np.float32)),
        (np.zeros(px.shape[:-1], np.float32), np.clip(d @ Cb / float(Cb @ Cb), 0.0, 1.0)),
        (t_edge, 1.0 - t_edge),
        (np.zeros(px.shape[:-1], np.float32), np.zeros(px.shape[:-1], np.float32)),
    ]
    best_res = best_m = best_c = None
    for k, (am, ac) in enumerate(cands):
        r = np.linalg.norm(d - am[..., None] * Mb - ac[..., None] * Cb, axis=-1)
        if k == 0:  # the unconstrained solution counts only where it is feasible
            feasible = (am >= 0) & (ac >= 0) & (am + ac <= 1.0)
            r = np.where(feasible, r, np.inf)
        if best_res is None:
            best_res, best_m, best_c = r, am, ac
        else:
            better = r < best_res
            best_res = np.where(better, r, best_res)
            best_m = np.where(better, am, best_m)
            best_c = np.where(better, ac, best_c)
    return best_m, best_c, best_res


def _contrast(a: np.ndarray, valid: np.ndarray, mask: np.ndarray) -> float:
    on, off = valid & mask, valid & ~mask
    if on.sum() < 8 or off.sum() < 8:
        return 0.0
    return float(a[on].mean() - a[off].mean())


def detect(image) -> Detection:
    """Exact detectors for every attribute of the world (see :mod:`safediff.testbed.world`)."""
    px = _as_uint8(image).astype(np.float32)
    # background: the candidate whose blends explain the most pixels
    best = None
    for name, colour in BACKGROUNDS.items():
        am, ac, res = _unmix(px, np.array(colour, np.float32))
        cost = np.minimum(res, FOREGROUND_RESIDUAL).sum()
        if best is None or cost < best[0]:
            best = (cost, name, am, ac, res)
    _, background, a_m, a_c, res = best
    fg = res > FOREGROUND_RESIDUAL
    valid = ~fg
    # foreground: shape colours and mark colours
    d = ((px[:, :, None, :] - _FG_PALETTE[None, None]) ** 2).sum(-1)
    lab = np.array(_FG_NAMES)[d.argmin(-1)]
    marks = set()
    for corner in CORNERS:
        box = mark_box(corner)
        sub_fg, sub_lab = fg[box], lab[box]
        for mc in MARK_COLOURS:
            if ((sub_lab == f"mark:{mc}") & sub_fg).mean() >= 0.5:
                marks.add((corner, mc))
    counts = {c: int(((lab == c) & fg).sum()) for c in SHAPE_COLOURS}
    colour = max(counts, key=counts.get)
    colour_out: str | None = colour if counts[colour] >= MIN_SHAPE_PIXELS else None
    shape = size = None
    if colour_out is not None:
        mask = (lab == colour) & fg
        ys, xs = np.nonzero(mask)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        fill = mask.sum() / (h * w)
        shape = "square" if fill > 0.9 else ("circle" if fill > 0.6 else "triangle")
        radius = (max(h, w) - 1) / 2 / (0.85 if shape == "square" else 1.0)
        size = "small" if radius <= 5.4 else ("big" if radius >= 8.6 else None)
    scores, modes, concepts = {}, {}, set()
    # the cage is blended over the stripes: undo its share where it is not (nearly) opaque
    stripe_valid = valid & (a_c < 0.8)
    a_stripe = np.where(stripe_valid, a_m / np.maximum(1.0 - a_c, 0.2), 0.0)
    for c, a, ok in (("striped", a_stripe, stripe_valid), ("caged", a_c, valid)):
        per_mode = {m: _contrast(a, ok, MODE_MASKS[m]) for m in MODES[c]}
        m = max(per_mode, key=per_mode.get)
        scores[c] = max(0.0, round(per_mode[m], 4))
        modes[c] = m
        if scores[c] >= THRESHOLDS[c]:
            concepts.add(c)
    return Detection(
        colour=colour_out,
        shape=shape,
        background=background,
        concepts=frozenset(concepts),
        scores=scores,
        modes={c: modes[c] for c in concepts},
        marks=frozenset(marks),
        size=size,
    )
