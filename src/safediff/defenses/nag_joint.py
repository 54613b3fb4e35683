"""NAG on MMDiT transformers (SD3, FLUX): the negative prompt as a second text stream in joint attention.

In an MMDiT block the image tokens and the text tokens attend together: every query reads the keys
of ``[text; image]`` (FLUX: text first) or ``[image; text]`` (SD3). There is no separate
cross-attention whose keys could be swapped, so :mod:`safediff.defenses.nag`'s UNet processor does
not apply. Here the negative prompt runs through the blocks as a **second text stream** of the
same sample:

* the transformer's ``context_embedder`` projects the prompt's tokens ``P`` (``L`` of them) as
  usual; for a guided row its output is extended along the sequence to ``[P; N]`` with the
  negative's tokens ``N`` (also ``L``), so every per-token layer of the blocks (the text-side
  norms, modulations and feed-forwards) carries the negative tokens beside the prompt's, with the
  row's own timestep / pooled modulation;
* in every joint attention, two views of the row are attended: the prompt's view, queries and
  keys ``[P; image]`` (exactly the unguided call), and the negative's view ``[N; image]``. The
  image tokens' outputs of the two views are ``Z+`` and ``Z-``; the image tokens continue with the
  NAG rule of :func:`~safediff.defenses.nag.nag_combine` (extrapolation ``s``, L1 ratio clipped to
  ``tau``, blend ``alpha``; before the output projection). The prompt's text tokens continue with
  their output of the prompt's view, the negative's with theirs of the negative's view;
* FLUX's single-stream blocks concatenate text and image into one sequence ``[P; N; image]`` and
  are guided the same way; the image stream is computed once per row in every block (only the
  negative's text tokens and the negative's view's attention are added).

Rows that are not the prompt's (the unconditional branch of true CFG, other defenses' extra
conditionings) get the same extended sequence but are attended as before (their negative tokens
are never read, their attention output is zero); a call without any guided row is not touched.

Differences from the reference code (github.com/ChenDarYen/Normalized-Attention-Guidance, FLUX):
it runs the negative stream as extra batch rows modulated by the negative prompt's pooled
embedding and recomputes the image tokens of those rows in the single-stream blocks; here the
negative tokens share their row's modulation and the image stream is not duplicated. Its FLUX
processor normalises with the L2 norm; the paper (and this module, as the UNet path) with L1.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .nag import NAGRun, nag_combine


class JointNAGRun(NAGRun):
    """One generation's NAG on an MMDiT: :class:`NAGRun` plus the state of the transformer call in
    progress (which rows are guided, the prompt's token count), set by the ``context_embedder``
    hook and cleared around every transformer call."""

    def __init__(self, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, config: Any):
        super().__init__(prompt_embeds, negative_embeds, config)
        if tuple(negative_embeds.shape[1:]) != tuple(prompt_embeds.shape[1:]):
            raise ValueError(f"nag: the negative prompt's token embeddings {tuple(negative_embeds.shape[1:])} differ "
                             f"in shape from the prompt's {tuple(prompt_embeds.shape[1:])}; both must come from the "
                             "model's own text encoding.")
        #: ``(guided row indices, L)`` of the transformer call in progress; None: not guided
        self.call: tuple[torch.Tensor, int] | None = None

    def extend_context(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """The ``context_embedder`` forward hook: ``[P; N]`` along the sequence when some rows are
        the prompt's (None, the output unchanged, otherwise)."""
        rows = self.guided_rows(args[0])
        if not bool(rows.any()):
            self.call = None
            return None
        negative = module.forward(self.negative_embeds.to(args[0].device, args[0].dtype))  # forward: no hook again
        self.call = (rows.nonzero().flatten(), output.shape[1])
        return torch.cat([output, negative.to(output.dtype).expand(output.shape[0], -1, -1)], dim=1)

    def end_call(self, *_: Any) -> None:
        """Forget the call's state (a pre- and post-hook of the transformer)."""
        self.call = None


def guided_joint_attention(image: tuple, text: tuple, call: tuple[torch.Tensor, int], config: Any, *,
                           text_first: bool, seq_dim: int,
                           attend: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """NAG in one joint attention.

    Args:
        image: ``(q, k, v)`` of the image tokens (``S`` along ``seq_dim``), after the q/k norms.
        text: ``(q, k, v)`` of the text tokens ``[P; N]`` (``2L`` along ``seq_dim``).
        call: ``(guided row indices, L)``.
        text_first: FLUX's order ``[text; image]`` (SD3: ``[image; text]``).
        attend: ``attend(q, k, v) -> (n, tokens, heads * head_dim)`` in the model's layout (with
            its rotary embedding), the attention of the unguided processor.

    Returns:
        ``(image output (N, S, C), text output (N, 2L, C))`` before the output projections.
    """
    idx, L = call
    S = image[0].shape[seq_dim]

    def joint(txt: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return torch.cat([txt, img] if text_first else [img, txt], dim=seq_dim)

    def split(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (out[:, L:], out[:, :L]) if text_first else (out[:, :S], out[:, S:])

    z_pos, t_pos = split(attend(*(joint(t.narrow(seq_dim, 0, L), i) for t, i in zip(text, image))))
    z_neg, t_neg = split(attend(*(joint(t.narrow(seq_dim, L, L)[idx], i[idx]) for t, i in zip(text, image))))
    c = config
    z = z_pos.index_copy(0, idx, nag_combine(z_pos[idx], z_neg, c.scale, c.tau, c.alpha).to(z_pos.dtype))
    t_negative = torch.zeros_like(t_pos).index_copy(0, idx, t_neg.to(t_pos.dtype))
    return z, torch.cat([t_pos, t_negative], dim=1)


class NAGJointAttnProcessor:
    """SD3's joint attention (diffusers' ``JointAttnProcessor2_0``) with NAG on the guided rows;
    a call outside a guided transformer call goes to the original processor."""

    def __init__(self, original: Any, run: JointNAGRun):
        self.original = original
        self.run = run

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        call = self.run.call
        if call is None or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise ValueError("nag: this joint attention takes an attention mask, which NAG's processor does not "
                             "support; remove `nag` from the stack for this model.")
        N = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        hd = query.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(N, -1, attn.heads, hd).transpose(1, 2)

        def norm(f, x: torch.Tensor) -> torch.Tensor:
            return x if f is None else f(x)

        image = (norm(attn.norm_q, heads(query)), norm(attn.norm_k, heads(attn.to_k(hidden_states))),
                 heads(attn.to_v(hidden_states)))
        text = (norm(attn.norm_added_q, heads(attn.add_q_proj(encoder_hidden_states))),
                norm(attn.norm_added_k, heads(attn.add_k_proj(encoder_hidden_states))),
                heads(attn.add_v_proj(encoder_hidden_states)))

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
            return out.transpose(1, 2).reshape(q.shape[0], -1, attn.heads * hd).to(q.dtype)

        z, t = guided_joint_attention(image, text, call, self.run.config, text_first=False, seq_dim=2, attend=attend)
        if not attn.context_pre_only:
            t = attn.to_add_out(t)
        return attn.to_out[1](attn.to_out[0](z)), t


class NAGFluxAttnProcessor:
    """FLUX's attention (diffusers' ``FluxAttnProcessor``) with NAG on the guided rows, in the
    double-stream blocks (text as ``encoder_hidden_states``) and the single-stream ones (one
    sequence ``[P; N; image]``); a call outside a guided transformer call goes to the original."""

    def __init__(self, original: Any, run: JointNAGRun):
        self.original = original
        self.run = run

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        call = self.run.call
        if call is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError("nag: this FLUX attention takes an attention mask, which NAG's processor does not "
                             "support; remove `nag` from the stack for this model.")
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (-1, attn.head_dim))

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if image_rotary_emb is not None:
                q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
                k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
            out = dispatch_attention_fn(q, k, v, attn_mask=None, backend=self.original._attention_backend,
                                        parallel_config=self.original._parallel_config)
            return out.flatten(2, 3).to(q.dtype)

        qkv = (attn.norm_q(split_heads(attn.to_q(hidden_states))), attn.norm_k(split_heads(attn.to_k(hidden_states))),
               split_heads(attn.to_v(hidden_states)))
        if encoder_hidden_states is None:  # single-stream block: [P; N; image] in one sequence
            n_text = 2 * call[1]
            text, image = tuple(x[:, :n_text] for x in qkv), tuple(x[:, n_text:] for x in qkv)
        else:
            image = qkv
            text = (attn.norm_added_q(split_heads(attn.add_q_proj(encoder_hidden_states))),
                    attn.norm_added_k(split_heads(attn.add_k_proj(encoder_hidden_states))),
                    split_heads(attn.add_v_proj(encoder_hidden_states)))
        z, t = guided_joint_attention(image, text, call, self.run.config, text_first=True, seq_dim=1, attend=attend)
        if encoder_hidden_states is None:
            return torch.cat([t, z], dim=1)
        return attn.to_out[1](attn.to_out[0](z.contiguous())), attn.to_add_out(t.contiguous())


def joint_attention_modules(transformer: torch.nn.Module) -> list[tuple[torch.nn.Module, type]]:
    """``[(attention module, NAG processor class)]``: the joint attentions of an SD3 or FLUX
    transformer (FLUX: the double- and the single-stream blocks'; SD3.5's image-only ``attn2`` is
    not one); empty for any other network."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if isinstance(transformer, FluxTransformer2DModel):
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        return [(b.attn, NAGFluxAttnProcessor) for b in blocks]
    if isinstance(transformer, SD3Transformer2DModel):
        return [(b.attn, NAGJointAttnProcessor) for b in transformer.transformer_blocks]
    return []


def _check_processors(modules: list[tuple[torch.nn.Module, type]]) -> None:
    """Refuse attention set-ups NAG's processors do not reproduce (before anything is patched)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    for m, cls in modules:
        want = FluxAttnProcessor if cls is NAGFluxAttnProcessor else JointAttnProcessor2_0
        if type(m.processor) is not want or getattr(m, "fused_projections", False) \
                or getattr(m.processor, "_parallel_config", None) is not None:
            raise ValueError(f"nag: an attention of this transformer runs {type(m.processor).__name__} (fused "
                             f"projections or context parallelism included); NAG replaces only diffusers' default "
                             f"{want.__name__}. Reset the processors (`transformer.set_default_attn_processor()`, "
                             "`unfuse_qkv_projections()`) or remove `nag` from the stack.")


@contextlib.contextmanager
def joint_attention_nag(transformer: torch.nn.Module, run: JointNAGRun):
    """For the duration of the block: NAG processors on ``transformer``'s joint attentions and the
    hooks that extend the text stream; leaving restores every original processor object and
    removes the hooks, also after an exception."""
    modules = joint_attention_modules(transformer)
    _check_processors(modules)
    originals = [m.processor for m, _ in modules]
    handles = []
    try:
        for (m, cls), orig in zip(modules, originals):
            m.set_processor(cls(orig, run))
        handles.append(transformer.register_forward_pre_hook(run.end_call))
        handles.append(transformer.register_forward_hook(run.end_call))
        handles.append(transformer.context_embedder.register_forward_hook(run.extend_context))
        yield
    finally:
        for h in handles:
            h.remove()
        for (m, _), orig in zip(modules, originals):
            m.set_processor(orig)
        run.call = None
