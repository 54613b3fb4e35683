"""The defended denoiser: the one guided step of every defense, written once.

Like k-diffusion's ``CFGDenoiser``, guidance wraps the model function. A
:class:`DefendedDenoiser` holds one generation's conditionings (the prompt embedding after the
embedding stage, the unconditional branch, every guidance defense's extra conditionings) and the
per-generation state of its guidance defenses; called at ``(x_t, t)`` it makes **one** UNet call
over ``[uncond, cond, *extras]`` and returns

* :meth:`~DefendedDenoiser.epsilon` -- the guided noise prediction, differentiable in the prompt
  embedding (white-box attacks and inversion take gradients through it), and
* :meth:`~DefendedDenoiser.model_output` -- the same prediction in the model's own
  parametrisation, for the scheduler.

With no active guidance defense the model output is classifier-free guidance computed exactly as
diffusers' ``StableDiffusionPipeline`` computes it (``out_u + s (out_c - out_u)`` in the model's
parametrisation, batch layout ``[uncond, cond]``), so images match diffusers' bit for bit. With
guidance defenses, every rule acts in epsilon space (:func:`safediff.core.to_epsilon`) and only
their change is converted back (the conversion is affine in the output).

The sampler (:func:`safediff.core.sample`), inversion through guidance, P4D, UnlearnDiffAtk,
ESD's ``x_t`` sampling and relearning all call it; a :class:`~safediff.pipeline.SafePipeline`
builds it (:meth:`~safediff.pipeline.SafePipeline.denoiser`).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from . import core
from .defenses.base import EmbeddingContext, GuidanceContext, GuidanceDefense, StepInfo


class DefendedDenoiser:
    """One generation's guided noise prediction (see the module docstring).

    Use it as a context manager: entering applies the guidance defenses' model patches (e.g.
    SAFREE's FreeU), leaving removes them, also after an exception.

    Args:
        model: the :class:`~safediff.models.Model` (weight edits already applied by the pipeline).
        prompt_embeds: ``(B, L, D)`` the prompt embedding after the embedding stage.
        negative_embeds: ``(B, L, D)`` the unconditional embedding (empty prompt); None without
            classifier-free guidance (``guidance_scale <= 1``), where no branch reads it.
        guidance: the active guidance defenses, in stack order.
        guidance_scale: the classifier-free guidance scale; ``<= 1`` gives the conditional
            prediction alone (no guidance defense may then be present).
        num_steps: the sampler's step count (windows of guidance rules are fractions of it).
        prompts: the prompt texts; ``embedding_ctx``: what the embedding stage produced;
            ``encode``: the pipeline's text encoding (guidance defenses encode their concepts).
        prompt_pooled / negative_pooled / time_ids: SDXL's added conditioning (the pooled text
            embedding of the prompt and of the unconditional branch, ``(B, P)`` (the latter None
            without classifier-free guidance), and the six
            size/crop numbers, ``(6,)``); SD3 and FLUX take the pooled embeddings only; None for
            models without them.
        image_ids: FLUX's position ids of the packed latent tokens (:func:`safediff.core.latent_image_ids`).
    """

    def __init__(self, model, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, *,
                 guidance: Sequence[GuidanceDefense] = (), guidance_scale: float, num_steps: int,
                 prompts: Sequence[str] = (), embedding_ctx: EmbeddingContext | None = None, encode=None,
                 original_prompt_embeds: torch.Tensor | None = None, prompt_pooled: torch.Tensor | None = None,
                 negative_pooled: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                 encode_pooled=None, image_ids: torch.Tensor | None = None):
        self.model = model
        self.guidance = list(guidance)
        self.guidance_scale = float(guidance_scale)
        self.num_steps = int(num_steps)
        self.do_cfg = self.guidance_scale > 1.0
        if not self.do_cfg and any(g.needs_cfg for g in self.guidance):
            raise ValueError(f"Guidance defenses need classifier-free guidance, but `guidance_scale` is "
                             f"{self.guidance_scale} (<= 1).{model.adapter.cfg_hint}")
        if self.do_cfg and negative_embeds is None:
            raise ValueError(f"Classifier-free guidance (guidance_scale {self.guidance_scale} > 1) needs the "
                             "unconditional embedding: pass `negative_embeds`.")
        if "packed_latents" in model.capabilities and image_ids is None:
            raise ValueError("A flux model needs the position ids of its packed latent tokens (`image_ids`).")
        self._image_ids = image_ids
        B = prompt_embeds.shape[0]
        self.batch_size = B
        ctx = GuidanceContext(prompts=list(prompts), prompt_embeds=prompt_embeds,
                              original_prompt_embeds=prompt_embeds if original_prompt_embeds is None else original_prompt_embeds,
                              negative_embeds=negative_embeds, guidance_scale=self.guidance_scale, encode=encode,
                              model=model, embedding_ctx=embedding_ctx, num_steps=self.num_steps,
                              encode_pooled=encode_pooled)
        pooled = getattr(model, "has_pooled", False)  # a capability of the model's family adapter, not a family name
        if pooled and (prompt_pooled is None or (negative_pooled is None and self.do_cfg)
                       or (time_ids is None and "size_conditioning" in model.capabilities)):
            raise ValueError(f"A {model.family} model needs the pooled embeddings (and on SDXL the time ids) of its "
                             "added conditioning.")
        for g in self.guidance:  # the pipeline allows at most one defense that replaces it
            u = g.unconditional(ctx)
            if u is not None:
                ctx.negative_embeds = _batch(u, B).to(prompt_embeds.dtype)
                if pooled:
                    negative_pooled = g.unconditional_pooled(ctx)
                    if negative_pooled is None:
                        raise ValueError(f"`{g.name}` cannot give {model.family}'s pooled unconditional embedding "
                                         f"(not supported on {model.family} yet).")
        self.names: list[str] = []
        extras: list[torch.Tensor] = []
        extra_pooled: list[torch.Tensor] = []
        for g in self.guidance:
            conds = g.conditionings(ctx)
            if conds and pooled:
                pc = g.conditionings_pooled(ctx)
                if pc is None or set(pc) != set(conds):
                    raise ValueError(f"`{g.name}` cannot give the pooled embeddings of its conditionings; it is not "
                                     f"supported on {model.family} yet.")
                extra_pooled += [pc[name] for name in conds]
            for name, emb in conds.items():
                if name in ("uncond", "cond") or name in self.names:
                    raise ValueError(f"Two guidance defenses ask for a conditioning named {name!r}; names must be unique.")
                self.names.append(name)
                extras.append(_batch(emb, B).to(prompt_embeds.dtype))
        self.states = [g.new_state(ctx) for g in self.guidance]
        self.context = ctx
        self._conds = [ctx.negative_embeds, prompt_embeds, *extras] if self.do_cfg else [prompt_embeds]
        self.conditioning = torch.cat(self._conds) if len(self._conds) > 1 else prompt_embeds
        self._pooled = self._time_ids = None
        if pooled:
            dt = prompt_embeds.dtype
            self._pooled = ([_batch(p, B).to(dt) for p in (negative_pooled, prompt_pooled, *extra_pooled)]
                            if self.do_cfg else [_batch(prompt_pooled, B).to(dt)])
            self._time_ids = (None if time_ids is None else
                              torch.as_tensor(time_ids, dtype=dt, device=prompt_embeds.device).reshape(1, -1))
        self._patches: contextlib.ExitStack | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "DefendedDenoiser":
        stack = contextlib.ExitStack()
        try:
            for g in self.guidance:
                stack.enter_context(g.patch(self.model))
        except BaseException:
            stack.close()
            raise
        self._patches = stack
        return self

    def __exit__(self, *exc) -> None:
        if self._patches is not None:
            self._patches.close()
            self._patches = None

    # -- the step -------------------------------------------------------------------------------
    def _predict(self, x_t: torch.Tensor, t, index: int | None, want_native: bool):
        """One UNet call; returns ``(native, eps)``: the guided prediction in the model's
        parametrisation and in epsilon space (only the one asked for is guaranteed)."""
        model = self.model
        n = len(self._conds)
        cond = self.conditioning
        if x_t.shape[0] != self.batch_size:  # one prompt for a batch of x_t (a loss over many draws)
            if self.batch_size != 1:
                raise ValueError(f"The denoiser holds {self.batch_size} prompts but got {x_t.shape[0]} latents.")
            cond = torch.cat([c.expand(x_t.shape[0], -1, -1) for c in self._conds])
        x_in = torch.cat([x_t] * n) if n > 1 else x_t
        x_in = x_in.to(model.dtype)  # the network runs in the model's dtype; the latents may be fp32
        t_in = t.repeat(n) if torch.is_tensor(t) and t.dim() > 0 and n > 1 else t
        pt = model.prediction_type
        # the pooled embedding per branch (families with one), then the family's own network call
        pooled_in = None if self._pooled is None else torch.cat([_batch(p, x_t.shape[0]) for p in self._pooled])
        out = model.adapter.call_denoiser(model, x_in, t_in, cond, pooled=pooled_in, time_ids=self._time_ids,
                                          image_ids=self._image_ids, latents_dtype=x_t.dtype)
        out = out.to(x_t.dtype)  # guidance in the latents' dtype (fp32 in the sampler)
        ab = core.noise_level(model.scheduler, t, x_t, pt)
        if not self.do_cfg:
            return out, (None if want_native else core.to_epsilon(out, x_t, ab, pt))
        chunks = out.chunk(n)
        # classifier-free guidance in the model's own parametrisation, exactly as diffusers
        native = chunks[0] + self.guidance_scale * (chunks[1] - chunks[0])
        if not self.guidance:
            return native, (None if want_native else core.to_epsilon(native, x_t, ab, pt))
        eps = {"uncond": core.to_epsilon(chunks[0], x_t, ab, pt), "cond": core.to_epsilon(chunks[1], x_t, ab, pt)}
        for name, ch in zip(self.names, chunks[2:]):
            eps[name] = core.to_epsilon(ch, x_t, ab, pt)
        eps_cfg = core.to_epsilon(native, x_t, ab, pt)
        T = model.scheduler.config.num_train_timesteps
        progress = (index / self.num_steps if index is not None
                    else 1.0 - (torch.as_tensor(t, dtype=torch.float64).reshape(-1) + 1) / T)
        info = StepInfo(index=index, num_steps=self.num_steps, timestep=t, alpha_bar=ab, latents=x_t, progress=progress)
        guided = eps_cfg
        for g, state in zip(self.guidance, self.states):
            guided = g.guide(eps, guided, info, state)
        if not want_native:
            return None, guided
        # the conversion is affine in the output, so only the change needs converting back
        a, _ = core.epsilon_coefficients(pt, ab)
        return native + ((guided - eps_cfg).double() / a).to(native.dtype), guided

    def epsilon(self, x_t: torch.Tensor, t, index: int | None = None) -> torch.Tensor:
        """The guided noise prediction at ``(x_t, t)`` (``t`` a scalar or one per sample); ``index``:
        the sampler's step index, or None in a loss at random timesteps."""
        return self._predict(x_t, t, index, want_native=False)[1]

    def model_output(self, x_t: torch.Tensor, t, index: int) -> torch.Tensor:
        """The guided prediction in the model's parametrisation, for the scheduler's ``step``."""
        return self._predict(x_t, t, index, want_native=True)[0]


def _batch(t: torch.Tensor, B: int) -> torch.Tensor:
    """One conditioning (token embeddings ``(1, L, D)`` or a pooled one ``(1, P)``) for ``B`` samples."""
    return t.expand(B, *t.shape[1:]) if t.shape[0] == 1 and B > 1 else t
