"""NAG on MMDiT transformers (SD3, FLUX): the joint-attention processors against the rule written out
by hand on one attention call, the negative prompt's text stream through the whole transformer
(a negative equal to the prompt changes nothing), the exact restore of processors and hooks, scale
0 as no defense, and composition with the other stages on tiny SD3 and FLUX models."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor, FluxPosEmbed

from safediff.defenses.nag import NAGConfig
from safediff.defenses.nag_joint import (JointNAGRun, NAGFluxAttnProcessor, NAGJointAttnProcessor,
                                         joint_attention_modules, joint_attention_nag)
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack

PROMPTS = ["a red circle on white background", "a striped zebra square"]
CFG = NAGConfig(negative="x", scale=4.0, tau=2.5, alpha=0.25)
GUIDED = torch.tensor([1, 2])  # rows 1 and 2 of three carry the prompt, row 0 does not


def _rule_by_hand(zp, zn, cfg):
    """The paper's rule, written out: extrapolate, clip the L1 ratio to tau, blend."""
    zt = zp + cfg.scale * (zp - zn)
    r = zt.abs().sum(-1, keepdim=True) / zp.abs().sum(-1, keepdim=True)
    zh = torch.where(r > cfg.tau, zt * cfg.tau / r, zt)
    return cfg.alpha * zh + (1 - cfg.alpha) * zp, r


def _softmax_attention(q, k, v):
    """``(n, heads, S, d)`` queries over keys: per-head softmax attention, heads merged."""
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    out = w @ v
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def _half_clipped(zp, zn):
    """CFG with tau at the median L1 ratio of the guided rows: the clipping acts on some tokens, not all."""
    zt = zp + CFG.scale * (zp - zn)
    r = zt.abs().sum(-1) / zp.abs().sum(-1)
    return NAGConfig(negative="x", scale=CFG.scale, tau=float(r[GUIDED].median()), alpha=CFG.alpha)


def _run(L, cfg):
    run = JointNAGRun(torch.zeros(1, L, 4), torch.zeros(1, L, 4), cfg)
    run.call = (GUIDED, L)
    return run


def _by_rows(guided, plain):
    """Rows in GUIDED from ``guided``, the others from ``plain``."""
    out = plain.clone()
    out[GUIDED] = guided[GUIDED]
    return out


def test_sd3_joint_processor_equals_the_definition():
    torch.manual_seed(0)
    H, d, C, S, L = 2, 8, 16, 6, 4
    attn = Attention(query_dim=C, cross_attention_dim=None, added_kv_proj_dim=C, dim_head=d, heads=H, out_dim=C,
                     context_pre_only=False, bias=True, processor=JointAttnProcessor2_0(), qk_norm="rms_norm",
                     eps=1e-6).double()
    x = torch.randn(3, S, C, dtype=torch.float64)
    prompt = torch.randn(3, L, C, dtype=torch.float64)
    neg = 3 * torch.randn(1, L, C, dtype=torch.float64).expand(3, -1, -1)

    def heads(t):
        return t.view(t.shape[0], -1, H, d).transpose(1, 2)

    def view(text):  # SD3's order: [image; text]
        q = torch.cat([attn.norm_q(heads(attn.to_q(x))), attn.norm_added_q(heads(attn.add_q_proj(text)))], 2)
        k = torch.cat([attn.norm_k(heads(attn.to_k(x))), attn.norm_added_k(heads(attn.add_k_proj(text)))], 2)
        v = torch.cat([heads(attn.to_v(x)), heads(attn.add_v_proj(text))], 2)
        out = _softmax_attention(q, k, v)
        return out[:, :S], out[:, S:]

    with torch.no_grad():
        zp, tp = view(prompt)
        zn, tn = view(neg)
        cfg = _half_clipped(zp, zn)
        z, r = _rule_by_hand(zp, zn, cfg)
        want_image = attn.to_out[0](_by_rows(z, zp))
        want_text = attn.to_add_out(torch.cat([tp, _by_rows(tn, torch.zeros_like(tn))], 1))
        image, text = NAGJointAttnProcessor(JointAttnProcessor2_0(), _run(L, cfg))(attn, x, torch.cat([prompt, neg], 1))
        plain_image, plain_text = JointAttnProcessor2_0()(attn, x, prompt)
    assert bool((r[GUIDED] > cfg.tau).any()) and bool((r[GUIDED] <= cfg.tau).any())  # the clipping both acts and not
    assert torch.allclose(image, want_image, atol=1e-10) and torch.allclose(text, want_text, atol=1e-10)
    assert torch.allclose(image[0], plain_image[0], atol=1e-12)  # the unguided row is attended as before
    assert torch.allclose(text[:, :L], plain_text, atol=1e-12)  # the prompt's tokens continue as before
    assert not torch.allclose(image[GUIDED], plain_image[GUIDED], atol=1e-3)


