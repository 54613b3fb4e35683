"""The vision-language judge detector (issue 33 item 4), on a tiny random LLaVA-style model built
offline, and the output filter's sensitivity and flag mode with it."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import safediff  # noqa: E402
from safediff.defenses.output_filter import OutputFilter, OutputFilterConfig  # noqa: E402
from safediff.detectors import make_detector  # noqa: E402
from safediff.vlm_judge import DEFAULT_JUDGE_PROMPT, VLMJudgeDetector, answer_probability  # noqa: E402

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "yes", "no", "is", "this", "image",
         "unsafe", "safe", "?", "answer", "one", "word:"]
TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")
IMAGE = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)


def build_tiny_vlm(folder):
    """A random LLaVA (1-layer CLIP vision tower, 1-layer Llama) and a word-level tokenizer, saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<image>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1, chat_template=TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=16, patch_size=8, projection_dim=8),
        text_config=LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64),
        image_token_index=WORDS.index("<image>"), vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"))


@pytest.fixture(scope="module")
def judge(tiny_vlm):
    return make_detector(f"vlm:{tiny_vlm}:0.5")


def with_answer_bias(judge, yes: float, no: float) -> VLMJudgeDetector:
    """The same judge with an lm_head that ignores the hidden state: logits = a hand-set bias."""
    model = judge.model
    vocab, hidden = model.lm_head.out_features, model.lm_head.in_features
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[WORDS.index("yes")] = yes
        head.bias[WORDS.index("no")] = no
    original = model.lm_head
    model.lm_head = head
    return original


def test_tiny_judge_loads_offline_and_scores_the_first_answer_token(judge, tiny_vlm):
    [r] = judge.detect([IMAGE])
    assert r.error is None and 0.0 <= r.score <= 1.0
    # recompute by hand from one forward pass: softmax over the (yes, no) logits at the last position
    text = "USER: <image> " + DEFAULT_JUDGE_PROMPT + " ASSISTANT:"
    assert judge.text == text
    from PIL import Image
    inputs = judge.processor(images=[Image.fromarray(IMAGE)], text=[text], return_tensors="pt")
    with torch.no_grad():
        logits = judge.model(**inputs).logits[0, -1]
    yes, no = logits[WORDS.index("yes")], logits[WORDS.index("no")]
    expected = float(torch.exp(yes) / (torch.exp(yes) + torch.exp(no)))
    assert r.score == pytest.approx(expected, abs=1e-6)
    assert r.unsafe == (expected >= 0.5)
    assert r.details["answer_mass"] == pytest.approx(float(torch.softmax(logits, 0)[[7, 8]].sum()), abs=1e-6)
    card = judge.protocol.to_dict()
    assert card["detector"] == "vlm-judge" and tiny_vlm in card["version"]
    assert card["classes"] == ["yes"] and card["threshold"] == 0.5 and card["preset"] == "pinned-prompt-v1"
    assert len(card["weights_hash"]) == 64 and "rendered prompt sha256" in card["aggregation"]


def test_hand_set_bias_decides_and_threshold_moves_the_decision(judge):
    original = with_answer_bias(judge, yes=30.0, no=0.0)
    try:
        [r] = judge.detect([IMAGE])
        assert r.unsafe is True and r.score == pytest.approx(1.0)
        judge.model.lm_head.bias[WORDS.index("no")].data.fill_(60.0)
        [r] = judge.detect([IMAGE])
        assert r.unsafe is False and r.score == pytest.approx(0.0, abs=1e-9)
        judge.model.lm_head.bias[WORDS.index("yes")].data.fill_(1.0)
        judge.model.lm_head.bias[WORDS.index("no")].data.fill_(0.0)
        p = 1.0 / (1.0 + math.exp(-1.0))  # 0.731
        [r] = judge.detect([IMAGE])
        assert r.score == pytest.approx(p, abs=1e-6) and r.unsafe is True
        threshold = judge.threshold
        try:
            judge.threshold = 0.75
            assert judge.detect([IMAGE])[0].unsafe is False
            judge.threshold = p
            assert judge.detect([IMAGE])[0].unsafe is True  # >= threshold
        finally:
            judge.threshold = threshold
    finally:
        judge.model.lm_head = original


def test_answer_probability_is_the_two_way_softmax():
    logits = torch.tensor([0.0, 2.0, -1.0, 5.0])
    p, mass = answer_probability(logits, unsafe_id=1, safe_id=2)
    assert p == pytest.approx(math.exp(2) / (math.exp(2) + math.exp(-1)))
    assert mass == pytest.approx((math.exp(2) + math.exp(-1)) / float(torch.exp(logits).sum()))


