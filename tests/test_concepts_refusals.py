"""Issue 34 items 2 and 3: real concepts, no testbed defaults outside the testbed, honest refusals.

Every registered method on every family either builds / passes its checks, or is refused before
any work with one sentence naming the family (never a TypeError / RuntimeError / AttributeError).
"""

import json

import pytest

import safediff
from safediff.attacks.base import AttackBudget, AttackTarget, get_attack, list_attacks, run_attack
from safediff.concepts import concept_names, registered_concepts, vocabulary
from safediff.defenses.base import known_defenses
from safediff.defenses.safree import NUDITY_SPACE
from safediff.defenses.sld import I2P_CONCEPT_ORIGINAL, SLDConfig
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack
from safediff.support import UnsupportedMethodError, check_supported, is_supported, methods, supported_defenses

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from safediff.testing import tiny_model

    cache: dict = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_model(family, cache_dir=tiny_dir)
        return cache[family]

    return get


# -- the concept registry -------------------------------------------------------------------

def test_real_concepts_are_registered_with_their_published_texts(capsys):
    i2p, nudity = vocabulary("i2p"), vocabulary("nudity")
    assert i2p.text == I2P_CONCEPT_ORIGINAL and "SLD" in i2p.source
    assert {w.lower() for w in NUDITY_SPACE} <= set(nudity.words) and "SAFREE" in nudity.source
    assert vocabulary("violence").preserve and len(vocabulary("violence").words) >= 2
    assert vocabulary("striped").testbed and not nudity.testbed
    assert set(concept_names(testbed=True)) == {"striped", "caged"}
    assert {"i2p", "nudity", "violence"} <= set(concept_names(testbed=False))
    from safediff.cli import main

    assert main(["concepts"]) == 0
    out = capsys.readouterr().out
    for name, v in registered_concepts().items():
        assert name in out and v.source in out
    assert "striped (testbed only)" in out and I2P_CONCEPT_ORIGINAL in out


# -- testbed defaults and presets apply on the testbed only -------------------------------------

@pytest.mark.parametrize("stack, option", [
    ("sld(preset=medium)", "option `concept`"),
    ('negative_prompt(text="nudity")+sld(preset=medium)', "option `concept`"),
    ("prompt_guard", "option `concepts`"),
    ("uce(preset=testbed-striped)", "preset=testbed-striped"),
    ("rece(preset=testbed-striped)", "preset=testbed-striped"),
    ("safree(preset=testbed-striped)", "preset=testbed-striped"),
])
def test_testbed_defaults_are_refused_on_other_models_naming_the_option(tiny, stack, option):
    model = tiny("sd1")
    with pytest.raises(ValueError, match=option.replace("(", r"\(").replace(")", r"\)")) as e:
        SafePipeline(model, DefenseStack.parse(stack))
    assert "sd1" in str(e.value) and model.edited_hash is None


def test_sanitizer_training_refuses_the_testbed_concepts_on_other_models(tiny, tmp_path):
    from safediff.defenses.sanitizer import SanitizerTrainConfig, train_sanitizer

    with pytest.raises(ValueError, match=r"\['striped', 'caged'\] are the testbed's"):
        train_sanitizer(tiny("sd1"), tmp_path / "es.safetensors", SanitizerTrainConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="give `anchors`"):  # a real concept carries no anchors of its own
        train_sanitizer(tiny("sd1"), tmp_path / "es.safetensors", SanitizerTrainConfig(concepts=("nudity",), steps=1),
                        progress=False)
    assert not any(tmp_path.iterdir())


def test_a_stack_file_export_refuses_testbed_defaults_on_other_models(tiny, tmp_path):
    # the file spells every option, so a testbed default written there would later pass as given
    from safediff.export import export

    with pytest.raises(ValueError, match="option `concept`"):
        export(tiny("sd1"), 'negative_prompt(text="nudity")+sld(preset=medium)', tmp_path / "s.json", fmt="stack")
    assert not any(tmp_path.iterdir())
    (path,) = export(tiny("sd1"), 'sld(preset=medium, concept="i2p")', tmp_path / "s.json", fmt="stack")
    assert json.loads(path.read_text())["defenses"][0]["concept"] == "i2p"


