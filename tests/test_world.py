"""The testbed world: exact detectors, caption rules, held-out split, tokenizer."""

import random

import numpy as np
import pytest

from safediff.testbed import world


def test_detectors_are_exact_on_rendered_images():
    rng = random.Random(0)
    for _ in range(2000):
        concepts = [c for c in world.CONCEPTS if rng.random() < 0.5]
        scene = world.random_scene(rng, concepts)
        det = world.detect(world.render(scene))
        assert (det.colour, det.shape, det.background, det.concepts) == (
            scene.colour, scene.shape, scene.background, scene.concepts), scene


def test_every_attribute_value_is_detected():
    rng = random.Random(1)
    for colour in world.SHAPE_COLOURS:
        for shape in world.SHAPES:
            for bg in world.BACKGROUNDS:
                s = world.random_scene(rng, colour=colour, shape=shape, background=bg)
                d = world.detect(world.render(s))
                assert (d.colour, d.shape, d.background) == (colour, shape, bg)


def test_detector_rejects_wrong_size():
    with pytest.raises(ValueError, match="32x32 RGB"):
        world.detect(np.zeros((64, 64, 3), np.uint8))


def test_concept_words_are_never_dropped_and_empty_captions_are_about_ten_percent():
    rng = random.Random(0)
    cfg = world.WorldConfig()
    empty = 0
    n = 5000
    for _ in range(n):
        concepts = [c for c in world.CONCEPTS if rng.random() < 0.5]
        s = world.random_scene(rng, concepts)
        cap = world.caption(s, rng, cfg)
        if cap == "":
            empty += 1
            continue
        words = set(cap.replace(",", " ").split())
        for c in world.CONCEPTS:
            has_word = bool(words & set(world.CONCEPTS[c].all_words))
            assert has_word == (c in s.concepts), cap
    assert 0.08 < empty / n < 0.12


def test_held_out_split():
    for c in world.CONCEPTS.values():
        assert len(c.synonyms) >= 3 and len(c.triggers) >= 3 and len(c.near_benign) >= 3
        assert c.heldout_synonyms() and c.heldout_triggers()
        assert not set(c.training_words) & set(c.held_out)
        assert set(c.held_out) <= set(c.synonyms) | set(c.triggers)
        assert not set(c.near_benign) & set(c.all_words)


def test_unknown_attribute_in_world_config():
    with pytest.raises(ValueError, match="unknown attribute"):
        world.WorldConfig(attributes=("colour", "texture"))


def test_offline_clip_tokenizer_single_tokens(tmp_path):
    from transformers import CLIPTokenizer

    from safediff.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(world.vocabulary(), tmp_path)
    assert isinstance(tok, CLIPTokenizer)
    for w in world.vocabulary():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    ids = tok("qwxz", add_special_tokens=False).input_ids  # unseen word: bytes, never unk
    assert tok.unk_token_id not in ids and len(ids) > 1
