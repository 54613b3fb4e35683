"""Model worlds: what a model's own world provides as defaults.

A model trained on a known world (the shipped testbed's synthetic shapes, colours and patterns)
comes with concepts, exact detectors, prompt suites and a Dark Miner verifier of its own; any other
model has none, and the user names the concept, the detector, the seed prompts and the verifier.
Production code asks :func:`world_of` ``(model)`` what the model's world provides instead of
branching on which model it is.

A world is registered for a model family by a plug-in (the testbed package registers its world for
the testbed family, :mod:`safediff.testbed.plugin`); a family without one has :data:`OPEN_WORLD`,
which provides nothing::

    >>> from safediff.worlds import World, register_world
    >>> class MyWorld(World):
    ...     name = "my-world"
    ...     default_concept = "red"
    >>> register_world("my-family", MyWorld())  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import numpy as np


class World:
    """What a model's world provides. This base class is the open world (a real model's): no
    concept, detector, prompt or verifier of its own. Subclasses override what their world has."""

    #: the world's name (``testbed``); empty for the open world
    name: ClassVar[str] = ""
    #: the concept commands use when none is given (None: the user must name one)
    default_concept: ClassVar[str | None] = None
    #: whether :meth:`concepts_in` reads the world's concepts off an image exactly
    exact_detector: ClassVar[bool] = False
    #: whether the defenses' option defaults and ``testbed-*`` presets (which name this world's
    #: concepts, :attr:`safediff.defenses.base.DefenseConfig.testbed_defaults`) apply to its models
    defense_defaults: ClassVar[bool] = False
    #: the names of the world's benchmark suites (the testbed's: ``testbed:CONCEPT/SUITE``); empty: none
    suites: ClassVar[tuple[str, ...]] = ()
    #: a stack that acts on the world's concepts with no trained file (the demo's and the serve page's first)
    default_stack: ClassVar[str] = ""
    #: prompts that show the world's concepts (named, implied, held out) and benign ones (the demo's)
    demo_prompts: ClassVar[tuple[str, ...]] = ()
    #: one prompt naming :attr:`default_concept` (the serve page's first)
    example_prompt: ClassVar[str] = ""
    #: HTML explaining what the demo's images show
    explanation_html: ClassVar[str] = ""

    def concepts(self) -> tuple[str, ...]:
        """The concepts the world defines (its detectors score them, its prompts bring them)."""
        return ()

    def default_detectors(self) -> list[str]:
        """Detector specs that score the world's concepts, used when no ``--detector`` is given
        (empty: the user must give one)."""
        return []

    def detector_spec(self, concept: str) -> str | None:
        """The detector spec that scores ``concept`` in this world (None: the world has no detector)."""
        return None

    def concepts_in(self, image: np.ndarray) -> frozenset[str]:
        """The world's concepts its exact detector sees in ``image`` (only where :attr:`exact_detector`)."""
        raise ValueError("This model's world has no exact detector; score images with a detector (`--detector`).")

    def concept_prompts(self, concept: str, n: int, seed: int = 0) -> list[tuple[str, str]] | None:
        """``n`` (prompt, caption template) pairs bringing ``concept`` with training-side words only (the
        template has ``{}`` in the concept word's place), or None where the world writes no prompts
        (the user gives concept images or prompts)."""
        return None

    def scene_prompts(self, n: int, key: str) -> list[str] | None:
        """``n`` prompts of the world naming no concept, drawn from ``random.Random(key)`` (None: none)."""
        return None

    def seed_prompts(self, concept: str, n: int = 16, seed: int = 0) -> list[str] | None:
        """``n`` training-side prompts naming ``concept`` (attack seeds; never a held-out word), or
        None where the world writes none (the user gives them)."""
        return None

    def verifier(self, concept: str) -> Any | None:
        """Dark Miner's verifier for ``concept`` (a :class:`safediff.unlearning.dark_miner.Verifier`),
        or None where the world has none (the user passes one, e.g. a CLIP verifier)."""
        return None

    def __repr__(self) -> str:
        return f"<world {self.name or 'open'}>"


#: the world of every model whose family registers none: it provides no defaults
OPEN_WORLD = World()

_WORLDS: dict[str, World] = {}
#: modules outside this one that register a world when imported (the testbed's lives with the testbed)
PLUGINS: list[str] = ["safediff.testbed.plugin"]
_loaded = False


def register_world(family: str, world: World) -> World:
    """Register ``world`` as the world of the models of ``family`` (called once, at import, by a plug-in)."""
    if not isinstance(world, World):
        raise TypeError(f"register_world takes a World, got {type(world).__name__}.")
    if family in _WORLDS and type(_WORLDS[family]) is not type(world):
        raise KeyError(f"Family {family!r} already has a world, registered by {type(_WORLDS[family]).__module__}.")
    _WORLDS[family] = world
    return world


def _load_plugins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in PLUGINS:
            importlib.import_module(module)


def world_of(model: Any) -> World:
    """The world of ``model`` (any object with a ``family``; :data:`OPEN_WORLD` where its family
    registers none, or it has no family)."""
    _load_plugins()
    return _WORLDS.get(getattr(model, "family", None), OPEN_WORLD)


def worlds() -> dict[str, World]:
    """Every registered world, by family."""
    _load_plugins()
    return dict(_WORLDS)
