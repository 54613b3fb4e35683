"""safediff's defense stacks on stock diffusers pipelines.

``callback_on_step_end`` only sees the latents after the scheduler step, so it cannot change the
noise prediction; the seam every UNet pipeline shares is the network call itself. :func:`apply`
therefore

* builds a :class:`~safediff.pipeline.SafePipeline` on the pipeline's own components (weight edits
  are applied in place to the shared UNet / text encoder and reverted on removal),
* replaces the pipeline's ``encode_prompt`` by one that runs safediff's encoding and embedding
  stage (stage 2), and
* wraps the pipeline's ``unet`` in a module that, when the stack has guidance defenses, returns
  safediff's guided prediction ``g`` (:meth:`~safediff.denoiser.DefendedDenoiser.model_output`,
  one UNet call over ``[uncond, cond, *extras]``) as both halves ``[g, g]``: diffusers' own CFG
  ``g + s (g - g)`` is then ``g`` exactly, and ``guidance_rescale`` leaves it unchanged.

Supported: ``StableDiffusionPipeline`` on SD 1.x / 2.x (and the testbed) and
``StableDiffusionXLPipeline`` on SDXL, text-to-image, tested with diffusers ``>=0.42,<0.43`` (:data:`TESTED_DIFFUSERS`; other
versions get a warning). Refused with an error saying what to use instead: prompt filters and
output checks (stages 1 and 5 are outside the network call: use ``SafePipeline``), other pipeline
classes, ``prompt_embeds`` / ``negative_prompt`` / ``clip_skip`` / LoRA scale / IP-adapter inputs in
the call (use the ``negative_prompt(...)`` defense instead of diffusers' argument), SDXL's
``prompt_2`` and size conditioning other than diffusers' default (no crop, original = target size). Modular
pipelines' ``BaseGuidance`` guiders run one network call per condition and are not covered.

Example::

    pipe = StableDiffusionPipeline.from_pretrained(...)
    with safediff.integrations.diffusers.apply(pipe, "sld(concept=nudity, preset=max)"):
        image = pipe("a photo", generator=torch.Generator().manual_seed(0)).images[0]
    # here the pipeline is exactly the stock one again
"""

from __future__ import annotations

from typing import Any

import torch

from ..models import Model, state_dict_hash
from ..pipeline import SafePipeline
from ..stack import DefenseStack

#: the diffusers versions this adapter is tested with (it relies on the pipelines' ``encode_prompt``
#: signature and their ``unet`` call layout); :func:`apply` warns outside them
TESTED_DIFFUSERS = ">=0.42,<0.43"
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
_UNSUPPORTED_STAGES = {"prompt_filter": "prompt filters", "output_check": "output checks"}


class _DefendedUNet(torch.nn.Module):
    """The pipeline's UNet, returning safediff's guided prediction for diffusers' ``[uncond, cond]``
    batch (see the module docstring); everything else (``config``, ``dtype``, ...) is the UNet's."""

    def __init__(self, unet: torch.nn.Module, handle: "DiffusersDefense"):
        super().__init__()
        self.inner = unet
        object.__setattr__(self, "_handle", handle)  # not a submodule: no cycle in .modules()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
                *args, return_dict: bool = True, **kwargs):
        return self._handle._unet_call(self.inner, sample, timestep, encoder_hidden_states, args, kwargs, return_dict)


