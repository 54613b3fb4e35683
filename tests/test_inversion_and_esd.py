"""Concept inversion core, INE through the negative prompt, ESD deltas."""


import pickle

import numpy as np
import pytest
import torch

import safediff
from safediff import encoding
from safediff.artifacts import ArtifactMismatchError, read_artifact
from safediff.encoding import encode_with_vectors, load_inverted
from safediff.inversion import InversionConfig, invert
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack


def test_vector_injection_is_exact(tiny_sd1):
    # injecting the embedding row of an existing word must equal encoding that word
    m = tiny_sd1
    word_id = m.tokenizer("zebra", add_special_tokens=False).input_ids[0]
    row = m.text_encoder.get_input_embeddings().weight[word_id][None]
    ours = encode_with_vectors(m, ["a red <z*> on white background"], "<z*>", row)
    ref, _, _ = encoding.encode_prompts(m, ["a red zebra on white background"])
    assert torch.equal(ours, ref)
    # and the model is untouched: no hook left behind, same result as before
    assert torch.equal(encoding.encode_prompts(m, ["a red zebra on white background"])[0], ref)


def _tiny_images(n=4, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(n)]


def test_inversion_file_loads_in_vanilla_diffusers(tiny_sd1, tmp_path):
    out = invert(tiny_sd1, tmp_path / "c.safetensors", images=_tiny_images(), progress=False,
                 config=InversionConfig(placeholder="<c*>", initializer="zebra", num_vectors=2, steps=3, batch_size=2))
    tensors, record = read_artifact(out)
    assert list(tensors) == ["<c*>"] and tensors["<c*>"].shape == (2, 8)
    assert record["base_model_hash"] == tiny_sd1.content_hash and record["edited_model_hash"] is None
    import copy

    pipe = tiny_sd1.to_diffusers()
    pipe.text_encoder = copy.deepcopy(tiny_sd1.text_encoder)  # vanilla loading edits them: keep ours intact
    pipe.tokenizer = copy.deepcopy(tiny_sd1.tokenizer)
    pipe.load_textual_inversion(str(out))
    ids = pipe.tokenizer(pipe.maybe_convert_prompt("<c*>", pipe.tokenizer)).input_ids
    assert len(ids) == 4  # bos, <c*>, <c*>_1, eos
    # diffusers' encoding of the loaded token equals ours
    ref = pipe.text_encoder(torch.tensor([pipe.tokenizer(pipe.maybe_convert_prompt("a <c*>", pipe.tokenizer), padding="max_length",
                                                         max_length=77).input_ids]))[0]
    ours = load_inverted(out, tiny_sd1).encode(tiny_sd1, ["a <c*>"])
    assert torch.allclose(ours, ref, atol=1e-6)


def test_inversion_resumes_from_checkpoint_exactly(tiny_sd1, tmp_path, monkeypatch):
    # regression (review defect 8): a resumed inversion differed from an uninterrupted one by 31%
    # (noise reseeded, Adam's state lost); now the checkpoint holds both and the result is identical
    cfg = InversionConfig(placeholder="<c*>", steps=6, batch_size=2, checkpoint_every=3, seed=1)
    full = invert(tiny_sd1, tmp_path / "full.safetensors", images=_tiny_images(), config=cfg, progress=False)
    part = tmp_path / "part.safetensors"
    calls = {"n": 0}
    real_mse = torch.nn.functional.mse_loss

    def dying_mse(*a, **k):  # killed in step 5, after the step-3 checkpoint
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_mse(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "mse_loss", dying_mse)
    with pytest.raises(KeyboardInterrupt):
        invert(tiny_sd1, part, images=_tiny_images(), config=cfg, progress=False)
    monkeypatch.setattr(torch.nn.functional, "mse_loss", real_mse)
    assert part.with_name(part.name + ".ckpt.safetensors").exists() and not part.exists()
    invert(tiny_sd1, part, images=_tiny_images(), config=cfg, progress=False)
    assert not part.with_name(part.name + ".ckpt.safetensors").exists()
    assert torch.equal(read_artifact(part)[0]["<c*>"], read_artifact(full)[0]["<c*>"])
    with pytest.raises(FileExistsError, match="exists"):  # never overwritten without asking
        invert(tiny_sd1, part, images=_tiny_images(), config=cfg, progress=False)


