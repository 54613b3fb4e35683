"""``safediff serve``: a local web page to see a defense act, without writing code (issue 21, part 2).

Type a prompt, build a stack (pick defenses from the menu, edit strengths and artifact paths in the
stack text), and see the same seeds with and without it side by side, with what each stage
decided: the prompt guard's verdict, the output filter's flags, the Embedding Sanitizer's
per-token attribution, the testbed's exact detectors (on the testbed), the stack hash, and the
stack file to download. The shipped testbed is the default model; any supported model loads by
path on the page or with ``--model``.

The page is built with Gradio (the ``serve`` extra: ``pip install "safediff[serve]"``). Everything
it shows comes from :class:`DemoSession`, which does not need Gradio (its behaviour is tested
without a browser). Bad input -- a stack that does not parse, a model that cannot be loaded, an
empty prompt, a prompt the guard refuses -- is shown on the page, which keeps working.

The page is safe to show to others (issue 31): it takes stack *text* only (never a server path to
a stack file); every model and artifact file must lie inside a directory the operator allowed at
start (``--allow-dir``), and a refusal never says whether a file exists; error messages never
echo file content nor server paths outside those directories. The operator bounds each request
(steps, images, seconds), runs several workers, and caps the models kept loaded. See docs/serve.md.

Example::

    safediff serve                         # http://127.0.0.1:7860, the testbed
    safediff serve --model path/to/sd-v1-4 --port 8000 --allow-dir runs --max-steps 30
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .defenses.sanitizer import EmbeddingSanitizer, explain
from .encoding import validate_prompts
from .models import SHIPPED_TESTBEDS, Model, load_model
from .pipeline import SafePipeline
from .stack import DefenseStack, parse_stack_string
from .worlds import world_of

#: the "add a defense" menu: label -> stack text inserted (``{concept}`` is the model's demo concept)
class _DefenseMenu(Mapping):
    """The "Add a defense" entries, ``{label: stack text}`` with ``{concept}`` and ``{detector}``
    to fill in: every registered defense config's ``menu`` (:class:`~safediff.defenses.base.DefenseConfig`),
    in registration order, read when used (so a defense registered later is offered too)."""

    def _entries(self) -> dict[str, str]:
        from .defenses.base import known_defenses

        out: dict[str, str] = {}
        for spec in known_defenses().values():
            for label, text in vars(spec.config_cls).get("menu", {}).items():
                out.setdefault(label, text)
        return out

    def __getitem__(self, label: str) -> str:
        return self._entries()[label]

    def __iter__(self):
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())


#: the serve page's "Add a defense" menu, ``{label: stack text}`` (from the defenses' registrations)
DEFENSE_MENU: Mapping[str, str] = _DefenseMenu()


def demo_concept(model) -> tuple[str, str]:
    """The concept word and output-filter detector the menu fills in: the default concept of the
    model's world and its detector (the testbed's ``striped``), else nudity."""
    w = world_of(model)
    return (w.default_concept, w.detector_spec(w.default_concept)) if w.default_concept else ("nudity", "nudenet")


def default_stack(model) -> str:
    """What the page starts with: the model's world's stack (on the testbed: UCE on both its concepts,
    no trained file needed), else a negative prompt."""
    return world_of(model).default_stack or 'negative_prompt(text="nudity")'


class RequestStopped(Exception):
    """A request stopped between two denoising steps: over its time limit, or cancelled."""


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; checked before any work. The defaults keep a request on the
    testbed well under a second and one on SD 1.x on a CPU around a minute, where ``max_seconds``
    stops it (``safediff serve --max-steps/--max-images/--max-seconds``)."""

    max_steps: int = 50
    max_images: int = 4
    max_seconds: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_images"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a whole number >= 1, got {getattr(self, name)!r}.")
        if not self.max_seconds > 0:
            raise ValueError(f"`max_seconds` must be > 0, got {self.max_seconds!r}.")

    def check(self, num_images: int, steps: int) -> None:
        """Raise ``ValueError`` (saying which limit and what to ask for) when a request is over one."""
        if not 1 <= num_images <= self.max_images:
            raise ValueError(f"Images per side must be between 1 and {self.max_images} (the server's limit), "
                             f"got {num_images}.")
        if not 1 <= steps <= self.max_steps:
            raise ValueError(f"Steps must be between 1 and {self.max_steps} (the server's limit), got {steps}; "
                             "set Steps to a number in that range.")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ABS_PATH = re.compile(r"(?<![\w.~:/\\-])(?:[A-Za-z]:)?[/\\][^\s'\"`,;:()\[\]{}]+")


