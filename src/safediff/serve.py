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

Example::

    safediff serve                         # http://127.0.0.1:7860, the testbed
    safediff serve --model path/to/sd-v1-4 --port 8000
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

#: the "add a defense" menu: label -> stack text inserted (``{concept}`` is the model's demo concept)
DEFENSE_MENU = {
    "negative prompt": 'negative_prompt(text="{concept}")',
    "SLD (medium)": 'sld(preset=medium, concept="{concept}")',
    "SLD (max)": 'sld(preset=max, concept="{concept}")',
    "SAFREE + self-validating filter": 'safree(space=["{concept}"])+safree_svf',
    "UCE (closed-form edit)": 'uce(erase=["{concept}"])',
    "prompt guard": 'prompt_guard(concepts=["{concept}"])',
    "output filter": 'output_filter(detector="{detector}")',
    "Embedding Sanitizer (trained file)": 'sanitizer(path="PATH/TO/sanitizer.safetensors", strength=1.0)',
    "ESD / DUO / Dark Miner delta (trained file)": 'esd(path="PATH/TO/delta.safetensors")',
}


def demo_concept(model) -> tuple[str, str]:
    """The concept word and output-filter detector the menu fills in: the testbed's ``striped``,
    or nudity on a real model."""
    return ("striped", "testbed:striped") if model.is_testbed else ("nudity", "nudenet")


def default_stack(model) -> str:
    """What the page starts with: UCE on both testbed concepts (no trained file needed), or a
    negative prompt on a real model."""
    return "uce(preset=testbed-all)" if model.is_testbed else 'negative_prompt(text="nudity")'


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
    """Loads models (cached by path) and runs comparisons; the page calls :meth:`compare`.

    Args:
        model: a folder or hub id, ``None`` / ``"testbed"`` for the shipped testbed, or a loaded
            :class:`~safediff.models.Model`.
        out_dir: where stack files for download are written (default: a temporary folder).
    """

    def __init__(self, model=None, out_dir: str | Path | None = None):
        from .models import Model, load_model

        self._models: dict[str, Any] = {}
        m = model if isinstance(model, Model) else load_model(model)  # a model it cannot run fails here, at start
        self.default_model = m.source
        self._models[m.source] = m
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="safediff-serve-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def model(self, path: str | None = None):
        from .models import load_model

        key = (path or "").strip() or self.default_model
        if key not in self._models:
            self._models[key] = load_model(None if key == "testbed" else key)
        return self._models[key]

    def compare(self, prompt: str, stack_text: str, *, model_path: str | None = None, seed: int = 0,
                num_images: int = 2, steps: int | None = None, guidance_scale: float | None = None,
                progress: Callable[[float, str], None] | None = None) -> Comparison:
        """The prompt's images without and with the stack, same seeds. Never raises for bad input:
        the returned :class:`Comparison` carries the message instead."""
        from .encoding import validate_prompts
        from .pipeline import SafePipeline
        from .stack import DefenseStack

        t0 = time.time()
        try:
            # cheap checks first: prompt, stack text, numbers, model
            prompt = validate_prompts(prompt)[0]
            stack = DefenseStack.parse((stack_text or "").strip() or None)
            if not 1 <= int(num_images) <= 8:
                raise ValueError(f"Images per side must be between 1 and 8, got {num_images}.")
            m = self.model(model_path)
        except Exception as e:  # noqa: BLE001 - shown on the page
            return Comparison(prompt=str(prompt), stack=str(stack_text), error=f"{type(e).__name__}: {e}")
        res = Comparison(prompt=prompt)
        try:
            kw = dict(seed=int(seed), num_images_per_prompt=int(num_images), num_inference_steps=steps,
                      guidance_scale=guidance_scale)

            def bar(half: int, label: str):  # no defense: the first half of the page's bar; defended: the second
                return False if progress is None else _HalfBar(progress, half, int(num_images), label)

            with SafePipeline(m, DefenseStack()) as plain:
                base = plain([prompt], progress=bar(0, "no defense"), **kw)
            with SafePipeline(m, stack) as pipe:
                res.stack, res.stack_hash = stack.to_string(), pipe.stack_hash
                out = pipe([prompt], progress=bar(1, "defended"), **kw)
                res.token_scores = _sanitizer_scores(pipe, prompt)
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
            if m.is_testbed:
                from .testbed import world

                def det(img):
                    return sorted(world.detect(np.asarray(img)).concepts) if img is not None else None
                res.detections = [{"undefended": det(a), "defended": det(b)} for a, b in zip(res.undefended, res.defended)]
            path = self.out_dir / f"stack-{res.stack_hash}.json"
            path.write_text(json.dumps(stack.to_list(), indent=2))
            res.stack_file = str(path)
        except Exception as e:  # noqa: BLE001 - e.g. an artifact made for another model: shown, page keeps working
            return Comparison(prompt=prompt, stack=res.stack or str(stack_text), error=f"{type(e).__name__}: {e}")
        res.seconds = time.time() - t0
        return res


