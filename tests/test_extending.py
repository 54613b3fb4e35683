"""docs/extending.md's promise (issue 30): a defense is one file and one ``register_defense`` call.

The toy defense (tests/toy_defense.py, the template the doc shows) is registered from its one
file and then found, with nothing else edited, in ``safediff defenses``, the serve page's menu,
the support table and the conformance checks; a toy attack and a toy trainer likewise in
``safediff attacks`` / the ASR definitions and ``safediff erase --method`` / ``safediff unlearn``.
Every registration is undone after its test, so the suite's "every registered defense" checks
see the built-in ones only.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from pathlib import Path

import pytest

import safediff  # noqa: F401 - registers every defense
from safediff.defenses import base as defense_base
from safediff.options import option
from safediff.stack import DefenseStack

ROOT = Path(__file__).resolve().parents[1]
TOY_FILE = Path(__file__).with_name("toy_defense.py")


@pytest.fixture
def toy():
    """The toy defense registered by importing its one file; unregistered afterwards."""
    saved = dict(defense_base._REGISTRY)
    sys.modules.pop("toy_defense", None)
    module = importlib.import_module("toy_defense")
    try:
        yield module
    finally:
        defense_base._REGISTRY.clear()
        defense_base._REGISTRY.update(saved)
        sys.modules.pop("toy_defense", None)


def test_the_doc_template_is_the_toy_file():
    doc = (ROOT / "docs" / "extending.md").read_text()
    blocks = re.findall(r"<!-- template: tests/toy_defense.py -->\n```python\n(.*?)```", doc, re.S)
    assert blocks, "docs/extending.md lost its template block"
    assert blocks[0] == TOY_FILE.read_text()


def test_the_toy_defense_is_listed_by_safediff_defenses(toy, capsys):
    from safediff.cli import main

    assert main(["defenses", "--options"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("toy_push"))
    assert "stage=guidance" in line and "strength=1.0" in line
    assert "strength = 1.0 (in [0, 20]): how far each step is pushed" in out


def test_the_toy_defense_is_in_the_serve_menu_and_its_entry_parses(toy):
    from safediff.serve import DEFENSE_MENU

    text = DEFENSE_MENU["toy push (template)"]
    (cfg,) = DefenseStack.parse(text.format(concept="striped", detector="testbed:striped")).defenses
    assert cfg.name == "toy_push" and cfg.strength == 2.0 and cfg.concept == "striped"


def test_the_toy_defense_is_in_the_support_table(toy):
    from safediff import support

    row = support.support_table()["defense toy_push"]
    assert row and all(row.values())  # it requires nothing: every family runs it
    support.check_defenses(["toy_push"], "sdxl")  # not refused
    assert "toy_push" in support.render_markdown()


def test_the_toy_defense_options_are_judged_by_its_schema(toy):
    cfg_cls = toy.ToyPushConfig
    with pytest.raises(ValueError, match=r"`toy_push` option `strength` must be in \[0, 20\], got -1.0"):
        DefenseStack.parse("toy_push(strength=-1)")
    with pytest.raises(ValueError, match=r"`toy_push` option `start` must be in \[0, 1\), got 1.0"):
        cfg_cls(start=1)
    with pytest.raises(ValueError, match=r"`toy_push` option `concept` must be non-empty text"):
        cfg_cls(concept="  ")
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['strenght'\] for defense `toy_push`"):
        DefenseStack.parse("toy_push(strenght=1)")


def test_the_toy_defense_passes_the_conformance_checks(toy, tiny_family, monkeypatch):
    conformance = importlib.import_module("test_conformance")
    cls = toy.ToyPushConfig  # its examples come from its class, as every registered defense's do
    conformance.test_every_registered_defense_has_a_zero_strength_entry_and_an_acting_one()  # reads the registry
    conformance.test_print_then_parse_keeps_the_stack_and_its_hash("toy_push", monkeypatch)
    conformance.test_zero_strength_is_no_defense_bit_for_bit(tiny_family, "testbed", "toy_push", cls.zero_strength[0])
    from _families import ours

    prompts = ["a striped zebra square"]  # acting: the images change
    assert (ours(tiny_family("testbed"), prompts, "toy_push(concept=\"striped\", strength=3)", n=1, steps=2)
            != ours(tiny_family("testbed"), prompts, "", n=1, steps=2)).any()


# ---------------------------------------------------------------------------------------------
# attacks and trainers: one registration each, found by the command line and the protocol
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def toy_attack():
    from safediff.attacks import base as attack_base

    saved = dict(attack_base._ATTACKS)

    @dataclasses.dataclass(frozen=True)
    class ToyAttackConfig(attack_base.AttackConfig):
        tries: int = option(3, low=1, help="random tries per seed prompt")

    @attack_base.register_attack
    class ToyAttack(attack_base.Attack):
        name = "toy_attack"
        white_box = False
        config_cls = ToyAttackConfig
        asr_definition = "share of seed prompts whose toy prompt gives a flagged image (one image)"
        paper_rule = {"rule": "any_of_n", "n_images": 2, "text": "toy: any of 2 images"}

    try:
        yield ToyAttack
    finally:
        attack_base._ATTACKS.clear()
        attack_base._ATTACKS.update(saved)


def test_a_toy_attack_is_listed_and_defines_its_rate(toy_attack, capsys):
    from safediff.cli import main
    from safediff.eval.protocol import ASR_DEFINITIONS, PAPER_RULES

    assert main(["attacks", "--options"]) == 0
    out = capsys.readouterr().out
    assert "toy_attack" in out and "tries = 3 (>= 1): random tries per seed prompt" in out
    assert ASR_DEFINITIONS["toy_attack"].startswith("share of seed prompts whose toy prompt")
    assert PAPER_RULES["toy_attack"]["n_images"] == 2
    with pytest.raises(ValueError, match=r"`toy_attack` option `tries` must be an integer >= 1, got 0"):
        toy_attack.config_cls.from_options(["tries=0"])


def test_a_toy_trainer_is_offered_by_erase_and_unlearn(tmp_path):
    from safediff.cli import build_parser
    from safediff.unlearning import registry

    saved = dict(registry._TRAINERS)
    calls = []

    def run(model, out_path, request):
        calls.append(request)
        return Path(out_path)

    def arguments(p):
        p.add_argument("--concept", default=None)
        p.add_argument("--rank", type=int, default=None)
        p.add_argument("--seed", type=int, default=0)

    try:
        registry.register_trainer(name="toy_trainer", run=run, summary="toy trainer", defense="delta",
                                  target="mapped nowhere", cli_arguments=arguments, cli_options={"rank": "rank"})
        parser = build_parser()
        args = parser.parse_args(["erase", "--method", "toy_trainer", "--concept", "x", "--out", str(tmp_path / "d")])
        assert args.method == "toy_trainer"
        args = parser.parse_args(["unlearn", "toy_trainer", "--rank", "4", "--out", str(tmp_path / "d")])
        assert args.unlearn_command == "toy_trainer" and args.rank == 4
        assert registry.erase_target("toy_trainer", "y") == "mapped nowhere"
        with pytest.raises(KeyError, match="already registered"):
            registry.register_trainer(name="toy_trainer", run=run, summary="", defense="delta", target="")
    finally:
        registry._TRAINERS.clear()
        registry._TRAINERS.update(saved)


def test_docs_option_tables_are_the_generated_ones():
    """docs/options.md is generated from the schemas (``safediff defenses --markdown`` and
    ``safediff attacks --markdown``); a changed option must be regenerated there."""
    from safediff.cli import attacks_markdown, defenses_markdown

    doc = (ROOT / "docs" / "options.md").read_text()
    generated = defenses_markdown() + attacks_markdown()
    assert doc[doc.index("## Defenses"):] == generated, "regenerate docs/options.md (see its first lines)"
