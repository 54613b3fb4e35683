"""Defense stacks: an ordered list of frozen defense configs, its text/file forms and its hash.

Text form (CLI)::

    negative_prompt(text="striped")+sld(preset=medium, concept=striped)

``name`` alone uses the defaults; values are JSON (numbers, ``true``, quoted strings, with JSON's
escapes: ``text="say \\"hi\\""``) or bare words; a list is written ``[a, b]``. The printed text
(:meth:`DefenseStack.to_string`) parses back to the same stack and hash. An entry that would do
nothing because it lacks what it needs (``delta`` without ``path``, ``uce`` without ``erase``) is
refused, naming it. File form (YAML, TOML or JSON)::

    defenses:
      - name: negative_prompt
        text: striped
      - {name: sld, preset: medium}

The **stack hash** covers every config, the base model's content hash and the content hash of
every artifact file a config names, so a retrained file at the same path never reuses results.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .defenses.base import STAGES, DefenseConfig, get_defense, known_defenses


def _parse_value(text: str) -> Any:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_parse_value(x) for x in _split_top(inner, ",")] if inner else []
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if len(text) >= 2 and text[0] == text[-1] == "'":
            return text[1:-1]
        return text


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside quotes, brackets and parentheses. Inside a double-quoted (JSON)
    string a backslash escapes the next character, so ``"a\\"b"`` is one value, as printed."""
    out, depth, quote, cur, escaped = [], 0, None, [], False
    for ch in text:
        if quote:
            cur.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quote or depth:
        raise ValueError(f"Unbalanced quotes or brackets in {text!r}.")
    out.append("".join(cur))
    return out


_ITEM = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.S)


def parse_stack_string(text: str) -> list[dict]:
    """``"a(x=1)+b"`` -> ``[{"name": "a", "x": 1}, {"name": "b"}]``."""
    items = []
    if not text.strip() or text.strip() == "none":
        return items
    for part in _split_top(text, "+"):
        m = _ITEM.match(part)
        if not m:
            raise ValueError(
                f"Cannot read defense {part.strip()!r}: write `name` or `name(key=value, ...)`, "
                f"for example `negative_prompt(text=\"striped\")`. Known defenses: {sorted(known_defenses())}."
            )
        opts: dict[str, Any] = {"name": m.group(1)}
        if m.group(2) and m.group(2).strip():
            for kv in _split_top(m.group(2), ","):
                if "=" not in kv:
                    raise ValueError(f"Option {kv.strip()!r} of defense `{m.group(1)}` needs the form key=value.")
                k, v = kv.split("=", 1)
                opts[k.strip()] = _parse_value(v)
        items.append(opts)
    return items


def _load_file(path: Path) -> list[dict]:
    if path.suffix not in {".yaml", ".yml", ".toml", ".json"}:
        raise ValueError(f"Stack file {path} must end in .yaml, .yml, .toml or .json.")
    if not path.is_file():
        raise ValueError(f"Stack file {path} is not a file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"Stack file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8.") from None
    try:
        if path.suffix in {".yaml", ".yml"}:
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - each parser has its own error type
        raise ValueError(f"Stack file {path} is not valid {path.suffix[1:].upper()}: {e}") from None
    if isinstance(data, dict):
        data = data.get("defenses", data.get("defense", []))
    if not isinstance(data, list):
        raise ValueError(f"Stack file {path} must hold a list `defenses:` of {{name: ..., options...}} entries.")
    return data


def _configured(cfg: DefenseConfig, index: int) -> DefenseConfig:
    """``cfg``, or a clear error when it lacks what it needs to do anything (a weight delta without
    its file, UCE without concepts): it would do nothing while the records say it ran."""
    why = cfg.unconfigured()
    if why:
        raise ValueError(f"Defense {index + 1} of the stack does nothing as given: {why} "
                         "(to run without it, leave it out of the stack).")
    return cfg


@dataclass(frozen=True)
class DefenseStack:
    """An ordered tuple of defense configs. Build one with :meth:`parse`.

    Example:
        >>> from safediff.stack import DefenseStack
        >>> stack = DefenseStack.parse('negative_prompt(text="striped")')
        >>> stack.to_string()
        'negative_prompt(text="striped")'
    """

    defenses: tuple[DefenseConfig, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "defenses", tuple(self.defenses))
        for d in self.defenses:
            if not isinstance(d, DefenseConfig):
                raise TypeError(f"A stack holds defense configs, got {type(d).__name__}.")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: "DefenseStack | str | Path | Iterable | None") -> "DefenseStack":
        """From a stack, a text form, a YAML/TOML/JSON file, a list of dicts or configs, or None."""
        if spec is None:
            return cls()
        if isinstance(spec, DefenseStack):
            return spec
        if isinstance(spec, DefenseConfig):
            return cls((spec,))
        if isinstance(spec, Path) or (isinstance(spec, str) and spec.endswith((".yaml", ".yml", ".toml", ".json"))):
            p = Path(spec)
            if not p.exists():
                raise FileNotFoundError(f"Stack file {p} does not exist.")
            items: list = _load_file(p)
        elif isinstance(spec, str):
            items = parse_stack_string(spec)
        else:
            items = list(spec)
        configs = []
        for it in items:
            if isinstance(it, DefenseConfig):
                configs.append(_configured(it, len(configs)))
                continue
            if not isinstance(it, dict) or "name" not in it:
                raise ValueError(f"Each defense needs a `name`, got {it!r}.")
            it = dict(it)
            name = it.pop("name")
            if not isinstance(name, str):
                raise ValueError(f"A defense name is text, got {name!r}.")
            dspec = get_defense(name)
            configs.append(_configured(dspec.config_cls.from_options(it), len(configs)))
        return cls(tuple(configs))

    # ---- views -------------------------------------------------------------------------
    def active(self) -> "DefenseStack":
        """The defenses that do something (zero-strength ones dropped)."""
        return DefenseStack(tuple(d for d in self.defenses if d.is_active()))

    def by_stage(self, stage: str) -> list[DefenseConfig]:
        if stage not in STAGES:
            raise ValueError(f"Unknown stage {stage!r}; stages are {list(STAGES)}.")
        return [d for d in self.defenses if get_defense(d.name).stage == stage]

    def to_list(self) -> list[dict]:
        return [d.to_dict() for d in self.defenses]

    def to_string(self) -> str:
        if not self.defenses:
            return "none"
        parts = []
        for d in self.defenses:
            cls = type(d)
            defaults = cls()  # every config has defaults
            opts = {k: v for k, v in d.to_dict().items() if k != "name" and getattr(defaults, k) != v}
            if opts:
                inner = ", ".join(f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in opts.items())
                parts.append(f"{d.name}({inner})")
            else:
                parts.append(d.name)
        return "+".join(parts)

    def __bool__(self) -> bool:
        return bool(self.defenses)

    # ---- hashing -----------------------------------------------------------------------
    def artifact_hashes(self) -> dict[str, str]:
        from .models import hash_files

        out = {}
        for d in self.defenses:
            for p in d.artifact_paths():
                path = Path(p)
                if not path.exists():
                    raise FileNotFoundError(f"Defense `{d.name}` names artifact {path}, which does not exist.")
                files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
                out[str(p)] = hash_files(files, root=path if path.is_dir() else None)
        return out

    def hash(self, base_model_hash: str) -> str:
        """Stable hash of (configs, base model content, artifact contents); keys every result."""
        payload = {
            "defenses": self.active().to_list(),
            "base_model": base_model_hash,
            "artifacts": sorted(self.active().artifact_hashes().values()),
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
