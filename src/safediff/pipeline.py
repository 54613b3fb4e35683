"""``SafePipeline``: a model plus a defense stack, running the five stages around one core.

Example:
    >>> import safediff
    >>> pipe = safediff.build(defenses='negative_prompt(text="striped")')   # doctest: +SKIP
    >>> out = pipe(["a red circle on white background, zebra"], seed=0)      # doctest: +SKIP
    >>> out.images[0].save("x.png")                                          # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from . import core, encoding
from .defenses.base import EmbeddingContext, check_config_for_model, get_defense
from .denoiser import DefendedDenoiser
from .encoding import InvertedConcept, load_inverted
from .models import Model, dtype_name
from .stack import DefenseStack
from .support import check_defenses



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
    #: the resolved stack: every option of every active defense (and the preset it came from),
    #: so a record says which concept ``sld(preset=medium)`` used; not part of the hash
    stack_config: list = field(default_factory=list)
    #: the images' size, and where and in which dtype the model ran (``"cpu"``, ``"fp32"``)
    height: int | None = None
    width: int | None = None
    device: str = ""
    dtype: str = ""

    @property
    def images(self) -> list:
        return [r.image for r in self.records]


class SafePipeline:
    """A :class:`~safediff.models.Model` with a :class:`~safediff.stack.DefenseStack` applied.

    Weight edits are applied in place when the pipeline is built (all of them or none) and
    reverted exactly by :meth:`close` (or on leaving a ``with`` block). :meth:`denoiser` builds the
    defended denoiser that generation, inversion and the white-box attacks all step with.
    """

    def __init__(self, model: Model, stack: DefenseStack, *, token_embeddings: Sequence = ()):
        """``token_embeddings``: textual-inversion files or :class:`~safediff.encoding.InvertedConcept`
        whose placeholders may appear in prompts (soft-prompt attacks, concept inversion); they
        are not defenses and do not enter the stack hash."""
        self.model = model
        self.stack = stack
        self._edits: list = []
        active = stack.active()
        self.defenses = {s: [] for s in ("prompt_filter", "embedding", "weight_edit", "guidance", "output_check")}
        specs = [(get_defense(cfg.name), cfg) for cfg in active.defenses]
        check_defenses([cfg.name for _, cfg in specs], model)  # each defense's needs vs the family's capabilities
        for _, cfg in specs:
            check_config_for_model(cfg, model)
        self.stack_hash = stack.hash(model.content_hash)
        if any(spec.stage == "weight_edit" for spec, _ in specs) and model.edited_hash is not None:
            raise ValueError("This model already carries weight edits from another SafePipeline; close() it first.")
        try:
            # 1. weight edits, all or none (a failing edit reverts the ones applied before it)
            for spec, cfg in specs:
                if spec.stage == "weight_edit":
                    d = spec.impl_cls(cfg, model)
                    self.defenses["weight_edit"].append(d)
                    self._edits.append(d.apply())
            if self._edits:
                model.edited_hash = DefenseStack(tuple(active.by_stage("weight_edit"))).hash(model.content_hash)
            # 2. the other stages, built on the edited model (their files are read and checked now,
            #    so a token inverted on this edited model loads without a transfer warning)
            for spec, cfg in specs:
                if spec.stage != "weight_edit":
                    self.defenses[spec.stage].append(spec.impl_cls(cfg, model))
            if sum(g.replaces_unconditional() for g in self.defenses["guidance"]) > 1:
                raise ValueError("At most one guidance defense may replace the unconditional embedding (negative "
                                 "prompt, INE, SAFREE's negative space); keep one of them.")
            self.token_embeddings = [t if isinstance(t, InvertedConcept) else
                                     load_inverted(t, model, edited_model_hash=model.edited_hash) for t in token_embeddings]
        except BaseException:
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
        return self._encode_text(prompts, pooled=False, warn_truncation=warn_truncation)[:3]

    def _encode_text(self, prompts: list[str], *, pooled: bool, warn_truncation: bool = False):
        """``(embeds, input_ids, mask, pooled or None)`` of ``prompts``, each text encoder running once;
        the placeholders of the pipeline's token embeddings stand for their vectors."""
        embeds, ids, mask, pool = encoding.encode_text(self.model, prompts, pooled=pooled,
                                                       warn_truncation=warn_truncation)
        if self.token_embeddings:
            embeds, ids, mask = encoding.put_token_vectors(self.model, prompts, self.token_embeddings, embeds, ids, mask)
        return embeds, ids, mask, pool

    def embedding_stage(self, prompts: list[str], embeds: torch.Tensor, input_ids: torch.Tensor, *,
                        straight_through: bool = False, unconditional: bool = True,
                        text: BatchText | None = None) -> tuple[torch.Tensor, torch.Tensor | None, EmbeddingContext]:
        """Stage 2 on ``embeds`` (the text encoder's output for ``prompts`` / ``input_ids``): every
        embedding defense in stack order. Returns ``(prompt, negative, ctx)``.

        ``straight_through``: for white-box gradients, the defenses run on a detached copy and
        the result is ``embeds + (transformed - embeds).detach()`` (BPDA, Athalye et al. 2018):
        the forward pass is the defended one, the gradient the identity.
        ``unconditional=False``: the caller uses no unconditional embedding (no classifier-free
        guidance); it is then encoded only when an embedding defense reads it, else the negative is None.
        ``text``: the batch's :class:`BatchText` (the denoiser's; default a new one)."""
        text = BatchText(self) if text is None else text
        B = embeds.shape[0]
        ids = input_ids.expand(B, -1) if input_ids.shape[0] == 1 and B > 1 else input_ids
        neg = text.unconditional(embeds)[0] if unconditional or self.defenses["embedding"] else None
        base = embeds.detach() if straight_through else embeds
        ctx = EmbeddingContext(prompts=list(prompts), input_ids=ids, attention_mask=encoding.real_token_mask(ids, self.model.tokenizer),
                               original_prompt_embeds=base, prompt_embeds=base, negative_embeds=neg, encode=text,
                               text_encoder=self.model.text_encoder, tokenizer=self.model.tokenizer)
        if self.defenses["embedding"]:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not straight_through):
                for d in self.defenses["embedding"]:
                    ctx.prompt_embeds, ctx.negative_embeds = d.transform(ctx)
        pe = embeds + (ctx.prompt_embeds - embeds).detach() if straight_through else ctx.prompt_embeds
        return pe, ctx.negative_embeds, ctx

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, EmbeddingContext]:
        """Encode ``prompts`` and run stage 2. Returns ``(prompt, negative, ctx)``."""
        embeds, ids, _ = self._encode(prompts, warn_truncation=True)
        return self.embedding_stage(prompts, embeds, ids)

    def denoiser(self, prompts: Sequence[str], *, prompt_embeds: torch.Tensor | None = None,
                 input_ids: torch.Tensor | None = None, guidance_scale: float | None = None,
                 num_steps: int | None = None, straight_through: bool = False,
                 size: tuple[int, int] | None = None, prompt_pooled: torch.Tensor | None = None) -> DefendedDenoiser:
        """The defended denoiser for ``prompts``: stage 2 (embedding defenses), the unconditional
        branch, stage 4 (guidance defenses); weight edits are the pipeline's.

        Args:
            prompt_embeds / input_ids: the text encoder's output and ids for ``prompts`` when the
                caller encoded them itself (learned vectors in the prompt); differentiable.
            guidance_scale: default the model's; ``<= 1`` gives the conditional prediction alone.
            num_steps: the sampler's step count (default the model's).
            straight_through: BPDA through the embedding stage (see :meth:`embedding_stage`).
            size: ``(height, width)`` of the images (SDXL's size conditioning; default the model's).
            prompt_pooled: SDXL: the pooled embedding of ``prompt_embeds`` when the caller encoded them
                (learned vectors in both encoders); differentiable.
        """
        prompts = list(prompts)
        gs = self.model.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        pooled = self.model.has_pooled  # a capability (the adapter's): pooled families get their added conditioning
        if pooled:
            if prompt_embeds is not None and "textual_inversion" not in self.model.capabilities:
                raise ValueError(f"Prompts with learned vectors (inversion, soft-prompt attacks) are not supported on "
                                 f"{self.model.family} models yet.")
            if prompt_embeds is not None and prompt_pooled is None:
                raise ValueError("On sdxl, prompts with learned vectors need their pooled embedding too: pass "
                                 "`prompt_pooled` (encoding.encode_sdxl_with_vectors gives both).")
        if prompt_embeds is not None and input_ids is None:
            raise ValueError("Give the `input_ids` of `prompt_embeds` (the embedding defenses read the tokens).")
        text = BatchText(self)  # each text encoder runs once per text of this batch, for tokens and pooled
        if prompt_embeds is None:
            prompt_embeds, input_ids, _, encoded_pooled = text.encode(prompts, warn_truncation=True)
            prompt_pooled = encoded_pooled if prompt_pooled is None else prompt_pooled
        # the unconditional branch is encoded only when classifier-free guidance (or an embedding defense) reads it
        pe, ne, ectx = self.embedding_stage(prompts, prompt_embeds, input_ids, straight_through=straight_through,
                                            unconditional=gs > 1, text=text)
        added = {}
        if pooled:
            h, w = size or (self.model.default_size, self.model.default_size)
            added = {"prompt_pooled": prompt_pooled, "encode_pooled": text.pooled,
                     "negative_pooled": text.unconditional(prompt_embeds, prompt_pooled)[1] if gs > 1 else None}
            added.update(self.model.adapter.added_conditioning(self.model, h, w))  # SDXL's size numbers, FLUX's ids
        return DefendedDenoiser(self.model, pe, ne, guidance=self.defenses["guidance"], guidance_scale=gs,
                                num_steps=num_steps or self.model.default_steps, prompts=prompts, embedding_ctx=ectx,
                                encode=text, original_prompt_embeds=ectx.original_prompt_embeds, **added)

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
        progress: bool | Any = False,
        seeds: Sequence[int] | None = None,
        image_ids: Sequence[tuple[int, int]] | None = None,
        allow_empty: bool = False,
    ) -> GenerationOutput:
        """Generate ``num_images_per_prompt`` images for every prompt.

        Args:
            seed: base seed: prompt ``i`` uses ``seed + i`` (no two prompts share noise), and its
                image ``k`` the seed :func:`core.imagecheck_seed(seed + i, k)`.
            seeds: one base seed per prompt (overrides ``seed``; I2P-style benchmarks carry one).
            guidance_scale / num_inference_steps: default to the model's recorded values.
            batch_size: images per UNet batch (images agree across batch sizes within float
                rounding; the runner records it).
            image_ids: one ``(seed, image_index)`` per prompt: exactly one image each (the runner
                uses it to regenerate any single image of a benchmark).
            allow_empty: accept empty prompts (the unconditional output; references, calibration).
            progress: show a progress bar that moves with every denoising step; or a tqdm bar of the
                caller's (the runner's), advanced by one per image, a step at a time.
        """
        from PIL import Image
        from tqdm.auto import tqdm

        # 1. validate, before any expensive work
        prompts = encoding.validate_prompts(prompts, allow_empty=allow_empty)
        gs = self.model.default_guidance_scale if guidance_scale is None else guidance_scale
        steps = self.model.default_steps if num_inference_steps is None else num_inference_steps
        gs = _number(gs, "guidance_scale", low=0.0)
        steps = int(_number(steps, "num_inference_steps", low=1, integer=True))
        batch_size = int(_number(batch_size, "batch_size", low=1, integer=True))
        num_images_per_prompt = int(_number(num_images_per_prompt, "num_images_per_prompt", low=1, integer=True))
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"`seeds` has {len(seeds)} entries for {len(prompts)} prompts.")
        base_seeds = [check_seed(s) for s in seeds] if seeds is not None else [check_seed(seed) + i for i in range(len(prompts))]
        h, w = self.model.check_size(height, width)
        if image_ids is not None:
            if len(image_ids) != len(prompts):
                raise ValueError(f"`image_ids` has {len(image_ids)} entries for {len(prompts)} prompts.")
            jobs = [(pi, check_seed(s), int(k)) for pi, (s, k) in enumerate(image_ids)]
        else:
            jobs = [(pi, base_seeds[pi], k) for pi in range(len(prompts)) for k in range(num_images_per_prompt)]

        # 2. prompt filter (stage 1)
        decisions = [None] * len(prompts)
        texts = list(prompts)
        for f in self.defenses["prompt_filter"]:
            for i, d in enumerate(f.check(texts, tokens=self.token_embeddings)):
                if decisions[i] is None or decisions[i].allowed:
                    if not d.allowed:
                        decisions[i] = d
                    else:
                        texts[i] = d.prompt
        records: dict[tuple[int, int], ImageRecord] = {}
        todo = []
        for pi, s, k in jobs:
            d = decisions[pi]
            if d is not None and not d.allowed:
                records[(pi, k)] = ImageRecord(prompts[pi], pi, s, k, None, refused=True, refusal_reason=d.reason)
            else:
                todo.append((pi, s, k))

        own_bar = isinstance(progress, bool)
        bar = tqdm(total=len(todo), desc="generate", disable=not progress, unit="img",
                   bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}]") if own_bar else progress
        done = bar.n
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            # 3. encode, embedding defenses (stage 2), unconditional branch and guidance (stage 4)
            den = self.denoiser([texts[pi] for pi, _, _ in chunk], guidance_scale=gs, num_steps=steps, size=(h, w))
            # 4. latents, one generator per image
            gens = [core.image_generator(s, k) for _, s, k in chunk]
            latents = core.initial_latents(self.model, gens, h, w, num_inference_steps=steps)
            # 5. denoise (weight edits already applied)
            with den:
                latents = core.sample(self.model, den, latents, num_inference_steps=steps, generators=gens,
                                      on_step=lambda i, total, n=len(chunk), base=done + start:
                                      bar.update(base + n * (i + 1) / total - bar.n))  # exact at the last step
            bar.refresh()
            imgs = core.to_uint8(core.decode(self.model, latents, size=(h, w)))
            pil = [Image.fromarray(a) for a in imgs]
            # 6. output checks (stage 5): each check's decision carries its own action
            for j, (pi, s, k) in enumerate(chunk):
                records[(pi, k)] = ImageRecord(prompts[pi], pi, s, k, pil[j])
            for oc in self.defenses["output_check"]:
                for j, dec in enumerate(oc.check(pil)):
                    rec = records[(chunk[j][0], chunk[j][2])]
                    rec.output_scores.update(dec.scores)
                    if dec.flagged:
                        rec.flagged = True
                        rec.refusal_reason = rec.refusal_reason or dec.reason
                        if dec.action == "blank":
                            rec.image = Image.fromarray(np.zeros_like(imgs[j]))
        if own_bar:
            bar.close()
        ordered = [records[(pi, k)] for pi, _, k in jobs]
        return GenerationOutput(ordered, self.stack.to_string(), self.stack_hash, self.model.content_hash, gs, steps,
                                stack_config=resolved_stack(self.stack), height=h, width=w,
                                device=str(self.model.device), dtype=dtype_name(self.model.dtype))


