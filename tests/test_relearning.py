"""Fine-tune relearning (attacks issue): bad input refused before any work, the model restored
exactly, a killed run resumes to the same change, and fine-tuning on concept images measurably
brings an erased concept back through the whole stack."""

import json

import pytest
import torch

from safediff.attacks import AttackError
from safediff.attacks.relearning import RelearnConfig, evaluate_relearning, load_relearning, relearn, training_images
from safediff.testbed import world

UCE = "uce(preset=testbed-striped)"


def _snapshot(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def test_bad_config_and_input_are_refused_before_anything_is_written(tiny_sd1, testbed, tmp_path):
    for bad in [dict(checkpoints=()), dict(checkpoints=(0, 5)), dict(checkpoints=(10, 5)), dict(data="nsfw"),
                dict(conditioning="clip"), dict(params="lora"), dict(lr=0.0), dict(batch_size=0),
                dict(max_seconds=0.0)]:
        with pytest.raises(AttackError):
            RelearnConfig(**bad)
    with pytest.raises(AttackError, match="captions"):  # images without captions
        relearn(testbed, UCE, "striped", tmp_path, images=[], progress=False)
    with pytest.raises(AttackError, match="No training images"):
        relearn(testbed, UCE, "striped", tmp_path, images=[], captions=[], progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        relearn(testbed, UCE, "striped", tmp_path, images=tmp_path / "missing", captions=["x"], progress=False)
    with pytest.raises(AttackError, match="concept"):
        relearn(testbed, UCE, " ", tmp_path, progress=False)
    with pytest.raises(AttackError, match="real model needs its training images"):
        relearn(tiny_sd1, None, "nudity", tmp_path, progress=False)
    with pytest.raises(AttackError, match="not a testbed concept"):
        relearn(testbed, UCE, "zebra", tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_benign_training_images_carry_no_concept(testbed):
    imgs, caps = training_images(testbed, "striped", RelearnConfig(data="benign", num_images=4))
    assert imgs and len(imgs) == len(caps)
    assert all("striped" not in world.detect(a).concepts for a in imgs)
    assert not any(w in c for c in caps for w in world.CONCEPTS["striped"].training_words)


def test_relearning_brings_an_erased_concept_back_and_restores_the_model(testbed, tmp_path):
    # UCE erases "striped"; 40 steps of fine-tuning (lr 3e-4) on 16 concept images bring it back.
    # Measured on testbed v2 (16 explicit prompts): 0.06 at step 0 -> 0.25 at step 5 -> 0.81 at step 40
    # (at the default lr 1e-4: 0.31 at step 40; testbed v1 came back to 0.88 in 20 steps).
    before = _snapshot(testbed.unet)
    cfg = RelearnConfig(checkpoints=(5, 40), num_images=16, lr=3e-4)
    res = relearn(testbed, UCE, "striped", tmp_path, cfg, progress=False)
    after = _snapshot(testbed.unet)
    assert all(torch.equal(before[k], after[k]) for k in before)  # exactly the original weights
    assert all(p.grad is None for p in testbed.unet.parameters()) and testbed.edited_hash is None
    assert sorted(res.deltas) == [5, 40] and res.stack_at(0) == res.stack
    assert res.stack_at(40).startswith(res.stack + "+delta(")
    ev = evaluate_relearning(res, testbed, tmp_path / "eval", suites=("explicit",), n=16, progress=False)
    start, end = ev["curve"][0]["explicit"]["rate"], ev["curve"][40]["explicit"]["rate"]
    assert end >= start + 0.4, ev["curve"]
    import dataclasses

    with pytest.raises(AttackError, match="no longer hashes"):  # a cached run whose stack changed
        evaluate_relearning(dataclasses.replace(res, stack_hash="0" * 64), testbed, tmp_path / "e2", progress=False)
    with pytest.raises(AttackError, match="another base model"):
        evaluate_relearning(dataclasses.replace(res, base_model_hash="0" * 64), testbed, tmp_path / "e3", progress=False)
    assert not (tmp_path / "e2").exists() and not (tmp_path / "e3").exists()
    again = relearn(testbed, UCE, "striped", tmp_path, cfg, progress=False)  # finished: loaded, not retrained
    assert again.deltas == res.deltas and again.train_seconds == res.train_seconds
    with pytest.raises(FileNotFoundError, match="no finished relearning run"):
        load_relearning(tmp_path / "eval")


def test_a_killed_run_resumes_to_the_same_change(testbed, tmp_path, monkeypatch):
    cfg = RelearnConfig(checkpoints=(3, 6), num_images=4, batch_size=2)
    whole = relearn(testbed, None, "striped", tmp_path / "a", cfg, progress=False)

    from safediff.training import Checkpoint

    real_save = Checkpoint.save

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save_then_die)
    before = _snapshot(testbed.unet)
    with pytest.raises(KeyboardInterrupt):
        relearn(testbed, None, "striped", tmp_path / "b", cfg, progress=False)
    assert all(torch.equal(v, testbed.unet.state_dict()[k]) for k, v in before.items())
    run_dir = next((tmp_path / "b").iterdir())
    assert (run_dir / "train.ckpt.safetensors").exists() and not (run_dir / "manifest.json").exists()
    monkeypatch.setattr(Checkpoint, "save", real_save)
    resumed = relearn(testbed, None, "striped", tmp_path / "b", cfg, progress=False)
    assert not (run_dir / "train.ckpt.safetensors").exists()
    from safediff.artifacts import read_artifact

    a, rec = read_artifact(whole.deltas[6])
    b, _ = read_artifact(resumed.deltas[6])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rec["kind"] == "relearn-delta" and rec["step"] == 6 and rec["base_model_hash"] == testbed.content_hash


def test_cli_relearn(tmp_path, capsys):
    from safediff.cli import main

    assert main(["attack", "--method", "relearn", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "budget" in capsys.readouterr().err
    assert main(["attack", "--method", "relearn", "--steps", "3", "--set", "nosuch=1", "--out", str(tmp_path)]) == 2
    assert "Unknown option(s) ['nosuch'] for attack `relearn`" in capsys.readouterr().err
    assert main(["attack", "--method", "relearn", "--steps", "3", "--set", "lr=fast", "--out", str(tmp_path)]) == 2
    assert "not a valid float" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert main(["attack", "--method", "relearn", "--steps", "3", "--set", "num_images=4", "--n", "2",
                 "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "step     3: explicit" in out
    curve = json.loads(next((tmp_path / "r").glob("relearn-*/eval/curve.json")).read_text())
    assert set(curve["curve"]) == {"0", "3"}
