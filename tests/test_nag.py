"""NAG (Normalized Attention Guidance): the rule against its definition, the processor against a
hand-made attention call, the patch's exact restore, scale 0 as no defense, and the effect on the
testbed."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from safediff.defenses.nag import NAGAttnProcessor, NAGConfig, NAGRun, cross_attention_modules, nag_combine
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack

PROMPTS = ["a red circle on white background", "a striped zebra square"]


def test_nag_combine_clips_the_l1_ratio_and_blends_by_hand():
    z_pos = torch.tensor([[1.0, -1.0], [2.0, 0.0]], dtype=torch.float64)
    z_neg = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    # s = 2: Z~ = 3 Z+ - 2 Z- = [[3, -3], [4, 0]]; |Z~|/|Z+| = 6/2 = 3 (clipped to 2.5), 4/2 = 2 (kept)
    # Z^ = [[2.5, -2.5], [4, 0]]; alpha 0.5: Z = [[1.75, -1.75], [3, 0]]
    out = nag_combine(z_pos, z_neg, scale=2.0, tau=2.5, alpha=0.5)
    assert torch.allclose(out, torch.tensor([[1.75, -1.75], [3.0, 0.0]], dtype=torch.float64), atol=1e-12)
    assert torch.equal(nag_combine(z_pos, z_neg, scale=0.0, tau=2.5, alpha=0.5), z_pos)


def _definition(attn, x, ctx, neg, cfg):
    """NAG written out from the paper on an Attention module: per-head softmax attention by hand."""
    def z(context):
        q = attn.to_q(x)
        k, v = attn.to_k(context), attn.to_v(context)
        B, S, C = q.shape
        h, d = attn.heads, C // attn.heads
        q, k, v = (t.view(t.shape[0], -1, h, d).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
        return (w @ v).transpose(1, 2).reshape(B, S, C)

    zp, zn = z(ctx), z(neg.expand(ctx.shape[0], -1, -1))
    zt = zp + cfg.scale * (zp - zn)
    r = zt.abs().sum(-1, keepdim=True) / zp.abs().sum(-1, keepdim=True)
    zh = torch.where(r > cfg.tau, zt * cfg.tau / r, zt)
    return attn.to_out[0](cfg.alpha * zh + (1 - cfg.alpha) * zp)


def test_processor_equals_the_definition_on_guided_rows_and_leaves_the_others():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=4, dim_head=4, processor=AttnProcessor2_0()).double()
    x = torch.randn(4, 9, 16, dtype=torch.float64)
    prompt = torch.randn(2, 5, 12, dtype=torch.float64)
    uncond = torch.randn(2, 5, 12, dtype=torch.float64)
    neg = 3 * torch.randn(1, 5, 12, dtype=torch.float64)
    cfg = NAGConfig(negative="x", scale=4.0, tau=2.5, alpha=0.25)
    ctx = torch.cat([uncond, prompt])  # the denoiser's layout [uncond, cond]
    proc = NAGAttnProcessor(AttnProcessor2_0(), NAGRun(prompt, neg, cfg))
    with torch.no_grad():
        out = proc(attn, x, ctx)
        plain = AttnProcessor2_0()(attn, x, ctx)
        want = _definition(attn, x[2:], prompt, neg, cfg)
        zp = _definition(attn, x[2:], prompt, neg, NAGConfig(negative="x", scale=0.0))
    assert torch.equal(out[:2], plain[:2])  # the unconditional rows are attended as before
    assert torch.allclose(out[2:], want, atol=1e-10)
    assert not torch.allclose(want, zp)
    # the clipping acted on some tokens (tau large enough never clips, and gives another output)
    assert not torch.allclose(want, _definition(attn, x[2:], prompt, neg, NAGConfig(negative="x", tau=100.0)))
    # a call whose text is not the prompt's (another defense's conditioning) is attended as before
    other = torch.cat([uncond, uncond])
    with torch.no_grad():
        assert torch.equal(proc(attn, x, other), AttnProcessor2_0()(attn, x, other))


def test_config_refuses_bad_values_and_zero_is_inactive():
    assert not NAGConfig(negative="striped", scale=0).is_active()
    assert not NAGConfig(negative=" ").is_active()
    assert NAGConfig(negative="striped").is_active()
    for bad in ('nag(negative="x", scale=-1)', 'nag(negative="x", tau=0.5)', 'nag(negative="x", alpha=2)'):
        with pytest.raises(ValueError):
            DefenseStack.parse(bad)


def test_patch_restores_every_processor_object_and_scale_zero_is_no_defense(tiny_sd1):
    before = [m.processor for m in cross_attention_modules(tiny_sd1.unet)]
    assert before
    run = lambda s: np.stack([np.asarray(r.image) for r in SafePipeline(tiny_sd1, DefenseStack.parse(s))(  # noqa: E731
        PROMPTS, seed=1, num_inference_steps=3).records])
    base = run(None)
    assert np.array_equal(run('nag(negative="zebra", scale=0)'), base)
    guided = run('nag(negative="zebra", scale=4)')
    assert not np.array_equal(guided, base)
    assert [m.processor for m in cross_attention_modules(tiny_sd1.unet)] == before
    assert np.array_equal(run(None), base)
    # no second branch: NAG also acts at guidance scale 1, where a negative prompt cannot
    pipe = SafePipeline(tiny_sd1, DefenseStack.parse('nag(negative="zebra")'))
    at1 = pipe(PROMPTS, seed=1, num_inference_steps=3, guidance_scale=1.0)
    plain1 = SafePipeline(tiny_sd1, DefenseStack.parse(None))(PROMPTS, seed=1, num_inference_steps=3, guidance_scale=1.0)
    assert not np.array_equal(np.asarray(at1.records[0].image), np.asarray(plain1.records[0].image))


def test_refused_without_text_attention(monkeypatch):
    """SD3 and FLUX are guided through their joint attention (tests/test_nag_transformer.py); a
    family without ``text_attention`` is refused by the support check, and a denoiser with neither
    cross- nor joint attention when the defense is built."""
    from types import SimpleNamespace

    from safediff.defenses.nag import NAG
    from safediff.families import registry
    from safediff.families.sd1 import SD1
    from safediff.support import check_defenses

    class NoTextAttention(SD1):
        name = "no-text-attention"
        capabilities = frozenset({"unet"})

    monkeypatch.setitem(registry._FAMILIES, NoTextAttention.name, NoTextAttention())
    with pytest.raises(ValueError, match="nag needs text_attention"):
        check_defenses(["nag"], NoTextAttention.name)
    with pytest.raises(ValueError, match="nag: .*neither UNet cross-attention nor SD3/FLUX joint attention"):
        NAG(NAGConfig(negative="zebra"), SimpleNamespace(unet=torch.nn.Linear(2, 2), family="made-up"))


def test_nag_lowers_the_striped_rate_on_the_testbed(testbed):
    from safediff.testbed import world
    from safediff.testbed.suites import testbed_suite

    recs = testbed_suite("striped", "implicit", n=16, seed=7)

    def rate(stack):
        with SafePipeline(testbed, DefenseStack.parse(stack)) as pipe:
            out = pipe([r["prompt"] for r in recs], image_ids=[(r["seed"], 0) for r in recs], batch_size=16,
                       num_inference_steps=10)
        return np.mean(["striped" in world.detect(np.asarray(r.image)).concepts for r in out.records])

    base, nag = rate(None), rate('nag(negative="striped")')
    print(f"striped rate on 16 implicit prompts, 10 steps: no defense {base:.3f}, nag {nag:.3f}")
    assert base > 0 and nag < base


def test_nag_composes_with_the_other_stages(tiny_sd1):
    """NAG stacked with an embedding defense, SLD and a negative prompt: it runs, changes the images
    of that stack, and leaves the model as it was."""
    def images(stack):
        out = SafePipeline(tiny_sd1, DefenseStack.parse(stack))(PROMPTS, seed=2, num_inference_steps=2)
        return np.stack([np.asarray(r.image) for r in out.records])

    others = 'safree+sld(concept="zebra")+negative_prompt(text="zebra")'
    before = [m.processor for m in cross_attention_modules(tiny_sd1.unet)]
    assert not np.array_equal(images(f'nag(negative="zebra")+{others}'), images(others))
    assert [m.processor for m in cross_attention_modules(tiny_sd1.unet)] == before
