"""The package's layers, read from its source: every import of ``safediff`` (at the top of a
module or inside a function) goes from a module to one in the same or a lower layer.

The layers, lowest first (a module belongs to the longest prefix listed):

0. the version;
1. foundations with no package imports of note (hashing, files, tokenizers, the testbed's world,
   shared statistics);
2. models, their files, families and worlds, encodings, artifacts, detectors;
3. concepts and the defenses;
4. the defended pipeline (stack, denoiser, pipeline);
5. methods built on the pipeline: training, inversion, unlearning, export, the testbed's model
   and presets, test helpers;
6. the evaluation;
7. attacks (an attack campaign is evaluated with the evaluation protocol), experiments (graphs of
   trainings, evaluations and attacks) and the library API;
8. the package root;
9. the servers (web UI, demo);
10. the command line.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

import safediff

SRC = Path(safediff.__file__).resolve().parent

LAYERS: dict[str, int] = {
    "safediff._version": 0,
    "safediff.core": 1, "safediff.fileio": 1, "safediff.tokenizer": 1, "safediff.stats": 1,
    "safediff.testbed.world": 1, "safediff.testbed.vocabulary": 1, "safediff.testbed.grammar": 1,
    "safediff.testbed.rendering": 1, "safediff.testbed.detection": 1,
    "safediff.artifacts": 2, "safediff.models": 2, "safediff.single_file": 2, "safediff.families": 2,
    "safediff.support": 2, "safediff.encoding": 2, "safediff.detectors": 2, "safediff.vlm_judge": 2, "safediff.options": 2,
    "safediff.worlds": 2,
    "safediff.concepts": 3, "safediff.defenses": 3,
    "safediff.stack": 4, "safediff.denoiser": 4, "safediff.pipeline": 4,
    "safediff.training": 5, "safediff.inversion": 5, "safediff.unlearning": 5, "safediff.export": 5,
    "safediff.testbed": 5, "safediff.testing": 5,
    "safediff.eval": 6,
    "safediff.attacks": 7, "safediff.api": 7, "safediff.experiments": 7, "safediff.integrations": 7,
    "safediff": 8,
    "safediff.serve": 9, "safediff.demo": 9,
    "safediff.cli": 10,
}

#: upward imports allowed inside functions only, each with its reason: (importer, target package) -> why
LAZY_UPWARD: dict[tuple[str, str], str] = {
    ("safediff.support", "safediff.defenses"): "the support table asks each registered defense what it requires",
    ("safediff.support", "safediff.attacks"): "the support table asks each registered attack what it requires",
    ("safediff.eval.protocol", "safediff.attacks"): "an attack's ASR definition and paper rule live on its class",
}

#: the modules no lower layer may import (issue 30's criterion)
TOPS = ("safediff.eval", "safediff.cli", "safediff.serve", "safediff.demo")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of ``module``: that of the longest listed prefix."""
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise KeyError(f"{module} is in no layer; add it (or its package) to LAYERS in tests/test_layers.py.")
    return LAYERS[best]


def package_imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(target module, line, inside a function)`` for each import of ``safediff`` in ``path``."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool) -> list[tuple[str, int, bool]]:
    """``(target module, line, inside a function)`` for each import of ``safediff`` in ``source``.
    ``from . import x`` counts as an import of the module ``x`` where ``x`` is a submodule."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target == "safediff" or target.startswith("safediff."):
                    for alias in child.names:
                        sub = f"{target}.{alias.name}"
                        is_module = (SRC.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                            (SRC.parent / Path(*sub.split("."))).is_dir()
                        found.append((sub if is_module else target, child.lineno, local))
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, local) for a in child.names
                             if a.name == "safediff" or a.name.startswith("safediff."))
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def all_imports() -> list[tuple[str, str, int, bool]]:
    return [(module_name(p), target, line, local) for p in sorted(SRC.rglob("*.py"))
            for target, line, local in package_imports(p)]


def test_every_module_has_a_layer():
    missing = sorted(m for m in map(module_name, SRC.rglob("*.py")) if not _has_layer(m))
    assert not missing, f"modules in no layer (add them to LAYERS): {missing}"


def _has_layer(module: str) -> bool:
    try:
        layer_of(module)
        return True
    except KeyError:
        return False


def _allowed(src: str, tgt: str, local: bool) -> bool:
    return local and any(src == s and (tgt == t or tgt.startswith(t + ".")) for s, t in LAZY_UPWARD)


def test_no_import_goes_up_a_layer():
    upward = [f"{src}:{line} imports {tgt} (layer {layer_of(src)} -> {layer_of(tgt)}{', in a function' if local else ''})"
              for src, tgt, line, local in all_imports()
              if layer_of(tgt) > layer_of(src) and not _allowed(src, tgt, local)]
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(upward)


@pytest.mark.parametrize("top", ["safediff", *TOPS])
def test_nothing_below_imports_the_root_eval_cli_or_servers(top):
    """Issue 30: no module of a lower layer imports the evaluation, the CLI, the servers or the package
    root (``__version__`` comes from :mod:`safediff._version`)."""
    offenders = [f"{src}:{line}" for src, tgt, line, _ in all_imports()
                 if (tgt == top or (top != "safediff" and tgt.startswith(top + ".")))
                 and layer_of(src) < layer_of(top)]
    assert not offenders, f"lower layers import {top}: {offenders}"


def test_the_check_sees_local_and_relative_imports():
    """The reader itself: relative, submodule, absolute and function-local imports are all found."""
    source = ("import os\nfrom .. import core\nfrom ..eval.runner import run_eval\n"
              "def f():\n    import safediff\n    from . import world\n")
    found = imports_in(source, "safediff.testbed.quality", is_package=False)
    assert found == [("safediff.core", 2, False), ("safediff.eval.runner", 3, False), ("safediff", 5, True),
                     ("safediff.testbed.world", 6, True)]
    assert imports_in("from . import _version\n", "safediff", is_package=True) == [("safediff._version", 1, False)]
    assert _allowed("safediff.support", "safediff.attacks.base", local=True)
    assert not _allowed("safediff.support", "safediff.attacks.base", local=False)
    assert not _allowed("safediff.support", "safediff.eval", local=True)
    assert layer_of("safediff.eval.runner") == 6 and layer_of("safediff.testbed.world") == 1
    assert layer_of("safediff.testbed.quality") == 5
    with pytest.raises(KeyError, match="add it"):
        layer_of("numpy")


def test_version_comes_from_its_own_module_and_matches_pyproject():
    from safediff._version import __version__

    pyproject = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())
    assert safediff.__version__ == __version__ == pyproject["project"]["version"]
