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

Every prompt names a colour, a shape and a background, so attribute accuracy (what a defense
preserves) is measured on the same images. Each record carries the route it uses (``word``,
``kind``, the route's data probability ``route_prob``), so per-word rates can be read off.
"""

from __future__ import annotations

import random

from . import world

SUITES = ("explicit", "synonym", "implicit", "heldout", "benign", "near_benign")


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
    if suite not in SUITES:
        raise ValueError(f"Unknown suite {suite!r}; choose one of {list(SUITES)}.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be an integer >= 1, got {n!r}.")
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
