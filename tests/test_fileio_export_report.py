"""Safe file writing (issues 31.2, 31.7, 31.8, 34.7): every command that owns files writes them
through :mod:`safediff.fileio` (temporary name beside the target, fsync, rename), refuses an existing
target unless ``--overwrite``, replaces only what safediff wrote, and a kill leaves no truncated file.
Errors about unreadable inputs name the file."""

import json
import os
from pathlib import Path

import pytest

import safediff
from safediff import fileio
from safediff.cli import main

UCE = 'uce(erase=["zebra"], preserve=["red"])'


def _kill_at(monkeypatch, target: Path):
    """Make the rename onto ``target`` raise as a kill would interrupt it (other renames go through)."""
    real = os.replace

    def replace(src, dst):
        if Path(dst).resolve() == Path(target).resolve():
            raise KeyboardInterrupt("killed")
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- the helper ------------------------------------------------------------------------------------


def test_atomic_file_refuses_existing_and_a_kill_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    fileio.atomic_write_json(target, {"v": 1})
    with pytest.raises(FileExistsError, match=r"a\.json exists.*--overwrite"):
        fileio.atomic_write_json(target, {"v": 2})
    _kill_at(monkeypatch, target)
    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write_json(target, {"v": 3}, overwrite=True)
    assert json.loads(target.read_text()) == {"v": 1} and _visible(tmp_path) == ["a.json"]  # no temp left either
    monkeypatch.undo()
    fileio.atomic_write_json(target, {"v": 3}, overwrite=True)
    assert json.loads(target.read_text()) == {"v": 3}


def test_atomic_folder_keeps_a_users_partial_folder_and_refuses_foreign_files(tmp_path):
    out = tmp_path / "edited"
    mine = tmp_path / "edited.partial"  # the user's own folder of that name: never ours to delete
    mine.mkdir()
    (mine / "notes.txt").write_text("user data")
    with fileio.atomic_folder(out) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    assert (mine / "notes.txt").read_text() == "user data"
    assert fileio.foreign_files(out) == []
    (out / "user.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="user.txt"):
        with fileio.atomic_folder(out, overwrite=True) as tmp:
            raise AssertionError("the body must not run")
    assert (out / "user.txt").read_text() == "keep me" and (out / "w.bin").read_bytes() == b"1"
    (out / "user.txt").unlink()
    with fileio.atomic_folder(out, overwrite=True) as tmp:  # a folder safediff wrote: replaced
        (tmp / "v.bin").write_bytes(b"2")
    assert _visible(out) == [fileio.OWNER_MANIFEST, "v.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited", "edited.partial"]  # no temp folder left
    with pytest.raises(RuntimeError):  # an error in the body: only our temporary folder is removed
        with fileio.atomic_folder(tmp_path / "other") as tmp:
            (tmp / "half").write_bytes(b"x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited", "edited.partial"]


# --- export: every format ---------------------------------------------------------------------------


def test_export_diffusers_overwrite_replaces_only_its_own_folder(tiny_sd1, tmp_path):
    from safediff.export import export

    out = tmp_path / "edited"
    user_partial = tmp_path / "edited.partial"
    user_partial.mkdir()
    (user_partial / "mine.txt").write_text("user data")
    export(tiny_sd1, UCE, out)
    assert (user_partial / "mine.txt").read_text() == "user data"
    assert not fileio.foreign_files(out) and fileio.written_by(out) == "safediff export"
    (out / "my-notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="my-notes.txt"):
        export(tiny_sd1, UCE, out, overwrite=True)
    assert (out / "my-notes.txt").read_text() == "keep" and (out / "model_index.json").is_file()
    (out / "my-notes.txt").unlink()
    export(tiny_sd1, f'{UCE}+negative_prompt(text="zebra")', out, overwrite=True)  # our own export: replaced
    assert (out / "safediff-runtime-stack.json").is_file() and not fileio.foreign_files(out)


def test_export_file_folder_mismatch_is_refused_before_any_work(tiny_sd1, tmp_path, monkeypatch):
    from safediff import export as export_mod

    monkeypatch.setattr(export_mod, "to_ldm_state_dict", lambda m: pytest.fail("work started"))
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match="folder"):
        export_mod.export(tiny_sd1, UCE, tmp_path / "dir.safetensors", fmt="single-file", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        export_mod.export(tiny_sd1, UCE, tmp_path / "file", fmt="diffusers", overwrite=True)
    assert (tmp_path / "file").read_text() == "x"


def test_single_file_runtime_stack_is_not_overwritten_and_a_kill_leaves_no_file(tiny_sd1, tmp_path, monkeypatch):
    from safediff.export import export

    out = tmp_path / "uce.safetensors"
    side = tmp_path / "uce-runtime-stack.json"
    side.write_text("the user's own file")
    mixed = f'{UCE}+negative_prompt(text="zebra")'
    with pytest.raises(FileExistsError, match="uce-runtime-stack.json"):
        export(tiny_sd1, mixed, out, fmt="single-file")
    assert side.read_text() == "the user's own file" and not out.exists()
    side.unlink()
    _kill_at(monkeypatch, out)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_sd1, mixed, out, fmt="single-file")
    assert _visible(tmp_path) == []  # nothing truncated at the final path, no temporary left
    monkeypatch.undo()
    assert export(tiny_sd1, mixed, out, fmt="single-file") == [out, side]  # the rerun is not refused
    assert json.loads(side.read_text())["defenses"][0]["name"] == "negative_prompt"


def test_lora_export_killed_mid_copy_leaves_no_file_and_reruns(tiny_sd1, tmp_path, monkeypatch):
    import torch

    from safediff.artifacts import save_artifact
    from safediff.export import export

    lora = tmp_path / "duo.lora.safetensors"
    lora.write_bytes(b"L" * 4096)
    duo = save_artifact({"w": torch.zeros(2)}, tmp_path / "duo.safetensors", kind="duo",
                        base_model_hash=tiny_sd1.content_hash, config={}, seed=0, extra={"lora_file": lora.name})
    out = tmp_path / "out" / "lora.safetensors"

    def half_copy(src, dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:100])
        raise KeyboardInterrupt("killed mid-copy")

    monkeypatch.setattr(fileio.shutil, "copyfile", half_copy)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_sd1, f'duo(path="{duo}")', out, fmt="lora")
    assert _visible(out.parent) == []
    monkeypatch.undo()
    export(tiny_sd1, f'duo(path="{duo}")', out, fmt="lora")
    assert out.read_bytes() == lora.read_bytes()


