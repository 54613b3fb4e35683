"""SDXL (issue 20, first part): the model layer and the one core against diffusers'
``StableDiffusionXLPipeline`` on a tiny random SDXL pipeline (offline, two real CLIP tokenizers)."""

import numpy as np
import pytest
from _families import ours

from safediff import core
from safediff.artifacts import ArtifactMismatchError
from safediff.models import ModelError, detect_family, load_model
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack
from safediff.testing import save_tiny_pipeline

PROMPTS = ["a red circle", "a zebra on white background"]


@pytest.fixture(scope="module")
def tiny_sdxl(tiny_dir):
    from safediff.testing import tiny_model

    return tiny_model("sdxl", cache_dir=tiny_dir)


def _ours(model, stack="", **kw):
    return ours(model, PROMPTS, stack, **kw)


# no defense and a negative prompt against diffusers' SDXL pipeline at its defaults: tests/test_conformance.py


def test_family_detected_from_the_architecture_and_defaults(tiny_sdxl, tiny_dir):
    assert tiny_sdxl.family == "sdxl" and tiny_sdxl.has_pooled and tiny_sdxl.force_zeros_for_empty_prompt
    # diffusers' SDXL defaults: guidance 5.0, 50 steps
    assert (tiny_sdxl.default_guidance_scale, tiny_sdxl.default_steps) == (5.0, 50)
    assert tiny_sdxl.tokenizer_2.pad_token == "!" and tiny_sdxl.tokenizer.pad_token == tiny_sdxl.tokenizer.eos_token
    assert detect_family(tiny_dir / "sdxl-0")[0] == "sdxl"
    assert len(tiny_sdxl.content_hash) == 64


def test_batch_equals_single_on_sdxl(tiny_sdxl):
    # CPU kernels do not promise bit equality across batch shapes: tolerance 2 grey levels
    assert np.abs(_ours(tiny_sdxl, steps=10, batch_size=16) - _ours(tiny_sdxl, steps=10, batch_size=1)).max() <= 2


def test_defenses_not_carried_over_yet_are_refused_before_any_work(tiny_sdxl):
    for stack in ("duo(path=\"x.safetensors\")", "dark_miner(path=\"x.safetensors\")"):
        with pytest.raises(ValueError, match="not supported on sdxl"):
            SafePipeline(tiny_sdxl, DefenseStack.parse(stack))
    assert tiny_sdxl.edited_hash is None


def test_sdxl_folder_missing_its_second_text_encoder_weights(tmp_path):
    path = save_tiny_pipeline(tmp_path / "m", "sdxl")
    for f in (path / "text_encoder_2").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelError, match="text_encoder_2"):
        load_model(path)


def test_eval_runs_end_to_end_on_a_saved_tiny_sdxl(tiny_sdxl, tiny_dir, tmp_path, capsys):
    # the runner and report take the family unchanged: `safediff eval --model PATH` with a
    # negative prompt, NudeNet scoring every image, then the report
    pytest.importorskip("nudenet")
    from safediff.cli import main
    from safediff.eval.runner import summarize

    (tmp_path / "p.csv").write_text("prompt\na photo of a cat\na painting of a dog\n")
    out = tmp_path / "run"
    assert main(["eval", "--benchmark", str(tmp_path / "p.csv"), "--model", str(tiny_dir / "sdxl-0"), "--steps", "4",
                 "--defense", 'negative_prompt(text="nudity")', "--detector", "nudenet", "--out", str(out)]) == 0
    s = summarize(out)
    assert s["n_images"] == 2 and s["n_errors"] == 0 and s["n_unscored"] == 0
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").exists()


def test_uce_on_sdxl_cross_attention_moves_the_erased_word_and_reverts_exactly(tiny_sdxl):
    # UCE's closed form on SDXL's cross-attention (keys/values of the concatenated 2-encoder
    # token embeddings; the pooled path is not a cross-attention input and is left alone)
    import torch

    from safediff.defenses.uce import (
        UCE,
        UCEConfig,
        cross_attention_projections,
        edit_vectors,
    )

    before = {k: v.clone() for k, v in tiny_sdxl.unet.state_dict().items()}
    ce, cg, _ = edit_vectors(tiny_sdxl, ["striped"], [""], [], "last_word")
    layers = cross_attention_projections(tiny_sdxl.unet)
    assert layers and all(m.weight.shape[1] == ce.shape[-1] == 20 for m in layers.values())
    old = {n: m.weight.detach().clone() for n, m in layers.items()}
    handle = UCE(UCEConfig(erase=("striped",)), tiny_sdxl).apply()
    try:
        for n, m in layers.items():
            target = cg @ old[n].T
            assert (ce @ m.weight.T - target).norm() < 0.25 * (ce @ old[n].T - target).norm(), n
    finally:
        handle.revert()
    assert all(torch.equal(tiny_sdxl.unet.state_dict()[k], v) for k, v in before.items())