class _HalfBar:
    """A tqdm-like bar the pipeline advances by images (a step at a time), reported to the page as
    a fraction: half ``half`` (0 or 1) of the two generations one click makes."""

    def __init__(self, progress: Callable[[float, str], None], half: int, num_images: int, label: str):
        self.progress, self.half, self.num_images, self.label = progress, half, num_images, label
        self.n = 0.0

    def update(self, k: float) -> None:
        self.n += k
        self.progress((self.half + min(self.n / self.num_images, 1.0)) / 2, self.label)

    def refresh(self) -> None:
        pass


def _sanitizer_scores(pipe, prompt: str) -> list[tuple[str, float]] | None:
    from .defenses.sanitizer import EmbeddingSanitizer, explain

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
    first_prompt = ("a striped blue square on gray background" if m.is_testbed else "a photo of a person at the beach")

    def add_defense(current: str, label: str) -> str:
        if not label:
            return current
        piece = DEFENSE_MENU[label].format(concept=concept, detector=detector)
        return piece if not (current or "").strip() or current.strip() == "none" else f"{current.strip()}+{piece}"

    def run(prompt, stack_text, model_path, seed, num_images, steps, guidance, progress=gr.Progress()):
        res = session.compare(prompt, stack_text, model_path=model_path, seed=int(seed), num_images=int(num_images),
                              steps=int(steps) if steps else None, guidance_scale=float(guidance) if guidance else None,
                              progress=lambda f, label: progress(f, desc=label))
        generated = [i for i in res.defended if i is not None]  # refused images have none
        tokens = [(t, float(s)) for t, s in res.token_scores] if res.token_scores else []
        return (res.undefended, generated, res.summary_markdown(), tokens, res.stack_file)

    with gr.Blocks(title="safediff") as app:
        gr.Markdown(f"# safediff: see a defense act\nModel: `{session.default_model}` ({m.family}). The same seeds "
                    "are drawn without and with the stack.")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value=first_prompt, scale=3)
            model_path = gr.Textbox(label="Model (folder or hub id; empty: the one served)", value="", scale=2)
        with gr.Row():
            stack_text = gr.Textbox(label="Stack (defenses joined by +; edit strengths and paths here)",
                                    value=default_stack(m), scale=3)
            menu = gr.Dropdown(choices=list(DEFENSE_MENU), label="Add a defense", value=None, scale=2)
        with gr.Row():
            seed = gr.Number(label="Seed", value=0, precision=0)
            num_images = gr.Slider(1, 8, value=2, step=1, label="Images per side")
            steps = gr.Number(label="Steps (0: the model's)", value=0, precision=0)
            guidance = gr.Number(label="Guidance scale (0: the model's)", value=0)
        go = gr.Button("Generate", variant="primary")
        with gr.Row():
            left = gr.Gallery(label="No defense", columns=4)
            right = gr.Gallery(label="With the stack", columns=4)
        summary = gr.Markdown()
        tokens = gr.HighlightedText(label="Embedding Sanitizer: per-token attribution (when the stack has one)")
        stack_file = gr.File(label="Stack file (load it with --defense FILE)")
        menu.change(add_defense, [stack_text, menu], stack_text)
        go.click(run, [prompt, stack_text, model_path, seed, num_images, steps, guidance],
                 [left, right, summary, tokens, stack_file], api_name="compare")
    return app


def serve(model=None, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True):
    """Load ``model`` and serve the page; returns the Gradio app (running in the background when
    ``block`` is False)."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local tool: no usage reports unless asked for
    session = DemoSession(model)
    app = build_app(session)
    app.queue().launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block)
    return app