def test_an_attack_target_refuses_testbed_settings_before_the_attack(tiny):
    with pytest.raises(ValueError, match="preset=testbed-striped"):
        AttackTarget(tiny("sd1"), "uce(preset=testbed-striped)")


def test_real_concepts_build_on_a_real_model(tiny):
    model = tiny("sd1")
    with SafePipeline(model, DefenseStack.parse('sld(concept="i2p")+prompt_guard(concepts=["nudity"])')) as pipe:
        (sld,) = pipe.defenses["guidance"]
        assert sld.concept_text == I2P_CONCEPT_ORIGINAL
        (guard,) = pipe.defenses["prompt_filter"]
        assert set(guard.thresholds) == {"nudity"}
    from safediff.pipeline import resolved_stack

    (rec,) = resolved_stack(DefenseStack.parse('sld(preset=strong, concept="i2p")'))
    assert rec["concept"] == "i2p" and rec["concept_text"] == I2P_CONCEPT_ORIGINAL and rec["preset"] == "strong"
    # a concept given in Python (not through options) is the caller's choice: not refused
    with SafePipeline(model, DefenseStack((SLDConfig(concept="zebra"),))):
        pass


def test_the_testbed_keeps_its_defaults_hashes_and_records_the_resolved_stack(testbed, tmp_path):
    medium = DefenseStack.parse("sld(preset=medium)")
    # the preset's name is provenance only: the hash is that of the same options given directly
    assert medium.hash(testbed.content_hash) == DefenseStack((SLDConfig(),)).hash(testbed.content_hash)
    uce = DefenseStack.parse("uce(preset=testbed-striped)")
    direct = DefenseStack.parse([{"name": "uce", **{k: (list(v) if isinstance(v, tuple) else v) for k, v in
                                                    type(uce.defenses[0]).presets()["testbed-striped"].items()}}])
    assert uce.hash(testbed.content_hash) == direct.hash(testbed.content_hash)
    out = safediff.generate(["a red circle on white background"], defenses="sld(preset=medium)", model=testbed,
                            num_inference_steps=2, out_dir=tmp_path)
    assert out.stack == "sld"  # the text form is unchanged...
    (cfg,) = out.stack_config  # ...and the record now says which concept it used
    assert cfg["concept"] == "striped caged" and cfg["preset"] == "medium"
    (sidecar,) = tmp_path.glob("*.json")
    assert json.loads(sidecar.read_text())["stack_config"][0]["concept"] == "striped caged"


def test_eval_and_attack_require_a_detector_and_concept_on_other_models(tmp_path, capsys):
    from safediff.cli import main
    from safediff.testing import save_tiny_pipeline

    folder = str(save_tiny_pipeline(tmp_path / "sd1", "sd1"))
    assert main(["eval", "--benchmark", "testbed:striped/explicit", "--model", folder, "--n", "1", "--out",
                 str(tmp_path / "run")]) != 0
    assert "Give --detector for this sd1 model" in capsys.readouterr().err
    attack = ["attack", "--method", "mma", "--model", folder, "--steps", "1", "--out", str(tmp_path / "run")]
    assert main(attack) != 0
    assert "Give --concept for this sd1 model" in capsys.readouterr().err
    assert main([*attack, "--concept", "nudity"]) != 0
    assert "Give --detector for this sd1 model" in capsys.readouterr().err
    assert main(["attack", "--method", "p4d", "--model", str(save_tiny_pipeline(tmp_path / "xl", "sdxl")), "--steps",
                 "1", "--out", str(tmp_path / "run")]) != 0
    assert "p4d does not run on sdxl models" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_demo_chooses_its_concept_by_model(tiny):
    from safediff.demo import REAL_DEMO_DEFENSE, demo_setup
    from safediff.testbed.plugin import DEMO_DEFENSE, DEMO_PROMPTS

    assert demo_setup(safediff.load_model()) == (DEMO_DEFENSE, DEMO_PROMPTS)
    defense, prompts = demo_setup(tiny("sd1"))
    assert defense == REAL_DEMO_DEFENSE and prompts and not any("striped" in p for p in prompts)
    with SafePipeline(tiny("sd1"), DefenseStack.parse(defense)):
        pass  # the real-model demo stack is not refused
    assert demo_setup(tiny("sd1"), "sld(concept=\"x\")")[0] == "sld(concept=\"x\")"