class BatchText:
    """One batch's text encoding: every text set (the prompts, the empty prompt, a defense's concept)
    goes through each text encoder once, its token and pooled embeddings from the same forward.

    Called as ``encode(texts) -> (embeds, input_ids, mask)``, it is the ``encode`` the defenses get;
    :meth:`pooled` is their ``encode_pooled``. Results are kept for the batch only (one denoiser).
    """

    def __init__(self, pipe: SafePipeline):
        self.pipe = pipe
        self._pooled = pipe.model.has_pooled
        self._done: dict[tuple[str, ...], tuple] = {}

    def encode(self, texts: Sequence[str], warn_truncation: bool = False) -> tuple:
        """``(embeds, input_ids, mask, pooled or None)`` of ``texts``, encoded on first request."""
        key = tuple(texts)
        if key not in self._done:
            self._done[key] = self.pipe._encode_text(list(texts), pooled=self._pooled, warn_truncation=warn_truncation)
        return self._done[key]

    def __call__(self, texts: Sequence[str], warn_truncation: bool = False) -> tuple:
        return self.encode(texts, warn_truncation)[:3]

    def pooled(self, texts: Sequence[str]) -> torch.Tensor:
        """The pooled embedding ``(B, P)`` of ``texts`` (families with one)."""
        return self.encode(texts)[3]

    def unconditional(self, embeds: torch.Tensor, pooled: torch.Tensor | None = None) -> tuple:
        """The unconditional branch for the ``B`` prompts of ``embeds``: the empty prompt's token
        embeddings and, when the prompts' ``pooled`` is given, its pooled one; zeros where the model
        says ``force_zeros_for_empty_prompt`` (SDXL base, as diffusers)."""
        if self.pipe.model.force_zeros_for_empty_prompt:
            return torch.zeros_like(embeds, requires_grad=False), None if pooled is None else torch.zeros_like(pooled)
        neg, _, _, neg_pooled = self.encode([""] * embeds.shape[0])
        return neg, None if pooled is None else neg_pooled