class AccessPolicy:
    """Which models and artifact files a visitor of the page may name.

    Args:
        allow_dirs: directories whose files may be used (symlinks resolved; default: the shipped
            testbed model and ``./runs``).
        allow_models: model names accepted as they are (hub ids, or the served model's name).
        allow_hub: accept any Hugging Face hub id for the model and the safety-checker detector.
    """

    def __init__(self, allow_dirs: Iterable[str | os.PathLike] | None = None, allow_models: Iterable[str] = (),
                 allow_hub: bool = False):
        dirs = [*(path for path, _ in SHIPPED_TESTBEDS.values()), Path("runs")] if allow_dirs is None else list(allow_dirs)
        self.allow_dirs = tuple(Path(os.path.realpath(os.path.expanduser(d))) for d in dirs)
        self.allow_models = frozenset(str(m) for m in allow_models) | set(SHIPPED_TESTBEDS)
        self.allow_hub = bool(allow_hub)

    def _inside(self, value: str) -> bool:
        # both spellings a loader might open: as written (relative to the working directory) and with ~ expanded
        for cand in {os.path.realpath(value), os.path.realpath(os.path.expanduser(value))}:
            if not any(Path(cand).is_relative_to(d) for d in self.allow_dirs):
                return False
        return True

    def _refusal(self, what: str, value: str) -> PermissionError:
        hub = " or a hub id" if self.allow_hub else ""
        return PermissionError(f"{what} {value!r} is not inside a directory this server allows "
                               f"({', '.join(map(str, self.allow_dirs)) or 'none'}){hub}; put the file there, "
                               "or ask the operator to start `safediff serve` with --allow-dir.")

    def check_model(self, value: str, what: str = "Model") -> None:
        """Raise ``PermissionError`` unless ``value`` is an allowed name, a folder inside an allowed
        directory, or (with ``allow_hub``) a hub id that is not a local path. The message is the same
        whether or not the path exists."""
        if value in self.allow_models or self._inside(value):
            return
        if self.allow_hub and _HUB_ID.match(value) and ".." not in value and not os.path.lexists(value):
            return
        raise self._refusal(what, value)

    def check_stack(self, stack) -> None:
        """Raise ``PermissionError`` for any artifact file of ``stack`` outside the allowed
        directories, and for a safety-checker or VLM-judge detector the model rules would refuse."""
        for cfg in stack.defenses:
            for p in cfg.artifact_paths():
                if not self._inside(str(p)):
                    raise self._refusal(f"Defense `{cfg.name}`: file", str(p))
            detector = getattr(cfg, "detector", "") or ""
            name, _, arg = detector.partition(":")
            if name == "sd-safety-checker":
                self.check_model(arg or "CompVis/stable-diffusion-safety-checker", f"Defense `{cfg.name}`: detector")
            if name == "vlm":  # a judge model is loaded like any model: same rules
                from .vlm_judge import split_vlm_spec

                self.check_model(split_vlm_spec(arg)[0], f"Defense `{cfg.name}`: detector")

    def sanitise(self, message: str, limit: int = 500) -> str:
        """``message`` with every absolute path outside the allowed directories replaced by
        ``<server path>``, cut to ``limit`` characters."""
        def hide(m: re.Match) -> str:
            return m.group(0) if self._inside(m.group(0)) else "<server path>"
        out = _ABS_PATH.sub(hide, message)
        return out if len(out) <= limit else out[: limit - 3] + "..."


