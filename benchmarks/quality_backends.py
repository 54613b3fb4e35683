"""Run `safediff eval --quality` through the real [metrics] models: torch-fidelity's Inception via
torchmetrics, the lpips package, a transformers CLIP; with random weights, since this machine has no
model hub (so the numbers mean nothing: what is checked is that every path runs end to end).

CI's CPU torch cannot import PyPI's torchvision, so this runs in a separate venv (x86_64, see
docs/evaluation.md):

    python3 -m venv /tmp/qvenv && /tmp/qvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        torchmetrics torch-fidelity lpips && /tmp/qvenv/bin/pip install -e . \
        && /tmp/qvenv/bin/pip install --no-deps torch==2.14.1
    /tmp/qvenv/bin/python benchmarks/quality_backends.py /tmp/qcheck

Random weights are made here without touching any installed file: the Inception network's own
random state dict is saved and passed as --inception-weights; LPIPS is built with its AlexNet
random (``pnet_rand=True``, its linear heads ship with the package).
"""
import functools
import json
import sys
from pathlib import Path

import lpips
import torch
import torch_fidelity.feature_extractor_inceptionv3 as fe

from safediff.cli import main
from safediff.testing import save_tiny_clip

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
w = out / "inception-random.pth"
if not w.exists():  # the network's own random weights (its loader patched in this process only)
    orig_load = torch.nn.Module.load_state_dict
    orig_url = fe.load_state_dict_from_url
    torch.nn.Module.load_state_dict = lambda self, sd, *a, **k: None
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        torch.nn.Module.load_state_dict, fe.load_state_dict_from_url = orig_load, orig_url
    torch.save(net.state_dict(), w)
lpips.LPIPS = functools.partial(lpips.LPIPS, pnet_rand=True)  # AlexNet weights would be downloaded
clip = out / "clip"
if not clip.exists():
    save_tiny_clip(clip)
rc = main(["eval", "--benchmark", "testbed:striped/benign", "--n", "8", "--steps", "10", "--defense", 'negative_prompt(text="striped")',
           "--quality", "--clip-model", str(clip), "--inception-weights", str(w), "--out", str(out / "run")])
print("rc", rc)
print(json.dumps(json.loads((out / "run" / "quality.json").read_text()), indent=1))
