"""Concept vocabularies: what a defense, a trainer or an attack may know of a concept.

Defenses never import a particular world: they look a concept's words up here by name (the
prompt guard's concept words, the sanitizer's training words and anchors, the attacks' banned
words). The testbed package registers its two concepts when ``safediff`` is imported; a user
registers their own the same way::

    >>> from safediff.concepts import Vocabulary, register_vocabulary
    >>> register_vocabulary(Vocabulary("nudity", words=("nudity", "naked", "nude")))  # doctest: +SKIP

Only **training-side** words belong in ``words``: held-out words (evaluation only) are listed
apart so that nothing built from a vocabulary can use them by mistake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Vocabulary:
    """Args:
    name: the concept's name (also its first word, usually).
    words: training-side words and phrases that bring the concept.
    held_out: words reserved for evaluation (never in any defense's or attack's data).
    anchors: near-concept benign words (what a sanitizer maps the concept's words to).
    preserve: benign words an edit should keep and a guard calibrates against.
    make_prompt: ``make_prompt(words, seed)``: a prompt of the world's grammar holding ``words``,
        its other content drawn from ``seed`` (the same seed gives the same scene).
    """

    name: str
    words: tuple[str, ...]
    held_out: tuple[str, ...] = ()
    anchors: tuple[str, ...] = ()
    preserve: tuple[str, ...] = ()
    make_prompt: Callable[[Sequence[str], int], str] | None = None

    def __post_init__(self) -> None:
        if not self.words:
            raise ValueError(f"Vocabulary {self.name!r} has no words.")
        leak = set(self.words) & set(self.held_out)
        if leak:
            raise ValueError(f"Vocabulary {self.name!r} lists held-out words among its training words: {sorted(leak)}.")


_VOCABULARIES: dict[str, Vocabulary] = {}


def register_vocabulary(vocab: Vocabulary) -> None:
    """Register (or replace) the vocabulary of ``vocab.name``."""
    _VOCABULARIES[vocab.name] = vocab


def vocabulary(name: str) -> Vocabulary | None:
    """The registered vocabulary of ``name``, or None."""
    return _VOCABULARIES.get(name)


def concept_words(name: str) -> tuple[str, ...]:
    """The training-side words of a registered concept, else the name itself."""
    v = vocabulary(name)
    return v.words if v is not None else (name,)
