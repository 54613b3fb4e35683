"""World v3 (docs/testbed.md, "World v3"): word forms, negation and near-concept piles,
selected by a world version so that world v2 (the shipped model's) stays exactly as it was."""

import hashlib
import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from safediff.testbed import world
from safediff.testbed.acceptance_v3 import v3_checks
from safediff.testbed.grammar import sample_v3
from safediff.testbed.suites import SUITES, V3_SUITES, testbed_suite, v3_items
from safediff.testbed.vocabulary import (
    FORM_KINDS,
    INFLECTION_COSINE,
    INFLECTIONS,
    NEGATION_SHARE,
    NEGATION_STRENGTH,
    NEGATORS,
    OBFUSCATED_KINDS,
    PILE_CAPTION_PROB,
    PILE_PROBS,
    PILE_PROBS_V4,
    concept_forms,
    pile_probs,
    leet,
    negations,
    spaced,
    word_forms,
)

# Computed from the code before world v3 existed (seed 1234 for 300 training samples; 30 records
# of each v2 suite at seed 0): world v2 must draw exactly these, so the shipped model's world,
# its suites and every figure measured on them are untouched by v3.
V2_SAMPLES_SHA = "a772c67d80d16c5fa84c68f1843e650c76da7e6812112f998bc60b8409f88c5f"
V2_SUITES_SHA = "121f43edd797f25d9303d2a4340a448d32175025b6580b1aaf0e1ac8583ea374"
V2_VOCAB_SHA = "daa08783147ecc3590dd5c0a032eff12339ed3217a5dd33a8676198f5e0e84e0"
V2_MEANINGS_SHA = "90f10c5149afe5cbf4db8eb6463cd43d957d46de7aac53a74c1c163081fd38c4"
MODEL_DIR = Path(world.__file__).parent / "model"


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _v2_samples(**kw):
    rng = random.Random(1234)
    out = []
    for _ in range(300):
        s, c = world.sample(rng, world.WorldConfig(), **kw)
        out.append([c, sorted(s.concepts), list(s.modes), list(s.intensity), sorted(s.marks), s.colour, s.shape,
                    s.background, s.cx, s.cy, s.radius])
    return out