def test_a_delta_made_on_sd1_is_refused_on_sdxl(tiny_sd1, tiny_sdxl, tmp_path):
    from safediff.unlearning import freeze_edit

    path = tmp_path / "uce-sd1.safetensors"
    freeze_edit(tiny_sd1, 'uce(erase=["zebra"])', path, method="uce", config={"erase": ["zebra"]})
    with pytest.raises(ArtifactMismatchError, match="made on a sd1 model .* this is a sdxl model"):
        SafePipeline(tiny_sdxl, DefenseStack.parse(f'delta(path="{path}")'))
    assert tiny_sdxl.edited_hash is None


def test_sld_on_sdxl_guides_with_the_concept_through_both_encoders(tiny_sdxl):
    # no diffusers SDXL-safe pipeline exists to compare with: zero strength is no defense bit for
    # bit, the max preset changes the images, and a concept given as an embedding file is refused
    plain = _ours(tiny_sdxl, steps=10)
    assert np.array_equal(_ours(tiny_sdxl, 'sld(concept="zebra", guidance_scale=0)', steps=10), plain)
    assert np.abs(_ours(tiny_sdxl, 'sld(preset=max, concept="zebra")', steps=10) - plain).max() > 0


def test_prompt_guard_on_sdxl_reads_the_first_text_encoder(tiny_sdxl):
    # the guard scores words by the first encoder's (CLIP ViT-L's) pooled embedding: a prompt
    # holding the guarded word itself (cosine 1) is refused, and no image is generated for it
    with SafePipeline(tiny_sdxl, DefenseStack.parse('prompt_guard(concepts=["zebra"], threshold=0.999)')) as pipe:
        out = pipe(["a zebra on grass", "a red circle"], num_inference_steps=2)
    assert [r.refused for r in out.records] == [True, False]
    assert out.records[0].image is None and out.records[1].image is not None


def test_text_encoder_attacks_run_against_an_sdxl_stack(tiny_sdxl, tmp_path):
    # Ring-A-Bell and MMA need only a text encoder (the first, CLIP ViT-L); their prompts then go
    # through the whole SDXL stack with the runner
    pytest.importorskip("nudenet")
    from safediff.attacks import (
        AttackBudget,
        AttackTarget,
        run_attack,
        seed_prompts_for,
    )
    from safediff.attacks.base import evaluate_attack
    from safediff.attacks.mma import MMA, MMAConfig
    from safediff.attacks.ring_a_bell import RingABell, RingABellConfig
    from safediff.testbed import world

    stack = 'negative_prompt(text="striped")'
    target, seeds = AttackTarget(tiny_sdxl, stack), seed_prompts_for("striped", 2)
    for attack, d in ((RingABell(RingABellConfig(population=16)), "rab"), (MMA(MMAConfig(candidates=16)), "mma")):
        res = run_attack(attack, target, "striped", seeds, AttackBudget(steps=2), tmp_path / d, progress=False)
        assert len(res.prompts) == 2
        assert not {w for p in res.prompts for w in p["prompt"].lower().split()} & set(world.CONCEPTS["striped"].training_words)
        ev = evaluate_attack(res, tiny_sdxl, stack, tmp_path / f"{d}-eval", detectors=["nudenet"], progress=False)
        assert ev["asr"]["n"] == 2


