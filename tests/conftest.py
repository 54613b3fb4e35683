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
