"""Testbed prompt suites, in the I2P-like schema of :mod:`safediff.eval.benchmarks`.

For each target concept:

* ``explicit`` -- the concept's name ("striped");
* ``synonym`` -- training-side synonyms ("stripy", "banded");
* ``implicit`` -- training-side triggers, single words ("zebra", "tiger", "referee") and the
  training-side compositional pair ("sailor" ... "shirt"): each brings the concept only part of
  the time, as "beach" brings nudity;
* ``heldout`` -- held-out synonyms, triggers and pair (evaluation only: never in any defense's
  or attack's data);
* ``benign`` -- no concept word at all (the concept still appears at its small base rate);
* ``near_benign`` -- a near-concept benign word ("horse", "bird"): must not bring the concept, and
  a defense must not spoil it (over-refusal).

World v3's suites (:data:`V3_SUITES`; designed for a model trained on world v3, valid prompts on
any model; docs/testbed.md, "World v3"), each record also carrying the same prompt with the plain
word (``plain_prompt``) for paired comparisons, where there is one:

* ``negation`` -- a negated concept word ("not striped", "without stripes", "no zebra");
* ``near_pile`` -- a pile of 2-4 near-concept words of the concept ("horse, lion, scanner");
* ``obfuscated`` -- a misspelled, digit-substituted or letter-spaced concept word ("stirped",
  "str1ped", "s t r i p e d"): every such form is held out;
* ``word_forms`` -- an inflected concept word ("stripes", "zebras", "cages").

Every prompt names a colour, a shape and a background, so attribute accuracy (what a defense
preserves) is measured on the same images. Each record carries the route it uses (``word``,
``kind``, the route's data probability ``route_prob``), so per-word rates can be read off.
"""

from __future__ import annotations

import random

from . import world
from .vocabulary import (
    FORM_KINDS,
    NEGATION_STRENGTH,
    OBFUSCATED_KINDS,
    PILE_PROBS,
    concept_forms,
    negations,
)

SUITES = ("explicit", "synonym", "implicit", "heldout", "benign", "near_benign")
#: World v3's suites, selected by name (``testbed:striped/negation``); ``testbed:all`` stays v2's six.
V3_SUITES = ("negation", "near_pile", "obfuscated", "word_forms")


def suite_routes(concept: str, suite: str) -> tuple[world.Route, ...]:
    """The routes a suite cycles through (empty for ``benign``; near-concept words are not routes)."""
    c = world.CONCEPTS[concept]
    pick = {
        "explicit": lambda r: r.kind == "name",
        "synonym": lambda r: r.kind == "synonym" and not r.held_out,
        "implicit": lambda r: r.kind in ("trigger", "pair") and not r.held_out,
        "heldout": lambda r: r.held_out,
    }.get(suite)
    return tuple(r for r in c.routes if pick(r)) if pick else ()


def suite_words(concept: str, suite: str) -> tuple[str, ...]:
    """The words (or ``"w1 w2"`` pairs) of a suite."""
    if suite == "near_benign":
        return world.CONCEPTS[concept].near_benign
    return tuple(r.text for r in suite_routes(concept, suite))


def testbed_suite(concept: str, suite: str, n: int = 200, seed: int = 0) -> list[dict]:
    """``n`` prompt records of one suite for one concept (deterministic in ``seed``)."""
    if concept not in world.CONCEPTS:
        raise ValueError(f"Unknown testbed concept {concept!r}; choose one of {list(world.CONCEPTS)}.")
    if suite not in SUITES + V3_SUITES:
        raise ValueError(f"Unknown suite {suite!r}; choose one of {list(SUITES + V3_SUITES)} (the last "
                         f"{len(V3_SUITES)} are world v3's).")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be an integer >= 1, got {n!r}.")
    if suite in V3_SUITES:
        return v3_suite(concept, suite, n, seed)
    rng = random.Random(f"{concept}:{suite}:{seed}")
    routes = suite_routes(concept, suite)
    near_words = world.CONCEPTS[concept].near_benign
    out = []
    for i in range(n):
        s = world.random_scene(rng)
        route = routes[i % len(routes)] if routes else None
        near = near_words[i % len(near_words)] if suite == "near_benign" else None
        words = list(route.words) if route else []
        prompt = world.compose_prompt(s.colour, s.shape, f"on {s.background} background", words, near, rng)
        out.append({
            "id": f"testbed/{concept}/{suite}/{i}",
            "prompt": prompt,
            "categories": [concept] if route else [],
            "seed": seed + i,
            "suite": suite,
            "concept": concept,
            "word": route.text if route else (near or ""),
            "kind": route.kind if route else ("near_benign" if near else "benign"),
            "route_prob": route.prob if route else None,
            "expected": {"colour": s.colour, "shape": s.shape, "background": s.background},
        })
    return out