def test_inversion_from_another_base_is_refused(tiny_sd1, tiny_sd2v, tmp_path):
    out = invert(tiny_sd1, tmp_path / "c.safetensors", images=_tiny_images(), progress=False,
                 config=InversionConfig(placeholder="<c*>", steps=1, batch_size=1))
    with pytest.raises(ArtifactMismatchError, match="made on a sd1 model .* this is a sd2 model"):
        load_inverted(out, tiny_sd2v)
    assert load_inverted(out, tiny_sd2v, allow_other_base=True).placeholder == "<c*>"


def test_ine_negative_embedding_changes_generation(tiny_sd1, tmp_path):
    out = invert(tiny_sd1, tmp_path / "c.safetensors", images=_tiny_images(), progress=False,
                 config=InversionConfig(placeholder="<c*>", steps=2, batch_size=2))
    base = safediff.generate("a red circle", model=tiny_sd1, num_inference_steps=3, guidance_scale=5, progress=False)
    ine = safediff.generate("a red circle", model=tiny_sd1, defenses=f'negative_prompt(embedding="{out}")',
                            num_inference_steps=3, guidance_scale=5, progress=False)
    assert not np.array_equal(np.asarray(base.images[0]), np.asarray(ine.images[0]))


def test_esd_delta_apply_revert_and_zero_scale(tiny_sd1, tmp_path):
    from safediff.unlearning.esd import ESDTrainConfig, train_esd

    before = {k: v.clone() for k, v in tiny_sd1.unet.state_dict().items()}
    cfg = ESDTrainConfig(prompts=("a zebra",), method="esd-x", lr=1e-2, iterations=2, ddim_steps=4, start_guidance=3.0)
    path = train_esd(tiny_sd1, tmp_path / "esd.safetensors", cfg, progress=False)
    assert all(torch.equal(before[k], v) for k, v in tiny_sd1.unet.state_dict().items())  # training restored it
    assert all(p.grad is None for p in tiny_sd1.unet.parameters())  # and left no gradients behind
    delta, record = read_artifact(path)
    assert delta and all(".attn2." in k for k in delta) and any(d.abs().sum() > 0 for d in delta.values())
    assert record["kind"] == "esd-delta" and record["base_model_hash"] == tiny_sd1.content_hash
    with SafePipeline(tiny_sd1, DefenseStack.parse(f'esd(path="{path}")')) as pipe:
        assert pipe.model.edited_hash is not None
        assert not all(torch.equal(before[k], v) for k, v in tiny_sd1.unet.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in tiny_sd1.unet.state_dict().items())  # reverted exactly
    assert tiny_sd1.edited_hash is None
    off = SafePipeline(tiny_sd1, DefenseStack.parse(f'esd(path="{path}", scale=0)'))
    assert off.defenses["weight_edit"] == []


def test_esd_delta_on_another_base_is_refused(tiny_sd1, tiny_sd2v, tmp_path):
    from safediff.unlearning.esd import ESDTrainConfig, train_esd

    path = train_esd(tiny_sd1, tmp_path / "esd.safetensors",
                     ESDTrainConfig(prompts=("a zebra",), method="esd-x", iterations=1, ddim_steps=2), progress=False)
    with pytest.raises(ArtifactMismatchError, match="made on a sd1 model .* this is a sd2 model"):
        SafePipeline(tiny_sd2v, DefenseStack.parse(f'esd(path="{path}")'))


