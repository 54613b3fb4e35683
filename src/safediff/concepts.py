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
    text: the concept as one text, for defenses that take a text (``sld(concept=NAME)`` reads it);
        empty: the words joined by spaces.
    source: where the words and text come from (paper, or ``[INFERRED]``).
    testbed: True for the shipped testbed's concepts (meaningful on the testbed model only).
    """

    name: str
    words: tuple[str, ...]
    held_out: tuple[str, ...] = ()
    anchors: tuple[str, ...] = ()
    preserve: tuple[str, ...] = ()
    make_prompt: Callable[[Sequence[str], int], str] | None = None
    text: str = ""
    source: str = ""
    testbed: bool = False

    def concept_text(self) -> str:
        """The concept as one text (``text``, else the words joined by spaces)."""
        return self.text or " ".join(self.words)

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
    _register_builtin()
    return _VOCABULARIES.get(name)


def registered_concepts() -> dict[str, Vocabulary]:
    """Every registered concept by name (the real-model ones and the testbed's)."""
    _register_builtin()
    return dict(sorted(_VOCABULARIES.items()))


def concept_names(*, testbed: bool | None = None) -> list[str]:
    """Registered concept names; ``testbed`` True / False keeps only the testbed's / the others."""
    return [n for n, v in registered_concepts().items() if testbed is None or v.testbed == testbed]


#: [INFERRED] Benign words a guard calibrates against and an edit preserves on real models: common
#: subjects, places and styles of everyday prompts (people and beaches included, so that a guard
#: calibrated on them does not refuse a person or a place for being one).
REAL_BENIGN_WORDS: tuple[str, ...] = (
    "woman", "man", "child", "portrait", "person", "dog", "cat", "horse", "bird", "tree", "flower", "forest",
    "mountain", "river", "beach", "sea", "city", "street", "house", "car", "bicycle", "food", "table", "chair",
    "sky", "sunset", "painting", "photo", "landscape", "dress", "shirt", "smile",
)

_BUILTIN_DONE = False


def _register_builtin() -> None:
    """Register the real-model concepts once (lazily: their texts live with the defenses that
    published them, which import this module)."""
    global _BUILTIN_DONE
    if _BUILTIN_DONE:
        return
    _BUILTIN_DONE = True
    from .defenses.safree import NUDITY_SPACE
    from .defenses.sld import I2P_CONCEPT_ORIGINAL

    sld_words = tuple(w.strip() for w in I2P_CONCEPT_ORIGINAL.split(","))
    for v in (
        Vocabulary("i2p", words=sld_words, preserve=REAL_BENIGN_WORDS, text=I2P_CONCEPT_ORIGINAL,
                   source="SLD (Schramowski et al. 2023): the paper code's default unsafe concept, I2P's categories"),
        Vocabulary("nudity", words=("nudity", "nude", "naked", "topless", *(w.lower() for w in NUDITY_SPACE)),
                   preserve=REAL_BENIGN_WORDS, text="nudity",
                   source="SAFREE (Yoon et al. 2025) negative_prompt_space (17 strings) plus nudity/nude/naked/"
                          "topless [INFERRED]"),
        Vocabulary("violence", words=("violence", "blood", "gore", "weapons", "brutality", "cruelty", "harm",
                                      "suffering", "fight", "wound"),
                   preserve=REAL_BENIGN_WORDS, text="violence",
                   source="[INFERRED] SLD's violence-related categories plus gore/fight/wound (no paper publishes "
                          "a violence word list)"),
    ):
        _VOCABULARIES.setdefault(v.name, v)


def concept_words(name: str) -> tuple[str, ...]:
    """The training-side words of a registered concept, else the name itself."""
    v = vocabulary(name)
    return v.words if v is not None else (name,)


def concept_text(name_or_text: str) -> str:
    """A registered concept's own ``text`` (``sld(concept="i2p")``), else the given text itself
    (a testbed concept's name is its text: ``sld(concept="striped")`` guides away from "striped")."""
    v = vocabulary(name_or_text)
    return v.text if v is not None and v.text else name_or_text
