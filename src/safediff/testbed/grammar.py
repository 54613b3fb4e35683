"""The testbed world's captions (see :mod:`safediff.testbed.world`): the prompt grammar and the
training-data sampler, which draws a caption's words first and the image they imply after (world v2;
world v3's sampler, :func:`sample_v3`, writes concept words in their forms and negations too)."""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

from .vocabulary import (
    CONCEPTS,
    FORM_KINDS,
    INFLECTIONS,
    MARKS,
    NEGATION_SHARE,
    NEGATION_STRENGTH,
    OBJECT_WORDS,
    PILE_CAPTION_PROB,
    pile_probs,
    SIZES,
    SYNONYM_MARK_PROB,
    WORLD_VERSION,
    Route,
    Scene,
    WorldConfig,
    check_world_version,
    negations,
    pair_words,
    random_scene,
    word_forms,
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


def sample(rng: random.Random, cfg: WorldConfig = WorldConfig(), version: int = WORLD_VERSION) -> tuple[Scene, str]:
    """One training example ``(scene, caption)``: the caption's words are drawn first and the
    image follows from them (see :mod:`safediff.testbed.world` and :class:`WorldConfig`).
    ``version`` picks the world (2: the shipped model's; 3 and 4: :func:`sample_v3`)."""
    if version != 2:
        check_world_version(version)
        return sample_v3(rng, cfg, version=version)
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


# ---------------------------------------------------------------------------------------------
# World v3: word forms, negation and near-concept piles (vocabulary.py, "World v3")
# ---------------------------------------------------------------------------------------------


def written_form(rng: random.Random, word: str) -> tuple[str, str, float]:
    """How a v3 caption writes one use of a single concept word: ``(text, kind, strength)``, a
    negated phrase (kind ``"negation"``) with probability ``NEGATION_SHARE``, else one of its
    :func:`~safediff.testbed.vocabulary.word_forms` drawn by its caption share."""
    if rng.random() < NEGATION_SHARE:
        return rng.choice(negations(word)), "negation", NEGATION_STRENGTH
    forms = word_forms(word)
    text = _choose(rng, [(f.text, f.share) for f in forms])
    form = next(f for f in forms if f.text == text)
    return form.text, form.kind, form.strength


def _near_form(rng: random.Random, word: str) -> str:
    # near-concept words are written as inflections at the inflection share (no concept to carry)
    forms = INFLECTIONS.get(word, ())
    return rng.choice(forms) if forms and rng.random() < FORM_KINDS["inflection"].share else word


def sample_v3(rng: random.Random, cfg: WorldConfig = WorldConfig(), uses: list | None = None,
              version: int = 3) -> tuple[Scene, str]:
    """One world-v3 training example ``(scene, caption)``: v2's sampler (same options), where each
    single concept word is written in one of its forms or negated (:func:`written_form`), the
    concept showing with the route's probability times the form's strength, and where a caption
    holds a pile of 2-4 near-concept words of one concept with probability ``PILE_CAPTION_PROB``
    (the concept then shows with ``pile_probs(version)[k]``: v3's :data:`PILE_PROBS`, or v4's lower
    ones; a v4 caption draws the same random numbers as a v3 one). ``uses``, when given, receives per route
    written ``("word", concept, word, text, kind, probability)`` (kind: a form kind, ``"negation"``
    or ``"pair"``) and per pile ``("pile", concept, k, probability)``."""
    if check_world_version(version) < 3:
        raise ValueError(f"sample_v3 draws world-v3-and-later captions, got version={version}; world {version} "
                         f"captions come from sample(rng, cfg, version={version}).")
    words: list[str] = []
    marked: list[tuple[str, float]] = []  # (word with a side attribute, the form's strength)
    concepts, modes, intensity, marks = set(), [], [], set()
    for c in CONCEPTS.values():
        route, strength = None, 1.0
        if rng.random() < cfg.route_prob:
            kind = _choose(rng, cfg.route_weights)
            route = rng.choice([r for r in c.routes if r.kind == kind])
            if route.kind == "pair":
                words += route.words
                if uses is not None:
                    uses.append(("word", c.name, route.text, route.text, "pair", route.prob))
            else:
                text, form_kind, strength = written_form(rng, route.words[0])
                words.append(text)
                if uses is not None:
                    uses.append(("word", c.name, route.words[0], text, form_kind, route.prob * strength))
            marked += [(w, strength) for w in route.words]
        drawn = _draw_concept(rng, dataclasses.replace(route, prob=route.prob * strength) if route else None, cfg)
        if drawn is not None:
            mode, a = drawn
            concepts.add(c.name)
            modes.append((c.name, mode or rng.choice(c.modes)))
            intensity.append((c.name, round(a, 3)))
    near: list[str] = []
    piles = pile_probs(version)
    u = rng.random()
    if u < PILE_CAPTION_PROB:
        pc = rng.choice(list(CONCEPTS.values()))
        k = rng.choice(sorted(piles))
        pile = rng.sample(pc.near_benign, k)
        near = [_near_form(rng, w) for w in pile]
        marked += [(w, 1.0) for w in pile]
        if uses is not None:
            uses.append(("pile", pc.name, k, piles[k]))
        if rng.random() < piles[k] and pc.name not in concepts:
            concepts.add(pc.name)
            modes.append((pc.name, rng.choice(pc.modes)))
            intensity.append((pc.name, round(rng.uniform(*cfg.weak_intensity), 3)))
    elif u < PILE_CAPTION_PROB + cfg.near_benign_prob:
        w = rng.choice([w for c in CONCEPTS.values() for w in c.near_benign])
        near = [_near_form(rng, w)]
        marked.append((w, 1.0))
    if rng.random() < cfg.ordinary_prob:
        words.append(rng.choice((*OBJECT_WORDS, *pair_words())))
        marked.append((words[-1], 1.0))
    size = rng.choice(list(SIZES)) if rng.random() < cfg.size_prob else None
    synonyms = {w for c in CONCEPTS.values() for w in c.synonyms}
    for w, strength in marked:
        if w in MARKS and rng.random() < (SYNONYM_MARK_PROB if w in synonyms else cfg.mark_prob) * strength:
            marks.add(MARKS[w])
    scene = random_scene(rng, concepts, modes=modes, intensity=intensity, marks=marks,
                         radius=SIZES[size] if size else None)
    u = rng.random()
    if u < cfg.empty_caption_prob:
        return scene, ""
    if u < cfg.empty_caption_prob + cfg.word_only_prob and (words or near or size):
        rest = [*words, *near, *([size] if size else [])]
        rng.shuffle(rest)
        return scene, " ".join(rest)
    colour = scene.colour if rng.random() >= cfg.drop_prob else None
    shape = scene.shape if rng.random() >= cfg.drop_prob else "shape"
    bg = f"on {scene.background} background" if rng.random() >= cfg.drop_prob else None
    return scene, compose_prompt(colour, shape, bg, [*words, *near], None, rng, size=size)