def stack_text_from_upload(filename: str, data: bytes) -> str:
    """An uploaded YAML/TOML/JSON stack file, parsed in memory, as stack text for the page."""
    import tomllib

    import yaml

    suffix = Path(filename or "").suffix.lower()
    if suffix not in {".yaml", ".yml", ".toml", ".json"}:
        raise ValueError(f"A stack file must end in .yaml, .yml, .toml or .json, got {Path(filename or '').name!r}.")
    if len(data) > 64_000:
        raise ValueError("A stack file is at most 64 kB.")
    try:
        text = data.decode("utf-8")
        parsed = (yaml.safe_load(text) if suffix in {".yaml", ".yml"} else
                  tomllib.loads(text) if suffix == ".toml" else json.loads(text))
    except Exception as e:  # noqa: BLE001 - each parser has its own error type
        raise ValueError(f"The uploaded file is not valid {suffix[1:].upper()} ({type(e).__name__}).") from None
    if isinstance(parsed, dict):
        parsed = parsed.get("defenses", parsed.get("defense"))
    if not isinstance(parsed, list) or not all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in parsed):
        raise ValueError("A stack file holds a list `defenses:` of {name: ..., options...} entries.")
    return DefenseStack.parse(parsed).to_string()


def parse_stack_text(text: str | None, max_chars: int = 4000):
    """Stack *text* (``a(x=1)+b``) to a :class:`~safediff.stack.DefenseStack`; never opens a file,
    whatever the text looks like."""
    text = (text or "").strip()
    if len(text) > max_chars:
        raise ValueError(f"The stack text is {len(text)} characters; at most {max_chars}.")
    return DefenseStack.parse(parse_stack_string(text))


class _ModelPool:
    """Loaded models: at most ``max_models`` distinct ones (the least recently used is evicted, the
    served default never), each with up to ``replicas`` copies so that concurrent requests never share
    one (a stack's weight edits are applied in place). A caller beyond ``replicas`` waits."""

    def __init__(self, max_models: int, replicas: int, loader: Callable[[str], Any]):
        if max_models < 1 or replicas < 1:
            raise ValueError(f"`max_models` and `workers` must be >= 1, got {max_models} and {replicas}.")
        self.max_models, self.replicas, self.loader = max_models, replicas, loader
        self.pinned: str | None = None
        self._entries: OrderedDict[str, dict] = OrderedDict()  # key -> {"idle": [...], "total": n}
        self._cond = threading.Condition()

    def add(self, key: str, copies: list, pinned: bool = False) -> None:
        with self._cond:
            self._entries[key] = {"idle": list(copies), "total": len(copies), "first": copies[0]}
            if pinned:
                self.pinned = key

    def loaded(self) -> list[str]:
        """The keys held, least recently used first."""
        with self._cond:
            return list(self._entries)

    def peek(self, key: str):
        """A loaded copy of ``key`` to read its attributes (not to generate with), or None."""
        with self._cond:
            e = self._entries.get(key)
            return e["first"] if e and "first" in e else (e["idle"][0] if e and e["idle"] else None)

    def acquire(self, key: str):
        with self._cond:
            while True:
                e = self._entries.get(key)
                if e is None:
                    e = self._entries[key] = {"idle": [], "total": 0}
                    self._evict(keep=key)
                self._entries.move_to_end(key)
                if e["idle"]:
                    return e["idle"].pop()
                if e["total"] < self.replicas:
                    e["total"] += 1
                    break
                self._cond.wait()
        try:
            m = self.loader(key)  # outside the lock: other models keep serving while this one loads
        except BaseException:
            with self._cond:
                e["total"] -= 1
                if e["total"] == 0 and not e["idle"] and self._entries.get(key) is e:
                    del self._entries[key]
                self._cond.notify_all()
            raise
        e.setdefault("first", m)
        return m

    def release(self, key: str, model) -> None:
        with self._cond:
            e = self._entries.get(key)
            if e is not None:  # an evicted model's copies are dropped here, freeing their memory
                e["idle"].append(model)
            self._cond.notify_all()

    def _evict(self, keep: str) -> None:
        while len(self._entries) > self.max_models:
            victim = next((k for k in self._entries if k not in (self.pinned, keep)), None)
            if victim is None:
                return
            del self._entries[victim]


