"""``safediff serve`` (issue 21, part 2): what the page shows (DemoSession, no browser needed), the
page over HTTP (Gradio, the ``serve`` extra; in the dev install), and the page in headless Chromium
where Debian's ``chromium`` is installed (skipped otherwise)."""

import json
import shutil
import socket
import subprocess

import numpy as np
import pytest

from safediff.serve import DEFENSE_MENU, AccessPolicy, DemoSession, default_stack
from safediff.stack import DefenseStack


@pytest.fixture(scope="module")
def session(testbed, tmp_path_factory):
    # the tests' own files (a trained sanitizer) lie under pytest's temporary directory: allowed
    return DemoSession(testbed, out_dir=tmp_path_factory.mktemp("serve"),
                       policy=AccessPolicy([tmp_path_factory.getbasetemp()]), workers=2)


def test_compare_shows_both_sides_the_detectors_and_the_stack_file(session, testbed):
    res = session.compare("a striped blue square on gray background", default_stack(testbed), num_images=2, steps=6)
    assert res.error is None and len(res.undefended) == len(res.defended) == 2
    # the undefended side is the plain model's images for the same seeds
    from safediff.pipeline import SafePipeline

    with SafePipeline(testbed, DefenseStack()) as plain:
        ref = plain(["a striped blue square on gray background"], num_images_per_prompt=2, num_inference_steps=6)
    assert all(np.array_equal(np.asarray(a), np.asarray(r.image)) for a, r in zip(res.undefended, ref.records))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(res.undefended, res.defended))
    assert len(res.detections) == 2 and all(set(d) == {"undefended", "defended"} for d in res.detections)
    assert "| image | no defense | defended |" in res.summary_markdown()
    # the stack file downloads and loads back to the same stack (same hash)
    loaded = DefenseStack.parse(res.stack_file)
    assert loaded.hash(testbed.content_hash) == res.stack_hash
    assert json.loads(open(res.stack_file).read())[0]["name"] == "uce"


def test_bad_input_is_shown_and_the_page_keeps_working(session):
    bad_stack = session.compare("a red circle", "sld(preset=nonsense")
    assert bad_stack.error and "Could not run" in bad_stack.summary_markdown()
    assert "empty" in session.compare("   ", "none").error
    # paths outside the allowed directories are refused (issue 31: whether they exist is not said)
    assert "not inside a directory this server allows" in session.compare("a red circle", "none",
                                                                         model_path="/no/such/model").error
    assert "not inside a directory" in session.compare("a red circle", 'esd(path="/no/such.safetensors")').error
    ok = session.compare("a red circle", "none", num_images=1, steps=2)
    assert ok.error is None and len(ok.defended) == 1


def test_prompt_guard_decision_and_output_filter_flags_are_shown(session):
    res = session.compare("a zebra on gray background", 'prompt_guard(concepts=["striped"], threshold=0.5)',
                          num_images=1, steps=2)
    assert res.error is None and res.defended == [None] and "refused by the prompt filter" in res.notes[0]
    res = session.compare("a striped blue square on gray background",
                          'output_filter(detector="testbed:striped", action="flag")', num_images=2, steps=10)
    flagged = [n for n in res.notes if "flagged by the output filter" in n]
    assert len(flagged) == sum("striped" in (d["defended"] or []) for d in res.detections)


def test_sanitizer_per_token_scores(session, testbed, tmp_path):
    from safediff.defenses.sanitizer import SanitizerTrainConfig, train_sanitizer

    path = train_sanitizer(testbed, tmp_path / "es.safetensors", SanitizerTrainConfig(concepts=("striped",), steps=2),
                           progress=False)
    res = session.compare("a striped blue square", f'sanitizer(path="{path}")', num_images=1, steps=2)
    assert res.error is None and res.token_scores and max(s for _, s in res.token_scores) == pytest.approx(1.0)
    assert any("Embedding Sanitizer" in n for n in res.notes)


def test_menu_entries_parse_on_the_testbed(testbed):
    for label, text in DEFENSE_MENU.items():
        if "PATH" in text:
            continue
        DefenseStack.parse(text.format(concept="striped", detector="testbed:striped"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(session, monkeypatch_module):
    monkeypatch_module.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # before Gradio is imported: no usage reports
    pytest.importorskip("gradio")
    from safediff.serve import build_app

    port = _free_port()
    app = build_app(session)
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_page_over_http(served):
    # the page loads, and its one API call runs a comparison end to end over HTTP
    import urllib.request

    from gradio_client import Client

    page = urllib.request.urlopen(served, timeout=30).read().decode()
    assert "<title>safediff</title>" in page or "safediff" in page
    left, right, summary, tokens, stack_file = Client(served, verbose=False).predict(
        "a striped blue square on gray background", "uce(preset=testbed-all)", "", 0, 2, 4, 0, api_name="/compare")
    assert len(left) == len(right) == 2 and "hash" in summary and stack_file
    _, right, summary, _, _ = Client(served, verbose=False).predict(
        "a red circle", "sld(preset=nonsense", "", 0, 1, 2, 0, api_name="/compare")
    assert "Could not run" in summary and right == []


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_page_renders_in_headless_chromium(served):
    out = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                          "--dump-dom", served], capture_output=True, text=True, timeout=120)
    assert "Generate" in out.stdout and "Add a defense" in out.stdout
