"""The trainer registry: each unlearning method registers itself, like a defense or an attack.

A trainer is a function ``run(model, out_path, request) -> Path`` that writes a weight-delta file,
plus what the command line and the docs need: a one-line summary, the defense that applies its
file, what it maps the concept to, its spellings, and (for ``safediff unlearn NAME``) its own
command-line arguments. :func:`safediff.unlearning.unlearn` checks what every method shares, then
calls the registered ``run``::

    register_trainer(name="my_method", run=_run, summary="My method (Author 2025)",
                     defense="delta", target="trained away from it", config=MyTrainConfig)
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class UnlearnRequest:
    """What :func:`safediff.unlearning.unlearn` was asked, after the checks every method shares.

    ``concepts``: the concept texts (``concept`` then ``prompts``); ``testbed_concept``: the
    testbed concept ``concept`` names on a testbed model (None elsewhere)."""

    concept: str | None
    prompts: tuple[str, ...]
    concepts: tuple[str, ...]
    testbed_concept: str | None
    anchor: str = ""
    pairs_dir: str | None = None
    concept_images: str | None = None
    clip_model: str | None = None
    preset: str | None = None
    seed: int = 0
    overwrite: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    work_dir: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class TrainerSpec:
    """A registered trainer.

    Attributes:
        run: ``run(model, out_path, request) -> Path`` writes the delta file.
        summary: one line for ``safediff unlearn --help`` and the docs.
        defense: the defense that applies the file (``esd`` -> ``esd(path=...)``; ``delta`` for any).
        target: what the erasure maps the concept to, in words (``safediff erase`` says it).
        aliases: other spellings (``dark-miner``).
        uses_anchor: the concept is mapped to ``anchor`` when one is given (``target`` says what
            happens without one).
        needs_concept: False when the method can run from data alone (DUO's image pairs, Dark
            Miner's concept images): ``unlearn`` then does not insist on a concept text.
        cli_arguments: adds ``safediff unlearn NAME``'s own arguments (None: the method has no
            ``unlearn`` sub-command; ``safediff erase --method NAME`` still runs it).
        cli_options: ``{argument dest: config option}`` passed as ``options`` when given.
        config: the method's training-config dataclass (its fields are what ``options`` may set, e.g.
            in an experiment file's ``artifacts``); None for a method with no training config (the
            closed-form ``uce`` / ``rece``), which an experiment does not train.
    """

    name: str
    run: Callable[..., Path]
    summary: str
    defense: str
    target: str
    aliases: tuple[str, ...] = ()
    uses_anchor: bool = False
    needs_concept: bool = True
    cli_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    cli_options: dict[str, str] = field(default_factory=dict)
    config: type | None = None


_TRAINERS: dict[str, TrainerSpec] = {}


def register_trainer(*, name: str, run: Callable[..., Path], summary: str, defense: str, target: str,
                     aliases: Sequence[str] = (), uses_anchor: bool = False, needs_concept: bool = True,
                     cli_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                     cli_options: dict[str, str] | None = None, config: type | None = None) -> TrainerSpec:
    """Register a trainer (called once, at import, by the trainer's own module)."""
    if not name.isidentifier() or not name.islower():
        raise ValueError(f"Trainer names must be lower-case identifiers, got {name!r}.")
    if name in _TRAINERS:
        raise KeyError(f"A trainer called {name!r} is already registered by {_TRAINERS[name].run.__module__}.")
    if not callable(run):
        raise TypeError(f"Trainer {name!r}: `run` must be a function run(model, out_path, request) -> Path.")
    taken = {a for spec in _TRAINERS.values() for a in spec.aliases}
    clash = sorted(set(aliases) & (taken | set(_TRAINERS)))
    if clash:
        raise KeyError(f"Trainer {name!r}: the spelling(s) {clash} already name another trainer.")
    if config is not None and not dataclasses.is_dataclass(config):
        raise TypeError(f"Trainer {name!r}: `config` must be the training-config dataclass, got {config!r}.")
    spec = TrainerSpec(name, run, summary, defense, target, tuple(aliases), uses_anchor, needs_concept, cli_arguments,
                       dict(cli_options or {}), config)
    _TRAINERS[name] = spec
    return spec


def get_trainer(name: str) -> TrainerSpec:
    """The trainer called ``name`` (or one of its aliases); a clear error naming the known ones."""
    for spec in _TRAINERS.values():
        if name == spec.name or name in spec.aliases:
            return spec
    raise ValueError(f"Unknown unlearning method {name!r}; choose one of {sorted(_TRAINERS)}.")


def erase_target(name: str, anchor: str | None) -> str:
    """What an erasure with trainer ``name`` maps the concept to, in words."""
    spec = get_trainer(name)
    return f"mapped to {anchor!r}" if anchor and spec.uses_anchor else spec.target


def known_trainers() -> dict[str, TrainerSpec]:
    """Every registered trainer, by name, in registration order."""
    return dict(_TRAINERS)