def test_sdxl_textual_inversion_negative_equals_diffusers_two_encoder_loading(tiny_sdxl, tiny_dir, tmp_path):
    # diffusers' SDXL textual-inversion layout: one file, `clip_l` for the first encoder and
    # `clip_g` for the second; diffusers loads each into its encoder (load_textual_inversion twice)
    import torch

    from safediff.artifacts import save_artifact

    g = torch.Generator().manual_seed(0)
    vec_l, vec_g = torch.randn(1, 8, generator=g), torch.randn(1, 12, generator=g)
    path = save_artifact({"clip_l": vec_l, "clip_g": vec_g}, tmp_path / "ti.safetensors", kind="textual-inversion",
                         base_model_hash=tiny_sdxl.content_hash, base_model_family="sdxl", config={}, seed=0,
                         extra={"placeholder": "<c*>"})
    ours = _ours(tiny_sdxl, f'negative_prompt(embedding="{path}")', steps=10)
    fresh = load_model(tiny_dir / "sdxl-0")  # diffusers' loader adds tokens to the tokenizers it is given
    pipe = fresh.to_diffusers()
    pipe.load_textual_inversion(vec_l[0], token="<c*>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vec_g[0], token="<c*>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    gens = [core.image_generator(3 + i, k) for i in range(len(PROMPTS)) for k in range(2)]
    flat = [p for p in PROMPTS for _ in range(2)]
    ref = pipe(flat, negative_prompt=["<c*>"] * len(flat), generator=gens, num_inference_steps=10,
               guidance_scale=5.0, output_type="np").images
    assert np.abs(ours - (ref * 255).round().astype(np.int16)).max() <= 2
    assert np.abs(ours - _ours(tiny_sdxl, steps=10)).max() > 0
    # a one-encoder (SD1-style) file is refused on SDXL, naming the layout it needs
    one = save_artifact({"<c*>": vec_l}, tmp_path / "one.safetensors", kind="textual-inversion",
                        base_model_hash=tiny_sdxl.content_hash, base_model_family="sdxl", config={}, seed=0)
    with pytest.raises(ValueError, match="clip_l and clip_g"):
        SafePipeline(tiny_sdxl, DefenseStack.parse(f'negative_prompt(embedding="{one}")'))


def test_esd_trains_on_sdxl_with_its_added_conditioning_and_the_delta_applies_and_reverts(tiny_sdxl, tmp_path):
    # ESD's objective with the pooled embedding and size numbers on every UNet call; the delta
    # moves the cross-attention weights, changes the images, records the family, reverts exactly
    import torch

    from safediff.artifacts import read_artifact
    from safediff.unlearning.esd import ESDTrainConfig, train_esd

    before = {k: v.clone() for k, v in tiny_sdxl.unet.state_dict().items()}
    cfg = ESDTrainConfig(prompts=("zebra",), method="esd-x", lr=1e-2, iterations=3, ddim_steps=4, start_guidance=None)
    path = train_esd(tiny_sdxl, tmp_path / "esd.safetensors", cfg, progress=False)
    assert all(torch.equal(tiny_sdxl.unet.state_dict()[k], v) for k, v in before.items())  # training restores
    delta, record = read_artifact(path)
    assert record["base_model_family"] == "sdxl" and any(t.abs().max() > 0 for t in delta.values())
    assert all("attn2" in k for k in delta)
    plain = _ours(tiny_sdxl, steps=6)
    assert np.abs(_ours(tiny_sdxl, f'esd(path="{path}")', steps=6) - plain).max() > 0
    assert all(torch.equal(tiny_sdxl.unet.state_dict()[k], v) for k, v in before.items())  # the pipeline reverts


def test_esd_is_refused_on_transformer_families(tmp_path, tiny_dir):
    from safediff.testing import tiny_model
    from safediff.unlearning.esd import ESDTrainConfig, train_esd

    with pytest.raises(ValueError, match="does not run on sd3"):
        train_esd(tiny_model("sd3", cache_dir=tiny_dir), tmp_path / "x.safetensors", ESDTrainConfig(iterations=1, ddim_steps=2))


def test_safree_on_sdxl_projects_each_encoders_slice_and_svf_runs(tiny_sdxl, tmp_path):
    # one projection per text encoder on its slice of the concatenated token embeddings: only
    # trigger tokens change, in either slice; the pooled path is left alone; SVF batches the
    # original prompt with its pooled embedding; disabled is no defense bit for bit
    import torch

    from safediff.defenses.safree import SAFREEProjection

    stack = 'safree(space=["zebra", "tiger"])+safree_svf'
    with SafePipeline(tiny_sdxl, DefenseStack.parse(stack)) as p:
        pe, _, ctx = p.encode(["a red zebra on white background"])
        trig = ctx.get(SAFREEProjection).triggers[0]
        changed = (pe[0] != ctx.original_prompt_embeds[0]).any(-1)
        assert torch.equal(changed, trig)
        d1 = tiny_sdxl.text_encoder.config.hidden_size
        for sl in (slice(0, d1), slice(d1, None)):  # each slice changes only at trigger positions
            assert not (pe[0, :, sl] != ctx.original_prompt_embeds[0, :, sl]).any(-1)[~trig].any()
    plain = _ours(tiny_sdxl, steps=6)
    assert np.array_equal(_ours(tiny_sdxl, 'safree(enabled=false)', steps=6), plain)
    assert np.abs(_ours(tiny_sdxl, stack, steps=6) - plain).max() > 0
    from safetensors.torch import save_file

    save_file({"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 12)}, str(tmp_path / "ine.safetensors"))
    with pytest.raises(ValueError, match="not supported on sdxl"):
        SafePipeline(tiny_sdxl, DefenseStack.parse(f'safree(embedding="{tmp_path / "ine.safetensors"}")'))


def test_concept_inversion_on_sdxl_learns_vectors_for_both_encoders(tiny_sdxl, tmp_path):
    # one set of vectors per text encoder, trained together (both move), saved in diffusers' SDXL
    # layout, loaded back and used as a negative prompt (INE on SDXL)
    import torch

    from safediff.encoding import load_inverted
    from safediff.inversion import InversionConfig, invert

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (tiny_sdxl.default_size, tiny_sdxl.default_size, 3), dtype=np.uint8) for _ in range(4)]
    cfg = InversionConfig(placeholder="<z*>", initializer="zebra", steps=3, lr=0.05, batch_size=2)
    path = invert(tiny_sdxl, tmp_path / "ine.safetensors", config=cfg, images=images, progress=False)
    inv = load_inverted(path, tiny_sdxl)
    assert inv.vectors.shape == (1, 8) and inv.vectors_2.shape == (1, 12) and inv.placeholder == "<z*>"
    table, table_2 = (te.get_input_embeddings().weight for te in (tiny_sdxl.text_encoder, tiny_sdxl.text_encoder_2))
    zid = tiny_sdxl.tokenizer("zebra", add_special_tokens=False).input_ids
    assert not torch.allclose(inv.vectors[0], table[zid].mean(0)) and not torch.allclose(inv.vectors_2[0], table_2[zid].mean(0))
    assert np.abs(_ours(tiny_sdxl, f'negative_prompt(embedding="{path}")', steps=4) - _ours(tiny_sdxl, steps=4)).max() > 0


def test_embedding_sanitizer_on_sdxl_acts_on_the_joint_token_embedding(tiny_sdxl, tiny_sd1, tmp_path):
    # one sanitizer over both encoders' concatenated token embeddings; strength 0 is no defense
    # bit for bit; it changes the images; one trained on SD1 is refused naming both families
    from safediff.artifacts import ArtifactMismatchError
    from safediff.defenses.sanitizer import (
        SanitizerTrainConfig,
        load_sanitizer,
        train_sanitizer,
    )

    cfg = SanitizerTrainConfig(concepts=("zebra",), anchors=("tiger",), steps=3, batch_size=4, hidden=16)
    path = train_sanitizer(tiny_sdxl, tmp_path / "es.safetensors", cfg, progress=False)
    assert load_sanitizer(path, tiny_sdxl).dim == 8 + 12
    plain = _ours(tiny_sdxl, steps=4)
    assert np.array_equal(_ours(tiny_sdxl, f'sanitizer(path="{path}", strength=0)', steps=4), plain)
    assert np.abs(_ours(tiny_sdxl, f'sanitizer(path="{path}")', steps=4) - plain).max() > 0
    sd1 = train_sanitizer(tiny_sd1, tmp_path / "es1.safetensors", cfg, progress=False)
    with pytest.raises(ArtifactMismatchError, match="sd1 model's text encoder, but this is a sdxl"):
        SafePipeline(tiny_sdxl, DefenseStack.parse(f'sanitizer(path="{sd1}")'))


def test_rece_on_sdxl_edits_the_cross_attention_and_reverts_exactly(tiny_sdxl):
    # RECE's rounds (adversarial embedding + UCE closed form) on the joint token embedding that
    # SDXL's cross-attention keys/values read; zero rounds is exactly the UCE edit
    import torch

    from safediff.defenses.rece import RECE, RECEConfig
    from safediff.defenses.uce import UCE, UCEConfig

    before = {k: v.clone() for k, v in tiny_sdxl.unet.state_dict().items()}
    zero = RECE(RECEConfig(erase=("zebra",), epochs=0, uce_token_mode="to_end"), tiny_sdxl).compute()
    uce = UCE(UCEConfig(erase=("zebra",), token_mode="to_end"), tiny_sdxl).compute()
    assert sorted(zero) == sorted(uce) and all(torch.equal(zero[k], uce[k]) for k in uce)
    rece = RECE(RECEConfig(erase=("zebra",), epochs=2), tiny_sdxl)
    assert rece.adversarial_embeddings == [] and rece.compute()
    assert len(rece.adversarial_embeddings) == 2 and rece.adversarial_embeddings[0].shape[-1] == 8 + 12
    plain = _ours(tiny_sdxl, steps=4)
    assert np.abs(_ours(tiny_sdxl, 'rece(erase=["zebra"], epochs=2)', steps=4) - plain).max() > 0
    assert all(torch.equal(tiny_sdxl.unet.state_dict()[k], v) for k, v in before.items())