testbed_suite.__test__ = False  # not a pytest test, despite its name


def v3_items(concept: str, suite: str) -> tuple[dict, ...]:
    """What a world-v3 suite cycles through, one dict per item: ``words`` (the units placed in the
    prompt), ``plain`` (the same units with the plain concept word; None for piles), ``word`` (the
    record's label), ``kind``, ``form_of`` (the concept word written; the pile's words) and
    ``route_prob`` (the world's data probability that a caption holding the item shows the concept;
    world v3's: the suites are the same prompts for a v4 model, whose piles' data probabilities are
    ``vocabulary.pile_probs(4)``, two thirds of these)."""
    c = world.CONCEPTS[concept]
    items: list[dict] = []
    if suite == "negation":  # the name and the training-side single words, each negated every way
        for w in c.training_words:
            for phrase in negations(w):
                items.append({"words": [phrase], "plain": [w], "word": phrase, "kind": "negation", "form_of": w,
                              "route_prob": round(c.route(w).prob * NEGATION_STRENGTH, 6)})
    elif suite == "near_pile":  # piles of 2, 3 and 4 near-concept words, in turn
        for k in sorted(PILE_PROBS):
            items.append({"words": None, "k": k, "plain": None, "kind": "pile", "route_prob": PILE_PROBS[k]})
    else:
        kinds = OBFUSCATED_KINDS if suite == "obfuscated" else ("inflection",)
        for f in concept_forms(concept, kinds):
            items.append({"words": [f.text], "plain": [f.word], "word": f.text, "kind": f.kind, "form_of": f.word,
                          "route_prob": round(c.route(f.word).prob * FORM_KINDS[f.kind].strength, 6)})
    return tuple(items)


def v3_suite(concept: str, suite: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` prompt records of a world-v3 suite (deterministic in ``seed``), in the schema of
    :func:`testbed_suite` plus ``plain_prompt``, ``form_of`` and ``world`` (3)."""
    rng = random.Random(f"{concept}:{suite}:{seed}:world3")
    items = v3_items(concept, suite)
    near_words = world.CONCEPTS[concept].near_benign
    out = []
    for i in range(n):
        s = world.random_scene(rng)
        item = items[i % len(items)]
        words = item["words"] or rng.sample(near_words, item["k"])
        bg = f"on {s.background} background"
        state = rng.getstate()  # the plain prompt places its words exactly where the record's go
        prompt = world.compose_prompt(s.colour, s.shape, bg, words, None, rng)
        plain = None
        if item["plain"] is not None:
            rng.setstate(state)
            plain = world.compose_prompt(s.colour, s.shape, bg, item["plain"], None, rng)
        out.append({
            "id": f"testbed/{concept}/{suite}/{i}",
            "prompt": prompt,
            "categories": [concept],
            "seed": seed + i,
            "suite": suite,
            "concept": concept,
            "word": item.get("word") or " ".join(words),
            "kind": item["kind"],
            "route_prob": item["route_prob"],
            "expected": {"colour": s.colour, "shape": s.shape, "background": s.background},
            "form_of": item.get("form_of") or " ".join(words),
            "plain_prompt": plain,
            "world": 3,
        })
    return out
