"""Normalized Attention Guidance (NAG): negative guidance in attention space, without a second branch.

Paper: D.-Y. Chen, H. Bandyopadhyay, K. Zou, Y.-Z. Song, "Normalized Attention Guidance: Universal
Negative Guidance for Diffusion Models", 2025, https://arxiv.org/abs/2505.21179 (reference code:
github.com/ChenDarYen/Normalized-Attention-Guidance).

In every cross-attention of the denoiser, for the rows of the batch that carry the prompt, the
image queries attend to the prompt's keys/values and to the negative prompt's, and the two
outputs (heads merged, before the output projection) are combined per token::

    Z+ = Attn(Q, K/V of the prompt)      Z- = Attn(Q, K/V of the negative)
    Z~ = Z+ + s (Z+ - Z-)                                   extrapolation, scale s
    r  = |Z~|_1 / |Z+|_1                                    L1 over the channels of each token
    Z^ = Z~ * min(r, tau) / r                               the ratio clipped to tau
    Z  = alpha Z^ + (1 - alpha) Z+                          blending

``s`` here is the paper's extrapolation; the reference code writes ``Z+ * phi - Z- * (phi - 1)``,
so its ``nag_scale`` is ``1 + s`` (its FLUX demos' ``nag_scale=5`` is ``scale=4``). Defaults
``tau=2.5``, ``alpha=0.25`` are the reference code's.

How it fits the toolkit:

* A guidance-stage defense whose work is a model patch (:meth:`GuidanceDefense.patch`): for the
  duration of one generation the cross-attention modules of the UNet get a
  :class:`NAGAttnProcessor`; leaving restores every original processor object.
* Only the rows whose text conditioning *is* the prompt embedding (compared value for value)
  are guided: the unconditional branch of classifier-free guidance and other defenses' extra
  conditionings (SLD's concept) are attended as before. With an empty prompt the unconditional
  branch equals the prompt's and is guided too (CFG then changes nothing between them).
* It adds no UNet batch, so unlike ``negative_prompt`` (true CFG) it works at guidance scale 1,
  and stacks with a negative prompt, SLD, SAFREE and weight edits.
* On MMDiT transformers (SD3, FLUX), where text and image tokens share one joint attention, the
  negative prompt runs as a second text stream through the blocks and the image tokens are guided
  by the same rule (:mod:`safediff.defenses.nag_joint`); ``requires`` names what both kinds have.
* ``scale=0`` or an empty ``negative`` is no defense (skipped, bit for bit).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..options import option
from .base import DefenseConfig, GuidanceContext, GuidanceDefense, register_defense


@dataclass(frozen=True)
class NAGConfig(DefenseConfig):
    """Args:
    negative: the negative prompt whose attention is guided away from, e.g. ``"striped"``.
    scale: the extrapolation ``s`` (0 switches the defense off; the reference's nag_scale minus 1).
    tau: the largest allowed L1-norm ratio of the guided attention output to the prompt's.
    alpha: how much of the normalised guided output is blended into the prompt's.
    """

    #: conformance (tests/test_conformance.py): stack texts at zero strength and an acting one
    zero_strength = ('nag(negative="zebra", scale=0)',)
    acting_example = 'nag(negative="zebra", scale=2, tau=3, alpha=0.5)'

    negative: str = option("", help="the negative prompt guided away from in attention")
    scale: float = option(4.0, low=0, help="extrapolation Z+ + s (Z+ - Z-); 0 switches NAG off")
    tau: float = option(2.5, low=1, help="largest L1-norm ratio |Z~|/|Z+| per token (clipped above it)",
                        why="a ratio below 1 would shrink even the unguided output")
    alpha: float = option(0.25, low=0, high=1, help="blend of the normalised guided output into the prompt's")

    menu = {"NAG (attention negative prompt)": 'nag(negative="{concept}")'}
    requires = frozenset({"text_attention"})

    def is_active(self) -> bool:
        return self.scale > 0 and bool(self.negative.strip())


def nag_combine(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float, tau: float, alpha: float) -> torch.Tensor:
    """The NAG rule on attention outputs ``(..., tokens, channels)`` (see the module docstring)."""
    z_tilde = z_pos + scale * (z_pos - z_neg)
    norm_pos = z_pos.abs().sum(-1, keepdim=True)
    norm_tilde = z_tilde.abs().sum(-1, keepdim=True)
    ratio = norm_tilde / norm_pos.clamp_min(torch.finfo(z_pos.dtype).tiny)
    factor = torch.where(ratio > tau, tau / ratio, torch.ones_like(ratio))
    return alpha * (z_tilde * factor) + (1.0 - alpha) * z_pos


class NAGRun:
    """One generation's NAG settings: the prompt embedding (to find the guided rows) and the
    negative embedding ``(1, L, D)`` whose keys/values each guided row also attends to."""

    def __init__(self, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, config: NAGConfig):
        self.prompt_embeds = prompt_embeds.detach()
        self.negative_embeds = negative_embeds.detach()
        self.config = config
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._negative_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def negative_keys_values(self, attn, head_dim: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1, heads, L, hd)`` keys and values of the negative in ``attn``, computed once per
        generation (the weights do not change during one)."""
        kv = self._negative_kv.get(id(attn))
        if kv is None:
            with torch.no_grad():
                kv = _keys_values(attn, self.negative_embeds.to(like.device, like.dtype), head_dim)
            self._negative_kv[id(attn)] = kv
        return kv

    def guided_rows(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: the rows of a UNet call's text conditioning that equal the prompt's
        (row ``i`` against prompt ``i mod B``); cached for the layers of one call."""
        if self._last is not None and self._last[0] is encoder_hidden_states:
            return self._last[1]
        N, B = encoder_hidden_states.shape[0], self.prompt_embeds.shape[0]
        if N % B or tuple(encoder_hidden_states.shape[1:]) != tuple(self.prompt_embeds.shape[1:]):
            rows = torch.zeros(N, dtype=torch.bool, device=encoder_hidden_states.device)
        else:
            pos = self.prompt_embeds.to(encoder_hidden_states.device, encoder_hidden_states.dtype).repeat(N // B, 1, 1)
            rows = (encoder_hidden_states.detach() == pos).flatten(1).all(1)
        self._last = (encoder_hidden_states, rows)
        return rows


def _keys_values(attn, context: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, heads, L, hd)`` keys and values of ``context`` (``(n, L, D)``), as AttnProcessor2_0."""
    n = context.shape[0]
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key = attn.to_k(context).view(n, -1, attn.heads, head_dim).transpose(1, 2)
    value = attn.to_v(context).view(n, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return key, value


def _attend(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``(n, S, heads * hd)``: the merged-head attention of ``query`` (``(n, heads, S, hd)``),
    before the output projection."""
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    n, heads, _, hd = query.shape
    return out.transpose(1, 2).reshape(n, -1, heads * hd).to(query.dtype)


class NAGAttnProcessor:
    """A cross-attention processor applying NAG to the guided rows; every other call (and every
    other row) is attended exactly as diffusers' AttnProcessor2_0 attends it."""

    def __init__(self, original: Any, run: NAGRun):
        self.original = original
        self.run = run

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        rows = self.run.guided_rows(encoder_hidden_states)
        if not bool(rows.any()):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if attention_mask is not None or attn.spatial_norm is not None:
            raise ValueError("nag: this cross-attention takes an attention mask or a spatial norm, which NAG's "
                             "processor does not support; remove `nag` from the stack for this model.")
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        N = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        head_dim = query.shape[-1] // attn.heads
        query = query.view(N, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        z = _attend(attn, query, *_keys_values(attn, encoder_hidden_states, head_dim))
        idx = rows.nonzero().flatten()
        key, value = self.run.negative_keys_values(attn, head_dim, encoder_hidden_states)
        z_neg = _attend(attn, query[idx], key.expand(len(idx), -1, -1, -1), value.expand(len(idx), -1, -1, -1))
        c = self.run.config
        z = z.index_copy(0, idx, nag_combine(z[idx], z_neg, c.scale, c.tau, c.alpha).to(z.dtype))
        out = attn.to_out[1](attn.to_out[0](z))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_modules(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of ``unet`` that read the text conditioning (diffusers' ``attn2``)."""
    return [m for m in unet.modules() if getattr(m, "is_cross_attention", False) and hasattr(m, "set_processor")]


class NAG(GuidanceDefense):
    needs_cfg = False  # it adds no branch: it also acts at guidance scale 1

    def __init__(self, config: NAGConfig, model):
        super().__init__(config, model)
        from .nag_joint import joint_attention_modules

        if not cross_attention_modules(model.unet) and not joint_attention_modules(model.unet):
            raise ValueError(f"nag: this {getattr(model, 'family', '')} denoiser ({type(model.unet).__name__}) has "
                             "neither UNet cross-attention nor SD3/FLUX joint attention modules to guide.")
        self._pending: NAGRun | None = None

    def new_state(self, ctx: GuidanceContext) -> NAGRun:
        """Encode the negative prompt once per generation; :meth:`patch` (entered next by the
        denoiser) installs the processors for this run."""
        from .nag_joint import JointNAGRun

        negative, _, _ = ctx.encode([self.config.negative])
        joint = not cross_attention_modules(self.model.unet)  # an MMDiT: the joint-attention path
        run = (JointNAGRun if joint else NAGRun)(ctx.prompt_embeds, negative[:1], self.config)
        self._pending = run
        return run

    @contextlib.contextmanager
    def patch(self, model):
        run, self._pending = self._pending, None
        if run is None:
            raise RuntimeError("nag: the denoiser must call new_state before patch (one generation at a time).")
        from .nag_joint import JointNAGRun, joint_attention_nag

        if isinstance(run, JointNAGRun):  # SD3 / FLUX
            with joint_attention_nag(model.unet, run):
                yield
            return
        modules = cross_attention_modules(model.unet)
        originals = [m.processor for m in modules]
        try:
            for m, orig in zip(modules, originals):
                m.set_processor(NAGAttnProcessor(orig, run))
            yield
        finally:
            for m, orig in zip(modules, originals):
                m.set_processor(orig)


register_defense(name="nag", config_cls=NAGConfig, impl_cls=NAG)
