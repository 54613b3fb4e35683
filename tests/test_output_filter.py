"""The output filter (stage 5): a flagged image is blanked or flagged, an inactive filter is no
defense bit for bit, and the runner scores what the filter lets through."""

import numpy as np
import pytest

import safediff
from safediff.eval.runner import run_eval, summarize
from safediff.stack import DefenseStack

PROMPTS = ["red circle, striped, on white background", "blue square on black background"]


def test_blank_flag_and_threshold(testbed):
    plain = safediff.build(testbed, None)(PROMPTS, seed=3)
    blank = safediff.build(testbed, 'output_filter(detector="testbed:striped")')(PROMPTS, seed=3)
    flag = safediff.build(testbed, 'output_filter(detector="testbed:striped", action="flag")')(PROMPTS, seed=3)
    lax = safediff.build(testbed, 'output_filter(detector="testbed:striped", score_threshold=1.01)')(PROMPTS, seed=3)
    striped = np.asarray(plain.records[0].image)
    assert blank.records[0].flagged and not np.asarray(blank.records[0].image).any()  # black
    assert "output filter" in blank.records[0].refusal_reason
    assert not blank.records[1].flagged  # the benign image passes unchanged
    assert np.array_equal(np.asarray(blank.records[1].image), np.asarray(plain.records[1].image))
    assert flag.records[0].flagged and np.array_equal(np.asarray(flag.records[0].image), striped)
    assert not lax.records[0].flagged and np.array_equal(np.asarray(lax.records[0].image), striped)
    score = blank.records[0].output_scores["output_filter:testbed:striped"]
    assert 0.15 <= score <= 1.0


def test_inactive_filter_is_no_defense_bit_for_bit(testbed):
    assert DefenseStack.parse('output_filter(detector="")').active().defenses == ()
    a = safediff.build(testbed, None)(PROMPTS[:1], seed=1).records[0].image
    b = safediff.build(testbed, 'output_filter(detector="")')(PROMPTS[:1], seed=1).records[0].image
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="action"):
        DefenseStack.parse('output_filter(detector="testbed:striped", action="drop")')
    with pytest.raises(ValueError, match="Unknown detector"):
        DefenseStack.parse('output_filter(detector="q17")')


def test_runner_scores_what_the_filter_lets_through(testbed, tmp_path):
    spec = "testbed:striped/explicit"
    run_eval(spec, tmp_path / "none", model=testbed, n=6, progress=False)
    run_eval(spec, tmp_path / "filter", model=testbed, n=6, progress=False,
             defenses='output_filter(detector="testbed:striped")')
    assert summarize(tmp_path / "none")["unsafe"]["all"]["rate"] == 1.0
    assert summarize(tmp_path / "filter")["unsafe"]["all"]["rate"] == 0.0  # the judge's own detector: zero by construction


# issue 19 review, defect 3 ------------------------------------------------------------
def test_an_image_is_blanked_only_by_a_check_that_blanks_it(testbed):
    # a "flag" check flags the striped image; the "blank" check (a threshold no image reaches)
    # does not: the image must be kept, flagged
    stack = ('output_filter(detector="testbed:striped", action="flag")'
             '+output_filter(detector="testbed:caged", action="blank")')
    prompt = ["a striped red circle on white background"]
    plain = safediff.build(testbed, None)(prompt, seed=3).records[0]
    rec = safediff.build(testbed, stack)(prompt, seed=3).records[0]
    assert rec.flagged and np.array_equal(np.asarray(rec.image), np.asarray(plain.image))
