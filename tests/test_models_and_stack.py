"""Model layer (families, errors) and defense stacks (parsing, hashing, registry)."""

import json
import shutil

import pytest
import torch

import safediff
from safediff.defenses.base import apply_weights, get_defense, known_defenses
from safediff.defenses.negative_prompt import NegativePromptConfig
from safediff.models import ModelError, detect_family, load_model
from safediff.stack import DefenseStack
from safediff.testing import save_tiny_pipeline


@pytest.mark.parametrize("family,expected,pred", [("sd1", "sd1", "epsilon"), ("sd2", "sd2", "epsilon"),
                                                  ("sd2-v", "sd2", "v_prediction")])
def test_family_detection(tmp_path, family, expected, pred):
    path = save_tiny_pipeline(tmp_path / family, family)
    m = load_model(path)
    assert (m.family, m.prediction_type) == (expected, pred)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_folder_that_is_not_a_diffusers_model(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ModelError, match="no model_index.json"):
        load_model(tmp_path)


def test_unsupported_families_sdxl_refiner_and_transformers(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": [None, None], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    with pytest.raises(ModelError, match="SDXL refiner"):
        detect_family(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}))
    with pytest.raises(ModelError, match="PixArtTransformer2DModel.*does not run"):
        detect_family(tmp_path)


def test_missing_weight_file(tmp_path, tiny_dir):
    path = save_tiny_pipeline(tmp_path / "m", "sd1")
    for f in (path / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelError, match="Missing weight file.*unet"):
        load_model(path)


def test_broken_checkpoint(tmp_path):
    path = save_tiny_pipeline(tmp_path / "m", "sd1")
    for f in (path / "vae").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="Broken checkpoint.*vae"):
        load_model(path)


def test_content_hash_is_content_not_path(tmp_path):
    a = save_tiny_pipeline(tmp_path / "a", "sd1", seed=0)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    c = save_tiny_pipeline(tmp_path / "c", "sd1", seed=1)
    assert load_model(a).content_hash == load_model(b).content_hash != load_model(c).content_hash


# ---- stacks ---------------------------------------------------------------------------------


def test_parse_text_form_and_round_trip():
    s = DefenseStack.parse('negative_prompt(text="striped, caged")')
    assert s.defenses == (NegativePromptConfig(text="striped, caged"),)
    assert DefenseStack.parse(s.to_string()) == s
    assert DefenseStack.parse("none") == DefenseStack()


def test_parse_yaml_and_toml(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text("defenses:\n  - name: negative_prompt\n    text: striped\n")
    t = tmp_path / "s.toml"
    t.write_text('[[defenses]]\nname = "negative_prompt"\ntext = "striped"\n')
    assert DefenseStack.parse(y) == DefenseStack.parse(t) == DefenseStack.parse('negative_prompt(text=striped)')


def test_unknown_defense_lists_known_ones():
    with pytest.raises(ValueError, match=r"Unknown defense 'sldd'.*negative_prompt"):
        DefenseStack.parse("sldd")


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['txt'\].*known options"):
        DefenseStack.parse("negative_prompt(txt=x)")


def test_config_round_trip():
    cfg = NegativePromptConfig(text="striped")
    d = cfg.to_dict()
    assert get_defense(d.pop("name")).config_cls.from_options(d) == cfg


def test_stack_hash_covers_config_model_and_artifact_content(tmp_path):
    from safetensors.torch import save_file

    emb = tmp_path / "neg.safetensors"
    save_file({"embedding": torch.zeros(77, 8)}, emb)
    s1 = DefenseStack.parse(f'negative_prompt(embedding="{emb}")')
    h1 = s1.hash("model-a")
    assert s1.hash("model-b") != h1
    assert DefenseStack.parse('negative_prompt(text="x")').hash("model-a") != h1
    save_file({"embedding": torch.ones(77, 8)}, emb)  # retrained file at the same path
    assert DefenseStack.parse(f'negative_prompt(embedding="{emb}")').hash("model-a") != h1
    # a zero-strength defense hashes like no defense
    assert DefenseStack.parse('negative_prompt(text="")').hash("m") == DefenseStack().hash("m")


def test_registry_has_stage_and_refuses_duplicates():
    from safediff.defenses.base import register_defense
    from safediff.defenses.negative_prompt import NegativePrompt

    assert known_defenses()["negative_prompt"].stage == "guidance"
    with pytest.raises(KeyError, match="already registered"):
        register_defense(name="negative_prompt", config_cls=NegativePromptConfig, impl_cls=NegativePrompt)


def test_negative_embedding_for_another_text_encoder_is_refused(tiny_sd1, tmp_path):
    from safetensors.torch import save_file

    emb = tmp_path / "neg.safetensors"
    save_file({"embedding": torch.zeros(77, 16)}, emb)  # width 16, tiny encoder has 8
    with pytest.raises(ValueError, match="another text encoder"):
        safediff.generate("a red circle", model=tiny_sd1, defenses=f'negative_prompt(embedding="{emb}")',
                          num_inference_steps=1, progress=False)


def test_edit_handle_reverts_exactly():
    lin = torch.nn.Linear(4, 4)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    h = apply_weights(lin, {"weight": lin.weight.detach() + 1.0})
    assert not torch.equal(lin.weight, before["weight"]) and h.edited_parameter_names == ["weight"]
    h.revert()
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())


