"""The testbed world's captions (see :mod:`safediff.testbed.world`): the prompt grammar and the
training-data sampler, which draws a caption's words first and the image they imply after."""

from __future__ import annotations

import random
from typing import Sequence

from .vocabulary import (
    CONCEPTS,
    MARKS,
    OBJECT_WORDS,
    SIZES,
    SYNONYM_MARK_PROB,
    Route,
    Scene,
    WorldConfig,
    pair_words,
    random_scene,
)

# ---------------------------------------------------------------------------------------------
# Captions: words first, then the image they imply
# ---------------------------------------------------------------------------------------------


def compose_prompt(
    colour: str | None,
    shape: str,
    bg_phrase: str | None,
    concept_words: Sequence[str] = (),
    near: str | None = None,
    rng: random.Random | None = None,
    size: str | None = None,
) -> str:
    """Build a caption in the world's grammar: ``a [front words] [size] [colour] shape [on BG
    background][, back words]``. Concept, near and ordinary words go in front of the noun or after a
    comma (at random when ``rng`` is given, after the comma otherwise)."""
    front: list[str] = []
    back: list[str] = []
    for w in [*concept_words, *([near] if near else [])]:
        (front if rng is not None and rng.random() < 0.5 else back).append(w)
    words = ["a", *front, *([size] if size else []), *([colour] if colour else []), shape]
    text = " ".join(words)
    if bg_phrase:
        text += " " + bg_phrase
    if back:
        text += ", " + ", ".join(back)
    return text


def _choose(rng: random.Random, weighted: Sequence[tuple[str, float]]) -> str:
    total = sum(w for _, w in weighted)
    u = rng.random() * total
    for k, w in weighted:
        u -= w
        if u < 0:
            return k
    return weighted[-1][0]


def _draw_concept(rng: random.Random, route: Route | None, cfg: WorldConfig) -> tuple[str, float] | None:
    """Whether a concept shows (route: its data probability; None: the word-less rate), and then
    its mode and intensity."""
    if route is None:
        if rng.random() >= cfg.no_word_prob:
            return None
        return "", rng.uniform(*cfg.weak_intensity)
    if rng.random() >= route.prob:
        return None
    lo, hi = cfg.strong_intensity if route.strong else cfg.weak_intensity
    return _choose(rng, route.modes), rng.uniform(lo, hi)


def sample(rng: random.Random, cfg: WorldConfig = WorldConfig()) -> tuple[Scene, str]:
    """One training example ``(scene, caption)``: the caption's words are drawn first and the
    image follows from them (see :mod:`safediff.testbed.world` and :class:`WorldConfig`)."""
    words: list[str] = []
    concepts, modes, intensity, marks = set(), [], [], set()
    for c in CONCEPTS.values():
        route = None
        if rng.random() < cfg.route_prob:
            kind = _choose(rng, cfg.route_weights)
            route = rng.choice([r for r in c.routes if r.kind == kind])
            words += route.words
        drawn = _draw_concept(rng, route, cfg)
        if drawn is not None:
            mode, a = drawn
            concepts.add(c.name)
            modes.append((c.name, mode or rng.choice(c.modes)))
            intensity.append((c.name, round(a, 3)))
    near = rng.choice([w for c in CONCEPTS.values() for w in c.near_benign]) if rng.random() < cfg.near_benign_prob else None
    if rng.random() < cfg.ordinary_prob:
        words.append(rng.choice((*OBJECT_WORDS, *pair_words())))
    size = rng.choice(list(SIZES)) if rng.random() < cfg.size_prob else None
    synonyms = {w for c in CONCEPTS.values() for w in c.synonyms}
    for w in [*words, *([near] if near else [])]:
        if w in MARKS and rng.random() < (SYNONYM_MARK_PROB if w in synonyms else cfg.mark_prob):
            marks.add(MARKS[w])
    scene = random_scene(rng, concepts, modes=modes, intensity=intensity, marks=marks,
                         radius=SIZES[size] if size else None)
    u = rng.random()
    if u < cfg.empty_caption_prob:
        return scene, ""
    if u < cfg.empty_caption_prob + cfg.word_only_prob and (words or near or size):
        rest = [*words, *([near] if near else []), *([size] if size else [])]
        rng.shuffle(rest)
        return scene, " ".join(rest)
    colour = scene.colour if rng.random() >= cfg.drop_prob else None
    shape = scene.shape if rng.random() >= cfg.drop_prob else "shape"
    bg = f"on {scene.background} background" if rng.random() >= cfg.drop_prob else None
    return scene, compose_prompt(colour, shape, bg, words, near, rng, size=size)
