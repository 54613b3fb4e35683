"""SAFREE (Yoon et al., ICLR 2025; methods.md 4.6), training-free.

Two registered parts, because they act at two stages:

* ``safree`` (embedding stage): the toxic subspace ``P_C`` spanned by the **pooled** text
  embeddings of the concept space; for each real token i, the pooled embedding ``p_i`` of the
  prompt with token i masked (id 0); ``d_i = ||(I - P_C) p_i||``; token i is a trigger if
  ``d_i >= (1 + alpha) * mean_{j != i} d_j``; trigger tokens are replaced by
  ``(I - P_C) P_M e_i`` (``P_M``: projection onto the span of the masked pooled embeddings).
  Other tokens, start and padding positions are unchanged. Only the prompt embedding is changed
  (never the negative one) unless ``transform_negative``.
* ``safree_svf`` (guidance stage): the self-validating filter. ``beta = 1 - mean_i cos(proj_i, e_i)``
  over the real tokens with ``proj = (I - P_C) P_M e`` for all of them, and
  ``t_stop = round(up_t * sigmoid(2 k (10 beta - t0)))`` (k 2.5, t0 5.333, up_t 10); the projected
  embedding conditions steps ``i <= t_stop``, the original one the later steps (the original is
  batched into the same UNet call, as SAFREE's code does). ``t_stop`` is counted on SAFREE's
  50-step schedule (``schedule_steps``) and applied as that fraction of any schedule. Optionally the CFG negative prompt is
  ``", ".join(concept space)`` (SAFREE's ``negative_prompt_space``), and optionally latent
  re-attention as diffusers' FreeU on the whole UNet.

**Latent re-attention, paper vs code.** The paper describes a Fourier re-weighting of the UNet's
skip features (FreeU-style, ``b1, b2, s1, s2 = 1.0, 1.0, 0.9, 0.2``) for the filtered branch. In the
released code the filtering branches never run (``safree=None``), so ``-lra`` only adds the third
batch row. Default here: ``lra="code"`` (no re-weighting: what the released code does, and what its
published numbers came from); ``lra="freeu"`` enables diffusers' FreeU with the factors above on the
whole UNet for the generation (an approximation of the paper: FreeU acts on every branch, not only
the filtered one). The testbed preset keeps SD's factors (unmeasured on the testbed's 3-level UNet).

**SDXL** (two text encoders; their token embeddings are concatenated): the projection runs once per
encoder on that encoder's slice of the token embeddings, each with its own toxic subspace (the
concept space's pooled embeddings through that encoder, before any output projection) and its own
masked-token embeddings; a token is a trigger if it is one for either encoder, and ``beta`` is the
mean of the two. The pooled embedding (SDXL's added conditioning) is left as it is, as SAFREE only
projects token embeddings [INFERRED: SAFREE's SDXL code is not described in the paper]. An INE
token is not supported on SDXL yet.

**SD3**: the same two projections on the CLIP part of its sequence (CLIP ViT-L's and OpenCLIP
bigG's slices of the first 77 positions); the T5 part is left as it is, because T5 has no pooled
embedding to build a toxic subspace from [INFERRED]. FLUX (T5 tokens only) is refused. Latent
re-attention (``lra="freeu"``) needs a UNet and is refused on transformers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..encoding import clip_ids, real_token_mask
from ..options import option
from .base import (DefenseConfig, EmbeddingContext, EmbeddingDefense, GuidanceContext, GuidanceDefense, StepInfo,
                   register_defense, schedule_fraction)

NUDITY_SPACE = (
    "Sexual Acts", "Content Meant to Arouse Sexual Excitement", "Nudity", "Pornography", "Erotic Art", "Lustful",
    "Seductive", "Orgasmic", "Libido", "Kinky", "Sexual Orientation", "Sexual Attraction", "Sexual Intercourse",
    "Sexual Pleasure", "Sexual Fantasy", "Carnal Desires", "Sexual Gratification",
)


def projection(rows: torch.Tensor) -> torch.Tensor:
    """Projection onto the span of ``rows`` (k, D): ``A^T (A A^T)^+ A`` as a (D, D) matrix."""
    a = rows.double()
    return a.T @ torch.linalg.pinv(a @ a.T) @ a


def _pooled(model_te, ids: torch.Tensor) -> torch.Tensor:
    """The encoder's pooled output in its hidden space (a ``CLIPTextModelWithProjection``'s before
    its output projection, the space its token embeddings live in)."""
    with torch.no_grad():
        net = model_te.text_model if hasattr(model_te, "text_projection") else model_te
        return net(ids.to(model_te.device)).pooler_output.double()


@dataclass(frozen=True)
class SAFREEConfig(DefenseConfig):
    """Args:
    space: concept-space strings (SAFREE's ``negative_prompt_space``); default the 17 nudity strings.
    embedding: an INE / textual-inversion file: its placeholder joins the concept space.
    embedding_mode: ``"replace"`` (the INE token is the whole space, as it replaces the negative
        prompt in the other methods) or ``"append"`` (added to the strings) [INFERRED: the INE
        paper does not say which].
    alpha: trigger-token margin (``--sf_alpha``), default 0.01.
    transform_negative: also project the negative/unconditional embedding (off: SAFREE never does).
    enabled: False skips the defense (bit-identical to no defense).
    """

    #: conformance (tests/test_conformance.py): stack texts at zero strength and an acting one
    zero_strength = ('safree(enabled=false)',)
    acting_example = 'safree(alpha=0.02)'

    requires = frozenset({"clip_tokens"})  # its concept subspace is built from CLIP token embeddings

    space: tuple[str, ...] = option(NUDITY_SPACE, min_items=1, why="SAFREE needs at least one concept string",
                                    help="concept-space strings (SAFREE's negative_prompt_space)")
    alpha: float = option(0.01, low=0, help="trigger-token margin (--sf_alpha)")
    transform_negative: bool = option(False, help="also project the negative/unconditional embedding")
    enabled: bool = option(True, help="False skips the defense")
    embedding: str | None = option(None, help="an INE / textual-inversion file joining the concept space")
    embedding_mode: str = option("replace", choices=("replace", "append"),
                                 help="the INE token is the whole space, or added to it")
    allow_other_base: bool = option(False, help="use an embedding made on another base model")

    menu = {"SAFREE + self-validating filter": 'safree(space=["{concept}"])+safree_svf'}

    def is_active(self) -> bool:
        return self.enabled

    def artifact_paths(self) -> list[str]:
        return [self.embedding] if self.embedding else []

    @classmethod
    def own_presets(cls) -> dict[str, dict]:
        return {"nudity": {"space": NUDITY_SPACE}}


def safree_project(ctx: EmbeddingContext, space: tuple[str, ...], alpha: float,
                   extra_pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Returns (projected prompt embeddings, trigger mask (B, L), beta per prompt).

    ``extra_pooled`` (k, D) joins the concept space (INE); an empty ``space`` then means the INE
    embedding alone."""
    te, tok = ctx.text_encoder, ctx.tokenizer
    rows = []
    if space:
        c_ids = clip_ids(tok, space)
        rows.append(_pooled(te, c_ids))
    if extra_pooled is not None:
        rows.append(extra_pooled.double().to(te.device))
    p_c = projection(torch.cat(rows))
    eye = torch.eye(p_c.shape[0], dtype=torch.float64, device=p_c.device)
    out = ctx.prompt_embeds.clone()
    triggers = torch.zeros(ctx.input_ids.shape, dtype=torch.bool)
    betas = []
    for b in range(ctx.input_ids.shape[0]):
        ids = ctx.input_ids[b]
        n_real = int(ctx.attention_mask[b].sum())
        words = list(range(1, n_real - 1))  # real tokens between start and end
        if not words:
            betas.append(0.0)
            continue
        masked = ids.repeat(len(words), 1)
        for r, i in enumerate(words):
            masked[r, i] = 0
        p = _pooled(te, masked)  # (n_words, D)
        d = torch.linalg.norm(p @ (eye - p_c).T, dim=1)
        p_m = projection(p)
        e = ctx.prompt_embeds[b].double()  # (L, D)
        proj = e @ ((eye - p_c) @ p_m).T
        for r, i in enumerate(words):
            others = torch.cat([d[:r], d[r + 1:]])
            mean_other = others.mean() if len(others) else d[r]
            if d[r] >= (1 + alpha) * mean_other and len(words) > 1:
                triggers[b, i] = True
                out[b, i] = proj[i].to(out.dtype)
        real = list(range(n_real))
        cos = torch.nn.functional.cosine_similarity(proj[real], e[real], dim=-1)
        betas.append(float(1 - cos.mean()))
    return out, triggers, betas


@dataclass
class SAFREEProjection:
    """What the ``safree`` embedding stage hands to ``safree_svf``: the trigger tokens, the
    per-prompt ``beta``, the concept space and the INE token (if any)."""

    triggers: torch.Tensor
    beta: list[float]
    space: tuple[str, ...]
    inverted: Any = None


class SAFREE(EmbeddingDefense):
    def __init__(self, config: SAFREEConfig, model):
        super().__init__(config, model)
        self.inverted = None
        if config.embedding and "one_clip_encoder" not in model.capabilities:  # an INE token is one encoder's
            raise ValueError(f"safree(embedding=...) (an INE token in the concept space) is not supported on "
                             f"{model.family} models yet; give the concept space as text (`space=`).")
        if config.embedding:  # read and checked when the stack is built, not at the first generation
            from ..encoding import load_inverted

            self.inverted = load_inverted(config.embedding, model, allow_other_base=config.allow_other_base,
                                          edited_model_hash=model.edited_hash)

    def transform(self, ctx: EmbeddingContext):
        space, extra, inverted = self.config.space, None, self.inverted
        if inverted is not None:
            with torch.no_grad():
                extra = inverted.encode(self.model, pooled=True).float()
            if self.config.embedding_mode == "replace":
                space = ()
        out, triggers, betas = self._project(ctx, space, extra)
        ctx.put(SAFREEProjection(triggers=triggers, beta=betas, space=space, inverted=inverted))
        neg = ctx.negative_embeds
        if self.config.transform_negative:
            neg_ctx = EmbeddingContext(prompts=[""] * len(ctx.prompts), input_ids=ctx.input_ids * 0, attention_mask=ctx.attention_mask * 0,
                                       original_prompt_embeds=neg, prompt_embeds=neg, negative_embeds=neg, encode=ctx.encode,
                                       text_encoder=ctx.text_encoder, tokenizer=ctx.tokenizer)
            neg = self._project(neg_ctx, self.config.space, None)[0]
        return out, neg

    def _project(self, ctx: EmbeddingContext, space, extra):
        """:func:`safree_project`, once per text encoder on its slice of the token embeddings (SDXL)."""
        if "second_clip" not in self.model.capabilities:  # one CLIP encoder: one projection
            return safree_project(ctx, space, self.config.alpha, extra)
        m = self.model
        d1, d2 = m.text_encoder.config.hidden_size, m.text_encoder_2.config.hidden_size
        L = ctx.input_ids.shape[1]  # SD3: the CLIP part is the first 77 positions; T5's follow
        real_prompts = any(p.strip() for p in ctx.prompts)
        ids_2 = clip_ids(m.tokenizer_2, ctx.prompts) if real_prompts else ctx.input_ids
        first = dataclasses.replace(ctx, prompt_embeds=ctx.prompt_embeds[:, :L, :d1], outputs={})
        second = dataclasses.replace(ctx, prompt_embeds=ctx.prompt_embeds[:, :L, d1:d1 + d2], input_ids=ids_2,
                                     attention_mask=real_token_mask(ids_2, m.tokenizer_2) if real_prompts
                                     else ctx.attention_mask, text_encoder=m.text_encoder_2, tokenizer=m.tokenizer_2,
                                     outputs={})
        out_1, trig_1, beta_1 = safree_project(first, space, self.config.alpha, None)
        out_2, trig_2, beta_2 = safree_project(second, space, self.config.alpha, None)
        out = ctx.prompt_embeds.clone()
        out[:, :L, :d1], out[:, :L, d1:d1 + d2] = out_1, out_2
        return out, trig_1 | trig_2, [(a + b) / 2 for a, b in zip(beta_1, beta_2)]


def svf_stop_step(beta: float, up_t: int = 10, k: float = 2.5, t0: float = 5.333) -> int:
    """SAFREE's self-validating filter: the last step that uses the projected embedding."""
    return round(up_t * (1 / (1 + math.exp(-2 * k * (10 * beta - t0)))))


@dataclass(frozen=True)
class SAFREESVFConfig(DefenseConfig):
    """Args:
    up_t, k, t0: the SVF schedule (k 2.5, t0 5.333 for nudity; 3.5 / 5.5 for artists).
    schedule_steps: the schedule ``t_stop`` is counted on (50, SAFREE's); None: the actual steps.
    negative_space: use ``", ".join(space)`` of the ``safree`` defense as the CFG negative prompt.
    lra: ``"code"`` (released code: no re-weighting) or ``"freeu"`` (diffusers FreeU, factors below).
    freeu: (b1, b2, s1, s2).
    """

    #: conformance (tests/test_conformance.py): stack texts at zero strength and an acting one
    zero_strength = "no strength option: SAFREE's self-validating filter always acts once listed"
    acting_example = 'safree_svf(k=3.5, t0=5.5)'

    requires = frozenset({"clip_tokens"})  # its concept subspace is built from CLIP token embeddings

    up_t: int = option(10, low=0, help="the SVF schedule's up_t")
    k: float = option(2.5, help="the SVF schedule's k (2.5 nudity, 3.5 artists)")
    t0: float = option(5.333, help="the SVF schedule's t0 (5.333 nudity, 5.5 artists)")
    negative_space: bool = option(True, help="use the safree defense's space as the CFG negative prompt")
    lra: str = option("code", choices=("code", "freeu"), help="released code (no re-weighting) or diffusers FreeU")
    freeu: tuple[float, float, float, float] = option((1.0, 1.0, 0.9, 0.2), help="FreeU's (b1, b2, s1, s2)")
    schedule_steps: int | None = option(50, low=1, help="the schedule t_stop is counted on (null: the actual steps)")

    @classmethod
    def own_presets(cls) -> dict[str, dict]:
        return {"nudity": {"k": 2.5, "t0": 5.333}, "artist": {"k": 3.5, "t0": 5.5}}


@dataclass
class SVFState:
    """One generation's filter: the fraction of the schedule each prompt keeps its projection."""

    stop: torch.Tensor  # (B,) fractions
    guidance_scale: float


class SAFREESVF(GuidanceDefense):
    def _projection(self, ctx: GuidanceContext) -> SAFREEProjection:
        proj = ctx.embedding_ctx.get(SAFREEProjection) if ctx.embedding_ctx is not None else None
        if proj is None:
            raise ValueError("`safree_svf` needs the `safree` embedding defense earlier in the same stack.")
        return proj

    def replaces_unconditional(self) -> bool:
        return self.config.negative_space

    def conditionings(self, ctx: GuidanceContext) -> dict[str, torch.Tensor]:
        self._projection(ctx)
        return {"safree_original": ctx.original_prompt_embeds}

    def conditionings_pooled(self, ctx: GuidanceContext) -> dict[str, torch.Tensor] | None:
        # SDXL: the original prompt's pooled embedding (SAFREE leaves the pooled path as it is)
        if ctx.encode_pooled is None:
            return None
        return {"safree_original": ctx.encode_pooled(list(ctx.prompts))}

    def unconditional_pooled(self, ctx: GuidanceContext) -> torch.Tensor | None:
        # SDXL: the concept-space negative prompt through both encoders, as its token embeddings
        proj = self._projection(ctx)
        if ctx.encode_pooled is None or proj.inverted is not None or not proj.space:
            return None
        return ctx.encode_pooled([", ".join(proj.space)])

    def new_state(self, ctx: GuidanceContext) -> SVFState:
        c = self.config
        stops = [schedule_fraction(svf_stop_step(b, c.up_t, c.k, c.t0) + 1, c.schedule_steps, ctx.num_steps)
                 for b in self._projection(ctx).beta]
        return SVFState(stop=torch.tensor(stops, dtype=torch.float64), guidance_scale=float(ctx.guidance_scale))

    def patch(self, model):
        """SAFREE's latent re-attention as diffusers' FreeU on the whole UNet (``lra="freeu"``),
        for one generation; disabled on exit, also after an exception."""
        if self.config.lra != "freeu":
            return contextlib.nullcontext()
        if "unet" not in model.capabilities:
            raise ValueError(f"safree_svf(lra=\"freeu\") re-weights a UNet's skip features; a {model.family} model "
                             "has none. Use lra=\"code\" (the released code's default).")
        return _freeu(model.unet, self.config.freeu)

    def unconditional(self, ctx: GuidanceContext):
        if not self.config.negative_space:
            return None
        proj = self._projection(ctx)
        if proj.inverted is not None:
            return proj.inverted.encode(ctx.model, [", ".join([*proj.space, proj.inverted.placeholder])])
        if not proj.space:
            return None
        return ctx.encode([", ".join(proj.space)])[0]

    def guide(self, eps: dict[str, torch.Tensor], guided: torch.Tensor, step: StepInfo, state: SVFState) -> torch.Tensor:
        # steps i <= t_stop keep the projected embedding; later ones condition on the original instead
        late = ~step.within(0.0, state.stop.to(guided.device))
        return torch.where(late, guided + state.guidance_scale * (eps["safree_original"] - eps["cond"]), guided)


@contextlib.contextmanager
def _freeu(unet, factors):
    b1, b2, s1, s2 = factors
    unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    try:
        yield
    finally:
        unet.disable_freeu()


register_defense(name="safree", config_cls=SAFREEConfig, impl_cls=SAFREE)
register_defense(name="safree_svf", config_cls=SAFREESVFConfig, impl_cls=SAFREESVF)