def _flux_rotary(L, S):
    ids = torch.cat([torch.zeros(L, 3), torch.stack([torch.zeros(S), torch.arange(S) // 2, torch.arange(S) % 2], 1)])
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[4, 4, 8])(ids)
    return cos.double(), sin.double()


@pytest.mark.parametrize("single", [False, True], ids=["double-stream", "single-stream"])
def test_flux_processor_equals_the_definition(single):
    torch.manual_seed(1)
    H, d, C, S, L = 2, 16, 32, 6, 4
    kw = dict(pre_only=True) if single else dict(added_kv_proj_dim=C, context_pre_only=False)
    attn = FluxAttention(query_dim=C, dim_head=d, heads=H, out_dim=C, bias=True, processor=FluxAttnProcessor(),
                         eps=1e-6, **kw).double()
    x = torch.randn(3, S, C, dtype=torch.float64)
    prompt = torch.randn(3, L, C, dtype=torch.float64)
    neg = 3 * torch.randn(1, L, C, dtype=torch.float64).expand(3, -1, -1)
    rotary = _flux_rotary(L, S)

    def qkv(t, text):  # (n, tokens, heads, d) after the q/k norms
        if single or not text:
            q, k, v = attn.to_q(t), attn.to_k(t), attn.to_v(t)
            nq, nk = attn.norm_q, attn.norm_k
        else:
            q, k, v = attn.add_q_proj(t), attn.add_k_proj(t), attn.add_v_proj(t)
            nq, nk = attn.norm_added_q, attn.norm_added_k
        q, k, v = (u.unflatten(-1, (H, d)) for u in (q, k, v))
        return nq(q), nk(k), v

    def view(text):  # FLUX's order: [text; image], the rotary embedding over both
        (tq, tk, tv), (iq, ik, iv) = qkv(text, True), qkv(x, False)
        q = apply_rotary_emb(torch.cat([tq, iq], 1), rotary, sequence_dim=1)
        k = apply_rotary_emb(torch.cat([tk, ik], 1), rotary, sequence_dim=1)
        out = _softmax_attention(q.transpose(1, 2), k.transpose(1, 2), torch.cat([tv, iv], 1).transpose(1, 2))
        return out[:, L:], out[:, :L]

    with torch.no_grad():
        zp, tp = view(prompt)
        zn, tn = view(neg)
        cfg = _half_clipped(zp, zn)
        proc = NAGFluxAttnProcessor(FluxAttnProcessor(), _run(L, cfg))
        z, r = _rule_by_hand(zp, zn, cfg)
        z, t = _by_rows(z, zp), torch.cat([tp, _by_rows(tn, torch.zeros_like(tn))], 1)
        if single:
            got = proc(attn, torch.cat([prompt, neg, x], 1), image_rotary_emb=rotary)
            want = torch.cat([t, z], 1)
            plain = FluxAttnProcessor()(attn, torch.cat([prompt, x], 1), image_rotary_emb=rotary)
            plain_image, plain_text, image, text = plain[:, L:], plain[:, :L], got[:, 2 * L:], got[:, :2 * L]
        else:
            image, text = proc(attn, x, torch.cat([prompt, neg], 1), image_rotary_emb=rotary)
            want = torch.cat([attn.to_add_out(t), attn.to_out[0](z)], 1)
            got = torch.cat([text, image], 1)
            plain_image, plain_text = FluxAttnProcessor()(attn, x, prompt, image_rotary_emb=rotary)
    assert bool((r[GUIDED] > cfg.tau).any()) and bool((r[GUIDED] <= cfg.tau).any())
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(image[0], plain_image[0], atol=1e-12)
    assert torch.allclose(text[:, :L], plain_text, atol=1e-12)
    assert not torch.allclose(image[GUIDED], plain_image[GUIDED], atol=1e-3)


def _transformer_call(model, cond, seed=0):
    """One call of the model's transformer on random latents for the rows of ``cond``."""
    g = torch.Generator().manual_seed(seed)
    n = cond.shape[0]
    if model.family == "flux":
        from safediff.core import latent_image_ids

        side = 4
        x = torch.randn(n, side * side, model.unet.config.in_channels, generator=g)
        extra = {"image_ids": latent_image_ids(2 * side, 2 * side, "cpu", torch.float32)}
    else:
        x = torch.randn(n, model.unet.config.in_channels, 8, 8, generator=g)
        extra = {"image_ids": None}
    pooled = torch.randn(n, model.unet.config.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return model.adapter.call_denoiser(model, x, torch.tensor(500.0), cond, pooled=pooled, time_ids=None,
                                           latents_dtype=torch.float32, **extra)


def _encode(model, texts):
    from safediff.encoding import encode_prompts

    return encode_prompts(model, texts)[0]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_negative_stream_through_the_transformer(tiny_family, family):
    """Through a whole transformer: with the prompt as its own negative the second stream equals the
    first and NAG changes nothing (up to rounding); another negative changes only the prompt's rows."""
    model = tiny_family(family)
    uncond, prompt, neg = (_encode(model, [t]) for t in ("", PROMPTS[0], "zebra"))
    cond = torch.cat([uncond, prompt])  # the denoiser's layout: [uncond, cond]
    plain = _transformer_call(model, cond)
    with joint_attention_nag(model.unet, JointNAGRun(prompt, prompt, CFG)):
        same = _transformer_call(model, cond)
    with joint_attention_nag(model.unet, JointNAGRun(prompt, neg, CFG)):
        guided = _transformer_call(model, cond)
    assert torch.allclose(same, plain, atol=1e-5)
    assert torch.allclose(guided[0], plain[0], atol=1e-5)  # the unconditional row is not guided
    assert not torch.allclose(guided[1], plain[1], atol=1e-3)
    assert torch.equal(_transformer_call(model, cond), plain)  # nothing left behind


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_restores_processors_and_hooks_and_scale_zero_is_no_defense(tiny_family, family):
    model = tiny_family(family)
    net = model.unet
    modules = joint_attention_modules(net)
    assert len(modules) == len(net.transformer_blocks) + len(getattr(net, "single_transformer_blocks", []))
    before = [m.processor for m, _ in modules]

    def hooks():
        return [len(h) for h in (net._forward_pre_hooks, net._forward_hooks, net.context_embedder._forward_hooks)]

    hooks_before = hooks()

    def images(stack, **kw):
        out = SafePipeline(model, DefenseStack.parse(stack))(PROMPTS, seed=1, num_inference_steps=3, **kw)
        return np.stack([np.asarray(r.image) for r in out.records])

    base = images(None)
    assert np.array_equal(images('nag(negative="zebra", scale=0)'), base)
    guided = images('nag(negative="zebra", scale=4)')  # at the family's default CFG (FLUX: 1, no second branch)
    assert not np.array_equal(guided, base)
    assert [m.processor for m, _ in modules] == before and hooks() == hooks_before
    assert np.array_equal(images(None), base)
    with pytest.raises(RuntimeError, match="boom"):  # an exception inside restores too
        with joint_attention_nag(net, JointNAGRun(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), CFG)):
            assert all(type(m.processor) is cls for m, cls in modules)
            raise RuntimeError("boom")
    assert [m.processor for m, _ in modules] == before and hooks() == hooks_before


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_composes_with_the_other_stages(tiny_family, family):
    """NAG stacked with true CFG on a negative prompt, with SLD, with a weight edit of the
    context_embedder (UCE) and on SD3 with SAFREE's embedding: it runs, changes that stack's images,
    and leaves the model as it was."""
    model = tiny_family(family)
    before = [m.processor for m, _ in joint_attention_modules(model.unet)]
    weights = {k: v.clone() for k, v in model.unet.state_dict().items()}

    def images(stack):
        with SafePipeline(model, DefenseStack.parse(stack)) as pipe:
            out = pipe(PROMPTS, seed=2, num_inference_steps=2, guidance_scale=4.0)
        return np.stack([np.asarray(r.image) for r in out.records])

    others = ['negative_prompt(text="zebra")', 'sld(concept="zebra")', 'uce(erase=["zebra"])']
    for other in others + (["safree"] if family == "sd3" else []):
        assert not np.array_equal(images(f'nag(negative="zebra")+{other}'), images(other)), other
    assert [m.processor for m, _ in joint_attention_modules(model.unet)] == before
    assert all(torch.equal(v, weights[k]) for k, v in model.unet.state_dict().items()) and model.edited_hash is None


def test_refuses_processors_it_does_not_reproduce_before_patching(tiny_family):
    class Custom(JointAttnProcessor2_0):
        pass

    model = tiny_family("sd3")
    attn = model.unet.transformer_blocks[0].attn
    original = attn.processor
    attn.set_processor(Custom())
    try:
        others = [m.processor for m, _ in joint_attention_modules(model.unet)]
        with pytest.raises(ValueError, match="nag: .*Custom.*JointAttnProcessor2_0"):
            SafePipeline(model, DefenseStack.parse('nag(negative="zebra")'))(PROMPTS[:1], seed=1, num_inference_steps=1)
        assert [m.processor for m, _ in joint_attention_modules(model.unet)] == others
    finally:
        attn.set_processor(original)


def test_supported_on_every_family_with_text_attention():
    from safediff.families import families
    from safediff.support import check_defenses

    for name, adapter in families().items():
        assert "text_attention" in adapter.capabilities, name
        check_defenses(["nag"], name)
