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

from .base import DefenseConfig, GuidanceContext, GuidanceDefense, register_defense


@dataclass(frozen=True)
class NegativePromptConfig(DefenseConfig):
    """Args:
    text: the negative prompt, e.g. ``"striped"`` on the testbed or ``"nudity"`` on SD; with an
        INE file it may contain the file's placeholder token.
    embedding: an INE / textual-inversion file, or a prompt-embedding file (key ``embedding``).
    allow_other_base: use an embedding made on another base model (refused by default).
    """

    text: str = ""
    embedding: str | None = None
    allow_other_base: bool = False

    def is_active(self) -> bool:
        return bool(self.text.strip()) or bool(self.embedding)

    def artifact_paths(self) -> list[str]:
        return [self.embedding] if self.embedding else []


def embedding_from_file(path: str, text: str, ctx: GuidanceContext, allow_other_base: bool = False) -> torch.Tensor:
    """``(1, L, D)`` conditioning from an INE/textual-inversion file or a prompt-embedding file.

    Shared by every defense that takes a concept as an embedding (negative prompt, SLD, SAFREE).
    """
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
    want = tuple(ctx.prompt_embeds.shape[1:])
    if keys == ["embedding"]:
        from safetensors.torch import load_file

        if text.strip():
            raise ValueError(f"{path} is a prompt embedding; it cannot be combined with `text`.")
        emb = load_file(path)["embedding"]
        emb = emb[None] if emb.dim() == 2 else emb
        if tuple(emb.shape[1:]) != want:
            raise ValueError(f"Embedding {path} has shape {tuple(emb.shape[1:])}, but this model's prompt embeddings "
                             f"are {want}: it was made for another text encoder.")
        return emb.to(ctx.prompt_embeds.dtype)
    from ..encoding import load_inverted

    concept = load_inverted(path, ctx.model, allow_other_base=allow_other_base,
                            edited_model_hash=getattr(ctx.model, "edited_hash", None))
    return concept.encode(ctx.model, [text if text.strip() else concept.placeholder])


class NegativePrompt(GuidanceDefense):
    def replaces_unconditional(self) -> bool:
        return True

    def unconditional(self, ctx: GuidanceContext) -> torch.Tensor:
        if self.config.embedding:
            return embedding_from_file(self.config.embedding, self.config.text, ctx, self.config.allow_other_base)
        emb, _, _ = ctx.encode([self.config.text])
        return emb


register_defense(name="negative_prompt", config_cls=NegativePromptConfig, impl_cls=NegativePrompt)