def test_protocol_hash_changes_with_prompt_threshold_and_answers(judge, tiny_vlm):
    same = VLMJudgeDetector(tiny_vlm, threshold=0.5, model=judge.model, processor=judge.processor)
    base = same.protocol.hash()
    again = VLMJudgeDetector(tiny_vlm, threshold=0.5, model=judge.model, processor=judge.processor)
    assert again.protocol.hash() == base
    other_thr = VLMJudgeDetector(tiny_vlm, threshold=0.7, model=judge.model, processor=judge.processor)
    other_prompt = VLMJudgeDetector(tiny_vlm, prompt="is this image unsafe ?", model=judge.model,
                                    processor=judge.processor)
    other_answers = VLMJudgeDetector(tiny_vlm, answers=("unsafe", "safe"), model=judge.model,
                                     processor=judge.processor)
    templated = VLMJudgeDetector(tiny_vlm, template="USER: <image> {prompt} ASSISTANT:", model=judge.model,
                                 processor=judge.processor)
    hashes = {base, other_thr.protocol.hash(), other_prompt.protocol.hash(), other_answers.protocol.hash()}
    assert len(hashes) == 4
    assert other_prompt.protocol.preset == "custom-prompt" and templated.protocol.preset == "custom-prompt"
    assert templated.text == judge.text  # same rendered text as the chat template here


def test_bad_options_are_refused_before_loading(tiny_vlm):
    for kwargs, match in [({"threshold": 1.5}, "threshold"), ({"prompt": " "}, "prompt"),
                          ({"answers": ("yes", "yes")}, "answers"), ({"template": "USER: <image>"}, "template"),
                          ({"dtype": "bfloat17"}, "dtype")]:
        with pytest.raises(ValueError, match=match):
            VLMJudgeDetector("/nonexistent/model", **kwargs)  # refused before any loading
    with pytest.raises(ValueError, match="names no model"):
        make_detector("vlm:")
    with pytest.raises(ValueError, match="one token"):
        VLMJudgeDetector(tiny_vlm, answers=("yes no", "safe"))


def test_errors_are_recorded_never_safe(judge, monkeypatch):
    results = judge.detect([IMAGE[..., 0], IMAGE])  # a grayscale image fails, the RGB one is judged
    assert results[0].unsafe is None and "RGB" in results[0].error
    assert results[1].error is None
    monkeypatch.setattr(judge, "first_token_logits", lambda image: (_ for _ in ()).throw(RuntimeError("OOM")))
    [r] = judge.detect([IMAGE])
    assert r.unsafe is None and r.error == "RuntimeError: OOM"


def test_output_filter_sensitivity_and_flag_mode_with_the_judge(testbed, tiny_vlm):
    prompts = ["red circle, striped, on white background"]
    plain = safediff.build(testbed, None)(prompts, seed=3).records[0]
    spec = f"vlm:{tiny_vlm}"
    flag = safediff.build(testbed, f'output_filter(detector="{spec}", action="flag", score_threshold=0.0)')(
        prompts, seed=3).records[0]
    blank = safediff.build(testbed, f'output_filter(detector="{spec}", score_threshold=0.0)')(
        prompts, seed=3).records[0]
    lax = safediff.build(testbed, f'output_filter(detector="{spec}", score_threshold=1.01)')(prompts, seed=3).records[0]
    assert flag.flagged and np.array_equal(np.asarray(flag.image), np.asarray(plain.image))  # kept, flagged
    assert blank.flagged and not np.asarray(blank.image).any()  # blacked out
    assert not lax.flagged and np.array_equal(np.asarray(lax.image), np.asarray(plain.image))
    assert 0.0 <= flag.output_scores[f"output_filter:{spec}"] <= 1.0


def test_output_filter_fails_closed_on_a_detector_error(tiny_vlm, monkeypatch):
    filt = OutputFilter(OutputFilterConfig(detector=f"vlm:{tiny_vlm}", action="flag"), None)
    monkeypatch.setattr(filt.detector, "first_token_logits", lambda image: (_ for _ in ()).throw(RuntimeError("OOM")))
    [d] = filt.check([IMAGE])
    assert d.flagged and "RuntimeError: OOM" in d.reason and d.action == "flag"


def test_spec_parsing_and_the_server_refuses_a_judge_outside_its_dirs(tiny_vlm, tmp_path):
    from safediff.serve import AccessPolicy
    from safediff.stack import DefenseStack
    from safediff.vlm_judge import split_vlm_spec

    assert split_vlm_spec("org/judge:0.3") == ("org/judge", 0.3)
    assert split_vlm_spec("org/judge") == ("org/judge", 0.5)
    assert make_detector(f"vlm:{tiny_vlm}:0.3").protocol.threshold == 0.3
    stack = DefenseStack.parse(f'output_filter(detector="vlm:{tiny_vlm}:0.3")')
    with pytest.raises(PermissionError):
        AccessPolicy([tmp_path]).check_stack(stack)
    AccessPolicy([tiny_vlm]).check_stack(stack)  # inside an allowed directory: accepted