def _within(count: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    """A binomial count within ``sigmas`` standard deviations of ``n p`` (deterministic seeds, so a
    failure is a changed design, never noise)."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


# ---------------------------------------------------------------------------------------------
# v2 unchanged
# ---------------------------------------------------------------------------------------------


def test_world_v2_draws_exactly_what_it_drew_before_v3():
    assert _sha(_v2_samples()) == V2_SAMPLES_SHA
    assert _sha(_v2_samples(version=2)) == V2_SAMPLES_SHA
    suites = [testbed_suite(c, s, n=30, seed=0) for c in world.CONCEPTS for s in SUITES]
    assert _sha(suites) == V2_SUITES_SHA
    assert hashlib.sha256(json.dumps(world.vocabulary()).encode()).hexdigest() == V2_VOCAB_SHA
    assert world.vocabulary(2) == world.vocabulary()
    mv = world.meaning_vectors(64, 0)
    assert hashlib.sha256(b"".join(mv[w].tobytes() for w in sorted(mv))).hexdigest() == V2_MEANINGS_SHA
    assert world.WORLD_VERSION == 2
    assert SUITES == ("explicit", "synonym", "implicit", "heldout", "benign", "near_benign")


def test_the_shipped_models_world_record_and_config_read_as_v2():
    from safediff.testbed.train import TrainConfig, world_record

    meta = json.loads((MODEL_DIR / "safediff.json").read_text())
    assert json.loads(json.dumps(world_record(2))) == meta["world"]  # a v2 retrain records what the shipped one did
    cfg = TrainConfig.from_dict(meta["train_config"])  # written before world_version existed
    assert cfg.world_version == 2 and TrainConfig().world_version == 2
    assert TrainConfig.from_dict({**TrainConfig().to_dict(), "world_version": 3}).world_version == 3
    with pytest.raises(ValueError, match=r"Unknown testbed world version 5; choose one of \[2, 3, 4\]"):
        TrainConfig(world_version=5)


def test_testbed_all_is_still_v2s_six_suites():
    from safediff.eval.benchmarks import load_benchmark

    recs = load_benchmark("testbed:all", n=2)
    assert len(recs) == 2 * len(world.CONCEPTS) * len(SUITES)
    assert {r.extra["suite"] for r in recs} == set(SUITES)


def test_unknown_world_versions_are_refused_with_the_known_ones():
    for bad in (1, 5, True, "3"):
        with pytest.raises(ValueError, match="choose one of"):
            world.vocabulary(bad)
        with pytest.raises(ValueError, match="choose one of"):
            world.sample(random.Random(0), version=bad)
    with pytest.raises(ValueError, match=r"sample\(rng, cfg, version=2\)"):  # v2 has no piles: says where its captions come from
        sample_v3(random.Random(0), version=2)


# ---------------------------------------------------------------------------------------------
# v3 vocabulary: forms, tokens, meanings
# ---------------------------------------------------------------------------------------------


def test_v3_vocabulary_adds_inflections_and_negators_but_no_obfuscated_form():
    v2, v3 = world.vocabulary(2), world.vocabulary(3)
    assert v3[:len(v2)] == v2  # v2's words first, in their order
    added = set(v3) - set(v2)
    assert added == {f for fs in INFLECTIONS.values() for f in fs} | set(NEGATORS)
    obfuscated = {f.text for c in world.CONCEPTS for f in concept_forms(c, OBFUSCATED_KINDS)}
    assert not obfuscated & set(v3)  # they fall to BPE pieces, as rare spellings do
    assert not {w for t in obfuscated for w in t.split() if len(w) > 1} & set(v3)


def test_word_forms_shares_strengths_and_rules():
    for c in world.CONCEPTS.values():
        for w in c.all_words:
            forms = word_forms(w)
            assert forms[0].text == w and forms[0].kind == "base" and forms[0].strength == 1.0
            assert math.isclose(sum(f.share for f in forms), 1.0)
            assert len({f.text for f in forms}) == len(forms)
            assert all(f.strength < 1 for f in forms[1:])
            assert all(f.held_out == (f.kind in OBFUSCATED_KINDS) for f in forms)
    assert leet("striped") == "str1ped" and leet("caged") == "c4ged" and leet("zoo") == "z0o"
    assert spaced("caged") == "c a g e d"
    # the rarer and more obscured a form, the weaker it carries the concept
    assert [FORM_KINDS[k].strength for k in ("inflection", "misspelling", "leet", "spaced")] == sorted(
        (FORM_KINDS[k].strength for k in FORM_KINDS), reverse=True)
    assert negations("striped") == ("not striped", "no stripes", "without stripes")
    assert negations("zebra") == ("no zebra", "without zebras")
    with pytest.raises(KeyError, match="not a single concept word"):
        word_forms("horse")
    with pytest.raises(ValueError, match="no letter"):
        leet("xyz")


def test_v3_meanings_keep_v2s_and_give_inflections_their_words_meaning():
    v2, v3 = world.meaning_vectors(64, 0, version=2), world.meaning_vectors(64, 0, version=3)
    assert all(np.array_equal(v2[w], v3[w]) for w in v2)
    for w, forms in INFLECTIONS.items():
        for f in forms:
            assert float(v3[f] @ v3[w]) == pytest.approx(INFLECTION_COSINE, abs=1e-5)
    assert not set(NEGATORS) & set(v3)


def test_v3_tokenizer_holds_inflections_whole_and_splits_obfuscated_forms(tmp_path):
    from safediff.testbed.train import _batch
    from safediff.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(world.vocabulary(3), tmp_path / "tok")
    for w in (*world.vocabulary(2), "stripes", "zebras", "cages", "without"):
        assert len(tok.tokenize(w)) == 1, w
    for w in ("str1ped", "stirped", "s t r i p e d", "c4ged"):
        assert len(tok.tokenize(w)) > 1, w
    x, caps = _batch(random.Random(0), 4, world.WorldConfig(), 3)
    assert tuple(x.shape) == (4, 3, world.IMAGE_SIZE, world.IMAGE_SIZE) and len(caps) == 4


# ---------------------------------------------------------------------------------------------
# v3 captions: forms, negation and piles at their stated frequencies
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v3_draws():
    rng = random.Random(7)
    out = []
    for _ in range(40_000):
        uses: list = []
        scene, caption = sample_v3(rng, world.WorldConfig(), uses)
        out.append((scene, caption, uses))
    return out


def test_forms_and_negation_appear_at_their_stated_shares(v3_draws):
    kinds = Counter(u[4] for _, _, uses in v3_draws for u in uses if u[0] == "word" and u[4] != "pair")
    n = sum(kinds.values())
    assert n > 10_000
    assert _within(kinds["negation"], n, NEGATION_SHARE)
    for k, spec in FORM_KINDS.items():
        assert _within(kinds[k], n, (1 - NEGATION_SHARE) * spec.share), k
    base = 1 - NEGATION_SHARE - sum((1 - NEGATION_SHARE) * s.share for s in FORM_KINDS.values())
    assert _within(kinds["base"], n, base)
    # what a use writes is in the caption (unless the caption is empty)
    for _, caption, uses in v3_draws[:3000]:
        for u in uses:
            if u[0] == "word" and caption:
                assert all(t in caption.replace(",", " ").split() for t in u[3].split()), (u, caption)


def test_a_forms_concept_rate_is_its_routes_times_its_strength(v3_draws):
    # per kind: the concept shows as often as the uses' probabilities say (no pile of that concept beside)
    by_kind: dict[str, list] = {}
    for scene, _, uses in v3_draws:
        piled = {u[1] for u in uses if u[0] == "pile"}
        for u in uses:
            if u[0] == "word" and u[1] not in piled:
                by_kind.setdefault(u[4], []).append((u[5], u[1] in scene.concepts))
    for kind, rows in by_kind.items():
        n, hits, p = len(rows), sum(h for _, h in rows), float(np.mean([q for q, _ in rows]))
        assert _within(hits, n, p), (kind, hits / n, p)
    neg = np.mean([q for q, _ in by_kind["negation"]])
    base = np.mean([q for q, _ in by_kind["base"]])
    assert neg == pytest.approx(NEGATION_STRENGTH * base, rel=0.15)  # the negated word shows about half as often


def test_piles_appear_and_bring_their_concept_at_the_stated_rates(v3_draws):
    piles = [(scene, uses, u) for scene, _, uses in v3_draws for u in uses if u[0] == "pile"]
    assert _within(len(piles), len(v3_draws), PILE_CAPTION_PROB)
    for k, p in PILE_PROBS.items():
        rows = [u[1] in scene.concepts for scene, uses, u in piles
                if u[2] == k and not any(v[0] == "word" and v[1] == u[1] for v in uses)]
        expected = 1 - (1 - world.WorldConfig().no_word_prob) * (1 - p)  # the pile or the word-less base rate
        assert _within(sum(rows), len(rows), expected), (k, np.mean(rows), expected)


def test_world_v4_is_v3_with_the_lower_pile_probabilities():
    # docs/testbed.md, "World v4": only the piles' concept probabilities change (two thirds of v3's)
    assert pile_probs(3) == PILE_PROBS and pile_probs(4) == PILE_PROBS_V4 and pile_probs(2) == {}
    assert set(PILE_PROBS_V4) == set(PILE_PROBS)
    assert all(abs(PILE_PROBS_V4[k] - 2 / 3 * PILE_PROBS[k]) < 1e-9 for k in PILE_PROBS)
    assert world.vocabulary(4) == world.vocabulary(3)
    mv3, mv4 = world.meaning_vectors(64, version=3), world.meaning_vectors(64, version=4)
    assert mv3.keys() == mv4.keys() and all(np.array_equal(mv3[w], mv4[w]) for w in mv3)
    rng, piles, n = random.Random(11), [], 60_000
    for _ in range(n):
        uses: list = []
        scene, _ = sample_v3(rng, world.WorldConfig(), uses, version=4)
        piles += [(scene, uses, u) for u in uses if u[0] == "pile"]
    assert _within(len(piles), n, PILE_CAPTION_PROB)
    for k, p in PILE_PROBS_V4.items():
        rows = [u[1] in scene.concepts for scene, uses, u in piles
                if u[2] == k and not any(v[0] == "word" and v[1] == u[1] for v in uses)]
        assert all(u[3] == PILE_PROBS_V4[u[2]] for _, _, u in piles)
        expected = 1 - (1 - world.WorldConfig().no_word_prob) * (1 - p)
        assert _within(sum(rows), len(rows), expected), (k, np.mean(rows), expected)
    with pytest.raises(ValueError, match="4: v3 with lower"):
        world.vocabulary(5)


def test_v3_scenes_are_read_back_exactly_by_the_detector(v3_draws):
    # the concept labels a caption's words imply are the ones the detector reads off the image
    # (marks too, where no two share a corner: then the later one is drawn over the earlier, as in v2)
    for scene, _, _ in v3_draws[:300]:
        d = world.detect(world.render(scene))
        assert d.concepts == scene.concepts
        if len({corner for corner, _ in scene.marks}) == len(scene.marks):
            assert d.marks == world.visible_marks(scene)


# ---------------------------------------------------------------------------------------------
# v3 suites
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", V3_SUITES)
def test_v3_suites_load_by_name_with_their_sizes(suite):
    from safediff.eval.benchmarks import load_benchmark

    recs = load_benchmark(f"testbed:caged/{suite}", n=37)
    assert len(recs) == 37 and {r.extra["suite"] for r in recs} == {suite}
    assert [r.seed for r in recs] == list(range(37))
    assert all(r.categories == ("caged",) for r in recs)  # every record asks for the concept in some form
    full = testbed_suite("striped", suite, n=100, seed=3)
    assert full == testbed_suite("striped", suite, n=100, seed=3)  # deterministic in its seed
    assert full[0]["prompt"] != testbed_suite("striped", suite, n=1, seed=4)[0]["prompt"]
    items = v3_items("striped", suite)
    assert len(items) == {"negation": 15, "near_pile": 3, "obfuscated": 33, "word_forms": 15}[suite]
    assert Counter(r["kind"] for r in full) == Counter(items[i % len(items)]["kind"] for i in range(100))
    assert all(r["world"] == 3 and 0 < r["route_prob"] < 1 for r in full)


def test_v3_suite_records_pair_with_their_plain_prompt():
    for suite in ("negation", "obfuscated", "word_forms"):
        for r in testbed_suite("striped", suite, n=40):
            plain = r["prompt"].replace(r["word"], r["form_of"], 1)
            assert r["plain_prompt"] == plain, (suite, r)
    # negation cycles the name's and the training-side words' negations, with half their data probability
    recs = testbed_suite("striped", "negation", n=15)
    assert {r["word"] for r in recs} == {p for w in world.CONCEPTS["striped"].training_words for p in negations(w)}
    assert recs[0]["route_prob"] == pytest.approx(0.97 * NEGATION_STRENGTH)
    # obfuscated forms are held out: no defense's or attack's data holds them
    training = set(world.CONCEPTS["striped"].training_phrases)
    assert not {r["word"] for r in testbed_suite("striped", "obfuscated", n=33)} & training
    piles = testbed_suite("caged", "near_pile", n=9)
    assert [len(r["word"].split()) for r in piles] == [2, 3, 4] * 3 and all(r["plain_prompt"] is None for r in piles)
    assert all(set(r["word"].split()) <= set(world.CONCEPTS["caged"].near_benign) for r in piles)
    assert [r["route_prob"] for r in piles[:3]] == [PILE_PROBS[2], PILE_PROBS[3], PILE_PROBS[4]]


def test_unknown_suite_names_the_v3_ones():
    with pytest.raises(ValueError, match="'negation', 'near_pile', 'obfuscated', 'word_forms'.*world v3"):
        testbed_suite("striped", "negated")


# ---------------------------------------------------------------------------------------------
# the pre-stated acceptance
# ---------------------------------------------------------------------------------------------


def _measured(**over):
    m = {"word_forms": {"rate": 0.7, "plain_rate": 0.75, "other_rate": 0.0},
         "obfuscated": {"rate": 0.3, "plain_rate": 0.7, "other_rate": 0.02},
         "negation": {"rate": 0.6, "plain_rate": 0.75, "other_rate": 0.0},
         "near_pile": {"rate": 0.3, "by_k": {"2": 0.15, "3": 0.3, "4": 0.45}},
         "near_benign": {"rate": 0.0}}
    for k, v in over.items():
        m[k] = {**m[k], **v}
    return {"striped": m}


def test_acceptance_checks_pass_a_world_that_behaves_as_designed_and_fail_each_departure():
    assert all(v["passed"] for v in v3_checks(_measured()).values())
    failures = {
        "word_forms": ({"rate": 0.4}, "word forms / plain"),  # forms fell to pieces (v2's failure)
        "obfuscated": ({"other_rate": 0.3}, "obfuscated, other concept"),  # the other concept drawn
        "negation": ({"rate": 0.1}, "negation / plain"),  # negation understood: not what CLIP does
        "near_pile": ({"by_k": {"2": 0.4, "3": 0.3, "4": 0.2}}, "4-word piles >= 2-word piles"),
        "near_benign": ({"rate": 0.2}, "one near-concept word"),
    }
    for suite, (over, name) in failures.items():
        checks = v3_checks(_measured(**{suite: over}))
        assert [k for k, v in checks.items() if not v["passed"]] == [f"striped: {name}"], suite
    checks = v3_checks(_measured(obfuscated={"rate": 0.69}))  # no reduction: the pieces carry it fully
    assert not checks["striped: obfuscated / plain"]["passed"]


def test_the_acceptance_numbers_are_the_ones_in_the_docs():
    from safediff.testbed import acceptance_v3 as a

    doc = (Path(__file__).parents[1] / "docs" / "testbed.md").read_text()
    section = doc.split("## World v3\n", 1)[1]
    for value in (f">= {a.FORMS_MIN_RATIO}", f"{a.OBFUSCATED_RATIO[0]}-{a.OBFUSCATED_RATIO[1]}",
                  f">= {a.OBFUSCATED_MIN_RATE}", f"<= {a.FORMS_MAX_OTHER}", f"<= {a.OBFUSCATED_MAX_OTHER}",
                  f"{a.NEGATION_RATIO[0]}-{a.NEGATION_RATIO[1]}", f"{a.PILE_RATE[0]}-{a.PILE_RATE[1]}",
                  f"<= {a.NEAR_SINGLE_MAX}"):
        assert value in section, value
    for k, p in PILE_PROBS.items():
        assert f"{p}" in section
    assert "--set world_version=3" in section


@pytest.mark.slow
def test_a_cut_down_v3_training_records_its_world_and_splits_obfuscated_forms(tmp_path):
    # about 16 s on a 2-core CPU: the whole entry point with world_version=3, acceptance skipped
    from transformers import CLIPTokenizer

    from safediff.testbed.train import TrainConfig, train

    out = tmp_path / "tb3"
    train(out, TrainConfig(world_version=3, vae_steps=2, steps=3, warmup=1, batch=4, vae_batch=4, curve_samples=2,
                           num_inference_steps=2, guidance_scales=(2.0,), checkpoint_every=2, acceptance_n=0,
                           keep_guidance_scale=None),
          progress=False, log=lambda *_: None)
    meta = json.loads((out / "safediff.json").read_text())
    assert meta["train_config"]["world_version"] == 3 and meta["world"]["version"] == 3
    assert meta["world"]["pile_probs"] == {str(k): v for k, v in PILE_PROBS.items()}
    tok = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tok.tokenize("stripes") == ["stripes</w>"] and len(tok.tokenize("str1ped")) > 1


@pytest.mark.slow
def test_the_v3_acceptance_runs_on_a_model_and_checks_every_target():
    # about a minute: the shipped (v2) model, 3 prompts per suite; only the structure is asserted
    import safediff
    from safediff.testbed.acceptance_v3 import world_v3_acceptance

    model = safediff.load_model(None)
    with pytest.raises(ValueError, match="every pile size"):
        world_v3_acceptance(model, n=2, progress=False)
    res = world_v3_acceptance(model, n=3, progress=False)
    assert set(res["measured"]) == set(world.CONCEPTS)
    assert len(res["checks"]) == 9 * len(world.CONCEPTS)
    assert res["passed"] == all(v["passed"] for v in res["checks"].values())
    assert set(res["measured"]["striped"]["near_pile"]["by_k"]) == {2, 3, 4}