@dataclass
class Comparison:
    """What one click shows. ``error`` is set (and the rest empty) when the input was bad."""

    prompt: str = ""
    stack: str = ""
    stack_hash: str = ""
    undefended: list = field(default_factory=list)   # PIL images
    defended: list = field(default_factory=list)     # PIL images, or None where refused
    notes: list[str] = field(default_factory=list)   # one line per stage decision
    token_scores: list[tuple[str, float]] | None = None
    detections: list[dict] | None = None             # testbed: per image pair, the exact detector's concepts
    stack_file: str | None = None
    seconds: float = 0.0
    error: str | None = None

    def summary_markdown(self) -> str:
        if self.error:
            return f"**Could not run:** {self.error}"
        lines = [f"**Stack** `{self.stack}` &nbsp; **hash** `{self.stack_hash}` &nbsp; ({self.seconds:.1f} s)"]
        lines += [f"- {n}" for n in self.notes] or ["- no stage refused, flagged or changed the prompt"]
        if self.detections is not None:
            lines.append("")
            lines.append("| image | no defense | defended |")
            lines.append("|---|---|---|")
            for i, d in enumerate(self.detections):
                lines.append(f"| {i} | {', '.join(d['undefended']) or 'no concept'} | "
                             f"{', '.join(d['defended']) if d['defended'] is not None else 'refused'} |")
        return "\n".join(lines)