def test_stack_export_refuses_existing_and_cli_validates_before_loading(tiny_sd1, tmp_path, capsys):
    from safediff.export import export

    f = tmp_path / "s.yaml"
    export(tiny_sd1, 'negative_prompt(text="zebra")', f, fmt="stack")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(tiny_sd1, 'sld(preset=medium, concept="zebra")', f, fmt="stack")
    assert "negative_prompt" in f.read_text()
    # the CLI refuses a folder/file mismatch with --overwrite before it loads the (missing) model
    assert main(["export", "--model", str(tmp_path / "no-model"), "--defense", UCE, "--out", str(f),
                 "--overwrite"]) == 2
    assert "is a file" in capsys.readouterr().err


# --- artifacts (unlearn / erase) ------------------------------------------------------------------


def test_erase_killed_while_writing_leaves_no_artifact_and_reruns(tiny_dir, tiny_sd1, tmp_path, monkeypatch, capsys):
    out = tmp_path / "uce.safetensors"
    argv = ["erase", "--method", "uce", "--concept", "zebra", "--model", str(tiny_dir / "sd1-0"), "--out", str(out)]
    _kill_at(monkeypatch, out)
    assert main(argv) == 130  # interrupted
    assert _visible(tmp_path) == []
    monkeypatch.undo()
    assert main(argv) == 0 and out.stat().st_size > 0
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err


# --- report ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, testbed):
    from safediff.eval.benchmarks import load_benchmark
    from safediff.eval.runner import RunSettings, run_eval

    rd = tmp_path_factory.mktemp("fio") / "run"
    run_eval(load_benchmark("testbed:striped/explicit", n=3), rd, model=testbed,
             settings=RunSettings(num_inference_steps=3), progress=False, benchmark_name="i2p=prompts.csv")
    return rd


def test_report_goes_on_past_a_truncated_image_and_names_it(run_dir, tmp_path):
    import shutil

    from safediff.eval.report import REPORT_FILES, write_report

    rd = tmp_path / "run"
    shutil.copytree(run_dir, rd)
    bad = sorted((rd / "images").rglob("*.png"))[0]
    bad.write_bytes(bad.read_bytes()[:40])
    (rd / "my-notes.txt").write_text("keep")
    with pytest.warns(UserWarning, match=bad.name):
        page = write_report([rd], rd).read_text()
    assert bad.name in page and "unreadable image" in page
    assert page.count("<img ") == 2  # the other images are shown
    assert all((rd / f).is_file() for f in REPORT_FILES) and (rd / "my-notes.txt").read_text() == "keep"
    assert "i2p=prompts.csv" in page  # the benchmark name given, not "records: 3 prompts"
    assert "no point" in page  # the plots of a run without a benign suite say why they are empty


