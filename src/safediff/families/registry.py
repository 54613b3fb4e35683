"""The family registry: adapters register themselves; lookups load the plug-ins first."""

from __future__ import annotations

import importlib

from .base import CAPABILITIES, FamilyAdapter

_FAMILIES: dict[str, FamilyAdapter] = {}
#: modules outside this package that register a family when imported (the testbed's adapter lives
#: with the testbed, so no production module names it)
PLUGINS: list[str] = ["safediff.testbed.family"]
_loaded = False


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    """Register a family adapter (called once, at import, by the family's own module)."""
    if not adapter.name:
        raise ValueError(f"{type(adapter).__name__} has no `name`.")
    unknown = sorted(set(adapter.capabilities) - set(CAPABILITIES))
    if unknown:
        raise ValueError(f"Family {adapter.name!r} declares unknown capabilities {unknown}; known: {sorted(CAPABILITIES)}.")
    if adapter.name in _FAMILIES and type(_FAMILIES[adapter.name]) is not type(adapter):
        raise KeyError(f"A family called {adapter.name!r} is already registered by "
                       f"{type(_FAMILIES[adapter.name]).__module__}.")
    _FAMILIES[adapter.name] = adapter
    return adapter


def _load_plugins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in PLUGINS:
            importlib.import_module(module)


def families() -> dict[str, FamilyAdapter]:
    """Every registered family, by name, in registration order."""
    _load_plugins()
    return dict(_FAMILIES)


def get_family(name: str) -> FamilyAdapter:
    """The adapter of family ``name``.

    Raises:
        ValueError: no family of that name is registered.
    """
    _load_plugins()
    if name not in _FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; registered families: {list(_FAMILIES)}.")
    return _FAMILIES[name]


def detect(index: dict, net_config: dict, meta: dict) -> FamilyAdapter:
    """The family claiming a folder with this ``model_index.json``, denoiser config and
    ``safediff.json`` (``meta``): the highest-priority adapter whose :meth:`~FamilyAdapter.detect` says so."""
    for adapter in sorted(families().values(), key=lambda a: -a.priority):
        if adapter.detect(index, net_config, meta):
            return adapter
    raise ValueError(f"No registered family claims this model (index {sorted(index)}).")  # sd1 claims every folder