class DemoSession:
    """Loads models and runs comparisons; the page calls :meth:`compare`, from several threads at once.

    Args:
        model: a folder or hub id, ``None`` / ``"testbed"`` for the shipped testbed, or a loaded
            :class:`~safediff.models.Model`. The operator's choice: always served, whatever the policy.
        out_dir: where stack files for download are written (default: a temporary folder).
        policy: which models and artifact files visitors may name (default: :class:`AccessPolicy`'s).
        limits: what one request may ask for (default: :class:`ServeLimits`'s).
        max_models: distinct models kept loaded; the least recently used is evicted, the served one never.
        workers: requests run at the same time (each on its own copy of the model).
        device, dtype: passed to :func:`~safediff.models.load_model` when given.
    """

    def __init__(self, model=None, out_dir: str | Path | None = None, *, policy: AccessPolicy | None = None,
                 limits: ServeLimits | None = None, max_models: int = 2, workers: int = 1,
                 device: str | None = None, dtype: Any = None):
        self.policy = policy or AccessPolicy()
        self.limits = limits or ServeLimits()
        self.workers = int(workers)
        self._load_kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self._pool = _ModelPool(max_models, self.workers, self._load)
        m = model if isinstance(model, Model) else self._load(model)  # a model it cannot run fails here, at start
        self.default_model = m.source
        # the served model's copies are made now, unedited (it may have been loaded with options a
        # reload would not repeat, e.g. a single checkpoint file); visitors' models load on demand
        self._pool.add(m.source, [m] + [copy.deepcopy(m) for _ in range(self.workers - 1)], pinned=True)
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="safediff-serve-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._cancels: dict[str, threading.Event] = {}
        self._cancels_lock = threading.Lock()

    def _load(self, key):
        return load_model(None if key in (None, "testbed") else key, **self._load_kw)

    def model(self, path: str | None = None):
        """A loaded copy of the served model (``path`` empty) or of ``path`` (checked against the
        policy), to read its family and defaults; :meth:`compare` runs on a copy of its own."""
        key = self._model_key(path)
        m = self._pool.peek(key)
        if m is None:
            m = self._pool.acquire(key)
            self._pool.release(key, m)
        return m

    def loaded_models(self) -> list[str]:
        """The models held in memory, least recently used first."""
        return self._pool.loaded()

    def _model_key(self, path: str | None) -> str:
        key = (path or "").strip() or self.default_model
        if key != self.default_model:
            self.policy.check_model(key)
            if key not in self.policy.allow_models and os.path.isdir(key):  # inside an allowed directory
                key = os.path.realpath(key)  # one copy per folder, however it is spelled
        return key

    def running(self) -> list[str]:
        """The ids of the requests running now (those :meth:`cancel` can stop)."""
        with self._cancels_lock:
            return list(self._cancels)

    def cancel(self, request_id: str) -> bool:
        """Stop the request ``request_id`` at its next denoising step; False when none is running."""
        with self._cancels_lock:
            ev = self._cancels.get(request_id)
        if ev is not None:
            ev.set()
        return ev is not None

    def compare(self, prompt: str, stack_text: str, *, model_path: str | None = None, seed: int = 0,
                num_images: int = 2, steps: int | None = None, guidance_scale: float | None = None,
                progress: Callable[[float, str], None] | None = None, request_id: str | None = None) -> Comparison:
        """The prompt's images without and with the stack, same seeds. Never raises for bad input:
        the returned :class:`Comparison` carries the message instead (never file content, never a
        server path outside the allowed directories). A request over ``limits.max_seconds`` or
        cancelled with :meth:`cancel` stops at its next denoising step and frees its worker."""
        t0 = time.time()
        stop = threading.Event()
        if request_id is not None:
            with self._cancels_lock:
                self._cancels[request_id] = stop
        key = m = None
        try:
            try:
                # cheap checks first: prompt, stack text, numbers, access, model, steps
                prompt = validate_prompts(prompt)[0]
                stack = parse_stack_text(stack_text)
                if isinstance(num_images, bool) or not float(num_images).is_integer():
                    raise ValueError(f"Images per side must be a whole number, got {num_images!r}.")
                num_images = int(num_images)
                self.limits.check(num_images, int(steps) if steps else 1)
                key = self._model_key(model_path)
                self.policy.check_stack(stack)
                m = self._pool.acquire(key)
                steps = int(steps) if steps else m.default_steps
                self.limits.check(num_images, steps)
            except Exception as e:  # noqa: BLE001 - shown on the page
                return Comparison(prompt=str(prompt), stack=str(stack_text)[:200],
                                  error=self.policy.sanitise(f"{type(e).__name__}: {e}"))
            res = Comparison(prompt=prompt)
            deadline = time.time() + self.limits.max_seconds  # from now: waiting for a free copy does not count
            try:
                kw = dict(seed=int(seed), num_images_per_prompt=num_images, num_inference_steps=steps,
                          guidance_scale=guidance_scale)

                def bar(half: int, label: str):  # no defense: the first half of the page's bar; defended: the second
                    return _HalfBar(progress, half, num_images, label, stop, deadline)

                with SafePipeline(m, DefenseStack()) as plain:
                    base = plain([prompt], progress=bar(0, "no defense"), **kw)
                with SafePipeline(m, stack) as pipe:
                    res.stack, res.stack_hash = stack.to_string(), pipe.stack_hash
                    out = pipe([prompt], progress=bar(1, "defended"), **kw)
                    res.token_scores = _sanitizer_scores(pipe, prompt)
                self._describe(res, m, base, out)
                path = self.out_dir / f"stack-{res.stack_hash}.json"
                path.write_text(json.dumps(stack.to_list(), indent=2))
                res.stack_file = str(path)
            except RequestStopped as e:
                return Comparison(prompt=prompt, stack=res.stack or str(stack_text)[:200], error=str(e))
            except Exception as e:  # noqa: BLE001 - e.g. an artifact made for another model: shown, page keeps working
                return Comparison(prompt=prompt, stack=res.stack or str(stack_text)[:200],
                                  error=self.policy.sanitise(f"{type(e).__name__}: {e}"))
            res.seconds = time.time() - t0
            return res
        finally:
            if m is not None:
                self._pool.release(key, m)
            if request_id is not None:
                with self._cancels_lock:
                    if self._cancels.get(request_id) is stop:
                        del self._cancels[request_id]

    @staticmethod
    def _describe(res: Comparison, m, base, out) -> None:
        """Fill in the images, one note per stage decision and (on the testbed) the detections."""
        res.undefended = [r.image for r in base.records]
        res.defended = [r.image for r in out.records]
        for r in out.records:
            if r.refused:
                res.notes.append(f"image {r.image_index}: refused by the prompt filter ({r.refusal_reason})")
            elif r.flagged:
                scores = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r.output_scores.items()))
                res.notes.append(f"image {r.image_index}: flagged by the output filter ({r.refusal_reason}"
                                 f"{'; ' + scores if scores else ''})")
        if res.token_scores:
            top = max(res.token_scores, key=lambda p: p[1])
            res.notes.append(f"Embedding Sanitizer: the token it changes most is {top[0]!r}")
        w = world_of(m)
        if w.exact_detector:
            def det(img):
                return sorted(w.concepts_in(np.asarray(img))) if img is not None else None
            res.detections = [{"undefended": det(a), "defended": det(b)} for a, b in zip(res.undefended, res.defended)]


