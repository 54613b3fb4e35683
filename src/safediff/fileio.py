"""The one way safediff writes a final output file or folder.

* A file is written under a unique temporary name beside its target, flushed to disk (``fsync``)
  and renamed over the target in one step (``os.replace``), then the folder entry is flushed: a
  kill at any moment leaves either the old target or the complete new one, never a truncated file
  at the final path (at worst a hidden ``.NAME.*.tmp*`` file beside it, which nothing reads).
* A folder is written into a uniquely named temporary folder beside the target that this process
  created (``.NAME.*.partial``; a pre-existing ``NAME.partial`` of the user's is never touched), with
  an ownership manifest (:data:`OWNER_MANIFEST`) listing the files written, then renamed into place.
* An existing target is refused unless ``overwrite=True`` (the message names the path and the
  ``--overwrite`` flag). With ``overwrite`` a folder is replaced only when every file in it is one a
  previous safediff write listed in its manifest; foreign files are named and the write is refused
  before any work.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: the ownership manifest of a folder safediff wrote: ``{"written_by": ..., "files": [relative paths]}``
OWNER_MANIFEST = ".safediff-written.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: the process umask, read once: temporary files and folders are made private (0600 / 0700) and get
#: the mode an ordinary ``open`` / ``mkdir`` would have given them before they are renamed into place
_UMASK = _umask()


def refuse_existing(path: str | os.PathLike, overwrite: bool, *, kind: str | None = None) -> None:
    """Refuse an existing ``path`` unless ``overwrite``; with ``kind`` ("file" or "folder") also refuse a
    target of the other kind, even with ``overwrite``. Call it before any expensive work."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    is_dir = path.is_dir()
    if kind == "file" and is_dir:
        raise IsADirectoryError(f"{path} exists and is a folder, but this writes a file there; choose another --out "
                                "(--overwrite does not replace a folder with a file).")
    if kind == "folder" and not is_dir:
        raise NotADirectoryError(f"{path} exists and is a file, but this writes a folder there; choose another --out "
                                 "(--overwrite does not replace a file with a folder).")
    if not overwrite:
        raise FileExistsError(f"{path} exists; choose another --out or pass --overwrite to replace it.")
    if is_dir:
        foreign = foreign_files(path)
        if foreign:
            shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
            raise FileExistsError(f"{path} holds files safediff did not write there ({shown}); --overwrite replaces "
                                  "only a folder safediff wrote. Move them away or choose another --out.")


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """The files in ``folder`` (relative paths, sorted) that its ownership manifest does not list."""
    folder = Path(folder)
    owned = set(_read_manifest(folder))
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())
    return [p for p in present if p != OWNER_MANIFEST and p not in owned]


def written_by(folder: str | os.PathLike) -> str | None:
    """The command its ownership manifest says wrote ``folder`` (e.g. ``"safediff demo"``), or None."""
    try:
        data = json.loads((Path(folder) / OWNER_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("written_by") if isinstance(data, dict) else None


def _read_manifest(folder: Path) -> list[str]:
    try:
        files = json.loads((folder / OWNER_MANIFEST).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [f for f in files if isinstance(f, str)]


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The JSON in ``path`` (``what`` says what the file is, for the message); a file that is not UTF-8
    or not valid JSON is a ``ValueError`` naming it, the place and the problem."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} ({what}) is not UTF-8 text (byte {e.start}); it is damaged or not a safediff file.") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} ({what}) is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); it is "
                         "damaged, or was cut off by a kill. Rerun the command that made it.") from None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (hidden, ending in ``.tmp``, so no glob for the target's
    extension picks up a leftover; writers that go by the extension must be given the format); when the block ends without error it is flushed and renamed onto ``path``. On error it is
    removed and ``path`` is untouched. An existing ``path`` is refused unless ``overwrite``."""
    path = Path(path)
    refuse_existing(path, overwrite, kind="file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(path: str | os.PathLike, data: Any, *, overwrite: bool = False, indent: int = 2) -> Path:
    """Write ``data`` as JSON (``default=str``, a final newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str) + "\n", overwrite=overwrite)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Copy the file ``src`` to ``dst`` atomically: a kill mid-copy leaves no partial ``dst``."""
    with atomic_path(dst, overwrite=overwrite) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False, written_by: str = "safediff") -> Iterator[Path]:
    """Yield a new, uniquely named temporary folder beside ``path`` that this call created; when the
    block ends without error an ownership manifest listing every file in it is added, each file is
    flushed, and the folder is renamed onto ``path``. With ``overwrite`` an existing ``path`` that
    safediff wrote is replaced (its listed files removed; anything else is kept and reported); one
    holding foreign files is refused before the block runs. On error only the temporary folder
    (ours) is removed."""
    path = Path(path)
    refuse_existing(path, overwrite, kind="folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir())
        (tmp / OWNER_MANIFEST).write_text(json.dumps({"written_by": written_by, "files": files}, indent=2) + "\n",
                                          encoding="utf-8")
        for f in [*files, OWNER_MANIFEST]:
            _fsync_file(tmp / f)
        old = None
        if path.exists():
            refuse_existing(path, overwrite, kind="folder")  # again: a file may have been added meanwhile
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        _remove_owned(old / "x")
        with contextlib.suppress(OSError):
            old.rmdir()


def _remove_owned(folder: Path) -> None:
    """Remove the files ``folder``'s manifest lists (and then empty subfolders); keep anything else."""
    for rel in [*_read_manifest(folder), OWNER_MANIFEST]:
        (folder / rel).unlink(missing_ok=True)
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()
    if folder.exists():
        import warnings

        warnings.warn(f"Kept {folder}: it held files safediff did not write there.", stacklevel=3)
