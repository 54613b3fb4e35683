"""The README's Use section runs as written: every ``safediff ...`` line of its ```bash blocks, in
order, in one fresh folder, as a user pastes them (issue 34). Only budget flags are changed (fewer
images, prompts, steps, iterations) so that CI stays short; lines that cannot run in CI are listed
in NOT_RUN with the reason, and a README line that is neither run nor listed fails the test."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from safediff.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"

#: flag -> tiny value, per command (the only changes made to a README line)
BUDGETS = {
    "generate": {"--num-images": "2", "--steps": "2"},
    "eval": {"--n": "2", "--steps": "2"},
    "unlearn esd": {"--iterations": "2"},
    "invert": {"--steps": "2", "--num-images": "2", "--batch-size": "2"},
    "attack p4d": {"--steps": "1", "--n": "1"},
    "attack relearn": {"--steps": "2", "--n": "1"},
}
#: lines kept out of CI (a prefix of the line's words -> why)
NOT_RUN = {
    "study": "runs the whole composition study (hours); test_study.py runs it on a tiny grid",
    "testbed train": "retrains the testbed (about 52 min); test_testbed.py trains a tiny one",
    "serve": "starts a web server that runs until stopped; test_serve.py drives it",
}
#: lines that run as written (budgets cut) but take 20-30 s each on 2 cores: only in the slow test
SLOW = ("attack --method p4d", "attack --method relearn")
#: lines whose README paths are placeholders for the user's own files: they must fail with a clear error
PLACEHOLDERS = ("/data/", "/models/", "path/to/")


def use_section_commands(text: str) -> list[list[str]]:
    """Every ``safediff`` command line of the ```bash blocks in the README's ``## Use`` section,
    continuation lines joined and comments dropped, as argument lists (without ``safediff``)."""
    section = text.split("\n## Use", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "safediff":
                commands.append(words[1:])
    return commands


def _kind(argv: list[str]) -> str:
    """The key of BUDGETS a line falls under: the command, with its method or subcommand where budgets differ."""
    if argv[0] == "attack" and "--method" in argv:
        return f"attack {argv[argv.index('--method') + 1]}"
    if argv[0] in ("unlearn", "testbed") and len(argv) > 1:
        return " ".join(argv[:2])
    return argv[0]


def with_budget(argv: list[str]) -> list[str]:
    """The line with its budget flags replaced by tiny values (added where the README leaves the default)."""
    budget = BUDGETS.get(_kind(argv), {})
    out, i = [], 0
    while i < len(argv):
        if argv[i] in budget:
            out += [argv[i], budget[argv[i]]]
            i += 2
            continue
        out.append(argv[i])
        i += 1
    for flag, value in budget.items():
        if flag not in argv:
            out += [flag, value]
    return out


def test_the_use_section_is_read_as_a_user_pastes_it():
    commands = use_section_commands(README.read_text())
    assert commands and commands[0][0] == "generate"
    assert ["generate", "a zebra red circle on white background", "--num-images", "8", "--out", "neg", "--defense",
            'negative_prompt(text="striped")'] in commands  # a continued line is one command
    assert with_budget(["eval", "--n", "100", "--out", "r"]) == ["eval", "--n", "2", "--out", "r", "--steps", "2"]


def test_readme_use_examples_run_in_order(tmp_path, monkeypatch, capsys):
    _run_in_order(tmp_path, monkeypatch, capsys, skip=SLOW)


@pytest.mark.slow
def test_readme_use_examples_run_in_order_with_the_attacks(tmp_path, monkeypatch, capsys):
    _run_in_order(tmp_path, monkeypatch, capsys, skip=())


def _run_in_order(tmp_path, monkeypatch, capsys, skip) -> None:
    monkeypatch.chdir(tmp_path)
    ran = []
    for argv in use_section_commands(README.read_text()):
        line = "safediff " + shlex.join(argv)
        if any(" ".join(argv).startswith(prefix) for prefix in (*NOT_RUN, *skip)):
            continue
        rc = main(with_budget(argv))
        err = capsys.readouterr().err
        if any(p in line for p in PLACEHOLDERS):
            assert rc == 2 and "error:" in err, f"{line}: a placeholder path must fail with a clear error"
            continue
        assert rc == 0, f"README line failed: {line}\n{err[-2000:]}"
        ran.append(argv[0])
    assert {"generate", "eval", "report", "erase", "unlearn", "invert", "export"} <= set(ran)
    assert "attack" in ran or skip


@pytest.mark.parametrize("prefix", sorted(NOT_RUN))
def test_lines_kept_out_of_ci_are_still_in_the_readme(prefix):
    # a stale NOT_RUN entry would hide nothing, but says the README changed: keep the list true
    assert any(" ".join(argv).startswith(prefix) for argv in use_section_commands(README.read_text()))
