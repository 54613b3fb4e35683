"""Printing and parsing a defense stack are inverse for every valid stack (issue 31.5).

Configs are generated over every registered defense's options with values of the field's type:
text with quotes, backslashes, commas, parentheses, brackets and non-ASCII characters; negative,
fractional and exponent numbers; booleans; lists. A drawn value the defense refuses leaves that
option at its default, so every generated stack is one :meth:`DefenseStack.parse` accepts.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import safediff  # noqa: F401 - registers every defense
from safediff.defenses.base import known_defenses
from safediff.stack import DefenseStack

TRICKY = st.sampled_from(['"', "\\", ",", "(", ")", "[", "]", "+", "=", "'", " ", "é", "雪", "\n", "\\\"", "null"])
TEXT = st.lists(st.one_of(TRICKY, st.text(max_size=4)), max_size=6).map("".join)
FLOAT = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=64),
                  st.sampled_from([-1.5, 0.0, 1e-30, 2.5e3, -7e12, 1.0, 0.3]))
INT = st.integers(min_value=-(2**40), max_value=2**40)


def _values(annotation: str):
    """A strategy of values for a field annotated ``annotation`` (a string, as dataclasses keep it)."""
    base = annotation.replace(" | None", "").strip()
    if base.startswith("tuple["):
        inner = _values(base[6:-1].split(",")[0].strip())
        return st.lists(inner, max_size=4).map(tuple) if "..." in base else \
            st.tuples(*[inner] * len(base[6:-1].split(",")))
    strategy = {"str": TEXT, "float": FLOAT, "int": INT, "bool": st.booleans()}[base]
    return st.one_of(st.none(), strategy) if "None" in annotation else strategy


@st.composite
def defense_configs(draw):
    """A valid config of a drawn defense: options drawn one by one, each kept if accepted."""
    spec = known_defenses()[draw(st.sampled_from(sorted(known_defenses())))]
    options: dict = {}
    for f in dataclasses.fields(spec.config_cls):
        if draw(st.booleans()):
            value = draw(_values(str(f.type)))
            try:
                spec.config_cls.from_options({**options, f.name: value})
            except ValueError:
                continue
            options[f.name] = value
    return spec.config_cls.from_options(options)


@pytest.fixture(autouse=True)
def _artifacts_hash_by_path(monkeypatch):
    """Generated artifact paths do not exist: hash each by its path so the stack hash covers configs."""
    monkeypatch.setattr(DefenseStack, "artifact_hashes",
                        lambda self: {p: hashlib.sha256(p.encode()).hexdigest() for d in self.defenses
                                      for p in d.artifact_paths()})


# bounded and reproducible in CI: the same 300 examples every run, no timing deadline, no example database
@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.lists(defense_configs(), min_size=1, max_size=3))
def test_printed_stack_parses_back_to_the_same_stack(configs):
    try:
        stack = DefenseStack.parse(configs)
    except ValueError:
        assume(False)  # not a valid stack (e.g. an entry that does nothing): nothing to print
    text = stack.to_string()
    again = DefenseStack.parse(text)
    assert again == stack, text
    assert again.to_string() == text
    assert again.hash("base") == stack.hash("base")


@pytest.mark.parametrize("value", ['a"b', "back\\slash", 'end\\', '\\"', "(x, [y]) + z=1", "é雪", 'say "hi", (ok)'])
def test_text_with_quotes_and_escapes_round_trips(value):
    stack = DefenseStack.parse([{"name": "negative_prompt", "text": value}])
    assert DefenseStack.parse(stack.to_string()).defenses[0].text == value