class DiffusersDefense:
    """A defense stack applied to one diffusers pipeline; :meth:`remove` (or leaving the ``with``
    block) restores the pipeline exactly (its ``unet``, ``encode_prompt`` and weights)."""

    def __init__(self, pipe, safe: SafePipeline):
        self.pipe = pipe
        self.safe = safe
        self._unet = pipe.__dict__["unet"]
        self._prompts: list[str] | None = None
        self._denoiser = None
        self._step = 0
        self._active = True
        # plain attribute writes: DiffusionPipeline.__setattr__ would rewrite the pipeline's config
        object.__setattr__(pipe, "unet", _DefendedUNet(self._unet, self))
        object.__setattr__(pipe, "encode_prompt", self._encode_prompt)

    # -- lifecycle ------------------------------------------------------------------------------
    def remove(self) -> None:
        """Give the pipeline back its own UNet and ``encode_prompt`` and revert the weight edits."""
        if not self._active:
            return
        self._finish()
        object.__setattr__(self.pipe, "unet", self._unet)
        self.pipe.__dict__.pop("encode_prompt", None)
        self.safe.close()
        self._active = False

    def __enter__(self) -> "DiffusersDefense":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _finish(self) -> None:
        if self._denoiser is not None:
            self._denoiser.__exit__(None, None, None)
            self._denoiser = None

    # -- the two seams --------------------------------------------------------------------------
    def _encode_prompt(self, prompt, *args, **kwargs):
        """diffusers' ``encode_prompt`` (SD's or SDXL's signature), through safediff's encoding and
        embedding stage."""
        pooled = self.safe.model.has_pooled
        names = (("prompt_2", "device", "num_images_per_prompt", "do_classifier_free_guidance", "negative_prompt",
                  "negative_prompt_2", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                  "negative_pooled_prompt_embeds", "lora_scale", "clip_skip") if pooled else
                 ("device", "num_images_per_prompt", "do_classifier_free_guidance", "negative_prompt", "prompt_embeds",
                  "negative_prompt_embeds", "lora_scale", "clip_skip"))
        call = {"num_images_per_prompt": 1, "do_classifier_free_guidance": True, **dict(zip(names, args)), **kwargs}
        device, num_images_per_prompt = call.get("device"), call["num_images_per_prompt"]
        do_classifier_free_guidance = call["do_classifier_free_guidance"]
        bad = [k for k in names if k not in ("device", "num_images_per_prompt", "do_classifier_free_guidance")
               and call.get(k) is not None]
        if bad or prompt is None:
            raise ValueError(f"With a safediff stack applied, call the pipeline with text prompts only (got {bad or 'no prompt'}); "
                             "use the `negative_prompt(text=...)` defense instead of diffusers' `negative_prompt`, or "
                             "remove the stack (handle.remove()) for embeddings of your own.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self._prompts = [p for p in prompts for _ in range(int(num_images_per_prompt))]  # diffusers' layout
        self._finish()  # a generation interrupted before its last step
        self._step = 0
        from ..pipeline import BatchText

        text = BatchText(self.safe)  # each text encoder once per text: tokens and pooled from one forward
        embeds, ids, _, pp = text.encode(self._prompts, warn_truncation=True)
        pe, ne, _ = self.safe.embedding_stage(self._prompts, embeds, ids, unconditional=do_classifier_free_guidance,
                                              text=text)
        pe, ne = pe.to(device), (ne.to(device) if do_classifier_free_guidance else None)
        if not pooled:
            return pe, ne
        npool = text.unconditional(embeds, pp)[1] if do_classifier_free_guidance else None
        return pe, ne, pp.to(device), (None if npool is None else npool.to(device))

    def _unet_call(self, unet, sample, timestep, hidden, args, kwargs, return_dict):
        if not self.safe.defenses["guidance"]:  # stage 2 was in encode_prompt: the call is diffusers' own
            return unet(sample, timestep, hidden, *args, return_dict=return_dict, **kwargs)
        added = kwargs.pop("added_cond_kwargs", None) or {}
        model = self.safe.model
        size = (sample.shape[-2] * model.vae_scale_factor, sample.shape[-1] * model.vae_scale_factor)
        if model.has_pooled:  # SDXL: the pooled embeddings are the denoiser's; the size numbers must be its default
            from ..encoding import sdxl_time_ids

            ids = added.get("time_ids")
            if set(added) != {"text_embeds", "time_ids"} or ids is None or not torch.equal(
                    ids.to("cpu", torch.float64), sdxl_time_ids(*size).to(torch.float64).expand_as(ids)):
                raise ValueError("safediff's guidance defenses on SDXL support diffusers' default size conditioning only "
                                 "(no original_size / crops_coords_top_left / target_size / IP-adapter); use SafePipeline.")
        elif added:
            kwargs["added_cond_kwargs"] = added
        extra = [k for k in ("cross_attention_kwargs", "added_cond_kwargs", "down_block_additional_residuals",
                             "mid_block_additional_residual", "down_intrablock_additional_residuals")
                 if kwargs.get(k) is not None]
        if args or extra or kwargs.get("timestep_cond") is not None:
            raise ValueError(f"safediff's guidance defenses on a diffusers pipeline support plain text-to-image calls only "
                             f"(got {extra or 'extra UNet inputs'}); use SafePipeline for this.")
        if self._prompts is None or not getattr(self.pipe, "do_classifier_free_guidance", False):
            raise ValueError("safediff's guidance defenses need classifier-free guidance: call the pipeline with a text "
                             "prompt and guidance_scale > 1.")
        sched = self.pipe.scheduler
        B = len(self._prompts)
        if sample.shape[0] != 2 * B:
            raise ValueError(f"Expected diffusers' [uncond, cond] batch of {2 * B} latents, got {sample.shape[0]}.")
        if self._step == 0:
            self._finish()
            steps = int(getattr(sched, "num_inference_steps", None) or len(sched.timesteps))
            self._denoiser = self.safe.denoiser(self._prompts, guidance_scale=float(self.pipe.guidance_scale),
                                                num_steps=steps, size=size).__enter__()
        i = self._step
        if i >= len(sched.timesteps) or float(sched.timesteps[i]) != float(timestep):
            raise ValueError("The pipeline does not step through its scheduler's timesteps from the first one (img2img, "
                             "custom loops); safediff's guidance windows would be misplaced. Use SafePipeline.")
        x = sample.chunk(2)[0]  # both halves are the same scaled latents
        guided = self._denoiser.model_output(x, timestep, i).to(sample.dtype)
        self._step += 1
        if self._step == len(sched.timesteps):
            self._finish()
        out = torch.cat([guided, guided])  # diffusers' CFG of [g, g] is g, exactly
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
            return UNet2DConditionOutput(sample=out)
        return (out,)


def model_from_pipeline(pipe) -> Model:
    """A safediff :class:`~safediff.models.Model` sharing a stock diffusers pipeline's components
    (no copy: weight edits of a stack change the pipeline's own modules)."""
    from ..families import detect

    name = type(pipe).__name__
    if name not in SUPPORTED_PIPELINES:
        raise ValueError(f"safediff's diffusers adapter supports {list(SUPPORTED_PIPELINES)}, not {name}; load the "
                         "model with safediff.load_model(...) and use SafePipeline.")
    index = {k: list(v) for k, v in pipe.config.items() if isinstance(v, (list, tuple))}
    family = detect(index, dict(pipe.unet.config), {}).name
    content = state_dict_hash(pipe.unet)[:16] + state_dict_hash(pipe.text_encoder)[:16]
    extra = {}
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL
        extra = {"text_encoder_2": pipe.text_encoder_2, "tokenizer_2": pipe.tokenizer_2,
                 "force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", True))}
    return Model(unet=pipe.unet, text_encoder=pipe.text_encoder, vae=pipe.vae, tokenizer=pipe.tokenizer,
                 scheduler=pipe.scheduler, family=family, source=f"diffusers {name}", content_hash=content, **extra)


