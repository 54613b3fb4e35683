"""A benchmark's results: ``OUT.json`` (the numbers, with the command that made them) and
``OUT.md`` (the table, ending with that command), each written atomically, the table printed.

Shared by the testbed design scripts (weighting / denoiser-size / autoencoder trials, the
empty-prompt and shape diagnoses). ``refuse_existing`` is called before the measurement, so a
script told not to overwrite stops before any expensive work.
"""

from __future__ import annotations

import sys
from pathlib import Path


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces this run (``argv`` as given to ``main``, else the process's)."""
    return f"python benchmarks/{Path(script).name} " + " ".join(sys.argv[1:] if argv is None else argv)


def refuse_existing(out: str | Path, overwrite: bool) -> None:
    """Raise before any work if ``OUT.json`` / ``OUT.md`` exist and ``overwrite`` is not set."""
    if overwrite:
        return
    existing = [str(p) for p in (Path(out).with_suffix(".json"), Path(out).with_suffix(".md")) if p.exists()]
    if existing:
        raise SystemExit(f"{', '.join(existing)} already exist(s); pass --overwrite to replace, "
                         "or choose another --results path.")


def write_results(out: str | Path, res: dict, lines: list[str], *, overwrite: bool) -> None:
    """Write ``res`` to ``OUT.json`` and ``lines`` plus ``res['command']`` to ``OUT.md``; print the table."""
    from safediff.fileio import atomic_write_json, atomic_write_text

    out = Path(out)
    atomic_write_json(out.with_suffix(".json"), res, overwrite=overwrite)
    lines = [*lines, "", f"`{res['command']}`"]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n", overwrite=overwrite)
    print("\n".join(lines))
