"""Which method runs on which model family, computed in one place, and checked first by every entry point.

Each model family says what it has (:attr:`safediff.families.FamilyAdapter.capabilities`); each
defense, trainer and attack says what it needs (``requires``: a defense config's or attack class's
class attribute, a trainer module's ``REQUIRES``). A method runs on a family when its needs are a
subset of the family's capabilities. :func:`check_supported` (trainers, attacks) and
:func:`check_defenses` (a stack) refuse a method on a family it does not run on with one sentence
naming the method, the family and the missing capabilities, **before** any data is asked for or
any work is done::

    >>> from safediff.support import check_supported
    >>> check_supported("duo", model)          # doctest: +SKIP
    UnsupportedMethodError: duo does not run on sdxl models: it needs one_clip_encoder (...); ...

:func:`render_markdown` writes the support table of docs/models.md from the same registries
(``python -m safediff.families --markdown`` prints it).
"""

from __future__ import annotations

import importlib
from typing import Any

#: trainers that are neither a registered defense nor an attack: the module declaring each one's ``REQUIRES``
_TRAINER_MODULES = {"esd": "safediff.unlearning.esd", "duo": "safediff.unlearning.duo",
                    "dark_miner": "safediff.unlearning.dark_miner", "inversion": "safediff.inversion",
                    "advunlearn": "safediff.unlearning.advunlearn"}
#: trainers that compute a registered defense (closed-form edits frozen into a delta, the sanitizer):
#: they need what that defense needs
_TRAINER_DEFENSES = ("uce", "rece", "sanitizer")

#: spellings the command line and the registries use for the same method
_ALIASES = {"dark-miner": "dark_miner", "darkminer": "dark_miner", "unlearn_diff_atk": "unlearndiffatk",
            "concept-inversion": "concept_inversion", "ine": "inversion", "invert": "inversion"}


class UnsupportedMethodError(ValueError):
    """A method asked of a model family it does not run on (raised before any work)."""


def _family(model: Any) -> str:
    return model if isinstance(model, str) else getattr(model, "family", "")


def _families() -> dict:
    from .families import families

    return families()


def _defense_specs() -> dict:
    from . import defenses  # noqa: F401  (registers the built-in defenses)
    from .defenses.base import known_defenses

    return known_defenses()


def _attacks() -> dict:
    from .attacks import get_attack, list_attacks

    return {name: get_attack(name) for name in list_attacks()}


def defense_requirements(name: str) -> frozenset[str]:
    """The capabilities the registered defense ``name`` needs (its config class's ``requires``)."""
    from .defenses.base import get_defense

    _defense_specs()
    return frozenset(get_defense(name).config_cls.requires)


def methods() -> list[str]:
    """Every trainer and attack that :func:`check_supported` knows, sorted."""
    return sorted({*_TRAINER_MODULES, *_TRAINER_DEFENSES, *_attacks()})


def requirements(method: str) -> frozenset[str]:
    """The capabilities the trainer or attack ``method`` needs.

    Raises:
        ValueError: no trainer or attack of that name.
    """
    key = _ALIASES.get(method, method)
    if key in _TRAINER_MODULES:
        return frozenset(importlib.import_module(_TRAINER_MODULES[key]).REQUIRES)
    if key in _TRAINER_DEFENSES:
        return defense_requirements(key)
    attacks = _attacks()
    if key in attacks:
        return frozenset(attacks[key].requires)
    raise ValueError(f"No support entry for method {method!r}; known: {methods()}.")


def missing_capabilities(requires: frozenset[str], model: Any) -> list[str]:
    """The capabilities in ``requires`` that ``model``'s family (a Model or a family name) lacks, sorted."""
    from .families import get_family

    return sorted(set(requires) - get_family(_family(model)).capabilities)


def _runs_on(requires: frozenset[str]) -> tuple[str, ...]:
    return tuple(name for name, a in _families().items() if requires <= a.capabilities)


def supported_families(method: str) -> tuple[str, ...]:
    """The families the trainer or attack ``method`` runs on (in registration order)."""
    return _runs_on(requirements(method))


