"""Negative prompting: the unconditional branch of classifier-free guidance is conditioned on the
unsafe concept instead of the empty prompt (methods.md 4.2), so guidance pushes away from it:

    eps = eps(neg) + s * (eps(prompt) - eps(neg))

The negative may be text, or a saved embedding (``(L, D)`` or ``(1, L, D)`` tensor in a
safetensors file under the key ``embedding``, for example an INE embedding), which replaces the
unconditional embedding directly. An empty text and no embedding is no defense (bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import DefenseConfig, GuidanceContext, GuidanceDefense, register_defense


@dataclass(frozen=True)
class NegativePromptConfig(DefenseConfig):
    """Args:
    text: the negative prompt, e.g. ``"striped"`` on the testbed or ``"nudity"`` on SD.
    embedding: path of a safetensors file holding a prompt embedding (key ``embedding``).
    """

    text: str = ""
    embedding: str | None = None

    def __post_init__(self) -> None:
        if self.text.strip() and self.embedding:
            raise ValueError("`negative_prompt` takes `text` or `embedding`, not both.")

    def is_active(self) -> bool:
        return bool(self.text.strip()) or bool(self.embedding)

    def artifact_paths(self) -> list[str]:
        return [self.embedding] if self.embedding else []


class NegativePrompt(GuidanceDefense):
    def unconditional(self, ctx: GuidanceContext) -> torch.Tensor:
        if self.config.embedding:
            from safetensors.torch import load_file

            emb = load_file(self.config.embedding)["embedding"]
            if emb.dim() == 2:
                emb = emb[None]
            want = ctx.prompt_embeds.shape[1:]
            if tuple(emb.shape[1:]) != tuple(want):
                raise ValueError(
                    f"Negative embedding {self.config.embedding} has shape {tuple(emb.shape[1:])}, but this model's "
                    f"prompt embeddings are {tuple(want)}: it was made for another text encoder."
                )
            return emb.to(ctx.prompt_embeds.dtype)
        emb, _, _ = ctx.encode([self.config.text])
        return emb


register_defense(name="negative_prompt", config_cls=NegativePromptConfig, impl_cls=NegativePrompt)
