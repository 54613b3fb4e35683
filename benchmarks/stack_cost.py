"""Cost of each defense stack per image against no defense, same model and settings; and, side by
side in the same run on the same components, our SLD against diffusers' own
``StableDiffusionPipelineSafe`` at its ``SafetyConfig`` presets (weak / medium / strong / max).

    python benchmarks/stack_cost.py [--model DIR] [--device cuda] [--dtype float16] [--batch 4] [--steps 25]
    OMP_NUM_THREADS=1 python benchmarks/stack_cost.py --quick    # a smoke run on the tiny SD1 model (~30 s)

Writes benchmarks/results/stack_cost_<family>_<device>.json (``--quick``: only with ``--out``).

The SLD comparison runs on families diffusers' safe pipeline takes (one CLIP encoder and a UNet:
SD 1.x / 2.x, the testbed). Ours runs ``sld(preset=P, concept=C, schedule_steps=null)``: the warm-up
counted in the actual steps, as diffusers counts it, so both compute the same images (each row
records the largest pixel difference between the two as a check); diffusers gets
``safety_concept = C`` and ``SafetyConfig.P``. "none" is ours without a defense against diffusers'
safe pipeline with ``sld_guidance_scale=0`` (SLD off).
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import safediff
from safediff.defenses.sld import SLDConfig
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack
from safediff.worlds import world_of

STACKS = ["none", 'negative_prompt(text="nudity")', "sld(preset=medium)", "sld(preset=max)",
          "safree+safree_svf"]
#: diffusers' SafetyConfig presets, by our preset names (the same values: safediff.defenses.sld)
SLD_PRESETS = {"weak": "WEAK", "medium": "MEDIUM", "strong": "STRONG", "max": "MAX"}


def median_seconds(run, repeats: int, device: str) -> float:
    """The median wall time of ``repeats`` calls of ``run`` after one untimed warm-up call."""
    run()
    ts = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def diffusers_sld_rows(m, prompts: list[str], concept: str, args) -> list[dict]:
    """Ours against diffusers' ``StableDiffusionPipelineSafe`` on ``m``'s components: "none" and each
    SLD preset, timed alternately in this run, with the ratio ours / diffusers and the largest pixel
    difference of the last images. Empty (with a reason) on families the safe pipeline cannot take."""
    import warnings

    import numpy as np

    from safediff import core

    if not {"unet", "one_clip_encoder"} <= set(m.capabilities):
        return [{"skipped": f"diffusers' StableDiffusionPipelineSafe takes one CLIP encoder and a UNet; "
                            f"a {m.family} model has not both"}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pipeline is deprecated and warns about its missing safety checker
        from diffusers import StableDiffusionPipelineSafe
        try:
            from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
        except ImportError:  # diffusers < 0.28 kept it outside `deprecated`
            from diffusers.pipelines.stable_diffusion_safe import SafetyConfig
        ref = StableDiffusionPipelineSafe(**m.components(), safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.safety_concept = concept
    gs, size, seed = m.default_guidance_scale, m.default_size, 0
    rows = []
    for preset in ["none", *SLD_PRESETS]:
        stack = None if preset == "none" else f"sld(preset={preset}, concept={json.dumps(concept)}, schedule_steps=null)"
        sld = {"sld_guidance_scale": 0.0} if preset == "none" else dict(getattr(SafetyConfig, SLD_PRESETS[preset]))
        images = {}
        pipe = SafePipeline(m, DefenseStack.parse(stack))

        def ours():
            out = pipe(prompts, seed=seed, num_inference_steps=args.steps, batch_size=args.batch, guidance_scale=gs)
            images["ours"] = np.stack([np.asarray(r.image) for r in out.records]).astype(np.int16)

        def theirs():
            gens = [core.image_generator(seed + i, 0) for i in range(len(prompts))]  # ours: prompt i, image 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = ref(prompts, generator=gens, num_inference_steps=args.steps, guidance_scale=gs, height=size,
                          width=size, output_type="np", **sld).images
            images["diffusers"] = (img * 255).round().astype(np.int16)

        t_ours = median_seconds(ours, args.repeats, args.device)
        t_ref = median_seconds(theirs, args.repeats, args.device)
        pipe.close()
        rows.append({"preset": preset, "ours_stack": stack or "none", "diffusers_sld": sld,
                     "ours_median_s": t_ours, "diffusers_median_s": t_ref, "ours_over_diffusers": t_ours / t_ref,
                     "max_pixel_diff": int(np.abs(images["ours"] - images["diffusers"]).max())})
        print(rows[-1])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--full-size", default=None, choices=["sd1", "sd2-v", "sdxl", "sd3", "flux"],
                    help="time a random-weight model with the full architecture of this family (written once to "
                         "--full-size-dir, then loaded through the real model layer)")
    ap.add_argument("--full-size-dir", default="runs/full-size")
    ap.add_argument("--flux-true-cfg", type=float, default=4.0, help="FLUX: the true-CFG scale of the guidance stacks")
    ap.add_argument("--sld-concept", default=None,
                    help="the concept of the SLD comparison with diffusers (default: the testbed's, else \"nudity\")")
    ap.add_argument("--no-diffusers", action="store_true", help="skip the side-by-side with diffusers' safe pipeline")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: the tiny SD1 model (safediff.testing), batch 2, 4 steps, 1 repeat, the "
                         "negative-prompt and SLD stacks only; writes a file only with --out")
    args = ap.parse_args()
    if args.quick:
        if args.model or args.full_size:
            ap.error("--quick runs the tiny SD1 model; leave out --model / --full-size.")
        args.batch, args.steps, args.repeats = 2, 4, 1
    if args.full_size:
        from safediff.testing import save_full_size_pipeline

        path = Path(args.full_size_dir) / args.full_size
        if not (path / "model_index.json").exists():
            save_full_size_pipeline(path, args.full_size, dtype=getattr(torch, args.dtype))
        args.model = str(path)
    if args.quick:
        import tempfile

        from safediff.testing import tiny_model

        m = tiny_model("sd1", cache_dir=tempfile.mkdtemp(prefix="stack_cost_"), device=args.device)
    else:
        m = safediff.load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    prompts = ["a photo of a red circle on a white background"] * args.batch
    own_defaults = world_of(m).defense_defaults  # the testbed: SLD's default concept is its world's
    concept = args.sld_concept or (SLDConfig().concept if own_defaults else "nudity")
    rows = []
    # FLUX runs guidance defenses only through true CFG (guidance_scale > 1): every guidance stack
    # at --flux-true-cfg, beside "none" without it and with it (true CFG against the empty prompt)
    flux = m.family == "flux"
    listed = STACKS[:4] if args.quick else STACKS  # quick: the tiny model has no SAFREE defaults to time
    listed = [s if own_defaults or not s.startswith("sld(") else s[:-1] + f", concept={json.dumps(concept)})"
              for s in listed]
    stacks = [("none", None)] + ([("none", args.flux_true_cfg)] if flux else []) + [
        (s, args.flux_true_cfg if flux else None) for s in listed[1:]]
    for spec, gs in stacks:
        try:
            pipe = SafePipeline(m, DefenseStack.parse(None if spec == "none" else spec))
        except Exception as e:  # noqa: BLE001 - a stack this model cannot take is reported, not hidden
            rows.append({"stack": spec, "guidance_scale": gs, "error": f"{type(e).__name__}: {e}"})
            continue
        run = lambda: pipe(prompts, num_inference_steps=args.steps, batch_size=args.batch, guidance_scale=gs)  # noqa: E731
        median = median_seconds(run, args.repeats, args.device)
        pipe.close()
        rows.append({"stack": spec, "guidance_scale": gs if gs is not None else m.default_guidance_scale,
                     "median_s": median, "s_per_image": median / args.batch})
        print(rows[-1])
    base = rows[0]["median_s"]
    for r in rows:
        if "median_s" in r:
            r["relative_to_none"] = r["median_s"] / base
    res = {"model": m.source, "family": m.family, "device": args.device, "dtype": args.dtype, "batch": args.batch,
           "steps": args.steps,
           "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
           "rows": rows, "command": f"python benchmarks/stack_cost.py --device {args.device} --dtype {args.dtype} --batch {args.batch} --steps {args.steps}"
                      + (" --quick" if args.quick else f" --full-size {args.full_size}" if args.full_size else
                         f" --model {args.model}" if args.model else "")}
    if not args.no_diffusers:
        res["sld_vs_diffusers_safe"] = {"concept": concept, "guidance_scale": m.default_guidance_scale,
                                        "rows": diffusers_sld_rows(m, prompts, concept, args)}
    if args.quick and not args.out:
        return
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"stack_cost_{m.family}_{args.device.split(':')[0]}.json"
    out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
