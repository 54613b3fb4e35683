"""``SafePipeline``: a model plus a defense stack, running the five stages around one core.

Example:
    >>> import safediff
    >>> pipe = safediff.build(defenses='negative_prompt(text="striped")')   # doctest: +SKIP
    >>> out = pipe(["a red circle on white background, zebra"], seed=0)      # doctest: +SKIP
    >>> out.images[0].save("x.png")                                          # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from . import core
from .defenses.base import EmbeddingContext, GuidanceContext, GuidanceDefense, get_defense
from .models import Model, load_model
from .stack import DefenseStack


@dataclass
class ImageRecord:
    """One generated (or refused) image and everything needed to reproduce it."""

    prompt: str
    prompt_index: int
    seed: int
    image_index: int
    image: Any  # PIL.Image or None when refused
    refused: bool = False
    refusal_reason: str = ""
    flagged: bool = False
    output_scores: dict = field(default_factory=dict)

    def key(self, stack_hash: str) -> str:
        return f"{self.prompt_index}:{self.seed}:{self.image_index}:{stack_hash}"


@dataclass
class GenerationOutput:
    records: list[ImageRecord]
    stack: str
    stack_hash: str
    model_hash: str
    guidance_scale: float
    num_inference_steps: int

    @property
    def images(self) -> list:
        return [r.image for r in self.records]


class SafePipeline:
    """A :class:`~safediff.models.Model` with a :class:`~safediff.stack.DefenseStack` applied.

    Weight edits are applied in place when the pipeline is built and reverted exactly by
    :meth:`close` (or on leaving a ``with`` block).
    """

    def __init__(self, model: Model, stack: DefenseStack, *, token_embeddings: Sequence = ()):
        """``token_embeddings``: textual-inversion files or :class:`~safediff.inversion.InvertedConcept`
        whose placeholders may appear in prompts (soft-prompt attacks, concept inversion); they
        are not defenses and do not enter the stack hash."""
        from .inversion import InvertedConcept, load_inverted

        self.model = model
        self.stack = stack
        active = stack.active()
        self.defenses = {s: [] for s in ("prompt_filter", "embedding", "weight_edit", "guidance", "output_check")}
        for cfg in active.defenses:
            spec = get_defense(cfg.name)
            self.defenses[spec.stage].append(spec.impl_cls(cfg, model))
        n_uncond = sum(type(g).unconditional is not GuidanceDefense.unconditional for g in self.defenses["guidance"])
        if n_uncond > 1:
            raise ValueError("At most one guidance defense may replace the unconditional embedding (negative prompt / INE).")
        self.stack_hash = stack.hash(model.content_hash)
        if self.defenses["weight_edit"] and model.edited_hash is not None:
            raise ValueError("This model already carries weight edits from another SafePipeline; close() it first.")
        self._edits = [d.apply() for d in self.defenses["weight_edit"]]
        if self._edits:
            model.edited_hash = DefenseStack(tuple(active.by_stage("weight_edit"))).hash(model.content_hash)
        try:  # after the edits: a token inverted on this edited model loads without a transfer warning
            self.token_embeddings = [t if isinstance(t, InvertedConcept) else
                                     load_inverted(t, model, edited_model_hash=model.edited_hash) for t in token_embeddings]
        except Exception:
            self.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Revert every weight edit (exactly) in reverse order."""
        for h in reversed(self._edits):
            h.revert()
        if self._edits:
            self.model.edited_hash = None
        self._edits = []

    def __enter__(self) -> "SafePipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- encoding --------------------------------------------------------------------------
    def _encode(self, prompts: list[str], warn_truncation: bool = False):
        if self.token_embeddings:
            from .inversion import encode_prompts_with_tokens

            return encode_prompts_with_tokens(self.model, prompts, self.token_embeddings, warn_truncation=warn_truncation)
        return core.encode_prompts(self.model, prompts, warn_truncation=warn_truncation)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, EmbeddingContext]:
        """Stage 2: encode, then apply embedding defenses. Returns ``(prompt, negative, ctx)``."""
        embeds, ids, mask = self._encode(prompts, warn_truncation=True)
        neg, _, _ = self._encode([""] * len(prompts))
        ctx = EmbeddingContext(prompts=prompts, input_ids=ids, attention_mask=mask, original_prompt_embeds=embeds,
                               prompt_embeds=embeds, negative_embeds=neg, encode=self._encode,
                               text_encoder=self.model.text_encoder, tokenizer=self.model.tokenizer)
        for d in self.defenses["embedding"]:
            ctx.prompt_embeds, ctx.negative_embeds = d.transform(ctx)
        return ctx.prompt_embeds, ctx.negative_embeds, ctx

    # -- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        seed: int = 0,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 16,
        progress: bool = False,
        seeds: Sequence[int] | None = None,
        image_ids: Sequence[tuple[int, int]] | None = None,
    ) -> GenerationOutput:
        """Generate ``num_images_per_prompt`` images for every prompt.

        Args:
            seed: base seed; image ``k`` of a prompt uses :func:`core.image_seed(seed, k)`.
            seeds: one base seed per prompt (overrides ``seed``; I2P-style benchmarks carry one).
            guidance_scale / num_inference_steps: default to the model's recorded values.
            batch_size: images per UNet batch (does not change any image beyond float tolerance).
            image_ids: one ``(seed, image_index)`` per prompt: exactly one image each (the runner
                uses it to regenerate any single image of a benchmark).
        """
        from PIL import Image
        from tqdm.auto import tqdm

        # 1. validate, before any expensive work
        prompts = core.validate_prompts(prompts)
        gs = self.model.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        steps = self.model.default_steps if num_inference_steps is None else int(num_inference_steps)
        if steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {steps}.")
        if gs < 0:
            raise ValueError(f"`guidance_scale` must be >= 0, got {gs}.")
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be >= 1, got {num_images_per_prompt}.")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"`seeds` has {len(seeds)} entries for {len(prompts)} prompts.")
        h = height or self.model.default_size
        w = width or self.model.default_size
        if h % self.model.vae_scale_factor or w % self.model.vae_scale_factor:
            raise ValueError(f"`height` and `width` must be multiples of {self.model.vae_scale_factor}, got {h}x{w}.")
        base_seeds = list(seeds) if seeds is not None else [seed] * len(prompts)

        # 2. prompt filter (stage 1)
        decisions = [None] * len(prompts)
        texts = list(prompts)
        for f in self.defenses["prompt_filter"]:
            for i, d in enumerate(f.check(texts)):
                if decisions[i] is None or decisions[i].allowed:
                    if not d.allowed:
                        decisions[i] = d
                    else:
                        texts[i] = d.prompt
        if image_ids is not None:
            if len(image_ids) != len(prompts):
                raise ValueError(f"`image_ids` has {len(image_ids)} entries for {len(prompts)} prompts.")
            jobs = [(pi, int(s), int(k)) for pi, (s, k) in enumerate(image_ids)]
        else:
            jobs = [(pi, base_seeds[pi], k) for pi in range(len(prompts)) for k in range(num_images_per_prompt)]
        records: dict[tuple[int, int], ImageRecord] = {}
        todo = []
        for pi, s, k in jobs:
            d = decisions[pi]
            if d is not None and not d.allowed:
                records[(pi, k)] = ImageRecord(prompts[pi], pi, s, k, None, refused=True, refusal_reason=d.reason)
            else:
                todo.append((pi, s, k))

        n_batches = -(-len(todo) // batch_size)
        bar = tqdm(total=n_batches * steps, desc="generate", disable=not progress, unit="batch-step")
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            batch_prompts = [texts[pi] for pi, _, _ in chunk]
            # 3. encode + embedding defenses (stage 2)
            pe, ne, ectx = self.encode(batch_prompts)
            gctx = GuidanceContext(prompts=batch_prompts, prompt_embeds=pe, original_prompt_embeds=ectx.original_prompt_embeds,
                                   negative_embeds=ne, guidance_scale=gs, encode=self._encode, model=self.model,
                                   embedding_ctx=ectx)
            for g in self.defenses["guidance"]:
                u = g.unconditional(gctx)
                if u is not None:
                    ne = u.expand(len(chunk), -1, -1) if u.shape[0] == 1 else u
                    gctx.negative_embeds = ne
            # 4. latents, one generator per image
            gens = [core.image_generator(s, k) for _, s, k in chunk]
            latents = core.initial_latents(self.model, gens, h, w)
            # 5. denoise (weight edits already applied; guidance defenses plug in here)
            latents = core.denoise(self.model, pe, ne, latents, guidance_scale=gs, num_inference_steps=steps,
                                   guidance=self.defenses["guidance"], guidance_ctx=gctx, generators=gens, progress=bar)
            imgs = core.to_uint8(core.decode(self.model, latents))
            pil = [Image.fromarray(a) for a in imgs]
            # 6. output checks (stage 5)
            flags = [(False, {}, "")] * len(pil)
            for oc in self.defenses["output_check"]:
                for j, dec in enumerate(oc.check(pil)):
                    f, sc, r = flags[j]
                    flags[j] = (f or dec.flagged, {**sc, **dec.scores}, r or dec.reason)
            for j, (pi, s, k) in enumerate(chunk):
                f, sc, r = flags[j]
                img = pil[j]
                if f and any(getattr(oc.config, "action", "flag") == "blank" for oc in self.defenses["output_check"]):
                    img = Image.fromarray(np.zeros_like(imgs[j]))
                records[(pi, k)] = ImageRecord(prompts[pi], pi, s, k, img, flagged=f, output_scores=sc, refusal_reason=r)
        bar.close()
        ordered = [records[(pi, k)] for pi, _, k in jobs]
        return GenerationOutput(ordered, self.stack.to_string(), self.stack_hash, self.model.content_hash, gs, steps)


def build(model: Model | str | None = None, defenses=None) -> SafePipeline:
    """Load ``model`` (default: the shipped testbed) and put the ``defenses`` stack on it."""
    stack = DefenseStack.parse(defenses)  # parse first: bad config fails before loading weights
    if not isinstance(model, Model):
        model = load_model(model)
    return SafePipeline(model, stack)