def apply(pipe, stack: DefenseStack | str, *, model: Model | None = None) -> DiffusersDefense:
    """Apply a safediff defense stack to a stock diffusers ``pipe``; returns a handle whose
    :meth:`~DiffusersDefense.remove` (or ``with`` block) restores the pipeline exactly.

    Args:
        pipe: a ``StableDiffusionPipeline`` (SD 1.x / 2.x) or ``StableDiffusionXLPipeline``, diffusers
            :data:`TESTED_DIFFUSERS`.
        stack: a :class:`~safediff.stack.DefenseStack` or its string (``"sld(concept=nudity, preset=max)"``).
        model: the safediff :class:`~safediff.models.Model` whose components ``pipe`` shares
            (``model.to_diffusers()``); default one built from ``pipe``'s own components.

    Raises:
        ValueError: an unsupported pipeline, a stack with a prompt filter or an output check (use
            :class:`~safediff.pipeline.SafePipeline`), a pipeline already carrying a stack, or a
            ``model`` whose components are not the pipeline's.
    """
    name = type(pipe).__name__
    if name not in SUPPORTED_PIPELINES:
        raise ValueError(f"safediff's diffusers adapter supports {list(SUPPORTED_PIPELINES)}, not {name}; load the "
                         "model with safediff.load_model(...) and use SafePipeline.")
    _check_version()
    if isinstance(pipe.__dict__.get("unet"), _DefendedUNet):
        raise ValueError("This pipeline already carries a safediff stack; remove() it first.")
    stack = DefenseStack.parse(stack) if isinstance(stack, str) else stack
    from ..defenses.base import get_defense

    stages = {cfg.name: get_defense(cfg.name).stage for cfg in stack.active().defenses}
    bad = {n: s for n, s in stages.items() if s in _UNSUPPORTED_STAGES}
    if bad:
        what = ", ".join(f"`{n}` ({_UNSUPPORTED_STAGES[s][:-1]})" for n, s in bad.items())
        raise ValueError(f"The diffusers adapter applies embedding, weight-edit and guidance defenses only; {what} act "
                         "outside the network call: use safediff's SafePipeline for stacks with them.")
    if model is None:
        model = model_from_pipeline(pipe)
    elif any(getattr(model, c) is not getattr(pipe, c) for c in ("unet", "text_encoder", "tokenizer", "scheduler")):
        raise ValueError("`model` does not share this pipeline's components; pass the pipeline made by "
                         "model.to_diffusers(), or leave `model` out.")
    return DiffusersDefense(pipe, SafePipeline(model, stack))


def _check_version() -> None:
    """Warn when the installed diffusers is outside :data:`TESTED_DIFFUSERS`."""
    import warnings

    import diffusers
    from packaging.specifiers import SpecifierSet

    if diffusers.__version__ not in SpecifierSet(TESTED_DIFFUSERS, prereleases=True):
        warnings.warn(f"safediff's diffusers adapter is tested with diffusers {TESTED_DIFFUSERS}, not "
                      f"{diffusers.__version__}; compare a few images with SafePipeline's before relying on it.",
                      stacklevel=3)
