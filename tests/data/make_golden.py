"""Rebuild tests/data/golden_images.npz: a fixed set of stacks' images on every family, recorded
from the code before the family-adapter redesign (issue 30), so the redesign can be checked to
change no image and no stack hash.

    OMP_NUM_THREADS=1 python tests/data/make_golden.py        # writes tests/data/golden_images.npz

Run it only to re-record on purpose (a change that is meant to alter images), and say so in the commit.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

#: family -> (prompts, stacks); every stack here runs on that family today
GOLDEN = {
    "testbed": (["a zebra red circle on white background", "a striped blue square on gray background"],
                ["", 'negative_prompt(text="striped")', 'sld(preset=medium, concept="striped")',
                 'uce(preset=testbed-striped)', 'safree(space=["striped"])+safree_svf']),
    "sd1": (["a zebra", "a horse in a field"],
            ["", 'negative_prompt(text="zebra")', 'sld(preset=max, concept="zebra")', 'uce(erase=["zebra"])',
             'safree(space=["zebra"])']),
    "sd2-v": (["a zebra", "a horse in a field"], ["", 'negative_prompt(text="zebra")', 'uce(erase=["zebra"])']),
    "sdxl": (["a zebra", "a horse in a field"],
             ["", 'negative_prompt(text="zebra")', 'sld(preset=max, concept="zebra")', 'uce(erase=["zebra"])']),
    "sd3": (["a zebra", "a horse in a field"], ["", 'negative_prompt(text="zebra")', 'uce(erase=["zebra"])']),
    "flux": (["a zebra", "a horse in a field"], ["", 'uce(erase=["zebra"])']),
}
STEPS = {"testbed": 4}


def images(model, prompts, stack, steps):
    from safediff.pipeline import SafePipeline
    from safediff.stack import DefenseStack

    with SafePipeline(model, DefenseStack.parse(stack or None)) as pipe:
        out = pipe(prompts, seed=3, num_images_per_prompt=1, num_inference_steps=steps, batch_size=16)
        # the testbed's folder is fixed, so its real stack hash is recorded; a tiny model's config
        # names the temporary folder it was saved in, so its stacks are hashed on a fixed base hash
        h = pipe.stack_hash if model.is_testbed else DefenseStack.parse(stack or None).hash("golden-base")
    return np.stack([np.asarray(r.image) for r in out.records]).astype(np.uint8), h


def main(out: Path) -> None:
    import safediff
    from safediff.testing import tiny_model

    arrays, hashes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for family, (prompts, stacks) in GOLDEN.items():
            model = safediff.load_model() if family == "testbed" else tiny_model(family, cache_dir=tmp)
            for j, stack in enumerate(stacks):
                arr, h = images(model, prompts, stack, STEPS.get(family, 6))
                arrays[f"{family}/{j}"] = arr
                hashes[f"{family}/{j}"] = {"stack": stack, "hash": h}
                print(family, repr(stack), h, arr.shape, flush=True)
    np.savez_compressed(out, **arrays)
    out.with_suffix(".json").write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("golden_images.npz"))
