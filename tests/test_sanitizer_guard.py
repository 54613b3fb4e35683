"""Embedding Sanitizer and the prompt guard on the testbed (cut-down training, seconds)."""

import numpy as np
import pytest
import torch

from safediff import encoding
from safediff.artifacts import ArtifactMismatchError
from safediff.defenses.sanitizer import SanitizerTrainConfig, explain, load_sanitizer, train_sanitizer
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack
from safediff.testbed import world
from safediff.testbed.suites import testbed_suite


@pytest.fixture(scope="module")
def sanitizer_path(tmp_path_factory, testbed):
    out = tmp_path_factory.mktemp("es") / "es.safetensors"
    return train_sanitizer(testbed, out, SanitizerTrainConfig(steps=250, batch_size=32), progress=False)


def _rate(model, stack, concept="striped", suite="explicit", n=32):
    recs = testbed_suite(concept, suite, n=n, seed=11)
    with SafePipeline(model, DefenseStack.parse(stack)) as pipe:
        out = pipe([r["prompt"] for r in recs], image_ids=[(r["seed"], 0) for r in recs], batch_size=32)
    dets = [world.detect(np.asarray(r.image)) for r in out.records]
    return np.mean([concept in d.concepts for d in dets])


def test_sanitizer_lowers_the_concept_rate(testbed, sanitizer_path):
    base = _rate(testbed, None)
    es = _rate(testbed, f'sanitizer(path="{sanitizer_path}")')
    assert es <= base - 0.3, (base, es)


def test_zero_strength_is_skipped_and_identical(testbed, sanitizer_path):
    pipe = SafePipeline(testbed, DefenseStack.parse(f'sanitizer(path="{sanitizer_path}", strength=0)'))
    assert pipe.defenses["embedding"] == []


def test_benign_embeddings_nearly_unchanged_and_negative_untouched(testbed, sanitizer_path):
    recs = testbed_suite("striped", "benign", n=32, seed=3)
    with SafePipeline(testbed, DefenseStack.parse(f'sanitizer(path="{sanitizer_path}")')) as pipe:
        pe, ne, ctx = pipe.encode([r["prompt"] for r in recs])
    mask = ctx.attention_mask.bool()
    cos = torch.nn.functional.cosine_similarity(pe[mask], ctx.original_prompt_embeds[mask], dim=-1)
    assert cos.mean() >= 0.99, float(cos.mean())  # real tokens only, padding excluded
    empty, _, _ = encoding.encode_prompts(testbed, [""] * len(recs))
    assert torch.equal(ne, empty)  # the negative/unconditional embedding is never transformed


def test_explain_scores_the_concept_token_highest(testbed, sanitizer_path):
    net = load_sanitizer(sanitizer_path, testbed)
    pairs = dict(explain(testbed, net, "a striped red circle on white background"))
    assert pairs["striped"] > max(v for k, v in pairs.items() if k in ("red", "circle", "white"))
    # regression (first-hour issue): every token after the concept word scored 1.00
    assert pairs["striped"] == 1.0 and max(pairs[k] for k in ("red", "circle", "background")) < 0.8


def test_sanitizer_for_another_text_encoder_is_refused(tiny_sd1, sanitizer_path, tmp_path):
    # another family: the message names both; the same family with another width: names both widths
    with pytest.raises(ArtifactMismatchError, match="safediff-testbed model's text encoder, but this is a sd1 model"):
        SafePipeline(tiny_sd1, DefenseStack.parse(f'sanitizer(path="{sanitizer_path}")'))
    from safediff.artifacts import read_artifact, save_artifact

    tensors, record = read_artifact(sanitizer_path)
    other = save_artifact(tensors, tmp_path / "es.safetensors", kind="embedding-sanitizer", config={}, seed=0,
                          base_model_hash=record["base_model_hash"], base_model_family="sd1",
                          extra={"dim": record["dim"], "hidden": record["hidden"],
                                 "text_encoder_hash": record["text_encoder_hash"]})
    with pytest.raises(ArtifactMismatchError, match="wide"):
        SafePipeline(tiny_sd1, DefenseStack.parse(f'sanitizer(path="{other}")'))


def test_sanitizer_config_errors():
    with pytest.raises(ValueError, match="strength"):
        DefenseStack.parse('sanitizer(path="x", strength=1.5)')
    with pytest.raises(ValueError, match="concepts"):
        SanitizerTrainConfig(concepts=())


def test_guard_refuses_concept_prompts_with_a_message_and_allows_benign(testbed):
    with SafePipeline(testbed, DefenseStack.parse("prompt_guard")) as pipe:
        out = pipe(["a red circle on white background, striped", "a blue square on gray background"], num_inference_steps=3)
        guard = pipe.defenses["prompt_filter"][0]
    assert out.records[0].refused and "striped" in out.records[0].refusal_reason and out.records[0].image is None
    assert not out.records[1].refused and out.records[1].image is not None
    for c, words in guard.concept_words.items():  # calibrated on training-side words only
        assert not set(words) & set(world.CONCEPTS[c].held_out)


def test_guard_reads_a_learned_token_by_its_vectors_not_its_name(testbed):
    """A textual-inversion placeholder is scored as the model encodes it: the concept word's own
    vectors under a neutral name are refused; a benign word's vectors under a name that spells the
    concept are allowed (before the fix the name's characters were pooled instead)."""
    emb = testbed.text_encoder.get_input_embeddings().weight.detach()
    vec = {w: emb[testbed.tokenizer(w, add_special_tokens=False).input_ids] for w in ("striped", "blue")}
    assert all(v.shape[0] == 1 for v in vec.values())  # one token each
    hidden = encoding.InvertedConcept("<tok-a*>", vec["striped"].clone(), {})
    decoy = encoding.InvertedConcept("<striped-adv*>", vec["blue"].clone(), {})
    prompts = ["a red circle on white background, <tok-a*>", "a red circle on white background, <striped-adv*>"]
    with SafePipeline(testbed, DefenseStack.parse("prompt_guard"), token_embeddings=[hidden, decoy]) as pipe:
        out = pipe(prompts, num_inference_steps=2)
        guard = pipe.defenses["prompt_filter"][0]
        plain = guard.score(prompts[1])  # no tokens given: the name's characters are read
    assert out.records[0].refused and "striped" in out.records[0].refusal_reason
    assert not out.records[1].refused and out.records[1].image is not None
    assert plain["striped"] >= guard.thresholds["striped"]
