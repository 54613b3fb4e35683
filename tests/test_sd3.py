"""SD3 (issue 20): the model layer and the one core against diffusers' ``StableDiffusion3Pipeline``
on a tiny random SD3 pipeline (offline: two real CLIP tokenizers and a real T5 tokenizer), and the
flow-matching velocity <-> epsilon conversion every guidance rule goes through."""

import numpy as np
import pytest
import torch
from _families import ours

from safediff import core
from safediff.models import ModelError, detect_family, load_model
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack
from safediff.testing import save_tiny_pipeline

PROMPTS = ["a red circle", "a zebra on white background"]


@pytest.fixture(scope="module")
def tiny_sd3(tiny_dir):
    from safediff.testing import tiny_model

    return tiny_model("sd3", cache_dir=tiny_dir)


def _ours(model, stack="", **kw):
    return ours(model, PROMPTS, stack, **kw)


def _diffusers(pipe, seed=3, n=2, steps=28, gs=7.0, negative=None):
    pipe.set_progress_bar_config(disable=True)
    gens = [core.image_generator(seed + i, k) for i in range(len(PROMPTS)) for k in range(n)]
    flat = [p for p in PROMPTS for _ in range(n)]
    img = pipe(flat, negative_prompt=[negative] * len(flat) if negative else None, generator=gens,
               num_inference_steps=steps, guidance_scale=gs, output_type="np").images
    return (img * 255).round().astype(np.int16)


def test_family_detected_from_the_architecture_and_defaults(tiny_sd3, tiny_dir):
    from transformers import T5Tokenizer

    assert tiny_sd3.family == "sd3" and tiny_sd3.prediction_type == "flow" and tiny_sd3.has_pooled
    assert type(tiny_sd3.unet).__name__ == "SD3Transformer2DModel"
    # diffusers' SD3 defaults: guidance 7.0, 28 steps
    assert (tiny_sd3.default_guidance_scale, tiny_sd3.default_steps) == (7.0, 28)
    assert isinstance(tiny_sd3.tokenizer_3, T5Tokenizer) and tiny_sd3.tokenizer_3.pad_token_id == 0
    ids = tiny_sd3.tokenizer_3(["a striped zebra"]).input_ids[0]
    assert ids[-1] == tiny_sd3.tokenizer_3.eos_token_id and tiny_sd3.tokenizer_3.unk_token_id not in ids
    assert detect_family(tiny_dir / "sd3-0")[0] == "sd3"


# no defense and a negative prompt against diffusers' SD3 pipeline at its defaults: tests/test_conformance.py


def test_batch_equals_single_on_sd3(tiny_sd3):
    assert np.abs(_ours(tiny_sd3, steps=8, batch_size=16) - _ours(tiny_sd3, steps=8, batch_size=1)).max() <= 2