def is_supported(method: str, model: Any) -> bool:
    """Whether ``method`` runs on ``model`` (a Model or a family name)."""
    return _family(model) in supported_families(method)


def _why(missing: list[str]) -> str:
    from .families import CAPABILITIES

    return "; ".join(f"{c} ({CAPABILITIES[c]})" for c in missing)


def _names(families: tuple[str, ...]) -> str:
    from .models import TESTBED_FAMILY

    named = [f for f in families if f != TESTBED_FAMILY]
    return ", ".join(named) + (" and the testbed" if TESTBED_FAMILY in families else "")


def check_supported(method: str, model: Any) -> None:
    """Raise :class:`UnsupportedMethodError` (one sentence) when ``method`` does not run on
    ``model``'s family; call it first, before asking for data or doing any work. ``model`` None
    (no model to check yet) passes."""
    requires = requirements(method)
    if model is None:
        return
    missing = missing_capabilities(requires, model)
    if not missing:
        return
    raise UnsupportedMethodError(f"{method} does not run on {_family(model)} models: it needs {_why(missing)}; it "
                                 f"runs on {_names(_runs_on(requires))} (docs/models.md).")


def supported_defenses(model: Any) -> tuple[str, ...]:
    """The registered defenses that run on ``model``'s family (a Model or a family name), sorted."""
    from .families import get_family

    caps = get_family(_family(model)).capabilities
    return tuple(sorted(n for n, spec in _defense_specs().items() if spec.config_cls.requires <= caps))


def check_defenses(names: list[str], model: Any) -> None:
    """Refuse (ValueError, before any work) defenses that do not run on ``model``'s family, naming
    each one's missing capabilities and the defenses that do run there."""
    family = _family(model)
    refused = {n: missing_capabilities(defense_requirements(n), model) for n in sorted(set(names))}
    refused = {n: m for n, m in refused.items() if m}
    if refused:
        why = "; ".join(f"{n} needs {_why(m)}" for n, m in refused.items())
        raise ValueError(f"{', '.join(refused)} not supported on {family} models: {why}; on {family}: "
                         f"{', '.join(supported_defenses(model))} (see docs/models.md).")


def support_table() -> dict[str, dict[str, bool]]:
    """``{"defense NAME" | "method NAME": {family: runs}}`` for every registered defense, trainer and attack."""
    fams = _families()
    table = {f"defense {n}": {f: spec.config_cls.requires <= a.capabilities for f, a in fams.items()}
             for n, spec in sorted(_defense_specs().items())}
    table.update({f"method {m}": {f: requirements(m) <= a.capabilities for f, a in fams.items()} for m in methods()})
    return table


def render_markdown() -> str:
    """The support table of docs/models.md: one row per defense, trainer and attack, one column per
    family, each cell ``yes`` or the missing capabilities; then what each family has, and what each
    capability means."""
    from .families import CAPABILITIES

    fams = _families()
    lines = ["| method | needs | " + " | ".join(f"`{f}`" for f in fams) + " |",
             "|---|---|" + "---|" * len(fams)]
    rows = [(f"defense `{n}`", spec.config_cls.requires) for n, spec in sorted(_defense_specs().items())]
    trainers = sorted({*_TRAINER_MODULES, *_TRAINER_DEFENSES})
    rows += [(f"trainer `{m}`", requirements(m)) for m in trainers]
    rows += [(f"attack `{m}`", requirements(m)) for m in methods() if m not in trainers]
    for label, requires in rows:
        cells = ["yes" if requires <= a.capabilities else "no: " + ", ".join(sorted(requires - a.capabilities))
                 for a in fams.values()]
        lines.append(f"| {label} | {', '.join(sorted(requires)) or '-'} | " + " | ".join(cells) + " |")
    lines += ["", "| family | capabilities |", "|---|---|"]
    lines += [f"| `{f}` | {', '.join(sorted(a.capabilities))} |" for f, a in fams.items()]
    lines += ["", "Capabilities:", ""] + [f"- `{c}`: {text}" for c, text in CAPABILITIES.items()]
    return "\n".join(lines) + "\n"