def resolved_stack(stack: DefenseStack) -> list[dict]:
    """Every option of every active defense, with ``preset`` where one was named (for records and
    sidecars; the stack hash is made from the same options without the preset's name)."""
    out = []
    for cfg in stack.active().defenses:
        d = cfg.record()
        if cfg.preset_name():
            d["preset"] = cfg.preset_name()
        out.append(d)
    return out


def _number(value, name: str, *, low: float, integer: bool = False):
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or value < low:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"`{name}` must be {kind} >= {low:g}, got {value!r}.")
    return value


def check_seed(value) -> int:
    """``value`` as an int if it is a valid seed (an integer in ``[0, 2**63)``), else a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) < 2**63:
        raise ValueError(f"A seed must be an integer in [0, 2**63), got {value!r}.")
    return int(value)


def build(model: Model | str | None = None, defenses=None, *, device: str | None = None,
          dtype: str | None = None) -> SafePipeline:
    """Load ``model`` (default: the shipped testbed) on ``device`` in ``dtype`` (default ``auto``:
    CUDA in fp16 when available, else the CPU in fp32) and put the ``defenses`` stack on it."""
    from .models import ensure_model

    stack = DefenseStack.parse(defenses)  # parse first: bad config fails before loading weights
    return SafePipeline(ensure_model(model, device=device, dtype=dtype), stack)
