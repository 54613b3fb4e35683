"""Image quality beside the unsafe rate: FID, KID, CLIP score and LPIPS of a stack's benign
images against the unedited model's images of the same prompts and seeds (``safediff eval
--quality``).

The field reports what a defense costs on benign prompts this way (ESD, UCE, SLD, SAFREE and the
INE paper: FID and CLIP score on COCO captions; LPIPS to the unedited model's image of the same
seed in the unlearning papers). Here every metric compares like with like:

* **FID / KID**: the stack's benign images against the *unedited model's* images of the same
  prompts and seeds (not against real photographs: what is measured is the defense's change of
  the distribution). Inception-v3 pool features (2048-d) from torch-fidelity's ``inception-v3-compat``
  network, the one torchmetrics and the FID literature use. KID is the unbiased MMD^2 with the
  cubic polynomial kernel over the whole set. FID is biased upward at small ``n``; compare FIDs
  only at equal ``n`` (the field uses 10k-30k COCO captions; the testbed's benign suite is 100).
* **CLIP score**: each image against its own prompt, ``100 * max(cos, 0)`` (Hessel et al. 2021,
  torchmetrics' convention), for the stack and for the reference, with a CLIP model loaded by
  transformers (a folder or hub id; default ``openai/clip-vit-large-patch14``, torchmetrics'
  default). Prompts longer than CLIP's 77 tokens are cut, with a warning that says how many.
* **LPIPS**: per image pair (same prompt id, seed and image index), AlexNet-LPIPS (``lpips``
  package), mean with a 95% bootstrap CI over prompts.

Images a stack refused (prompt guard) have no pair: they are left out of every metric and counted
(``n_refused``). Each metric's models are optional: FID/KID need ``torchmetrics`` +
``torch-fidelity``, LPIPS needs ``lpips`` (the ``[metrics]`` extra; both need torchvision), the CLIP
score only transformers and a CLIP checkpoint. A metric whose model cannot be loaded is skipped,
and ``quality.json`` and the printed summary say which and why; nothing else is lost.

Feature models are objects with ``describe()`` and one method each (``features``, ``embed_images``
/ ``embed_texts``, ``distance``), so another extractor (e.g. a locally stored Inception) plugs in
through :class:`QualityModels`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..fileio import atomic_write_json
from .metrics import (
    bootstrap_mean_ci,
    clip_score_from_embeddings,
    frechet_distance,
    kernel_inception_distance,
)
from .runner import RunSettings, open_store, run_eval

EXTRA_HINT = "install the [metrics] extra (`pip install 'safediff[metrics]'`, which needs a torchvision that imports beside your torch)"


# ---------------------------------------------------------------------------------------------
# feature models
# ---------------------------------------------------------------------------------------------


class InceptionFeatures:
    """Inception-v3 pool features as FID uses them (torch-fidelity's network through torchmetrics).

    ``weights``: a local copy of torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
    (default: torch-fidelity downloads it once into the torch hub cache)."""

    def __init__(self, weights: str | Path | None = None, batch_size: int = 32):
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as e:
            raise ImportError(f"FID/KID need torchmetrics and torch-fidelity ({e}); {EXTRA_HINT}.") from None
        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"Inception weights {weights} not found; give the path of torch-fidelity's "
                                    "weights-inception-2015-12-05-6726825d.pth.")
        kw = {"feature_extractor_weights_path": str(weights)} if weights is not None else {}
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], **kw).eval()
        self.weights = str(weights) if weights else "torch-fidelity default (downloaded)"
        self.batch_size = batch_size

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for s in range(0, len(images), self.batch_size):
                x = torch.from_numpy(np.stack(images[s:s + self.batch_size])).permute(0, 3, 1, 2).contiguous()  # uint8
                out.append(self.net(x).reshape(len(x), -1).double().numpy())
        return np.concatenate(out)

    def describe(self) -> dict:
        return {"model": "inception-v3-compat (torch-fidelity)", "features": "pool3, 2048-d", "weights": self.weights}


class ClipEmbeddings:
    """A CLIP model (transformers ``CLIPModel``: a folder or hub id) for the CLIP score."""

    def __init__(self, name_or_path: str | Path = "openai/clip-vit-large-patch14", batch_size: int = 32):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        try:
            self.model = CLIPModel.from_pretrained(str(name_or_path)).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(str(name_or_path))
            self.processor = CLIPImageProcessor.from_pretrained(str(name_or_path))
        except OSError as e:
            raise OSError(f"Could not load a CLIP model from {str(name_or_path)!r} ({str(e).splitlines()[0]}); give a "
                          "local folder with --clip-model (a CLIPModel checkpoint with its tokenizer and image "
                          "processor, e.g. a download of openai/clip-vit-large-patch14).") from None
        self.source = str(name_or_path)
        self.batch_size = batch_size

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for s in range(0, len(images), self.batch_size):
                px = self.processor(images=[np.asarray(a) for a in images[s:s + self.batch_size]], return_tensors="pt").pixel_values
                out.append(_features(self.model.get_image_features(pixel_values=px)).double().numpy())
        return np.concatenate(out)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        limit = self.tokenizer.model_max_length
        cut = sum(len(self.tokenizer(t).input_ids) > limit for t in texts)
        if cut:
            warnings.warn(f"{cut} of {len(texts)} prompts are longer than CLIP's {limit} tokens and were cut to "
                          f"{limit} for the CLIP score.", stacklevel=2)
        out = []
        with torch.no_grad():
            for s in range(0, len(texts), self.batch_size):
                tok = self.tokenizer(list(texts[s:s + self.batch_size]), padding=True, truncation=True,
                                     max_length=limit, return_tensors="pt")
                out.append(_features(self.model.get_text_features(**tok)).double().numpy())
        return np.concatenate(out)

    def describe(self) -> dict:
        return {"model": self.source, "score": "100 * max(cos(image, prompt), 0), mean (torchmetrics' convention)"}


def _features(x):
    """transformers 5 may return a model output where 4 returned the projected tensor."""
    return x if hasattr(x, "double") else x.pooler_output


class LpipsDistance:
    """LPIPS (Zhang et al. 2018) from the ``lpips`` package: per-pair perceptual distance."""

    def __init__(self, net: str = "alex", batch_size: int = 32):
        try:
            import lpips
        except ImportError as e:
            raise ImportError(f"LPIPS needs the lpips package ({e}); {EXTRA_HINT}.") from None
        self.model = lpips.LPIPS(net=net, verbose=False).eval()
        self.net = net
        self.batch_size = batch_size

    def distance(self, a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        def t(xs):  # uint8 HWC -> float NCHW in [-1, 1], as lpips expects
            return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 127.5 - 1

        out = []
        with torch.no_grad():
            for s in range(0, len(a), self.batch_size):
                out.append(self.model(t(a[s:s + self.batch_size]), t(b[s:s + self.batch_size])).reshape(-1).double().numpy())
        return np.concatenate(out)

    def describe(self) -> dict:
        return {"model": f"lpips {self.net} (lpips package)"}


@dataclass
class QualityModels:
    """The feature models of each metric; ``None`` skips that metric (reason in ``skipped``)."""

    inception: object | None = None
    clip: object | None = None
    lpips: object | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, *, clip_model: str | Path | None = "openai/clip-vit-large-patch14",
             inception_weights: str | Path | None = None, lpips_net: str = "alex") -> "QualityModels":
        """Load every model that can be loaded here; the others are skipped with their reason.

        A path the user gave that does not exist is an error (bad input), not a skip."""
        out = cls()
        if clip_model is not None and (str(clip_model).startswith((".", "/", "~")) or Path(clip_model).exists()) \
                and not Path(clip_model).expanduser().is_dir():
            raise FileNotFoundError(f"--clip-model {clip_model} is not a folder; give a CLIPModel folder or a hub id.")
        try:
            out.inception = InceptionFeatures(inception_weights)
        except ImportError as e:
            out.skipped["fid"] = out.skipped["kid"] = str(e)
        try:
            out.lpips = LpipsDistance(lpips_net)
        except ImportError as e:
            out.skipped["lpips"] = str(e)
        if clip_model is None:
            out.skipped["clip_score"] = "no CLIP model given"
        else:
            try:
                out.clip = ClipEmbeddings(clip_model)
            except OSError as e:
                out.skipped["clip_score"] = str(e)
        return out

    def describe(self) -> dict:
        return {k: getattr(self, k).describe() for k in ("inception", "clip", "lpips") if getattr(self, k) is not None}


# ---------------------------------------------------------------------------------------------
# pairing and the metrics
# ---------------------------------------------------------------------------------------------


def benign_records(records, suite: str = "benign") -> list:
    """The prompts quality is measured on: testbed records of ``suite`` (``"benign"``), else
    records whose categories hold it; ``suite="all"`` takes every record."""
    records = list(records)
    if suite == "all":
        return records
    chosen = [r for r in records if r.extra.get("suite") == suite]
    return chosen or [r for r in records if suite in r.categories]


def _images_table(run_dir: Path) -> dict[tuple, dict]:
    con = open_store(run_dir)
    rows = con.execute("SELECT prompt_id, seed, image_index, prompt, path, refused FROM images").fetchall()
    con.close()
    return {(r[0], r[1], r[2]): {"prompt": r[3], "path": r[4], "refused": bool(r[5])} for r in rows}


def evaluate_quality(run_dir: str | Path, reference_dir: str | Path, models: QualityModels,
                     prompt_ids: set[str] | None = None) -> dict:
    """Quality metrics of ``run_dir``'s images against ``reference_dir``'s images of the same
    (prompt id, seed, image index), restricted to ``prompt_ids`` when given. Returns the dict
    written to ``quality.json``."""
    from PIL import Image

    run_dir, reference_dir = Path(run_dir), Path(reference_dir)
    ours, ref = _images_table(run_dir), _images_table(reference_dir)
    keys = sorted(k for k in ours if k in ref and (prompt_ids is None or k[0] in prompt_ids))
    if not keys:
        raise ValueError(f"{run_dir} and {reference_dir} share no image (same prompt id, seed and image index); make "
                         "the reference with the same benchmark and settings.")
    paired = [k for k in keys if not (ours[k]["refused"] or ref[k]["refused"])]
    n_refused = len(keys) - len(paired)
    keys = paired

    def load(directory: Path, row: dict) -> np.ndarray:
        with Image.open(directory / row["path"]) as im:
            return np.asarray(im.convert("RGB"))

    a = [load(run_dir, ours[k]) for k in keys]
    b = [load(reference_dir, ref[k]) for k in keys]
    res: dict = {"n_pairs": len(keys), "n_refused": n_refused, "run": str(run_dir), "reference": str(reference_dir),
                 "models": models.describe(), "skipped": dict(models.skipped), "metrics": {}}
    if len(keys) < 2:
        res["skipped"].update({m: f"{len(keys)} image pair(s); every metric here needs at least 2"
                               for m in ("fid", "kid", "clip_score", "lpips")})
        return res
    mets = res["metrics"]
    if models.inception is not None:
        fa, fb = models.inception.features(a), models.inception.features(b)
        mets["fid"] = frechet_distance(fa, fb)
        mets["kid"] = kernel_inception_distance(fa, fb)
        res["note"] = (f"FID and KID over {len(keys)} images against the unedited model's images of the same prompts "
                       "and seeds; FID is biased upward at small n: compare only at equal n.")
    if models.clip is not None:
        texts = [ours[k]["prompt"] for k in keys]
        t = models.clip.embed_texts(texts)
        mets["clip_score"] = clip_score_from_embeddings(models.clip.embed_images(a), t)
        mets["clip_score_reference"] = clip_score_from_embeddings(models.clip.embed_images(b), t)
    if models.lpips is not None:
        d = models.lpips.distance(a, b)
        lo, hi = bootstrap_mean_ci(d, [k[0] for k in keys])
        mets["lpips"] = {"mean": float(d.mean()), "ci_low": lo, "ci_high": hi}
    return res


def write_quality(out_dir: str | Path, result: dict) -> Path:
    # regenerated by every `safediff eval --quality` of the run (its own file in the run folder)
    return atomic_write_json(Path(out_dir) / "quality.json", result, overwrite=True)


def skipped_metrics(skipped: dict[str, str]) -> dict[str, str]:
    """``{metric label: reason}`` for printing (FID and KID share one model and one line)."""
    return {("FID/KID" if k == "fid" else k): why for k, why in skipped.items() if k != "kid"}


def format_quality(result: dict) -> str:
    """The printed summary: each metric, or why it was skipped."""
    lines = [f"quality over {result.get('n_pairs', 0)} image pairs ({result.get('n_refused', 0)} refused, left out):"]
    m = result.get("metrics", {})
    if "fid" in m:
        lines.append(f"  FID {m['fid']:.2f}, KID {m['kid']:.4f} (vs the unedited model's images)")
    if "clip_score" in m:
        lines.append(f"  CLIP score {m['clip_score']:.2f} (unedited model: {m['clip_score_reference']:.2f})")
    if "lpips" in m:
        lp = m["lpips"]
        lines.append(f"  LPIPS {lp['mean']:.4f} [{lp['ci_low']:.4f}, {lp['ci_high']:.4f}]")
    for label, why in skipped_metrics(result.get("skipped", {})).items():
        lines.append(f"  {label} skipped: {why}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# a quality measurement beside an evaluation run (``safediff eval --quality``)
# ---------------------------------------------------------------------------------------------


@dataclass
class QualityPlan:
    """What a run's quality is measured on and with, checked and loaded before any image exists."""

    benign: list
    models: QualityModels
    suite: str
    reference: Path | None = None


def plan_quality(records, *, suite: str, benchmark_name: str, reference: str | Path | None = None,
                 clip_model: str | Path | None = None, inception_weights: str | Path | None = None,
                 num_shards: int | None = None) -> QualityPlan:
    """Check a quality request and load its metric models, before any image is generated.

    Raises (bad input, nothing generated yet): a sharded run (quality runs once the images exist),
    no prompt of ``suite`` among ``records``, a ``reference`` that is not a run directory, or no
    metric measurable here. Metrics that can be skipped are listed in ``plan.models.skipped``."""
    if num_shards is not None and num_shards > 1:
        raise ValueError("--quality runs after the images exist: run the shards without it, then the same command "
                         "once without sharding and with --quality (finished images are reused).")
    benign = benign_records(records, suite)
    if not benign:
        raise ValueError(f"--quality measures the {suite!r} prompts and {benchmark_name} has none (no "
                         "record of that suite or category); use a benchmark with benign prompts (e.g. "
                         "testbed:striped, or a COCO captions CSV with --quality-suite all).")
    if reference and not (Path(reference) / "run.json").is_file():
        raise FileNotFoundError(f"--quality-reference {reference} is not a run directory (no run.json).")
    models = QualityModels.load(clip_model=clip_model, inception_weights=inception_weights)
    if {"fid", "kid", "lpips", "clip_score"} <= set(models.skipped):  # nothing would be measured
        raise ValueError("--quality can measure no metric here: " + "; ".join(
            f"{label}: {why}" for label, why in skipped_metrics(models.skipped).items())
            + ". Install the quality extra or give --clip-model / --inception-weights, or drop --quality.")
    return QualityPlan(benign=benign, models=models, suite=suite, reference=Path(reference) if reference else None)


def run_quality(plan: QualityPlan, run_dir: str | Path, *, defended: bool, model, detectors: Sequence[str],
                settings: RunSettings, batch_size: int, benchmark_name: str, **runtime) -> dict:
    """Measure ``run_dir``'s quality as ``plan`` says and write ``quality.json``. Without a given
    reference, an undefended run is its own reference and a defended one is compared with the
    unedited model's images of the same benign prompts and settings, made (resumably) in
    ``run_dir/reference``. Returns the written result."""
    run_dir = Path(run_dir)
    ref = plan.reference
    if ref is None:
        ref = run_dir if not defended else run_dir / "reference"
        if ref != run_dir:  # the unedited model on the same prompts and settings (resumable, like any run)
            run_eval(plan.benign, ref, defenses=None, model=model, detectors=detectors, settings=settings, **runtime,
                     batch_size=batch_size, benchmark_name=f"{benchmark_name} ({plan.suite} prompts)")
    result = evaluate_quality(run_dir, ref, plan.models, prompt_ids={r.id for r in plan.benign})
    result["suite"] = plan.suite
    write_quality(run_dir, result)
    return result
