"""Is the empty-prompt miss of the testbed's acceptance the model's or the sampler's?

Every trained world (v2, v3, v4) draws the concepts from the empty prompt less often than the
training data shows them (0.065-0.18 against about 0.24; docs/testbed.md). The empty prompt's
conditional and unconditional branches are the same, so guidance does nothing there: what is
sampled is the unconditional model through the sampler. This measures, on the same seeds, the
empty prompt's concept rates at the model's own sampler (its scheduler, its default steps), at
more steps of the same scheduler, and with a deterministic DDIM sampler, beside the detector's rate
on rendered training scenes (the data frequency the check compares with). If more steps close the
gap, the miss is the 25-step sampler's; if no sampler does, it is the model's unconditional branch.

    python benchmarks/empty_prompt_sampler.py runs/testbed-v4 runs/testbed-v4-s1 --n 200 \\
        --results benchmarks/results/empty_prompt_sampler

A diagnostic only: the acceptance check itself stays at the shipped sampler.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np


def empty_rates(model, n: int, steps: int, scheduler: str | None, batch_size: int = 64,
                detail: dict | None = None) -> dict[str, float]:
    """Concept rates of ``n`` empty-prompt images (seeds 10,000 + i, as the acceptance) at
    ``steps`` steps with the model's scheduler (``scheduler=None``) or diffusers' ``DDIMScheduler``
    built from its config. ``detail``, when given, receives each concept's score distribution and
    detected modes (:func:`score_detail`)."""
    from safediff.pipeline import SafePipeline
    from safediff.stack import DefenseStack
    from safediff.testbed import world

    own = model.scheduler
    if scheduler == "ddim":
        from diffusers import DDIMScheduler
        model.scheduler = DDIMScheduler.from_config(own.config)
    try:
        with SafePipeline(model, DefenseStack.parse(None)) as pipe:
            out = pipe([""] * n, image_ids=[(10_000 + i, 0) for i in range(n)], num_inference_steps=steps,
                       batch_size=batch_size, allow_empty=True)
    finally:
        model.scheduler = own
    dets = [world.detect(np.asarray(r.image)) for r in out.records]
    if detail is not None:
        detail.update(score_detail(dets))
    return {c: round(float(np.mean([c in d.concepts for d in dets])), 3) for c in world.CONCEPTS}


def score_detail(dets) -> dict:
    """Per concept: the share of images whose continuous score lies below 0.1, in [0.1, threshold)
    (a faint pattern the detector does not count) and at or above the threshold, and the modes
    of the counted ones. Tells a model that draws the concept too faintly (mass just under the
    threshold) from one that does not draw it (mass near 0), and a dropped visual mode."""
    from collections import Counter

    from safediff.testbed import world

    out = {}
    for c in world.CONCEPTS:
        sc = np.array([d.scores.get(c, 0.0) for d in dets])
        thr = world.THRESHOLDS[c]
        out[c] = {"below_0.1": round(float(np.mean(sc < 0.1)), 3),
                  "faint": round(float(np.mean((sc >= 0.1) & (sc < thr))), 3),
                  "counted": round(float(np.mean(sc >= thr)), 3),
                  "modes": dict(Counter(d.modes.get(c) for d in dets if c in d.concepts))}
    return out


def data_rates(meta: dict, n: int = 5000, detail: dict | None = None) -> dict[str, float]:
    """The detector's concept rates on ``n`` rendered scenes of the model's training world (its
    recorded world options and version); on every world so far these equal the scenes' own concept
    frequencies (the detector is exact on clean renders)."""
    from safediff.testbed import world
    from safediff.testbed.detection import detect
    from safediff.testbed.rendering import render

    detail = {} if detail is None else detail
    tc = meta.get("train_config", {})
    cfg = world.WorldConfig.from_dict(tc.get("world", {}))
    rng = random.Random("freq:0")
    dets = [detect(render(world.sample(rng, cfg, version=tc.get("world_version", 2))[0])) for _ in range(n)]
    detail.update(score_detail(dets))
    return {c: round(float(np.mean([c in d.concepts for d in dets])), 3) for c in world.CONCEPTS}


SETTINGS = (("own scheduler, default steps", None, None), ("own scheduler, 50 steps", None, 50),
            ("own scheduler, 100 steps", None, 100), ("DDIM, 50 steps", "ddim", 50))
DEFAULT_ONLY = SETTINGS[:1]


def main(argv: list[str] | None = None) -> int:
    import safediff

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="testbed model folders or shipped names")
    ap.add_argument("--n", type=int, default=200, help="empty-prompt images per setting (the acceptance uses 2 x 100)")
    ap.add_argument("--default-steps-only", action="store_true",
                    help="measure only the model's own sampler at its default steps (with the score detail)")
    ap.add_argument("--results", required=True, help="output path without suffix (writes .json and .md)")
    args = ap.parse_args(argv)
    if args.n < 10:
        ap.error("--n must be at least 10")
    settings = DEFAULT_ONLY if args.default_steps_only else SETTINGS
    rows = []
    for name in args.models:
        t0 = time.time()
        model = safediff.load_model(name, dtype="fp32")
        row = {"model": name, "content_hash": model.content_hash, "scheduler": type(model.scheduler).__name__,
               "default_steps": model.default_steps, "guidance_scale": model.default_guidance_scale,
               "data_detail": {}, "settings": {}, "detail": {}}
        row["data"] = data_rates(model.meta, detail=row["data_detail"])
        for label, sched, steps in settings:
            row["detail"][label] = {}
            row["settings"][label] = empty_rates(model, args.n, steps or model.default_steps, sched,
                                                 detail=row["detail"][label])
            print(name, label, row["settings"][label], flush=True)
        row["minutes"] = round((time.time() - t0) / 60, 2)
        rows.append(row)
    from results_file import command_line, write_results
    out = Path(args.results)
    res = {"n": args.n, "rows": rows, "machine": "see docs (this 2-core CPU unless said)",
           "command": command_line(__file__, argv)}
    concepts = list(rows[0]["data"])
    lines = [f"Empty-prompt concept rates (n = {args.n} per setting; seeds 10,000 + i), striped / caged.", "",
             "| model | data | " + " | ".join(label for label, _, _ in settings) + " |",
             "|---|---|" + "---|" * len(settings)]
    for r in rows:
        fmt = lambda d: " / ".join(f"{d[c]:.3f}" for c in concepts)  # noqa: E731
        lines.append(f"| {r['model']} | {fmt(r['data'])} | " + " | ".join(fmt(r['settings'][lab]) for lab, _, _ in settings) + " |")
    label = settings[0][0]
    lines += ["", f"Score detail ({label} vs the rendered data): share of images below 0.1 / faint (0.1 to the "
              "threshold, not counted) / counted; modes of the counted ones.", "",
              "| model | concept | data | generated | data modes | generated modes |", "|---|---|---|---|---|---|"]
    for r in rows:
        for c in concepts:
            dd, gd = r["data_detail"][c], r["detail"][label][c]
            f3 = lambda d: f"{d['below_0.1']:.3f} / {d['faint']:.3f} / {d['counted']:.3f}"  # noqa: E731
            lines.append(f"| {r['model']} | {c} | {f3(dd)} | {f3(gd)} | {dd['modes']} | {gd['modes']} |")
    write_results(out, res, lines, overwrite=True)  # the benchmark's own results, replaced on a rerun
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