# -- method x family ---------------------------------------------------------------------------

def test_every_registered_method_has_a_support_entry():
    from safediff.unlearning import METHODS

    for m in (*METHODS, *list_attacks(), "sanitizer", "inversion"):
        assert m in methods(), f"{m} has no support entry in safediff.support"
    with pytest.raises(ValueError, match="No support entry"):
        check_supported("nonsense", "sd1")


# a minimal valid config of each defense that needs no artifact file (the others are refused by
# family here, and their files are checked by the artifact tests)
_MINIMAL = {
    "prompt_guard": 'prompt_guard(concepts=["zebra"], threshold=0.99)',
    "negative_prompt": 'negative_prompt(text="zebra")',
    "nag": 'nag(negative="zebra")',
    "sld": 'sld(concept="zebra")',
    "uce": 'uce(erase=["zebra"])',
    "rece": 'rece(erase=["zebra"], epochs=1)',
    "safree": "safree",
    "safree_svf": "safree_svf",
    "output_filter": 'output_filter(detector="testbed:striped")',
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_defense_builds_or_is_refused_by_family(tiny, family):
    model = tiny(family)
    allowed = supported_defenses(family)
    for name in sorted(known_defenses()):
        if name not in allowed:
            stack = _MINIMAL.get(name, f'{name}(path="missing.safetensors")')
            with pytest.raises(ValueError, match=f"not supported on {family}"):
                SafePipeline(model, DefenseStack.parse(stack))
            assert model.edited_hash is None
        elif name in _MINIMAL:
            with SafePipeline(model, DefenseStack.parse(_MINIMAL[name])):
                pass
    assert model.edited_hash is None


def _trainer_call(method, model, tmp_path):
    """The entry point of a trainer with no data at all: a supported one asks for its data (or
    runs), an unsupported one must be refused by family before that."""
    if method in ("esd", "duo", "dark_miner", "uce", "rece", "advunlearn"):
        from safediff.unlearning import unlearn

        return lambda: unlearn(method, model, tmp_path / "out.safetensors", concept=None)
    if method == "sanitizer":
        from safediff.defenses.sanitizer import SanitizerTrainConfig, train_sanitizer

        return lambda: train_sanitizer(model, tmp_path / "es.safetensors", SanitizerTrainConfig(), progress=False)
    if method == "inversion":
        from safediff.inversion import invert

        return lambda: invert(model, tmp_path / "ine.safetensors", progress=False)
    if method == "relearn":
        from safediff.attacks.relearning import relearn

        return lambda: relearn(model, None, "zebra", tmp_path, progress=False)
    attack = get_attack(method)
    return lambda: run_attack(attack(), AttackTarget(model, None), "zebra", [], AttackBudget(steps=1), tmp_path,
                              progress=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_trainer_and_attack_is_refused_by_family_before_any_work(tiny, family, tmp_path):
    model = tiny(family)
    for method in methods():
        call = _trainer_call(method, model, tmp_path)
        if is_supported(method, model):
            # supported: given no data it answers with what it needs, a ValueError, never a traceback
            try:
                call()
            except ValueError as e:
                assert not isinstance(e, UnsupportedMethodError)
                assert str(e).strip()
            except (TypeError, RuntimeError, AttributeError, KeyError, IndexError) as e:  # pragma: no cover
                pytest.fail(f"{method} on {family} with no data: {type(e).__name__}: {e}")
            continue
        with pytest.raises(UnsupportedMethodError, match=f"{method} does not run on {family} models") as e:
            call()
        assert str(e.value).count(". ") == 0  # one sentence
        assert model.edited_hash is None
    assert not any(tmp_path.iterdir()), f"files written: {sorted(p.name for p in tmp_path.iterdir())}"
