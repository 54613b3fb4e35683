"""Images and stack hashes of a fixed set of stacks on every family, against values recorded
before the family-adapter redesign (issue 30): a refactor must change neither.

The recording is tests/data/golden_images.npz (+ .json for the hashes), rebuilt on purpose only by
``OMP_NUM_THREADS=1 python tests/data/make_golden.py``. Images may differ by 1 grey level (float
reductions depend on the thread count); stack hashes must be equal.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
_spec = importlib.util.spec_from_file_location("make_golden", DATA / "make_golden.py")
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)

RECORDED = np.load(DATA / "golden_images.npz")
HASHES = json.loads((DATA / "golden_images.json").read_text())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import safediff
    from safediff.testing import tiny_model

    cache = tmp_path_factory.mktemp("golden")
    return {f: (safediff.load_model() if f == "testbed" else tiny_model(f, cache_dir=cache)) for f in make_golden.GOLDEN}


@pytest.mark.parametrize("family", list(make_golden.GOLDEN))
def test_images_and_hashes_unchanged(models, family):
    prompts, stacks = make_golden.GOLDEN[family]
    for j, stack in enumerate(stacks):
        arr, h = make_golden.images(models[family], prompts, stack, make_golden.STEPS.get(family, 6))
        key = f"{family}/{j}"
        assert h == HASHES[key]["hash"], f"{family} {stack!r}: stack hash changed"
        diff = np.abs(arr.astype(np.int16) - RECORDED[key].astype(np.int16)).max()
        assert diff <= 1, f"{family} {stack!r}: images differ by {diff} grey levels"