def test_esd_presets():
    from safediff.unlearning.esd import ESDTrainConfig

    o = ESDTrainConfig.preset("original", ("nudity",))
    assert (o.eta, o.lr, o.iterations) == (1.0, 1e-5, 1000)
    d = ESDTrainConfig.preset("diffusers-2024", ("nudity",))
    assert (d.eta, d.lr, d.iterations) == (2.0, 5e-5, 200)
    with pytest.raises(ValueError, match="Unknown ESD preset"):
        ESDTrainConfig.preset("fast", ("x",))


def test_cli_erase_dispatches_esd_with_the_concept_text(monkeypatch, tmp_path):
    import safediff.unlearning.esd as esd_mod
    from safediff.cli import main

    seen = {}

    def fake_train(model, out, cfg, progress=True, **kw):
        seen["cfg"] = cfg
        return out

    monkeypatch.setattr(esd_mod, "train_esd", fake_train)
    assert main(["erase", "--method", "esd", "--concept", "striped", "--out", str(tmp_path / "a.safetensors")]) == 0
    assert seen["cfg"].prompts == esd_mod.testbed_prompts("striped") and seen["cfg"].method == "esd-x"  # testbed preset
    assert main(["erase", "--method", "esd", "--concept", "a red zebra", "--concept", "tiger stripes",
                 "--out", str(tmp_path / "b.safetensors")]) == 0
    assert seen["cfg"].prompts == ("a red zebra", "tiger stripes")  # any text, a list


def test_esd_resumes_from_its_checkpoint_to_the_same_delta(tiny_sd1, tmp_path, monkeypatch):
    from safediff.unlearning.esd import ESDTrainConfig, train_esd

    cfg = ESDTrainConfig(prompts=("a zebra",), method="esd-x", lr=1e-2, iterations=6, ddim_steps=4, start_guidance=3.0)
    ref = read_artifact(train_esd(tiny_sd1, tmp_path / "ref.safetensors", cfg, progress=False, checkpoint_every=2))[0]
    assert not (tmp_path / "ref.safetensors.ckpt.safetensors").exists()  # removed once the delta is written
    # a run killed after iteration 4 (its checkpoint written), then started again
    calls = {"n": 0}
    real_mse = torch.nn.functional.mse_loss

    def dying_mse(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_mse(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "mse_loss", dying_mse)
    with pytest.raises(KeyboardInterrupt):
        train_esd(tiny_sd1, tmp_path / "run.safetensors", cfg, progress=False, checkpoint_every=2)
    monkeypatch.setattr(torch.nn.functional, "mse_loss", real_mse)
    assert (tmp_path / "run.safetensors.ckpt.safetensors").exists() and not (tmp_path / "run.safetensors").exists()
    with pytest.raises(ValueError, match="another config"):
        train_esd(tiny_sd1, tmp_path / "run.safetensors", ESDTrainConfig(**{**cfg.__dict__, "lr": 1e-3}), progress=False)
    resumed = read_artifact(train_esd(tiny_sd1, tmp_path / "run.safetensors", cfg, progress=False, checkpoint_every=2))[0]
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)  # bit for bit


# issue 19 review, defect 4 ------------------------------------------------------------
class _Boom:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_a_planted_checkpoint_runs_no_code(tiny_sd1, tmp_path, monkeypatch):
    from safediff.unlearning.esd import ESDTrainConfig, train_esd

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "esd.safetensors"
    with open(out.with_name(out.name + ".ckpt.safetensors"), "wb") as f:
        pickle.dump({"state": _Boom()}, f)
    with open(out.with_name(out.name + ".ckpt"), "wb") as f:  # the old name, for good measure
        pickle.dump({"state": _Boom()}, f)
    cfg = ESDTrainConfig(prompts=("a zebra",), method="esd-x", iterations=2, ddim_steps=2)
    with pytest.raises(ValueError, match="unreadable"):
        train_esd(tiny_sd1, out, cfg, progress=False)
    assert not (tmp_path / "PWNED").exists()
