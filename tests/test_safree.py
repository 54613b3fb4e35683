"""SAFREE: projection math, trigger tokens, the self-validating filter, stage wiring."""

import numpy as np
import pytest
import torch

from safediff.defenses.safree import projection, svf_stop_step
from safediff.defenses.safree import SAFREEProjection
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack


def test_projection_is_an_orthogonal_projector_onto_the_rows():
    torch.manual_seed(0)
    a = torch.randn(3, 8)
    p = projection(a)
    assert torch.allclose(p @ p, p, atol=1e-10) and torch.allclose(p, p.T, atol=1e-12)
    assert torch.allclose(a.double() @ p.T, a.double(), atol=1e-10)  # rows are kept
    v = torch.randn(8).double()
    assert (a.double() @ (v - p @ v)).abs().max() < 1e-9  # the residual is orthogonal to every row


def test_svf_schedule():
    assert svf_stop_step(0.0) == 0
    assert svf_stop_step(1.0) == 10
    assert svf_stop_step(0.5333) == 5  # sigmoid(0) = 0.5
    assert svf_stop_step(1.0, k=3.5, t0=5.5, up_t=20) == 20


def test_disabled_is_bit_identical(tiny_sd1):
    def run(stack):
        with SafePipeline(tiny_sd1, DefenseStack.parse(stack)) as p:
            return np.asarray(p(["a red zebra"], num_inference_steps=3, guidance_scale=5).images[0])

    assert np.array_equal(run("safree(enabled=false)"), run(None))


def test_svf_needs_the_embedding_part(tiny_sd1):
    with pytest.raises(ValueError, match="needs the `safree` embedding defense"):
        SafePipeline(tiny_sd1, DefenseStack.parse("safree_svf"))(["a red zebra"], num_inference_steps=2, guidance_scale=5)


def test_safree_runs_on_v_prediction_and_changes_only_flagged_tokens(tiny_sd2v):
    with SafePipeline(tiny_sd2v, DefenseStack.parse('safree(space=["zebra", "tiger"])+safree_svf')) as p:
        pe, _, ctx = p.encode(["a red zebra on white background"])
        trig = ctx.get(SAFREEProjection).triggers[0]
        changed = (pe[0] != ctx.original_prompt_embeds[0]).any(-1)
        assert torch.equal(changed, trig)  # exactly the trigger tokens were projected
        out = p(["a red zebra on white background"], num_inference_steps=3, guidance_scale=5)
        assert out.images[0].size == (16, 16)


def test_trigger_tokens_on_the_testbed(testbed):
    from safediff.testbed.suites import testbed_suite

    flagged_concept, flagged_benign = [], []
    with SafePipeline(testbed, DefenseStack.parse("safree(preset=testbed-striped)")) as p:
        recs = testbed_suite("striped", "explicit", n=20)
        _, _, ctx = p.encode([r["prompt"] for r in recs])
        tok = testbed.tokenizer
        for b, r in enumerate(recs):
            ids = ctx.input_ids[b].tolist()
            word_pos = ids.index(tok.convert_tokens_to_ids("striped</w>"))
            flagged_concept.append(bool(ctx.get(SAFREEProjection).triggers[b, word_pos]))
        benign = testbed_suite("striped", "benign", n=20)
        _, _, ctx = p.encode([r["prompt"] for r in benign])
        flagged_benign = ctx.get(SAFREEProjection).triggers.float().sum(1).tolist()
    # measured, not tuned: the explicit word is a trigger far more often than a benign token
    assert np.mean(flagged_concept) > np.mean([f > 0 for f in flagged_benign])