def test_sd3_without_t5_equals_diffusers_without_t5(tiny_sd3, tmp_path):
    # SD3 can be loaded without its T5 encoder (its part of the sequence is then zeros)
    import json
    import shutil

    path = save_tiny_pipeline(tmp_path / "m", "sd3")
    shutil.rmtree(path / "text_encoder_3")
    shutil.rmtree(path / "tokenizer_3")
    index = json.loads((path / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (path / "model_index.json").write_text(json.dumps(index))
    model = load_model(path)
    assert model.text_encoder_3 is None
    assert np.abs(_ours(model, steps=6) - _diffusers(model.to_diffusers(), steps=6)).max() <= 2
    assert np.abs(_ours(model, steps=6) - _ours(tiny_sd3, steps=6)).max() > 0  # T5 did matter


def test_sd3_folder_missing_its_t5_weights(tmp_path):
    path = save_tiny_pipeline(tmp_path / "m", "sd3")
    for f in (path / "text_encoder_3").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelError, match="text_encoder_3"):
        load_model(path)


def test_flow_velocity_epsilon_conversion_matches_definition():
    # rectified flow: x_t = (1 - s) x0 + s eps, the model predicts u = eps - x0
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for sigma in (0.0, 0.37, 0.9):
        x_t = (1 - sigma) * x0 + sigma * eps
        u = eps - x0
        assert torch.allclose(core.to_epsilon(u, x_t, sigma, "flow"), eps, atol=1e-10)
        assert torch.allclose(core.from_epsilon(eps, x_t, sigma, "flow"), u, atol=1e-10)
    # timesteps are sigma * 1000; sigma = 1 is capped so that a rule's change can be converted back
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    like = torch.zeros(1, 4, 8, 8)
    assert core.noise_level(sched, torch.tensor(370.0), like, "flow") == pytest.approx(0.37)
    assert core.noise_level(sched, torch.tensor(1000.0), like, "flow") == pytest.approx(0.999)
    per_sample = core.noise_level(sched, torch.tensor([100.0, 1000.0]), like, "flow")
    assert per_sample.shape == (2, 1, 1, 1) and per_sample.flatten().tolist() == pytest.approx([0.1, 0.999])


def test_an_epsilon_rule_moves_the_velocity_by_its_epsilon_change_over_one_minus_sigma(tiny_sd3):
    # a rule "add c to epsilon" written once in epsilon space changes SD3's velocity by
    # c / (1 - sigma) at every step, as the conversion says
    from safediff.defenses.base import GuidanceDefense

    class AddConstant(GuidanceDefense):
        def guide(self, eps, guided, step, state):
            return guided + 0.01

    with SafePipeline(tiny_sd3, DefenseStack.parse(None)) as pipe:
        plain = pipe.denoiser(["a red circle"], num_steps=28)
        added = pipe.denoiser(["a red circle"], num_steps=28)
    added.guidance, added.states = [AddConstant(None, tiny_sd3)], [None]
    added.names = []
    tiny_sd3.scheduler.set_timesteps(28)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for i in (0, 10, 27):
        t = tiny_sd3.scheduler.timesteps[i]
        sigma = core.noise_level(tiny_sd3.scheduler, t, x, "flow")
        with torch.no_grad():
            du = added.model_output(x, t, i) - plain.model_output(x, t, i)
        assert torch.allclose(du, torch.full_like(du, 0.01 / (1 - sigma)), rtol=1e-3)


def test_sld_on_sd3_guides_with_the_concept_through_all_encoders(tiny_sd3):
    plain = _ours(tiny_sd3, steps=10)
    assert np.array_equal(_ours(tiny_sd3, 'sld(concept="zebra", guidance_scale=0)', steps=10), plain)
    assert np.abs(_ours(tiny_sd3, 'sld(preset=max, concept="zebra")', steps=10) - plain).max() > 0


def test_prompt_guard_on_sd3_reads_the_first_text_encoder(tiny_sd3):
    with SafePipeline(tiny_sd3, DefenseStack.parse('prompt_guard(concepts=["zebra"], threshold=0.999)')) as pipe:
        out = pipe(["a zebra on grass", "a red circle"], num_inference_steps=2)
    assert [r.refused for r in out.records] == [True, False]


def test_defenses_not_carried_over_yet_are_refused_before_any_work(tiny_sd3, tmp_path):
    for stack in ('esd(path="x.safetensors")', 'duo(path="x.safetensors")'):
        with pytest.raises(ValueError, match="not supported on sd3"):
            SafePipeline(tiny_sd3, DefenseStack.parse(stack))
    assert tiny_sd3.edited_hash is None
    from safetensors.torch import save_file

    f = tmp_path / "ti.safetensors"  # a vanilla one-encoder textual-inversion file
    save_file({"<x>": torch.zeros(1, 8)}, str(f))
    with pytest.raises(ValueError, match="not supported on sd3"):
        SafePipeline(tiny_sd3, DefenseStack.parse(f'negative_prompt(embedding="{f}")'))


def test_eval_runs_end_to_end_on_a_saved_tiny_sd3(tiny_sd3, tiny_dir, tmp_path):
    pytest.importorskip("nudenet")
    from safediff.cli import main
    from safediff.eval.runner import summarize

    (tmp_path / "p.csv").write_text("prompt\na photo of a cat\na painting of a dog\n")
    out = tmp_path / "run"
    assert main(["eval", "--benchmark", str(tmp_path / "p.csv"), "--model", str(tiny_dir / "sd3-0"), "--steps", "4",
                 "--defense", 'negative_prompt(text="nudity")', "--detector", "nudenet", "--out", str(out)]) == 0
    s = summarize(out)
    assert s["n_images"] == 2 and s["n_errors"] == 0 and s["n_unscored"] == 0
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_text_encoder_attacks_run_against_transformer_families(family, tiny_dir, tmp_path):
    # Ring-A-Bell and MMA need only the first text encoder (CLIP, with or without projection);
    # their prompts then go through the family's whole stack
    from safediff.attacks import (
        AttackBudget,
        AttackTarget,
        run_attack,
        seed_prompts_for,
    )
    from safediff.attacks.mma import MMA, MMAConfig
    from safediff.attacks.ring_a_bell import RingABell, RingABellConfig
    from safediff.testing import tiny_model

    model = tiny_model(family, cache_dir=tiny_dir)
    target = AttackTarget(model, 'prompt_guard(concepts=["striped"], threshold=0.999)')
    for attack, d in ((RingABell(RingABellConfig(population=16)), "rab"), (MMA(MMAConfig(candidates=16)), "mma")):
        res = run_attack(attack, target, "striped", seed_prompts_for("striped", 2), AttackBudget(steps=2), tmp_path / d,
                         progress=False)
        assert len(res.prompts) == 2


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_uce_and_rece_edit_the_context_embedder_and_revert_exactly(family, tiny_dir):
    # the closed form on the linear map every text token enters the transformer through: the
    # erased word's tokens (CLIP and T5 segments) now map near where the guide's mapped; the edit
    # changes the images and is reverted bit for bit; zero rounds of RECE are the UCE edit
    from safediff.defenses.rece import RECE, RECEConfig
    from safediff.defenses.uce import (
        UCE,
        UCEConfig,
        cross_attention_projections,
        edit_vectors,
    )
    from safediff.testing import tiny_model

    model = tiny_model(family, cache_dir=tiny_dir)
    assert list(cross_attention_projections(model.unet)) == ["context_embedder"]
    ce, cg, _ = edit_vectors(model, ["zebra"], [""], [], "last_word")
    assert len(ce) == (2 if family == "sd3" else 1)  # one last-word token per text segment
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    old = model.unet.context_embedder.weight.detach().clone()
    handle = UCE(UCEConfig(erase=("zebra",)), model).apply()
    try:
        new = model.unet.context_embedder.weight
        assert (ce @ new.T - cg @ old.T).norm() < 0.25 * (ce @ old.T - cg @ old.T).norm()
    finally:
        handle.revert()
    assert all(torch.equal(model.unet.state_dict()[k], v) for k, v in before.items())
    zero = RECE(RECEConfig(erase=("zebra",), epochs=0), model).compute()
    uce = UCE(RECEConfig(erase=("zebra",), epochs=0).start_config(), model).compute()
    assert all(torch.equal(zero[k], uce[k]) for k in uce)
    gs = 4.0 if family == "flux" else None
    plain = _ours(model, steps=4, gs=gs)
    assert np.abs(_ours(model, 'uce(erase=["zebra"])', steps=4, gs=gs) - plain).max() > 0
    assert np.abs(_ours(model, 'rece(erase=["zebra"], epochs=1)', steps=4, gs=gs) - plain).max() > 0
    assert all(torch.equal(model.unet.state_dict()[k], v) for k, v in before.items())


def test_safree_on_sd3_projects_the_clip_part_per_encoder_and_leaves_t5(tiny_sd3):
    from safediff.defenses.safree import SAFREEProjection

    stack = 'safree(space=["zebra", "tiger"])+safree_svf'
    with SafePipeline(tiny_sd3, DefenseStack.parse(stack)) as p:
        pe, _, ctx = p.encode(["a red zebra on white background"])
        orig = ctx.original_prompt_embeds
        trig = ctx.get(SAFREEProjection).triggers[0]
        assert trig.any()
        changed = (pe[0, :77] != orig[0, :77]).any(-1)
        assert torch.equal(changed, trig) and torch.equal(pe[0, 77:], orig[0, 77:])  # T5 part untouched
    plain = _ours(tiny_sd3, steps=6)
    assert np.array_equal(_ours(tiny_sd3, 'safree(enabled=false)', steps=6), plain)
    assert np.abs(_ours(tiny_sd3, stack, steps=6) - plain).max() > 0
    with pytest.raises(ValueError, match="has none"):
        _ours(tiny_sd3, 'safree(space=["zebra"])+safree_svf(lra="freeu")', steps=2)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_embedding_sanitizer_on_the_joint_sequence(family, tiny_dir, tmp_path):
    # one sanitizer on the whole token sequence the transformer reads (SD3: CLIP then T5; FLUX:
    # T5); strength 0 is no defense bit for bit; it changes the images; its per-token attribution
    # reads the first segment's tokens; one made on another family is refused naming both
    from safediff.artifacts import ArtifactMismatchError
    from safediff.defenses.sanitizer import (
        SanitizerTrainConfig,
        explain,
        load_sanitizer,
        train_sanitizer,
    )
    from safediff.testing import tiny_model

    model = tiny_model(family, cache_dir=tiny_dir)
    cfg = SanitizerTrainConfig(concepts=("zebra",), anchors=("tiger",), steps=2, batch_size=4, hidden=16)
    path = train_sanitizer(model, tmp_path / "es.safetensors", cfg, progress=False)
    net = load_sanitizer(path, model)
    assert net.dim == 32
    pairs = explain(model, net, "a zebra")
    assert [t for t, _ in pairs][:3] == (["a", "zebra", "</s>"] if family == "flux" else ["<|startoftext|>", "a", "zebra"])
    gs = 4.0 if family == "flux" else None
    plain = _ours(model, steps=4, gs=gs)
    assert np.array_equal(_ours(model, f'sanitizer(path="{path}", strength=0)', steps=4, gs=gs), plain)
    assert np.abs(_ours(model, f'sanitizer(path="{path}")', steps=4, gs=gs) - plain).max() > 0
    other = tiny_model("flux" if family == "sd3" else "sd3", cache_dir=tiny_dir)
    with pytest.raises(ArtifactMismatchError, match=f"{family} model's text encoder"):
        SafePipeline(other, DefenseStack.parse(f'sanitizer(path="{path}")'))