class _HalfBar:
    """A tqdm-like bar the pipeline advances by images (a step at a time), reported to the page as
    a fraction: half ``half`` (0 or 1) of the two generations one click makes. Each step also checks
    the request's cancel flag and deadline, and raises :class:`RequestStopped` past either."""

    def __init__(self, progress: Callable[[float, str], None] | None, half: int, num_images: int, label: str,
                 stop: threading.Event | None = None, deadline: float | None = None):
        self.progress, self.half, self.num_images, self.label = progress, half, num_images, label
        self.stop, self.deadline = stop, deadline
        self.n = 0.0
        self._check()

    def _check(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise RequestStopped("Cancelled; the worker is free again.")
        if self.deadline is not None and time.time() > self.deadline:
            raise RequestStopped("Stopped: over this server's time limit per request; ask for fewer steps or "
                                 "images (the operator sets the limit with --max-seconds).")

    def update(self, k: float) -> None:
        self.n += k
        self._check()
        if self.progress is not None:
            self.progress((self.half + min(self.n / self.num_images, 1.0)) / 2, self.label)

    def refresh(self) -> None:
        pass


def _sanitizer_scores(pipe, prompt: str) -> list[tuple[str, float]] | None:
    for d in pipe.defenses["embedding"]:
        if isinstance(d, EmbeddingSanitizer):
            return explain(pipe.model, d.net, prompt)
    return None


def build_app(session: DemoSession):
    """The Gradio page over ``session`` (``pip install "safediff[serve]"``)."""
    try:
        import gradio as gr
    except ImportError:
        raise ImportError('`safediff serve` needs Gradio: pip install "safediff[serve]"') from None

    m = session.model()
    concept, detector = demo_concept(m)
    first_prompt = world_of(m).example_prompt or "a photo of a person at the beach"

    def add_defense(current: str, label: str) -> str:
        if not label:
            return current
        piece = DEFENSE_MENU[label].format(concept=concept, detector=detector)
        return piece if not (current or "").strip() or current.strip() == "none" else f"{current.strip()}+{piece}"

    def run(prompt, stack_text, model_path, seed, num_images, steps, guidance, request: gr.Request,
            progress=gr.Progress()):
        res = session.compare(prompt, stack_text, model_path=model_path, seed=int(seed), num_images=int(num_images),
                              steps=int(steps) if steps else None, guidance_scale=float(guidance) if guidance else None,
                              progress=lambda f, label: progress(f, desc=label),
                              request_id=getattr(request, "session_hash", None))
        generated = [i for i in res.defended if i is not None]  # refused images have none
        tokens = [(t, float(s)) for t, s in res.token_scores] if res.token_scores else []
        return (res.undefended, generated, res.summary_markdown(), tokens, res.stack_file)

    def stop(request: gr.Request):
        session.cancel(getattr(request, "session_hash", None) or "")

    def upload(current: str, path: str | None):
        if not path:
            return current, ""
        try:
            return stack_text_from_upload(path, Path(path).read_bytes()), ""
        except Exception as e:  # noqa: BLE001 - shown on the page
            return current, f"**Could not load the stack file:** {session.policy.sanitise(f'{type(e).__name__}: {e}')}"

    for fn in (run, stop):  # this module's annotations are strings; Gradio injects the request by its type
        fn.__annotations__["request"] = gr.Request
    lim = session.limits
    with gr.Blocks(title="safediff") as app:
        gr.Markdown(f"# safediff: see a defense act\nModel: `{session.default_model}` ({m.family}). The same seeds "
                    "are drawn without and with the stack.")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value=first_prompt, scale=3)
            model_path = gr.Textbox(label="Model (a folder in the server's allowed directories; empty: the one served)",
                                    value="", scale=2)
        with gr.Row():
            stack_text = gr.Textbox(label="Stack (defenses joined by +; edit strengths and paths here)",
                                    value=default_stack(m), scale=3)
            menu = gr.Dropdown(choices=list(DEFENSE_MENU), label="Add a defense", value=None, scale=2)
            upload_btn = gr.UploadButton("Load a stack file", file_types=[".yaml", ".yml", ".toml", ".json"],
                                         type="filepath", scale=1)
        with gr.Row():
            seed = gr.Number(label="Seed", value=0, precision=0)
            num_images = gr.Slider(1, lim.max_images, value=min(2, lim.max_images), step=1, label="Images per side")
            steps = gr.Number(label=f"Steps (0: the model's; at most {lim.max_steps})", value=0, precision=0)
            guidance = gr.Number(label="Guidance scale (0: the model's)", value=0)
        with gr.Row():
            go = gr.Button("Generate", variant="primary", scale=3)
            cancel = gr.Button("Cancel", scale=1)
        gr.Markdown(f"Each request: at most {lim.max_images} images per side, {lim.max_steps} steps and "
                    f"{lim.max_seconds:g} s; {session.workers} run at a time, the others wait in line.")
        with gr.Row():
            left = gr.Gallery(label="No defense", columns=4)
            right = gr.Gallery(label="With the stack", columns=4)
        summary = gr.Markdown()
        tokens = gr.HighlightedText(label="Embedding Sanitizer: per-token attribution (when the stack has one)")
        stack_file = gr.File(label="Stack file (load it with --defense FILE)")
        menu.change(add_defense, [stack_text, menu], stack_text)
        upload_btn.upload(upload, [stack_text, upload_btn], [stack_text, summary], api_name=False)
        event = go.click(run, [prompt, stack_text, model_path, seed, num_images, steps, guidance],
                         [left, right, summary, tokens, stack_file], api_name="compare",
                         concurrency_limit=session.workers)
        # frees the worker (the request stops at its next step) and the visitor's place in the line
        cancel.click(stop, None, None, cancels=[event], queue=False, api_name=False)
    return app


