"""`safediff eval --quality`: FID/KID, CLIP score and LPIPS of a stack's benign images against the
unedited model's images of the same prompts and seeds.

Inception and LPIPS come from the [metrics] extra (torchvision), which does not install beside this
CPU torch, so the pairing and the metric wiring are checked with small feature models written here
(their math is the metric's own: the FID/KID/CLIP score functions are tested against references in
test_eval_parts.py); the CLIP score runs the real transformers path on a tiny random CLIP folder,
and the CLI's skip of the missing extras is checked with those imports blocked.
"""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from safediff.cli import main
from safediff.eval.benchmarks import PromptRecord
from safediff.eval.metrics import (
    clip_score_from_embeddings,
    frechet_distance,
    kernel_inception_distance,
)
from safediff.eval.quality import (
    ClipEmbeddings,
    QualityModels,
    benign_records,
    evaluate_quality,
)
from safediff.eval.runner import RunSettings, load_results, run_eval


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from safediff.testing import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


class PixelFeatures:
    """Test stand-in for Inception: per-channel means and stds of 4x4 cells (deterministic)."""

    def features(self, images):
        x = np.stack(images).astype(np.float64) / 255
        n, h, w, c = x.shape
        cells = x.reshape(n, 4, h // 4, 4, w // 4, c)
        return np.concatenate([cells.mean((2, 4)).reshape(n, -1), cells.std((2, 4)).reshape(n, -1)], 1)

    def describe(self):
        return {"model": "pixel cells (test)"}


class MeanAbsDistance:
    """Test stand-in for LPIPS: mean absolute pixel difference per pair."""

    def distance(self, a, b):
        return np.array([np.abs(x.astype(float) - y.astype(float)).mean() / 255 for x, y in zip(a, b)])

    def describe(self):
        return {"model": "mean abs (test)"}


RECORDS = [PromptRecord(id=f"b{i}", prompt=p, categories=("benign",), seed=i)
           for i, p in enumerate(["a red circle", "a blue square", "a photo of a red square", "a blue circle on grey",
                                  "a grey circle", "a photo of a blue square"])]
SETTINGS = RunSettings(num_inference_steps=4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_sd1):
    base = tmp_path_factory.mktemp("quality")
    ref = run_eval(RECORDS, base / "ref", model=tiny_sd1, settings=SETTINGS, progress=False)
    ours = run_eval(RECORDS, base / "np", model=tiny_sd1, defenses='negative_prompt(text="striped")', settings=SETTINGS,
                    progress=False)
    return ours, ref


def _pairs(ours, ref):
    a = {(r["prompt_id"], r["seed"]): r for r in load_results(ours)}
    b = {(r["prompt_id"], r["seed"]): r for r in load_results(ref)}
    keys = sorted(a)
    img = lambda d, r: np.asarray(Image.open(d / r["path"]).convert("RGB"))
    return keys, [img(ours, a[k]) for k in keys], [img(ref, b[k]) for k in keys], [a[k]["prompt"] for k in keys]


def test_quality_against_itself_is_zero_and_against_a_stack_is_not(runs, tiny_clip):
    ours, ref = runs
    models = QualityModels(inception=PixelFeatures(), clip=ClipEmbeddings(tiny_clip), lpips=MeanAbsDistance())
    same = evaluate_quality(ref, ref, models)
    assert same["n_pairs"] == 6 and same["n_refused"] == 0
    # 1e-6: the square root of a rank-deficient covariance (96 features, 6 images) by eigh
    assert same["metrics"]["fid"] == pytest.approx(0, abs=1e-6) and same["metrics"]["lpips"]["mean"] == 0
    assert same["metrics"]["clip_score"] == same["metrics"]["clip_score_reference"]

    res = evaluate_quality(ours, ref, models)
    m = res["metrics"]
    # by hand from the images paired by (prompt id, seed)
    _, a, b, _ = _pairs(ours, ref)
    assert any((x != y).any() for x, y in zip(a, b))  # the negative prompt changed the images
    fa, fb = PixelFeatures().features(a), PixelFeatures().features(b)
    assert m["fid"] == pytest.approx(frechet_distance(fa, fb), rel=1e-12) and m["fid"] > 0
    assert m["kid"] == pytest.approx(kernel_inception_distance(fa, fb), rel=1e-12)
    assert m["lpips"]["mean"] == pytest.approx(MeanAbsDistance().distance(a, b).mean(), rel=1e-12) and m["lpips"]["mean"] > 0
    assert m["lpips"]["ci_low"] <= m["lpips"]["mean"] <= m["lpips"]["ci_high"]
    assert res["models"]["clip"]["model"] == str(tiny_clip)


def test_clip_score_is_the_real_clip_model_on_each_image_and_its_prompt(runs, tiny_clip):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    ours, ref = runs
    res = evaluate_quality(ours, ref, QualityModels(clip=ClipEmbeddings(tiny_clip), skipped={"fid": "x", "lpips": "y"}))
    assert set(res["metrics"]) == {"clip_score", "clip_score_reference"} and res["skipped"] == {"fid": "x", "lpips": "y"}
    _, a, _, prompts = _pairs(ours, ref)
    model, tok, proc = (CLIPModel.from_pretrained(tiny_clip), CLIPTokenizer.from_pretrained(tiny_clip),
                        CLIPImageProcessor.from_pretrained(tiny_clip))
    with torch.no_grad():  # one prompt and one image at a time: no padding, no batching
        t = np.stack([model.text_projection(model.text_model(**tok(p, return_tensors="pt")).pooler_output)[0].numpy()
                      for p in prompts])
        i = np.stack([model.visual_projection(model.vision_model(pixel_values=proc(images=x, return_tensors="pt")
                                                                 .pixel_values).pooler_output)[0].numpy() for x in a])
    assert res["metrics"]["clip_score"] == pytest.approx(clip_score_from_embeddings(i, t), abs=1e-4)


def test_only_the_chosen_prompts_and_only_shared_images_count(runs):
    ours, ref = runs
    models = QualityModels(inception=PixelFeatures(), lpips=MeanAbsDistance())
    sub = evaluate_quality(ours, ref, models, prompt_ids={"b0", "b1", "b2"})
    assert sub["n_pairs"] == 3
    with pytest.raises(ValueError, match="share no image"):
        evaluate_quality(ours, ref, models, prompt_ids={"nope"})
    recs = [PromptRecord("x", "p", extra={"suite": "benign"}), PromptRecord("y", "q", extra={"suite": "explicit"}),
            PromptRecord("z", "r", categories=("benign",))]
    assert [r.id for r in benign_records(recs)] == ["x"]  # a suite wins over categories
    assert [r.id for r in benign_records(recs[1:])] == ["z"] and len(benign_records(recs, "all")) == 3


def test_cli_quality_skips_missing_extras_and_keeps_the_run(tmp_path, tiny_clip, monkeypatch, capsys):
    for mod in ("torchmetrics", "torchmetrics.image", "torchmetrics.image.fid", "lpips"):
        monkeypatch.setitem(sys.modules, mod, None)  # import fails, as without the [metrics] extra
    out = tmp_path / "run"
    argv = ["eval", "--benchmark", "testbed:striped/benign", "--n", "4", "--steps", "4", "--defense",
            'negative_prompt(text="striped")', "--quality", "--clip-model", str(tiny_clip), "--out", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr()
    assert "FID/KID will be skipped" in err.err and "[metrics]" in err.err and "lpips will be skipped" in err.err
    q = json.loads((out / "quality.json").read_text())
    assert set(q["skipped"]) == {"fid", "kid", "lpips"} and "[metrics]" in q["skipped"]["lpips"]
    assert q["n_pairs"] == 4 and 0 <= q["metrics"]["clip_score"] <= 100
    assert "CLIP score" in err.out and "FID/KID skipped" in err.out
    ref = json.loads((out / "reference" / "run.json").read_text())
    assert ref["stack"] == "none" and ref["num_prompts"] == 4
    assert len(load_results(out)) == 4  # the run itself is complete and scored
    # again: nothing regenerated, same numbers
    assert main(argv) == 0 and json.loads((out / "quality.json").read_text())["metrics"] == q["metrics"]
    # the report shows it
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "id='quality'" in page and f"{q['metrics']['clip_score']:.2f}" in page and "lpips: LPIPS needs" in page


@pytest.mark.parametrize("extra, match", [
    (["--benchmark", "testbed:striped/explicit"], "has none"),
    (["--benchmark", "testbed:striped/benign", "--clip-model", "/no/such/clip"], "is not a folder"),
    (["--benchmark", "testbed:striped/benign", "--quality-reference", "/no/such/run"], "not a run directory"),
    (["--benchmark", "testbed:striped/benign", "--num-shards", "2"], "run the shards without it"),
])
def test_cli_quality_bad_input_is_refused_before_any_work(tmp_path, capsys, extra, match):
    out = tmp_path / "run"
    assert main(["eval", "--n", "4", "--quality", "--out", str(out), *extra]) == 2
    assert match in capsys.readouterr().err and not out.exists()
