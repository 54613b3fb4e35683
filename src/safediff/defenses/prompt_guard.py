"""A Latent-Guard-style prompt guard (prompt-filter stage).

Flags or refuses a prompt any of whose words lies near a target concept in the model's own text
embedding space: the score of a prompt is ``max over its words w and concept words c of
cos(pool(w), pool(c))`` with ``pool`` the text encoder's pooled embedding of the word alone. A
word holding a learned token's placeholder (textual inversion loaded into the pipeline) is pooled
with the token's vectors, as the model encodes it, never by the characters of its name.

The threshold is **calibrated on training-side words only** (:func:`calibrate_threshold`): the
concept's training words are the positives (leave-one-out: each scored against the *other*
training words, since a word always matches itself), and a benign vocabulary the negatives; the
threshold is the midpoint that best separates them. Held-out words are never used: they measure
how far the guard generalises.

[INFERRED] Latent Guard (Liu et al. 2024) learns an embedding mapping on top of the text
encoder; this guard uses the text encoder's space directly, which needs no training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..encoding import clip_ids, clip_pooled, encode_with_vectors
from ..options import option
from .base import DefenseConfig, FilterDecision, PromptFilterDefense, register_defense


def _pooled_words(model, words) -> torch.Tensor:
    ids = clip_ids(model.tokenizer, words)
    with torch.no_grad():
        p = clip_pooled(model.text_encoder(ids.to(model.text_encoder.device))).float()
    return torch.nn.functional.normalize(p, dim=-1)


def word_scores(model, words, concept_words) -> torch.Tensor:
    """cos(pool(w), pool(c)) maximised over concept words, for each word."""
    return (_pooled_words(model, words) @ _pooled_words(model, concept_words).T).max(1).values


def calibrate_threshold(model, concept_words, benign_words) -> float:
    """Midpoint between positives (leave-one-out training words) and negatives that maximises
    balanced accuracy. Training-side words only."""
    cw = list(concept_words)
    if len(cw) < 2:
        raise ValueError("Calibration needs at least two training words per concept (leave-one-out).")
    pc = _pooled_words(model, cw)
    sim = pc @ pc.T
    sim.fill_diagonal_(-1.0)
    pos = sim.max(1).values
    neg = word_scores(model, benign_words, cw)
    cands = torch.sort(torch.cat([pos, neg])).values
    mids = (cands[1:] + cands[:-1]) / 2
    best, thr = -1.0, float(mids[0]) if len(mids) else 0.5
    for m in mids:
        acc = 0.5 * ((pos >= m).float().mean() + (neg < m).float().mean())
        if acc > best:
            best, thr = float(acc), float(m)
    return thr


@dataclass(frozen=True)
class PromptGuardConfig(DefenseConfig):
    """Args:
    concepts: names of registered concepts (:mod:`safediff.concepts`, listed by ``safediff
        concepts``: their training-side words are used and their benign words calibrate), or
        explicit concept words. The default ``("striped", "caged")`` applies on the testbed only;
        on any other model it must be given (e.g. ``concepts=["nudity", "violence"]``).
    threshold: cosine threshold; None calibrates it on training-side words at build time.
    benign_words: negatives for calibration (default: the registered concepts' ``preserve`` words).
    action: ``"refuse"`` (no image is generated) or ``"flag"`` (generated, flagged in the record).
    enabled: False skips the guard.
    """

    #: conformance (tests/test_conformance.py): stack texts at zero strength and an acting one
    zero_strength = ('prompt_guard(concepts=["zebra"], enabled=false)',)
    acting_example = 'prompt_guard(concepts=["zebra", "nudity"], threshold=0.9)'

    concepts: tuple[str, ...] = option(("striped", "caged"), min_items=1, why="name a concept to guard against",
                                       help="registered concepts or explicit concept words")
    threshold: float | None = option(None, low=-1, high=1, why="it is a cosine",
                                     help="cosine threshold (null: calibrated at build time)")
    benign_words: tuple[str, ...] = option((), help="negatives for calibration")
    action: str = option("refuse", choices=("refuse", "flag"), help="refuse (no image) or flag (in the record)")
    enabled: bool = option(True, help="False skips the guard")

    menu = {"prompt guard": 'prompt_guard(concepts=["{concept}"])'}

    #: options whose defaults name the testbed's concepts (refused unset on other models)
    testbed_defaults: ClassVar[tuple[str, ...]] = ("concepts",)

    def is_active(self) -> bool:
        return self.enabled


class PromptGuard(PromptFilterDefense):
    def __init__(self, config: PromptGuardConfig, model):
        super().__init__(config, model)
        from ..concepts import concept_words, vocabulary

        self.concept_words: dict[str, list[str]] = {c: list(concept_words(c)) for c in config.concepts}
        registered = [vocabulary(c).preserve for c in config.concepts if vocabulary(c) is not None]
        benign = list(config.benign_words) or list(dict.fromkeys(w for ws in registered for w in ws))
        if not benign and config.threshold is None:
            raise ValueError("`prompt_guard` needs benign words to calibrate its threshold: give `benign_words` or a "
                             "`threshold`, or name a registered concept (`safediff concepts` lists them).")
        self.thresholds = {c: config.threshold if config.threshold is not None else
                           calibrate_threshold(model, ws, benign) for c, ws in self.concept_words.items()}

    def score(self, prompt: str, tokens: Sequence = ()) -> dict[str, float]:
        """The prompt's score per concept. A word that holds a learned token's placeholder (``tokens``:
        the pipeline's textual-inversion tokens) is pooled with the token's vectors in its place, as
        the model encodes it; its name's characters are not read."""
        words = [w for w in prompt.replace(",", " ").split() if w]
        plain, vecs = [], []
        for w in words:
            t = next((t for t in tokens if t.placeholder in w), None)
            if t is None:
                plain.append(w.lower())
                continue
            with torch.no_grad():
                v = encode_with_vectors(self.model, [w], t.placeholder, t.vectors, pooled=True).float()
            vecs.append(torch.nn.functional.normalize(v, dim=-1))
        if plain:
            vecs.append(_pooled_words(self.model, plain))
        if not vecs:
            return {c: -1.0 for c in self.concept_words}
        w_all = torch.cat(vecs)
        return {c: float((w_all @ _pooled_words(self.model, ws).T).max()) for c, ws in self.concept_words.items()}

    def check(self, prompts: list[str], tokens: Sequence = ()) -> list[FilterDecision]:
        out = []
        for p in prompts:
            scores = self.score(p, tokens)
            hits = [c for c, v in scores.items() if v >= self.thresholds[c]]
            if hits and self.config.action == "refuse":
                out.append(FilterDecision(False, p, reason=f"prompt is close to the concept(s) {hits} "
                                                           f"(scores {', '.join(f'{c}={scores[c]:.2f}' for c in hits)})",
                                          score=max(scores.values())))
            else:
                out.append(FilterDecision(True, p, reason=f"flagged: {hits}" if hits else "", score=max(scores.values())))
        return out


register_defense(name="prompt_guard", config_cls=PromptGuardConfig, impl_cls=PromptGuard)
