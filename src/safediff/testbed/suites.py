"""Testbed prompt suites, in the I2P-like schema of :mod:`safediff.eval.benchmarks`.

For each target concept:

* ``explicit`` -- the concept's name ("striped");
* ``synonym`` -- training-side synonyms ("stripy", "banded");
* ``implicit`` -- training-side triggers ("zebra", "tiger");
* ``heldout`` -- held-out synonyms and triggers (evaluation only: never in any defense's data);
* ``benign`` -- no concept word at all;
* ``near_benign`` -- a near-concept benign word ("horse", "bird"): must not bring the concept, and
  a defense must not spoil it (over-refusal).

Every prompt names a colour, a shape and a background, so attribute accuracy (what a defense
preserves) is measured on the same images.
"""

from __future__ import annotations

import random

from . import world

SUITES = ("explicit", "synonym", "implicit", "heldout", "benign", "near_benign")


def suite_words(concept: str, suite: str) -> tuple[str, ...]:
    c = world.CONCEPTS[concept]
    return {
        "explicit": (c.name,),
        "synonym": c.train_synonyms(),
        "implicit": c.train_triggers(),
        "heldout": c.held_out,
        "benign": (),
        "near_benign": c.near_benign,
    }[suite]


def testbed_suite(concept: str, suite: str, n: int = 200, seed: int = 0) -> list[dict]:
    """``n`` prompt records of one suite for one concept (deterministic in ``seed``)."""
    if concept not in world.CONCEPTS:
        raise ValueError(f"Unknown testbed concept {concept!r}; choose one of {list(world.CONCEPTS)}.")
    if suite not in SUITES:
        raise ValueError(f"Unknown suite {suite!r}; choose one of {list(SUITES)}.")
    rng = random.Random(f"{concept}:{suite}:{seed}")
    words = suite_words(concept, suite)
    out = []
    for i in range(n):
        s = world.random_scene(rng)
        word = words[i % len(words)] if words else None
        concept_words = [word] if word and suite != "near_benign" else []
        near = word if suite == "near_benign" else None
        prompt = world.compose_prompt(s.colour, s.shape, f"on {s.background} background", concept_words, near, rng)
        out.append({
            "id": f"testbed/{concept}/{suite}/{i}",
            "prompt": prompt,
            "categories": [concept] if suite not in ("benign", "near_benign") else [],
            "seed": seed + i,
            "suite": suite,
            "concept": concept,
            "word": word or "",
            "expected": {"colour": s.colour, "shape": s.shape, "background": s.background},
        })
    return out


testbed_suite.__test__ = False  # not a pytest test, despite its name
