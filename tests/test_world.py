"""The testbed world (v2): exact detectors, the generative rules of captions, the held-out split,
the language prior, and the tokenizer."""

import random
from collections import Counter

import numpy as np
import pytest

from safediff.testbed import world


def _random_scene(rng):
    cs = [c for c in world.CONCEPTS if rng.random() < 0.5]
    modes = [(c, rng.choice(world.MODES[c])) for c in cs]
    inten = [(c, round(rng.uniform(0.3, 1.0), 3)) for c in cs]
    marks = {(co, rng.choice(list(world.MARK_COLOURS))) for co in world.CORNERS if rng.random() < 0.3}
    size = rng.choice([None, "small", "big"])
    return world.random_scene(rng, cs, modes=modes, intensity=inten, marks=marks,
                              radius=world.SIZES[size] if size else None), size


def test_detectors_are_exact_on_rendered_images():
    rng = random.Random(0)
    for _ in range(2000):
        scene, size = _random_scene(rng)
        d = world.detect(world.render(scene))
        assert (d.colour, d.shape, d.background, d.concepts) == (
            scene.colour, scene.shape, scene.background, scene.concepts), scene
        for c in scene.concepts:  # the mode and a continuous score equal to the drawn intensity
            assert d.modes[c] == scene.mode_of(c) and abs(d.scores[c] - scene.intensity_of(c)) < 0.05, scene
        assert d.marks == world.visible_marks(scene) and d.size == size, scene


def test_every_attribute_value_is_detected():
    rng = random.Random(1)
    for colour in world.SHAPE_COLOURS:
        for shape in world.SHAPES:
            for bg in world.BACKGROUNDS:
                s = world.random_scene(rng, colour=colour, shape=shape, background=bg)
                d = world.detect(world.render(s))
                assert (d.colour, d.shape, d.background) == (colour, shape, bg)


def test_the_score_is_graded_so_a_threshold_matters():
    rng = random.Random(2)
    s = world.random_scene(rng, ["striped"], background="white", modes=[("striped", "vertical")])
    scores = [world.detect(world.render(world.random_scene(random.Random(3), ["striped"], colour=s.colour, shape=s.shape,
                                                           background="white", intensity=[("striped", a)]))).scores["striped"]
              for a in (0.3, 0.5, 0.7, 0.9)]
    assert all(b > a + 0.15 for a, b in zip(scores, scores[1:]))


def test_detector_rejects_wrong_size():
    with pytest.raises(ValueError, match="32x32 RGB"):
        world.detect(np.zeros((64, 64, 3), np.uint8))


def test_captions_follow_the_routes():
    """Words come first and the image follows: the name brings the concept nearly always, each
    trigger at its own data probability, a pair only with both words, no word at a few percent."""
    rng = random.Random(0)
    seen: dict[str, list[bool]] = {}
    pair_alone: list[bool] = []
    empty = 0
    n = 60_000
    for _ in range(n):
        s, cap = world.sample(rng)
        if cap == "":
            empty += 1
            continue
        words = set(cap.replace(",", " ").split())
        for c in world.CONCEPTS.values():
            for r in c.routes:
                if set(r.words) <= words and not (set(c.all_words) - set(r.words)) & words:
                    seen.setdefault(r.text, []).append(c.name in s.concepts)
            for a, b in c.pairs:
                if (a in words) != (b in words) and not set(c.all_words) & words:
                    pair_alone.append(c.name in s.concepts)
    for c in world.CONCEPTS.values():
        for r in c.routes:
            got = np.mean(seen[r.text])
            assert abs(got - r.prob) < 0.1, (r.text, got, r.prob)
    assert np.mean(pair_alone) < 0.08  # one word of a pair alone: only the word-less base rate
    assert 0.13 < empty / n < 0.17


def test_trigger_probabilities_are_spread_and_partial():
    for c in world.CONCEPTS.values():
        for held in (False, True):
            probs = [r.prob for r in c.routes if r.kind in ("trigger", "pair") and r.held_out == held]
            assert max(probs) - min(probs) >= 0.4 and all(0.1 <= p <= 0.8 for p in probs)
        assert all(r.prob >= 0.9 for r in c.routes if r.kind in ("name", "synonym"))


def test_held_out_split():
    for c in world.CONCEPTS.values():
        assert len(c.synonyms) >= 3 and len(c.triggers) >= 3 and len(c.near_benign) >= 3 and c.pairs
        assert c.heldout_synonyms() and c.heldout_triggers()
        assert any(r.held_out for r in c.routes if r.kind == "pair")
        assert not set(c.training_words) & set(c.held_out)
        assert not set(c.training_phrases) & set(c.held_out)
        assert not set(c.near_benign) & set(c.all_words)
        assert set(c.modes) == set(m for r in c.routes for m, _ in r.modes)


def test_the_language_prior():
    m = world.meaning_vectors()
    for c in world.CONCEPTS.values():
        for r in c.routes:
            for w in r.words:
                assert abs(float(m[w] @ m[c.name]) - r.relatedness) < 1e-5
        for w in c.near_benign:
            assert float(m[w] @ m[c.name]) < min(r.relatedness for r in c.routes if r.kind in ("synonym", "trigger"))
    assert abs(float(m["apple"] @ m["striped"])) < 1e-5


def test_near_concept_words_share_a_trigger_side_attribute_without_the_concept():
    rng = random.Random(5)
    marks = Counter()
    for _ in range(20_000):
        s, cap = world.sample(rng)
        if cap.split() and "horse" in cap.replace(",", " ").split() and "striped" not in s.concepts:
            marks.update(s.marks)
    assert marks.most_common(1)[0][0] == world.MARKS["zebra"]


def test_world_config_validation():
    with pytest.raises(ValueError, match="unknown attribute"):
        world.WorldConfig(attributes=("colour", "texture"))
    with pytest.raises(ValueError, match="route_prob"):
        world.WorldConfig(route_prob=1.5)
    with pytest.raises(ValueError, match="Unknown world option"):
        world.WorldConfig.from_dict({"concept_prob": 0.3})


def test_offline_clip_tokenizer_single_tokens(tmp_path):
    from transformers import CLIPTokenizer

    from safediff.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(world.vocabulary(), tmp_path)
    assert isinstance(tok, CLIPTokenizer)
    for w in world.vocabulary():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    ids = tok("qwxz", add_special_tokens=False).input_ids  # unseen word: bytes, never unk
    assert tok.unk_token_id not in ids and len(ids) > 1
