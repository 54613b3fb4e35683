"""Model worlds (issue 30, item 3): the testbed is a registered plug-in of :mod:`safediff.worlds`
and production code asks a model's world for its defaults instead of branching on the testbed."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import safediff
from safediff import worlds
from safediff.testbed import world as tb_world
from safediff.worlds import OPEN_WORLD, World, register_world, world_of

SRC = Path(safediff.__file__).resolve().parent


def test_the_testbed_registers_its_world_and_other_models_have_the_open_one(testbed, tiny_sd1):
    w = world_of(testbed)
    assert w.name == "testbed" and w is worlds.worlds()[testbed.family]
    assert w.concepts() == tuple(tb_world.CONCEPTS) and w.default_concept == "striped"
    assert w.default_detectors() == [f"testbed:{c}" for c in tb_world.CONCEPTS]
    assert w.exact_detector and w.defense_defaults and w.suites
    assert world_of(tiny_sd1) is OPEN_WORLD and world_of(object()) is OPEN_WORLD
    o = OPEN_WORLD
    assert (o.concepts(), o.default_concept, o.default_detectors(), o.detector_spec("striped"), o.suites) == \
        ((), None, [], None, ())
    assert o.seed_prompts("nudity") is None and o.concept_prompts("nudity", 4) is None and o.verifier("nudity") is None
    assert not (o.exact_detector or o.defense_defaults or o.default_stack or o.demo_prompts)
    with pytest.raises(ValueError, match="no exact detector"):
        o.concepts_in(np.zeros((32, 32, 3), np.uint8))


def test_the_testbed_worlds_prompts_use_training_side_words_only_and_are_seeded(testbed):
    w = world_of(testbed)
    c = tb_world.CONCEPTS["striped"]
    pairs = w.concept_prompts("striped", 6, seed=3)
    assert pairs == w.concept_prompts("striped", 6, seed=3) != w.concept_prompts("striped", 6, seed=4)
    def has(text, word):
        return f" {word} " in f" {text.replace(',', ' ')} "

    for prompt, caption in pairs:
        assert "{}" in caption and any(has(prompt, word) for word in c.training_words)
        assert not any(has(prompt, word) for word in c.held_out)
    scenes = w.scene_prompts(5, "key")
    assert scenes == w.scene_prompts(5, "key") != w.scene_prompts(5, "other") and len(scenes) == 5
    every = [word for k in tb_world.CONCEPTS.values() for word in (*k.training_words, *k.held_out)]
    assert not any(has(scene, word) for scene in scenes for word in every)
    assert len(w.seed_prompts("striped", n=3)) == 3
    with pytest.raises(ValueError, match="Unknown testbed concept"):
        w.concept_prompts("spotted", 2)


class _ToyWorld(World):
    name = "toy"
    default_concept = "red"
    default_stack = 'negative_prompt(text="red")'
    demo_prompts = ("a red thing",)
    example_prompt = "a red square"

    def concepts(self):
        return ("red",)

    def detector_spec(self, concept):
        return f"toy:{concept}"

    def verifier(self, concept):
        return f"verifier of {concept}"


def test_production_code_takes_its_defaults_from_the_models_world(tiny_sd1, monkeypatch):
    """A world registered for a family is what the demo, the serve page, Dark Miner and unlearning
    use on that family's models: none of them names the testbed."""
    from safediff.demo import REAL_DEMO_DEFENSE, demo_setup
    from safediff.serve import default_stack, demo_concept
    from safediff.unlearning import _testbed_concept
    from safediff.unlearning.dark_miner import DarkMinerTrainConfig, default_verifier

    assert demo_setup(tiny_sd1)[0] == REAL_DEMO_DEFENSE and demo_concept(tiny_sd1) == ("nudity", "nudenet")
    monkeypatch.setitem(worlds._WORLDS, tiny_sd1.family, _ToyWorld())
    assert demo_setup(tiny_sd1) == ('negative_prompt(text="red")', ("a red thing",))
    assert demo_concept(tiny_sd1) == ("red", "toy:red") and default_stack(tiny_sd1) == 'negative_prompt(text="red")'
    assert default_verifier(tiny_sd1, DarkMinerTrainConfig(concept="red")) == "verifier of red"
    assert _testbed_concept(tiny_sd1, "red") == "red" and _testbed_concept(tiny_sd1, "blue") is None


def test_register_world_refuses_what_is_not_a_world_and_a_second_world_for_a_family(monkeypatch):
    monkeypatch.setattr(worlds, "_WORLDS", dict(worlds.worlds()))
    with pytest.raises(TypeError, match="takes a World"):
        register_world("toy-family", object())
    register_world("toy-family", _ToyWorld())
    register_world("toy-family", _ToyWorld())  # the same world again (a module imported twice) is fine
    with pytest.raises(KeyError, match="already has a world"):
        register_world("toy-family", World())


def _is_testbed_uses() -> list[tuple[str, int, str]]:
    """``(file, line, source line)`` of every ``.is_testbed`` read in the package (``getattr`` included)."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.Attribute) and node.attr == "is_testbed") or \
                    (isinstance(node, ast.Constant) and node.value == "is_testbed"):  # getattr(m, "is_testbed")
                found.append((str(path.relative_to(SRC)), node.lineno, lines[node.lineno - 1]))
    return found


def test_production_code_asks_is_testbed_only_where_a_comment_justifies_it():
    """Defaults come from the model's world; a module that still asks ``model.is_testbed`` says why
    on the same line (e.g. the composition study, the testbed's own experiment)."""
    unjustified = [f"{f}:{n}: {line.strip()}" for f, n, line in _is_testbed_uses() if "#" not in line]
    assert not unjustified, "route these through safediff.worlds.world_of(model) or justify them:\n" + \
        "\n".join(unjustified)


def test_the_source_reader_finds_is_testbed_uses():
    assert any(f == "eval/study.py" for f, _, _ in _is_testbed_uses())


def test_real_models_still_refuse_the_testbeds_defaults_with_the_same_messages(testbed, tiny_sd1, tmp_path):
    """What used to branch on ``is_testbed`` refuses as before, before any work (the routes now go
    through the model's world)."""
    from safediff.attacks.base import AttackError
    from safediff.attacks.relearning import RelearnConfig, training_images
    from safediff.inversion import invert
    from safediff.unlearning import unlearn

    with pytest.raises(ValueError, match=r"concept name \('striped'\) works on the testbed only"):
        invert(tiny_sd1, tmp_path / "i.safetensors", concept="striped")
    with pytest.raises(AttackError, match="real model needs its training images"):
        training_images(tiny_sd1, "striped", RelearnConfig())
    with pytest.raises(AttackError, match=r"'spotted' is not a testbed concept \(\['caged', 'striped'\]\)"):
        training_images(testbed, "spotted", RelearnConfig())
    with pytest.raises(ValueError, match=r"Dark Miner on the testbed needs one of its concepts \['caged', 'striped'\]"):
        unlearn("dark_miner", testbed, tmp_path / "d.safetensors", concept="a zebra")
    assert not list(tmp_path.iterdir())
