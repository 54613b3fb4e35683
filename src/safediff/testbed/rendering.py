"""Rendering of the testbed world (see :mod:`safediff.testbed.world`): a scene drawn as a 32x32
RGB image (background, concept patterns at their intensity, corner marks, the shape on top)."""

from __future__ import annotations

import numpy as np

from .vocabulary import (
    BACKGROUNDS,
    BAND,
    BAR,
    CYAN,
    IMAGE_SIZE,
    MAGENTA,
    MARK,
    MARK_COLOURS,
    MARK_INSET,
    RING,
    SHAPE_COLOURS,
    THIN_BAND,
    Scene,
)

# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
_RING_MASK = (_YY < RING) | (_YY >= IMAGE_SIZE - RING) | (_XX < RING) | (_XX >= IMAGE_SIZE - RING)
#: Where each visual mode paints its colour.
MODE_MASKS: dict[str, np.ndarray] = {
    "horizontal": (_YY // BAND) % 2 == 0,
    "vertical": (_XX // BAND) % 2 == 0,
    "thin": (_XX // THIN_BAND) % 2 == 0,
    "frame": _RING_MASK,
    "bars": (_XX % 8) < BAR,
}
_CONCEPT_COLOUR = {"striped": MAGENTA, "caged": CYAN}


def mark_box(corner: str) -> tuple[slice, slice]:
    lo, hi = MARK_INSET, IMAGE_SIZE - MARK_INSET - MARK
    y = lo if corner[0] == "t" else hi
    x = lo if corner[1] == "l" else hi
    return slice(y, y + MARK), slice(x, x + MARK)


def _shape_mask(scene: Scene) -> np.ndarray:
    dx, dy, r = _XX - scene.cx, _YY - scene.cy, scene.radius
    if scene.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if scene.shape == "square":
        h = int(round(r * 0.85))
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    # an upward triangle: apex at (cx, cy - r), base from cx - r to cx + r at cy + r
    t = (dy + r) / (2.0 * r)  # 0 at the apex, 1 at the base
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= t * r + 0.5)


def visible_marks(scene: Scene) -> frozenset[tuple[str, str]]:
    """The marks of ``scene`` that the shape leaves at least half visible (what a detector can see)."""
    shape = _shape_mask(scene)
    out = set()
    for corner, colour in scene.marks:
        box = np.zeros_like(shape)
        box[mark_box(corner)] = True
        if (box & ~shape).sum() >= 0.5 * box.sum():
            out.add((corner, colour))
    return frozenset(out)


def render(scene: Scene) -> np.ndarray:
    """Draw a scene as an ``(H, W, 3)`` uint8 RGB array: background, concept patterns (blended
    at their intensity; stripes under the cage), corner marks, then the shape on top."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    for c in ("striped", "caged"):
        if c in scene.concepts:
            m = MODE_MASKS[scene.mode_of(c)]
            a = scene.intensity_of(c)
            img[m] = (1 - a) * img[m] + a * np.array(_CONCEPT_COLOUR[c], np.float32)
    for corner, colour in sorted(scene.marks):
        img[mark_box(corner)] = MARK_COLOURS[colour]
    img[_shape_mask(scene)] = SHAPE_COLOURS[scene.colour]
    return np.round(img).astype(np.uint8)
