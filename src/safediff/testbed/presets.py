"""The testbed's concepts and defense presets, registered when ``safediff`` is imported.

Production defenses never import the testbed: its concept vocabularies go to
:mod:`safediff.concepts` and its named option sets (``uce(preset=testbed-striped)``, ...) to the
defense registry (:func:`safediff.defenses.base.register_preset`). Every list here uses
**training-side** words only; held-out words never enter a defense.
"""

from __future__ import annotations

import random

from ..concepts import Vocabulary, register_vocabulary
from ..defenses.base import register_preset
from . import world

#: Benign words an edit preserves and a guard calibrates against: colours, shapes, backgrounds.
BENIGN_WORDS: tuple[str, ...] = (*world.SHAPE_COLOURS, *world.SHAPES, *world.BACKGROUNDS)


def make_prompt(words, seed: int) -> str:
    """A prompt of the world's grammar holding ``words`` (a scene drawn from ``seed``)."""
    rng = random.Random(f"prompt:{seed}")
    s = world.random_scene(rng)
    bg = f"on {s.background} background" if rng.random() < 0.7 else None
    colour = s.colour if rng.random() < 0.8 else None
    return world.compose_prompt(colour, s.shape, bg, list(words), None, rng)


def register() -> None:
    for name, c in world.CONCEPTS.items():
        register_vocabulary(Vocabulary(name=name, words=c.training_words, held_out=c.held_out,
                                       anchors=c.near_benign, preserve=BENIGN_WORDS, make_prompt=make_prompt,
                                       source="the testbed's synthetic world (safediff.testbed.world)", testbed=True))
    every = tuple(w for c in world.CONCEPTS.values() for w in c.training_words)
    for name, c in world.CONCEPTS.items():
        # SAFREE's concept space: the concept's training-side words
        register_preset("safree", f"testbed-{name}", {"space": c.training_words})
        # UCE: the name, training synonyms and triggers towards "", benign words preserved; erase_scale
        # 0.25: the budget the rule of docs/testbed.md picks (benchmarks/unlearning_presets.py)
        register_preset("uce", f"testbed-{name}", {"erase": c.training_words, "guide": ("",), "preserve": BENIGN_WORDS,
                                                    "erase_scale": 0.25})
        # RECE [INFERRED, for the tiny testbed]: a UCE start at erase_scale 1 (last-word tokens,
        # benign words preserved), then rounds with reg 0.1 preserving "" and the benign words; 1 round:
        # the budget the rule of docs/testbed.md picks
        register_preset("rece", f"testbed-{name}", {
            "erase": c.training_words, "guide": ("",), "epochs": 1, "reg": 0.1, "preserve": ("", *BENIGN_WORDS),
            "erase_scale": 1.0, "preserve_scale": 0.1, "lamb": 0.1, "targets": "kv", "uce_token_mode": "last_word",
            "uce_preserve": BENIGN_WORDS, "uce_erase_scale": 1.0, "uce_preserve_scale": 1.0, "uce_lamb": 0.5})
    # both concepts in ONE edit: stacking two single-concept UCE edits lets the second undo the
    # first's preservation (measured on testbed v1: striped prompts then drew the frame)
    register_preset("uce", "testbed-all", {"erase": every, "guide": ("",), "preserve": BENIGN_WORDS, "erase_scale": 0.25})


register()
