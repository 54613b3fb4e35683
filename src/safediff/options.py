"""One option schema for every method: defenses, attacks and trainers.

A method's options are the fields of a frozen config dataclass. :func:`option` declares one field
with what the command line, the docs tables and the validator need (default, help, bounds,
choices)::

    @dataclass(frozen=True)
    class MyConfig(DefenseConfig):
        strength: float = option(1.0, low=0, high=1, help="0 switches the defense off")
        mode: str = option("soft", choices=("soft", "hard"), help="how the edit is applied")

:func:`check_options` then judges a config from its schema alone (type, bounds, choices, blank
text) with one sentence naming the method, the option, the bad value and what is allowed; only
checks that relate several options stay written by hand in the config's ``__post_init__``.
:func:`config_from_options` is the one parser (a dict from a stack or YAML file, or ``key=value``
text from the command line) and :func:`describe_options` what ``safediff defenses``,
``safediff attacks`` and the docs tables print.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["Option", "option", "option_of", "canonical", "check_type", "check_options", "config_from_options",
           "describe_options", "options_table"]


@dataclass(frozen=True)
class Option:
    """What one config field accepts, beyond its type annotation.

    ``low`` / ``high`` bound a number (``low_open`` / ``high_open``: strictly); ``choices`` the
    allowed values (of each entry, for a list); ``nonblank`` refuses blank text (of each entry,
    for a list); ``min_items`` the shortest list; ``why`` is said after a refusal (e.g. "it keeps
    the closed form invertible")."""

    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    nonblank: bool = False
    min_items: int = 0
    why: str = ""

    def range_text(self) -> str:
        """The allowed range in words (``">= 0"``, ``"in [0, 1]"``, ``"> 0"``), or ``""``."""
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f"in {'(' if self.low_open else '['}{lo:g}, {hi:g}{')' if self.high_open else ']'}"
        if lo is not None:
            return f"{'>' if self.low_open else '>='} {lo:g}"
        if hi is not None:
            return f"{'<' if self.high_open else '<='} {hi:g}"
        return ""


def option(default: Any = dataclasses.MISSING, *, help: str = "", low: float | None = None,
           high: float | None = None, above: float | None = None, below: float | None = None,
           choices: Sequence | None = None, nonblank: bool = False, min_items: int = 0, why: str = "") -> Any:
    """A config field with its schema: ``low``/``high`` inclusive bounds, ``above``/``below``
    strict ones, ``choices`` the allowed values, ``nonblank`` no blank text, ``min_items`` the
    shortest list, ``help`` one line for the CLI and the docs, ``why`` the reason a bound exists."""
    if low is not None and above is not None or high is not None and below is not None:
        raise ValueError("Give `low` or `above` (and `high` or `below`), not both.")
    meta = Option(help=help, low=above if above is not None else low, high=below if below is not None else high,
                  low_open=above is not None, high_open=below is not None,
                  choices=tuple(choices) if choices is not None else None, nonblank=nonblank, min_items=min_items,
                  why=why)
    return dataclasses.field(default=default, metadata={"option": meta})


def option_of(f: dataclasses.Field) -> Option:
    """The schema of field ``f`` (an empty :class:`Option` for a plain field)."""
    return f.metadata.get("option") or Option()


# --------------------------------------------------------------------------------------------
# Types: one spelling per value, and a clear error for the wrong kind
# --------------------------------------------------------------------------------------------


def canonical(value: Any, annotation: Any) -> Any:
    """One spelling per value, so that equal configs hash equally: ``1`` and ``1.0`` for a float
    field are both ``1.0``; a list for a tuple field is a tuple (recursively)."""
    text = str(annotation)
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(value, tuple):
        inner = "float" if "float" in text else ""
        return tuple(canonical(v, inner) for v in value)
    if isinstance(value, int) and not isinstance(value, bool) and "float" in text and "int" not in text:
        return float(value)
    return value


def _kind_ok(v: Any, kind: str) -> bool:
    if kind == "str":
        return isinstance(v, str)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return True


def _base(annotation: str) -> str:
    return annotation.replace(" | None", "").replace("None | ", "").replace("Optional[", "").strip()


def _kind_words(base: str) -> str:
    return {"float": "a finite number", "int": "an integer", "str": "text", "bool": "true or false"}.get(base, f"a {base}")


def check_type(value: Any, annotation: str, method: str, name: str, *, extra: str = "",
               error: type[Exception] = ValueError) -> None:
    """A clear error when a value has the wrong kind for its field (``extra``: the allowed range,
    said in the same sentence)."""
    if value is None:
        if "None" in annotation:
            return
        raise error(f"`{method}` option `{name}` cannot be null.")
    base = _base(annotation)
    if base.startswith("tuple["):
        inner = [k.strip() for k in base[6:-1].split(",") if k.strip() and k.strip() != "..."]
        if not isinstance(value, tuple) or not all(_kind_ok(v, inner[0] if len(inner) == 1 else inner[min(i, len(inner) - 1)])
                                                   for i, v in enumerate(value)):
            plural = {"int": "integers", "float": "finite numbers", "str": "texts", "bool": "true/false values"}
            what = plural.get(inner[0], inner[0]) if inner else "values"
            raise error(f"`{method}` option `{name}` must be a list of {what}, got {value!r}.")
    elif base in ("str", "bool", "int", "float") and not _kind_ok(value, base):
        null = " or null" if "None" in annotation else ""
        raise error(f"`{method}` option `{name}` must be {_kind_words(base)}{extra}{null}, got {value!r}.")


def _method_label(config_or_cls: Any) -> str:
    cls = config_or_cls if isinstance(config_or_cls, type) else type(config_or_cls)
    return getattr(cls, "name", "") or cls.__name__


def check_options(config: Any, method: str | None = None, *, error: type[Exception] = ValueError) -> None:
    """Judge every field of ``config`` (a dataclass) from its type and :class:`Option`, storing
    each value in its one canonical spelling; the first bad one raises ``error`` naming
    ``method``, the option, the value and what is allowed."""
    method = method or _method_label(config)
    for f in dataclasses.fields(config):
        meta = option_of(f)
        annotation = str(f.type)
        value = canonical(getattr(config, f.name), annotation)
        if value is not getattr(config, f.name):
            object.__setattr__(config, f.name, value)
        rng = meta.range_text()
        check_type(value, annotation, method, f.name, extra=f" {rng}" if rng else "", error=error)
        if value is None:
            continue
        why = f" ({meta.why})" if meta.why else ""
        items = value if isinstance(value, tuple) else (value,)
        if isinstance(value, tuple) and len(value) < meta.min_items:
            raise error(f"`{method}` option `{f.name}` needs at least {meta.min_items} "
                        f"entr{'y' if meta.min_items == 1 else 'ies'}{why}, got {value!r}.")
        for i, v in enumerate(items):
            where = f"`{method}` option `{f.name}`" + (f" entry {i}" if isinstance(value, tuple) else "")
            if meta.nonblank and isinstance(v, str) and not v.strip():
                raise error(f"{where} must be non-empty text{why}, got {v!r}.")
            if meta.choices is not None and v not in meta.choices:
                raise error(f"{where} must be one of {list(meta.choices)}{why}, got {v!r}.")
            if rng and isinstance(v, (int, float)) and not isinstance(v, bool):
                lo, hi = meta.low, meta.high
                bad = (lo is not None and (v <= lo if meta.low_open else v < lo)) or \
                      (hi is not None and (v >= hi if meta.high_open else v > hi))
                if bad:
                    kind = "an integer " if _base(annotation) == "int" else ""
                    null = " or null" if "None" in annotation else ""
                    raise error(f"{where} must be {kind}{rng}{null}{why}, got {v!r}.")


# --------------------------------------------------------------------------------------------
# The one parser
# --------------------------------------------------------------------------------------------


def _from_text(text: str, f: dataclasses.Field, method: str, error: type[Exception]) -> Any:
    """A value typed from ``key=value`` text, by the field's default (or its annotation)."""
    default = f.default if f.default is not dataclasses.MISSING else None
    base = _base(str(f.type))
    try:
        if isinstance(default, bool) or base == "bool":
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        if isinstance(default, int) or (default is None and base == "int"):
            return int(text)
        if isinstance(default, float) or default is None and (base == "float" or
                                                              text.replace(".", "", 1).replace("e-", "").isdigit()):
            v = float(text)
            if not math.isfinite(v):
                raise ValueError(text)
            return v
        if isinstance(default, tuple) or base.startswith("tuple["):
            items = tuple(x.strip() for x in text.split(",") if x.strip())
            if (default and isinstance(default[0], int)) or base.startswith("tuple[int"):
                return tuple(int(x) for x in items)
            if (default and isinstance(default[0], float)) or base.startswith("tuple[float"):
                return tuple(float(x) for x in items)
            return items
    except ValueError:
        kind = type(default).__name__ if default is not None else base
        raise error(f"`{method}` option {f.name}={text!r} is not a valid {kind}.") from None
    return text


def pairs_from_text(items: Sequence[str], *, error: type[Exception] = ValueError) -> dict[str, str]:
    """``["a=1", "b=x"]`` (the command line's ``--set``) as ``{"a": "1", "b": "x"}``."""
    pairs = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise error(f"A setting is key=value, got {item!r}.")
        k, v = item.split("=", 1)
        pairs[k.strip()] = v.strip()
    return pairs


def config_from_options(cls: type, options: dict[str, Any] | Sequence[str] | None, *, kind: str = "method",
                        presets: dict[str, dict] | None = None, from_text: bool = False,
                        error: type[Exception] = ValueError) -> Any:
    """Build ``cls`` (a config dataclass) from options: a dict (a stack, a YAML file), or
    ``key=value`` text (whose values are then typed by the fields). ``preset`` picks one of
    ``presets`` first; the given options replace its values. Unknown options, a wrong kind of
    value and a value the schema refuses raise ``error`` before anything is built.

    The config records the preset it came from and the options given (not fields: neither the
    text form nor a hash changes) as ``_preset`` and ``_given``."""
    method = _method_label(cls)
    if options is None:
        options = {}
    if not isinstance(options, dict):
        options, from_text = pairs_from_text(options, error=error), True
    options = dict(options)
    base: dict[str, Any] = {}
    chosen = None
    if "preset" in options and presets is not None:
        chosen = options.pop("preset")
        if not isinstance(chosen, str) or chosen not in presets:
            raise error(f"Unknown preset {chosen!r} for {kind} `{method}`; choose one of {sorted(presets)}.")
        base = dict(presets[chosen])
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(options) - set(fields)
    if unknown:
        raise error(f"Unknown option(s) {sorted(unknown)} for {kind} `{method}`; known options: {sorted(fields)}.")
    if from_text:
        options = {k: _from_text(v, fields[k], method, error) if isinstance(v, str) and _base(str(fields[k].type)) != "str"
                   else v for k, v in options.items()}
    values = {k: canonical(v, fields[k].type) for k, v in {**base, **options}.items()}
    for k, v in values.items():
        check_type(v, str(fields[k].type), method, k, error=error)
    try:
        cfg = cls(**values)
    except TypeError as e:
        raise error(f"Bad option for {kind} `{method}`: {e}.") from None
    object.__setattr__(cfg, "_preset", chosen)
    object.__setattr__(cfg, "_given", frozenset(values))
    return cfg


# --------------------------------------------------------------------------------------------
# What the CLI and the docs print
# --------------------------------------------------------------------------------------------


def _docstring_help(cls: type) -> dict[str, str]:
    """``{option: first sentence}`` from the class docstring's ``Args:`` lines (``a / b: text``
    documents both), for fields declared without ``help``."""
    out: dict[str, str] = {}
    doc = cls.__doc__ or ""
    for m in re.finditer(r"^\s*([a-z_][a-z0-9_]*(?:\s*/\s*[a-z_][a-z0-9_]*)*):\s+(.+)$", doc, re.M):
        text = m.group(2).strip()
        for name in re.split(r"\s*/\s*", m.group(1)):
            out.setdefault(name, text)
    return out


def describe_options(cls: type) -> list[dict[str, Any]]:
    """One row per option of ``cls``: ``name``, ``type``, ``default``, ``allowed`` (range or
    choices, in words) and ``help``."""
    fallback = _docstring_help(cls)
    rows = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        meta = option_of(f)
        allowed = meta.range_text()
        if meta.choices is not None:
            allowed = "one of " + ", ".join(map(str, meta.choices))
        if meta.nonblank:
            allowed = (allowed + "; " if allowed else "") + "non-empty"
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        rows.append({"name": f.name, "type": str(f.type), "default": default, "allowed": allowed,
                     "help": meta.help or fallback.get(f.name, "")})
    return rows


def options_table(cls: type) -> str:
    """The options of ``cls`` as a Markdown table (what the docs' option tables are made of)."""
    lines = ["| option | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for r in describe_options(cls):
        cells = [f"`{r['name']}`", f"`{r['type']}`", f"`{r['default']!r}`", r["allowed"], r["help"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
