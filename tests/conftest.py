import os
import warnings

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_sd1(tiny_dir):
    from safediff.testing import tiny_model

    return tiny_model("sd1", cache_dir=tiny_dir)


@pytest.fixture(scope="session")
def tiny_sd2v(tiny_dir):
    from safediff.testing import tiny_model

    return tiny_model("sd2-v", cache_dir=tiny_dir)


@pytest.fixture(scope="session")
def testbed():
    import safediff

    return safediff.load_model()


@pytest.fixture(scope="session")
def tiny_family(tiny_dir, request):
    """A getter: ``tiny_family(name)`` is the model of that family, loaded once per session
    (``"testbed"``: the shipped testbed model, the ``testbed`` fixture; the others:
    ``safediff.testing.tiny_model``)."""
    from safediff.testing import tiny_model

    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = request.getfixturevalue("testbed") if family == "testbed" else \
                tiny_model(family, cache_dir=tiny_dir)
        return cache[family]

    return get


def load_benchmark_script(name: str):
    """``benchmarks/<name>.py`` as a module (the benchmark scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def benchmark_script():
    """A loader of benchmark scripts: ``benchmark_script("ine_premise")``."""
    return load_benchmark_script