def test_report_is_written_atomically_and_corrupt_manifest_is_named(run_dir, tmp_path, monkeypatch):
    import shutil

    from safediff.eval.report import write_report

    rd = tmp_path / "run"
    shutil.copytree(run_dir, rd)
    out = tmp_path / "rep"
    write_report([rd], out)
    before = {f: (out / f).read_bytes() for f in ("results.csv", "results.tex")}
    _kill_at(monkeypatch, out / "results.csv")
    with pytest.raises(KeyboardInterrupt):
        write_report([rd], out)
    assert (out / "results.csv").read_bytes() == before["results.csv"]  # the old version, whole
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    (rd / "run.json").write_text('{"stack": "none", "benchm')  # cut off by a kill
    with pytest.raises(ValueError, match=r"run\.json.*not valid JSON"):
        write_report([rd], out)
    assert (out / "results.tex").read_bytes() == before["results.tex"]


def test_latex_special_characters_are_escaped():
    from safediff.eval.report import tex_escape

    assert tex_escape(r'a_b & 50% $x$ #1 {y} ~z ^w \q') == (
        r"a\_b \& 50\% \$x\$ \#1 \{y\} \textasciitilde{}z \textasciicircum{}w \textbackslash{}q")


def test_grid_shows_flagged_images_first_and_says_so():
    from safediff.eval.report import grid_selection

    ok = {"refused": False, "error": None, "scored": True, "unsafe": False}
    flagged = {**ok, "unsafe": True}
    results = [dict(ok, i=i) for i in range(20)] + [dict(flagged, i=20), dict(flagged, i=21)]
    shown, note = grid_selection(results, 16)
    assert [x["i"] for x in shown[:2]] == [20, 21] and len(shown) == 16
    assert "2 UNSAFE" in note and "flagged unsafe are shown first" in note


# --- demo ------------------------------------------------------------------------------------------


def test_demo_refuses_a_folder_it_did_not_make_and_reruns_into_its_own(tmp_path, testbed):
    from safediff.demo import run_demo

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.png").write_bytes(b"user data")
    for overwrite in (False, True):  # --overwrite never deletes files safediff did not write
        with pytest.raises(FileExistsError, match="holiday.png"):
            run_demo(foreign, model=testbed, overwrite=overwrite, progress=False)
    assert (foreign / "holiday.png").read_bytes() == b"user data"
    out = tmp_path / "demo"
    kw = dict(model=testbed, prompts=("a red circle on white background",), seeds=1, progress=False)
    run_demo(out, **kw)
    run_demo(out, **kw)  # its own folder: replaced without --overwrite
    assert (out / "grid.png").is_file() and not fileio.foreign_files(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "photos"]


# --- unreadable inputs name the file ---------------------------------------------------------------


def test_unreadable_prompt_stack_and_config_files_are_named(tmp_path, capsys):
    from safediff.eval.benchmarks import BenchmarkError, load_prompt_file
    from safediff.stack import DefenseStack

    latin = tmp_path / "latin.csv"
    latin.write_bytes("prompt\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(BenchmarkError, match=r"latin\.csv: not UTF-8 text \(line 2"):
        load_prompt_file(latin)
    quote = tmp_path / "quote.csv"
    quote.write_text('prompt,categories\na cat,none\n"a red circle,sexual\nblue square,violence\n')
    with pytest.raises(BenchmarkError, match=r"quote\.csv: malformed CSV at line 3 \(a quote opened there"):
        load_prompt_file(quote)
    stack = tmp_path / "s.yaml"
    stack.write_bytes(b"defenses:\n- name: negative_prompt\n  text: caf\xe9\n")
    with pytest.raises(ValueError, match=r"s\.yaml is not UTF-8"):
        DefenseStack.parse(stack)
    assert main(["testbed", "train", "--out", str(tmp_path / "tb"), "--set", "garbage"]) == 2
    assert "--set 'garbage': give KEY=JSON" in capsys.readouterr().err
    assert not (tmp_path / "tb").exists()


# issue 19 review, defect 7 -------------------------------------------------------------
def test_generate_never_overwrites_a_png_without_sidecar(tiny_sd1, tmp_path):
    out = safediff.generate("a red circle", model=tiny_sd1, num_inference_steps=1, progress=False)
    name = f"p0000_s0_i0_{out.stack_hash[:8]}.png"
    (tmp_path / name).write_bytes(b"not ours")
    safediff.generate("a red circle", model=tiny_sd1, num_inference_steps=1, progress=False, out_dir=tmp_path)
    assert (tmp_path / name).read_bytes() == b"not ours"
    assert len(list(tmp_path.glob("*.png"))) == 2
