"""``safediff serve`` exposed to visitors (issue 31, items 1 and 3; issue 34.7): the page takes stack
text only, reads models and artifact files only inside the operator's allowed directories without
saying whether a file exists, never echoes file content; each request is bounded (steps, images,
seconds), can be cancelled, runs beside others without being starved, and loaded models are bounded."""

import os
import socket
import threading
import time

import numpy as np
import pytest

from safediff.serve import AccessPolicy, DemoSession, ServeLimits, stack_text_from_upload

SECRET = "sk-SECRET-123456"
PROMPT = "a striped blue square on gray background"


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A directory the server does not allow, holding a secret file (and a broken YAML one)."""
    d = tmp_path_factory.mktemp("outside")
    (d / "secret.yaml").write_text(f"api_key: {SECRET}\n")
    (d / "broken.yaml").write_text(f"defenses: [{{name: {SECRET}\n")
    return d


@pytest.fixture(scope="module")
def session(testbed, allowed, tmp_path_factory):
    return DemoSession(testbed, out_dir=tmp_path_factory.mktemp("serve-out"), policy=AccessPolicy([allowed]),
                       limits=ServeLimits(max_steps=1000, max_images=4, max_seconds=120), workers=2)


def _images(res):
    return [np.asarray(i) for i in res.undefended], [None if i is None else np.asarray(i) for i in res.defended]


# ---- issue 31.1: files ------------------------------------------------------------------------
def test_a_secret_file_named_as_the_stack_is_never_read_nor_echoed(session, outside):
    errors = []
    for name in ("secret.yaml", "broken.yaml", "missing.yaml"):
        res = session.compare("a red circle", str(outside / name))
        assert res.error and SECRET not in res.error and SECRET not in res.summary_markdown()
        assert str(outside) not in res.error  # the server path is not shown either
        errors.append(res.error)
    # an existing file and a missing one give the very same answer: the page does not say which exists
    assert errors[0] == errors[1] == errors[2]


@pytest.mark.parametrize("stack", ['esd(path="{p}")', 'sanitizer(path="{p}")', 'negative_prompt(embedding="{p}")',
                                   'sld(concept_embedding="{p}")', 'output_filter(detector="sd-safety-checker:{d}")'])
def test_artifacts_outside_the_allowed_dirs_are_refused_alike_whether_they_exist(session, outside, stack):
    there = session.compare("a red circle", stack.format(p=outside / "secret.yaml", d=outside)).error
    missing = session.compare("a red circle", stack.format(p=outside / "nope.yaml", d=outside / "nope")).error
    assert "not inside a directory this server allows" in there and SECRET not in there
    assert there == missing
    assert str(outside) not in there


def test_a_symlink_inside_an_allowed_dir_to_a_file_outside_is_refused(session, allowed, outside):
    link = allowed / "delta.safetensors"
    link.symlink_to(outside / "secret.yaml")
    try:
        res = session.compare("a red circle", f'esd(path="{link}")')
        assert "not inside a directory this server allows" in res.error and SECRET not in res.error
    finally:
        link.unlink()


def test_models_outside_the_allowed_dirs_and_hub_ids_are_refused(session, outside, tiny_sd1):
    there = session.compare("a red circle", "none", model_path=str(outside)).error
    missing = session.compare("a red circle", "none", model_path=str(outside / "nope")).error
    assert "not inside a directory this server allows" in there and there == missing
    assert "not inside" in session.compare("a red circle", "none", model_path=str(tiny_sd1.source)).error
    hub = session.compare("a red circle", "none", model_path="someone/some-model").error
    assert "not inside a directory" in hub and "or a hub id" not in hub
    # ... unless the operator allows the hub (the check only; nothing is downloaded here)
    AccessPolicy([], allow_hub=True).check_model("someone/some-model")
    with pytest.raises(PermissionError):
        AccessPolicy([], allow_hub=True).check_model("../someone/x")


def test_default_policy_allows_the_testbed_and_runs_only(tmp_path, monkeypatch):
    from safediff.models import TESTBED_PATH

    monkeypatch.chdir(tmp_path)
    policy = AccessPolicy()
    policy.check_model(str(TESTBED_PATH))
    policy.check_model("runs/some-model")
    with pytest.raises(PermissionError):
        policy.check_model(str(tmp_path / "other"))


def test_errors_hide_server_paths_outside_the_allowed_dirs(allowed):
    policy = AccessPolicy([allowed])
    msg = policy.sanitise(f"ValueError: could not read /etc/passwd nor {allowed}/x.safetensors")
    assert "/etc/passwd" not in msg and "<server path>" in msg and f"{allowed}/x.safetensors" in msg
    assert len(policy.sanitise("x" * 5000)) == 500


def test_an_uploaded_stack_file_is_parsed_in_memory():
    text = stack_text_from_upload("s.yaml", b"defenses:\n  - name: negative_prompt\n    text: striped\n")
    assert text == 'negative_prompt(text="striped")'
    assert stack_text_from_upload("s.json", b'[{"name": "sld", "preset": "max"}]').startswith("sld(")
    for name, data in [("s.yaml", f"api_key: {SECRET}\n".encode()), ("s.yaml", f"[{{name: {SECRET}\n".encode()),
                       ("s.toml", f'api_key = "{SECRET}"'.encode()), ("s.txt", b"x")]:
        with pytest.raises(ValueError) as e:
            stack_text_from_upload(name, data)
        assert SECRET not in str(e.value)


# ---- issue 31.3: limits, cancel, concurrency, bounded models ------------------------------------
def test_limits_are_enforced_before_any_work(testbed, tmp_path):
    s = DemoSession(testbed, out_dir=tmp_path, limits=ServeLimits(max_steps=10, max_images=2, max_seconds=60))
    t0 = time.time()
    assert "between 1 and 2 (the server's limit)" in s.compare(PROMPT, "none", num_images=8, steps=2).error
    assert "between 1 and 10 (the server's limit)" in s.compare(PROMPT, "none", num_images=1, steps=1000).error
    # the model's own default (the testbed's 25 steps) is held to the limit too
    assert "between 1 and 10" in s.compare(PROMPT, "none", num_images=1).error
    assert time.time() - t0 < 2
    with pytest.raises(ValueError, match="max_steps"):
        ServeLimits(max_steps=0)


def test_a_request_over_its_time_limit_stops_and_frees_the_worker(testbed, tmp_path):
    s = DemoSession(testbed, out_dir=tmp_path, limits=ServeLimits(max_steps=1000, max_seconds=0.5), workers=1)
    t0 = time.time()
    res = s.compare(PROMPT, "uce(preset=testbed-all)", num_images=2, steps=1000)
    assert "time limit" in res.error and time.time() - t0 < 10
    assert testbed.edited_hash is None  # the stack's weight edits were reverted on the way out
    ok = s.compare(PROMPT, "none", num_images=1, steps=2)  # the one worker serves the next request
    assert ok.error is None and len(ok.defended) == 1


def _run_long(session, started, box, request_id="long"):
    def progress(frac, label):
        started.set()
    box["res"] = session.compare(PROMPT, "uce(preset=testbed-all)", num_images=4, steps=1000,
                                 progress=progress, request_id=request_id)


def test_a_short_request_is_not_starved_by_a_long_one_and_answers_stay_correct(session):
    stacks = ["uce(preset=testbed-all)", "none", 'sld(preset=max, concept="striped")']
    reference = [session.compare(PROMPT, st, num_images=1, steps=2, seed=i) for i, st in enumerate(stacks)]
    started, box = threading.Event(), {}
    long = threading.Thread(target=_run_long, args=(session, started, box))
    long.start()
    try:
        assert started.wait(30)
        assert session.running() == ["long"]
        shorts = [session.compare(PROMPT, st, num_images=1, steps=2, seed=i) for i, st in enumerate(stacks)]
        assert long.is_alive()  # the short ones finished while the long one still ran
    finally:
        assert session.cancel("long")
        long.join(30)
    assert not long.is_alive() and "Cancelled" in box["res"].error and session.running() == []
    for a, b in zip(shorts, reference):  # the same answers as one at a time
        assert a.error is None and a.stack_hash == b.stack_hash
        for x, y in zip(_images(a), _images(b)):
            assert all(np.array_equal(p, q) for p, q in zip(x, y))


def test_loaded_models_are_bounded_least_recently_used_first(testbed, tiny_sd1, tmp_path):
    from safediff.testing import save_tiny_pipeline

    other = save_tiny_pipeline(tmp_path / "sd1-seed1", "sd1", seed=1)
    first = os.path.realpath(tiny_sd1.source)
    s = DemoSession(testbed, out_dir=tmp_path / "out", max_models=2,
                    policy=AccessPolicy([tmp_path, os.path.dirname(first)]))
    assert s.compare("a red circle", "none", model_path=first, num_images=1, steps=1).error is None
    assert s.loaded_models() == [s.default_model, first]
    assert s.compare("a red circle", "none", model_path=str(other), num_images=1, steps=1).error is None
    # the first tiny model was evicted, the served one is kept
    assert s.loaded_models() == [s.default_model, os.path.realpath(other)]
    assert s.compare(PROMPT, "none", num_images=1, steps=1).error is None
    assert s.loaded_models() == [os.path.realpath(other), s.default_model]


# ---- over HTTP, loopback only -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_over_http_a_short_request_runs_beside_a_long_one_and_no_secret_leaks(session, outside, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    pytest.importorskip("gradio")
    from gradio_client import Client

    from safediff.serve import build_app

    port = _free_port()
    app = build_app(session)
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        long = Client(url, verbose=False).submit(PROMPT, "uce(preset=testbed-all)", "", 0, 4, 1000, 0,
                                                 api_name="/compare")
        deadline = time.time() + 30
        while not session.running() and time.time() < deadline:
            time.sleep(0.05)
        assert session.running()
        left, right, summary, _, _ = Client(url, verbose=False).predict(PROMPT, "none", "", 0, 1, 2, 0,
                                                                        api_name="/compare")
        assert len(left) == len(right) == 1 and "hash" in summary
        assert session.running()  # the long one is still going
        _, _, probe, _, _ = Client(url, verbose=False).predict("a red circle", str(outside / "secret.yaml"), "",
                                                               0, 1, 2, 0, api_name="/compare")
        assert "Could not run" in probe and SECRET not in probe
        for rid in session.running():
            session.cancel(rid)
        assert "Cancelled" in long.result(timeout=30)[2]
    finally:
        app.close()


def test_serve_prints_one_line_of_its_own_and_no_share_hint(testbed, capsys, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    pytest.importorskip("gradio")
    from safediff.serve import serve

    app = serve(testbed, port=_free_port(), block=False, workers=1)
    try:
        out = capsys.readouterr().out
        assert out.count("\n") == 1 and out.startswith("safediff serve: http://127.0.0.1:")
        assert "--host 0.0.0.0" in out and "docs/serve.md" in out and "share=True" not in out
    finally:
        app.close()


def test_cli_options_reach_serve(tmp_path, monkeypatch):
    import safediff.serve as serve_mod
    from safediff.cli import main

    seen = {}
    monkeypatch.setattr(serve_mod, "serve", lambda model, **kw: seen.update(kw, model=model))
    (tmp_path / "logins").write_text("# operators\nalice:s3cret\n")
    assert main(["serve", "--allow-dir", str(tmp_path), "--allow-dir", "runs", "--max-steps", "7", "--max-images", "3",
                 "--max-seconds", "9", "--workers", "3", "--max-models", "4", "--auth-file", str(tmp_path / "logins"),
                 "--device", "cpu", "--dtype", "fp32"]) == 0
    assert seen["allow_dirs"] == [str(tmp_path), "runs"] and seen["limits"] == ServeLimits(7, 3, 9.0)
    assert (seen["workers"], seen["max_models"], seen["auth"]) == (3, 4, [("alice", "s3cret")])
    assert (seen["device"], seen["dtype"], seen["model"].is_testbed) == ("cpu", "fp32", True)
    (tmp_path / "bad").write_text("alice\n")
    with pytest.raises(ValueError, match="user:password"):
        serve_mod.read_auth_file(tmp_path / "bad")