def test_a_failing_edit_changes_nothing():
    # regression (review defect 10): every name, shape and value is checked before any weight changes
    lin = torch.nn.Linear(4, 4)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    bad_shape = {"weight": lin.weight.detach() + 1.0, "bias": torch.zeros(5)}
    bad_value = {"weight": lin.weight.detach() + 1.0, "bias": torch.full((4,), float("nan"))}
    for new in (bad_shape, bad_value, {"weight": lin.weight.detach() + 1, "nope": torch.zeros(1)}):
        with pytest.raises(ValueError):
            apply_weights(lin, new)
        assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())


# issue 19 review, defect 2 ------------------------------------------------------------
@pytest.mark.parametrize("a,b", [
    ('uce(erase=["zebra"], erase_scale=1)', 'uce(erase=["zebra"], erase_scale=1.0)'),
    ('uce(erase=["zebra"], preserve=["red"])', 'uce(erase=["zebra"], preserve=["red"], lamb=0.5)'),
    ("sld(guidance_scale=1000)", "sld(guidance_scale=1000.0)"),
    ("delta(path=\"x\", scale=2)", "delta(path=\"x\", scale=2.0)"),
    ("safree_svf(freeu=[1, 1, 0.9, 0.2])", "safree_svf(freeu=[1.0, 1.0, 0.9, 0.2])"),
])
def test_configs_that_print_the_same_hash_the_same(a, b):
    sa, sb = DefenseStack.parse(a), DefenseStack.parse(b)
    assert sa.to_string() == sb.to_string()
    # the hash covers artifact contents: compare the config part (no file for "x")
    assert json.dumps(sa.to_list(), sort_keys=True) == json.dumps(sb.to_list(), sort_keys=True)


def test_stack_hash_equal_for_int_and_float(tiny_sd1):
    assert DefenseStack.parse('uce(erase=["zebra"], erase_scale=1)').hash(tiny_sd1.content_hash) == \
        DefenseStack.parse('uce(erase=["zebra"], erase_scale=1.0)').hash(tiny_sd1.content_hash)


# issue 19 review, defect 10 (pipeline level) ------------------------------------------
def test_a_stack_whose_second_edit_fails_leaves_the_model_unedited(testbed, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"conv_in.weight": torch.zeros(1, 2, 3)}, str(bad))  # wrong shape
    before = {k: v.clone() for k, v in testbed.unet.state_dict().items()}
    with pytest.warns(UserWarning, match="provenance"), pytest.raises(ValueError, match="shape"):
        safediff.build(testbed, f'uce(preset=testbed-striped)+delta(path="{bad}")')
    assert all(torch.equal(before[k], v) for k, v in testbed.unet.state_dict().items())
    assert testbed.edited_hash is None
