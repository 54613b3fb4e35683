"""Negative prompting (methods.md 4.2) and its INE form (methods.md 1).

The unconditional branch of classifier-free guidance is conditioned on the unsafe concept instead
of the empty prompt, so guidance pushes away from it::

    eps = eps(neg) + s * (eps(prompt) - eps(neg))

The negative may be

* text (``text="striped"``);
* an **implicit negative embedding** (INE): a textual-inversion file made by
  :func:`safediff.inversion.invert` against an unlearned model (``embedding=FILE``); the negative
  prompt is then the file's placeholder token (or ``text`` containing it);
* a saved prompt embedding (safetensors with key ``embedding``, ``(L, D)`` or ``(1, L, D)``).

An empty text and no embedding is no defense (skipped, bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import option
from .base import DefenseConfig, GuidanceContext, GuidanceDefense, register_defense


@dataclass(frozen=True)
class NegativePromptConfig(DefenseConfig):
    """Args:
    text: the negative prompt, e.g. ``"striped"`` on the testbed or ``"nudity"`` on SD; with an
        INE file it may contain the file's placeholder token.
    embedding: an INE / textual-inversion file, or a prompt-embedding file (key ``embedding``).
    allow_other_base: use an embedding made on another base model (refused by default).
    """

    #: conformance (tests/test_conformance.py): stack texts at zero strength and an acting one
    zero_strength = ('negative_prompt(text="")',)
    acting_example = 'negative_prompt(text="zebra, \\"striped\\"")'

    text: str = option("", help="the negative prompt")
    embedding: str | None = option(None, help="an INE / textual-inversion or prompt-embedding file")
    allow_other_base: bool = option(False, help="use an embedding made on another base model")

    menu = {"negative prompt": 'negative_prompt(text="{concept}")'}

    def is_active(self) -> bool:
        return bool(self.text.strip()) or bool(self.embedding)

    def artifact_paths(self) -> list[str]:
        return [self.embedding] if self.embedding else []


class ConceptEmbeddingFile:
    """A concept given as a file: an INE / textual-inversion file (its placeholder stands for the
    learned vectors) or a prompt-embedding file (key ``embedding``, ``(L, D)`` or ``(1, L, D)``).

    Read and checked against the model when the defense is built (a missing, empty, corrupt or
    mismatched file fails before any generation); encoded once per generation. Shared by every
    defense that takes a concept as an embedding (negative prompt, SLD)."""

    def __init__(self, path: str, model, *, allow_other_base: bool = False):
        from ..artifacts import read_artifact
        from ..encoding import load_inverted

        tensors, _ = read_artifact(path)
        self.path, self.model = path, model
        self.prompt_embedding: torch.Tensor | None = None
        self.inverted = None
        if list(tensors) == ["embedding"]:
            emb = tensors["embedding"]
            emb = emb[None] if emb.dim() == 2 else emb
            want = (model.tokenizer.model_max_length, model.text_encoder.config.hidden_size)
            if tuple(emb.shape[1:]) != want:
                raise ValueError(f"Embedding {path} has shape {tuple(emb.shape[1:])}, but this model's prompt "
                                 f"embeddings are {want}: it was made for another text encoder.")
            self.prompt_embedding = emb.to(model.dtype)
        else:
            self.inverted = load_inverted(path, model, allow_other_base=allow_other_base,
                                          edited_model_hash=getattr(model, "edited_hash", None))

    def encode(self, text: str = "") -> torch.Tensor:
        """``(1, L, D)``: the prompt embedding, or ``text`` (default: the placeholder alone) encoded
        with the placeholder standing for the learned vectors."""
        if self.prompt_embedding is not None:
            if text.strip():
                raise ValueError(f"{self.path} is a prompt embedding; it cannot be combined with `text`.")
            return self.prompt_embedding
        return self.inverted.encode(self.model, [text if text.strip() else self.inverted.placeholder])

    def encode_pooled(self, text: str = "") -> torch.Tensor | None:
        """SDXL: the pooled embedding of what :meth:`encode` encodes (None for a prompt-embedding
        file, which carries none)."""
        if self.inverted is None:
            return None
        return self.inverted.encode(self.model, [text if text.strip() else self.inverted.placeholder], pooled=True)


class NegativePrompt(GuidanceDefense):
    def __init__(self, config: NegativePromptConfig, model):
        super().__init__(config, model)
        self.file = (ConceptEmbeddingFile(config.embedding, model, allow_other_base=config.allow_other_base)
                     if config.embedding else None)

    def replaces_unconditional(self) -> bool:
        return True

    def unconditional(self, ctx: GuidanceContext) -> torch.Tensor:
        if self.file is not None:
            return self.file.encode(self.config.text)
        emb, _, _ = ctx.encode([self.config.text])
        return emb

    def unconditional_pooled(self, ctx: GuidanceContext) -> torch.Tensor | None:
        # SDXL: a text negative prompt is encoded by both encoders, as diffusers' `negative_prompt`;
        # a textual-inversion file in SDXL's layout (clip_l, clip_g) through both too; a saved
        # prompt embedding carries no pooled vector (refused)
        if self.file is not None:
            return self.file.encode_pooled(self.config.text)
        if ctx.encode_pooled is None:
            return None
        return ctx.encode_pooled([self.config.text])


register_defense(name="negative_prompt", config_cls=NegativePromptConfig, impl_cls=NegativePrompt)