def read_auth_file(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``user:password`` lines (blank lines and ``#`` comments skipped) for the page's login."""
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{path}, line {n}: write `user:password`.")
        pairs.append((user, password))
    if not pairs:
        raise ValueError(f"{path} holds no `user:password` line.")
    return pairs


def serve(model=None, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True,
          allow_dirs: Iterable[str | os.PathLike] | None = None, allow_models: Iterable[str] = (),
          allow_hub: bool = False, limits: ServeLimits | None = None, workers: int = 2, max_models: int = 2,
          auth: list[tuple[str, str]] | None = None, device: str | None = None, dtype: Any = None):
    """Load ``model`` and serve the page; returns the Gradio app (running in the background when
    ``block`` is False). ``allow_dirs`` / ``allow_models`` / ``allow_hub``: see :class:`AccessPolicy`;
    ``limits``, ``workers``, ``max_models``, ``device``, ``dtype``: see :class:`DemoSession`; ``auth``:
    the logins the page asks for (None: no login)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local tool: no usage reports unless asked for
    policy = AccessPolicy(allow_dirs, allow_models, allow_hub)
    session = DemoSession(model, policy=policy, limits=limits, workers=workers, max_models=max_models,
                          device=device, dtype=dtype)
    app = build_app(session)
    # quiet: none of Gradio's own hints (its "set share=True" line among them); one line of ours instead
    _, local_url, share_url = app.queue().launch(server_name=host, server_port=port, share=share, auth=auth,
                                                 prevent_thread_lock=True, quiet=True)
    where = ("reachable from other machines" if host not in ("127.0.0.1", "localhost", "::1")
             else "this machine only; --host 0.0.0.0 exposes it to your network")
    print(f"safediff serve: {local_url} ({where}"
          + (f"; public link {share_url}" if share_url else "") + "; see docs/serve.md)", flush=True)
    if block:
        app.block_thread()
    return app
