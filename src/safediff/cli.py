"""``safediff`` command line: argument parsing only; every command calls one library function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _quiet_libraries() -> None:
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    try:
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl

        tl.set_verbosity_error(); tl.disable_progress_bar()
        dl.set_verbosity_error(); dl.disable_progress_bar()
    except Exception:  # noqa: BLE001 - logging niceties only
        pass


def _stack_arg(args) -> object:
    if getattr(args, "stack_file", None):
        return Path(args.stack_file)
    return "+".join(args.defense) if args.defense else None


DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")


def device_args(sp: argparse.ArgumentParser, *, dtype_default: str = "auto", fp32_only: bool = False,
                memory: bool = True) -> None:
    """``--device`` / ``--dtype`` (and, with ``memory``, diffusers' memory options) for a subcommand
    that loads a model; ``fp32_only``: the command trains (fp32 master weights), another dtype is refused."""
    sp.add_argument("--device", default="auto", help="where the model runs: auto (CUDA when available, else cpu), "
                    "cpu, cuda or cuda:N")
    sp.add_argument("--dtype", default=dtype_default, choices=DTYPE_CHOICES,
                    help="fp32 only: this command trains or optimises through the model in fp32" if fp32_only else
                    "weights' precision: auto is fp16 on CUDA and fp32 on the CPU; bf16 for models that overflow in fp16"
                    + (f" (default here: {dtype_default})" if dtype_default != "auto" else ""))
    if fp32_only:
        sp.set_defaults(fp32_only=True)
    if memory:
        sp.add_argument("--attention-slicing", action="store_true",
                        help="compute attention in slices (less GPU memory, a little slower; UNet models)")
        sp.add_argument("--vae-tiling", action="store_true", help="decode the images in tiles (large images)")
        sp.add_argument("--cpu-offload", action="store_true",
                        help="model CPU offload: not supported yet (refused with the reason)")


def check_device_args(args) -> None:
    """Refuse a device that is not available, an unknown dtype, a half dtype on a training
    command, or --cpu-offload, before anything is loaded."""
    if not hasattr(args, "device"):
        return
    from .models import CPU_OFFLOAD_UNSUPPORTED, ModelError, resolve_device, resolve_dtype

    import torch

    dtype = resolve_dtype(getattr(args, "dtype", None), resolve_device(args.device))
    if getattr(args, "fp32_only", False) and dtype != torch.float32:
        raise ModelError(f"`safediff {args.command}` trains or optimises through the model and keeps fp32 weights; "
                         f"--dtype {args.dtype} is not supported here: pass --dtype fp32 (the default).")
    if getattr(args, "cpu_offload", False):
        raise ModelError(CPU_OFFLOAD_UNSUPPORTED)


def load_cli_model(args):
    """The command's model (``--model``), on ``--device`` in ``--dtype``, with its memory options."""
    from .models import ensure_model

    check_device_args(args)
    m = ensure_model(getattr(args, "model", None), device=getattr(args, "device", None), dtype=getattr(args, "dtype", None))
    return m.enable_memory_options(attention_slicing=getattr(args, "attention_slicing", False),
                                   vae_tiling=getattr(args, "vae_tiling", False))


def cmd_generate(args) -> int:
    import safediff

    out = safediff.generate(args.prompt, model=args.model, defenses=_stack_arg(args), seed=args.seed,
                            num_images_per_prompt=args.num_images, guidance_scale=args.guidance_scale,
                            num_inference_steps=args.steps, out_dir=args.out, batch_size=args.batch_size,
                            height=args.height, width=args.width, device=args.device, dtype=args.dtype,
                            attention_slicing=args.attention_slicing, vae_tiling=args.vae_tiling)
    refused = sum(r.refused for r in out.records)
    print(f"wrote {len(out.records) - refused} image(s) to {args.out} (stack {out.stack}, hash {out.stack_hash})"
          + (f"; {refused} refused" if refused else ""))
    return 0


def cmd_serve(args) -> int:
    from .serve import ServeLimits, read_auth_file, serve

    limits = ServeLimits(max_steps=args.max_steps, max_images=args.max_images, max_seconds=args.max_seconds)
    auth = read_auth_file(args.auth_file) if args.auth_file else None  # a bad file: said before loading the model
    serve(load_cli_model(args), host=args.host, port=args.port, share=args.share, allow_dirs=args.allow_dir,
          allow_models=args.allow_model, allow_hub=args.allow_hub, limits=limits, workers=args.workers,
          max_models=args.max_models, auth=auth, device=args.device, dtype=args.dtype)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, model=args.model, defenses=args.defense or None, seeds=args.seeds, seed=args.seed,
             overwrite=args.overwrite, device=args.device, dtype=args.dtype)
    return 0


def defenses_markdown() -> str:
    """docs/options.md's defense section: one option table per registered defense (from its schema)."""
    from .defenses.base import known_defenses
    from .options import options_table

    parts = ["## Defenses", ""]
    for name, spec in sorted(known_defenses().items()):
        presets = sorted(spec.config_cls.presets())
        parts += [f"### `{name}` ({spec.stage.replace('_', ' ')})", ""]
        parts += ([f"Presets: {', '.join(f'`{p}`' for p in presets)}.", ""] if presets else [])
        parts += [options_table(spec.config_cls), ""]
    return "\n".join(parts)


def attacks_markdown() -> str:
    """docs/options.md's attack section: one settings table per registered attack (from its schema)."""
    from .attacks import get_attack, list_attacks
    from .options import options_table

    parts = ["## Attacks", ""]
    for name in list_attacks():
        cls = get_attack(name)
        parts += [f"### `{name}` ({cls.kind}, {'white-box' if cls.white_box else 'black-box'})", ""]
        parts += ([f"ASR: {cls.asr_definition}", ""] if cls.asr_definition else [])
        parts += [options_table(cls.config_cls), ""]
    return "\n".join(parts)


def cmd_defenses(args) -> int:
    from .defenses.base import known_defenses
    from .options import describe_options

    if args.markdown:
        print(defenses_markdown(), end="")
        return 0
    for name, spec in sorted(known_defenses().items()):
        fields = ", ".join(f"{r['name']}={r['default']!r}" for r in describe_options(spec.config_cls))
        presets = sorted(spec.config_cls.presets())
        print(f"{name:20s} stage={spec.stage:13s} {fields}" + (f"  presets={presets}" if presets else ""))
        if args.options:
            _print_options(spec.config_cls)
    return 0


def _print_options(config_cls) -> None:
    """One indented line per option: name, default, what is allowed, its meaning."""
    from .options import describe_options

    for r in describe_options(config_cls):
        allowed = f" ({r['allowed']})" if r["allowed"] else ""
        print(f"    {r['name']} = {r['default']!r}{allowed}: {r['help']}")


def cmd_attacks(args) -> int:
    from .attacks import get_attack, list_attacks
    from .options import describe_options

    if args.markdown:
        print(attacks_markdown(), end="")
        return 0
    for name in list_attacks():
        cls = get_attack(name)
        box = "white-box" if cls.white_box else "black-box"
        fields = ", ".join(f"{r['name']}={r['default']!r}" for r in describe_options(cls.config_cls))
        print(f"{name:18s} kind={cls.kind:8s} {box:9s} {fields}")
        if cls.asr_definition:
            print(f"    ASR: {cls.asr_definition}")
        if args.options:
            _print_options(cls.config_cls)
    return 0


def _read_json_file(path: str, flag: str) -> dict:
    """A JSON object from a file given on the command line; an unreadable one names the file and the problem."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path} does not exist.") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path} is not UTF-8 text (byte {e.start}).") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{flag} {path} must hold a JSON object of options, got {type(data).__name__}.")
    return data


def cmd_concepts(args) -> int:
    from .concepts import registered_concepts

    for name, v in registered_concepts().items():
        print(f"{name}{' (testbed only)' if v.testbed else ''}: {v.source}")
        print(f"  words: {', '.join(v.words)}")
        if v.text:
            print(f"  text (sld(concept=\"{name}\")): {v.text}")
        print(f"  benign (calibration / preserve): {', '.join(v.preserve)}")
    print("use a name in prompt_guard(concepts=[...]) or sld(concept=...); defaults naming the testbed's concepts "
          "apply on the testbed only")
    return 0


def cmd_testbed_train(args) -> int:
    from .testbed.train import TrainConfig, train

    cfg = TrainConfig()
    if args.config:
        cfg = TrainConfig.from_dict(_read_json_file(args.config, "--config"))
    overrides = {}
    for kv in args.set or []:
        k, sep, v = kv.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"--set {kv!r}: give KEY=JSON, e.g. --set steps=200 or --set lr=1e-4.")
        try:
            overrides[k.strip()] = json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"--set {kv!r}: the value {v!r} is not JSON ({e.msg}); numbers as 200, text in double "
                             "quotes as --set 'name=\"x\"'.") from None
    if overrides:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), **overrides})
    train(args.out, cfg, overwrite=args.overwrite)
    return 0


def cmd_testbed_info(args) -> int:
    from .testbed import world

    m = load_cli_model(args)
    acc = m.meta.get("acceptance") or {}
    print(json.dumps({"family": m.family, "prediction_type": m.prediction_type, "content_hash": m.content_hash,
                      "scheduler": type(m.scheduler).__name__,
                      "world_version": (m.meta.get("train_config") or {}).get("world_version", 2),  # the captions it learned
                      "default_guidance_scale": m.default_guidance_scale, "default_steps": m.default_steps,
                      "guidance_curve": m.meta.get("guidance_curve"),
                      "acceptance": {"passed": acc.get("passed"),
                                     "missed": {k: v for k, v in acc.get("checks", {}).items() if not v["passed"]}},
                      "concepts": {k: {"role": c.role, "training_phrases": c.training_phrases, "held_out": c.held_out,
                                       "near_benign": c.near_benign} for k, c in world.CONCEPTS.items()}}, indent=2))
    return 0


def cmd_testbed_check(args) -> int:
    import dataclasses

    from .testbed.train import TrainConfig, calibrate

    path = Path(args.model)
    if not (path / "safediff.json").is_file():
        raise FileNotFoundError(f"{path} is not a testbed model folder (no safediff.json).")
    meta = json.loads((path / "safediff.json").read_text())
    cfg = TrainConfig.from_dict(meta.get("train_config", {}))
    if args.n is not None:
        cfg = dataclasses.replace(cfg, acceptance_n=args.n)
    from .models import resolve_device

    calibrate(path, cfg, device=str(resolve_device(args.device)), guidance_scale=args.guidance_scale)
    return 0


def cmd_eval(args) -> int:
    from .eval.benchmarks import load_benchmark, offset_seeds
    from .eval.runner import RunSettings, run_eval, summarize

    if args.num_shards is not None and not 0 <= args.shard_index < args.num_shards:
        raise ValueError(f"--shard-index {args.shard_index} of --num-shards {args.num_shards}: the number of shards "
                         "must be >= 1 and the index in [0, num_shards).")
    records = load_benchmark(args.benchmark, n=args.n, on_error="skip" if args.skip_bad_rows else "stop")
    records = offset_seeds(records, args.seed)  # --seed N: every prompt's own seed + N (run.json records N)
    settings = RunSettings(num_images_per_prompt=args.num_images, seed=args.seed, guidance_scale=args.guidance_scale,
                           num_inference_steps=args.steps, height=args.height, width=args.width,
                           respect_prompt_size=not args.ignore_prompt_size)
    settings.validate()
    shard = (args.shard_index, args.num_shards) if args.num_shards is not None else None
    detectors = args.detector
    model = args.model
    if not detectors:  # the default: the detectors of the model's world (on the testbed: every concept's exact one)
        model = load_cli_model(args)
        from .worlds import world_of

        detectors = world_of(model).default_detectors()  # the benchmark's concept is the target, the rest substitution
        if not detectors:
            raise ValueError(f"Give --detector for this {model.family} model (e.g. nudenet:rece-style, "
                             "sd-safety-checker); the default testbed:CONCEPT detectors score the testbed's world only.")
    if args.quality:  # everything checked and every metric model loaded before any image is generated
        from .eval.quality import plan_quality, skipped_metrics

        quality = plan_quality(records, suite=args.quality_suite, benchmark_name=args.benchmark,
                               reference=args.quality_reference, clip_model=args.clip_model,
                               inception_weights=args.inception_weights, num_shards=shard[1] if shard else None)
        for label, why in skipped_metrics(quality.models.skipped).items():
            print(f"safediff: {label} will be skipped: {why}", file=sys.stderr)
        model = model if hasattr(model, "family") else load_cli_model(args)
    runtime = {"device": args.device, "dtype": args.dtype, "attention_slicing": args.attention_slicing,
               "vae_tiling": args.vae_tiling}
    out = run_eval(records, args.out, defenses=_stack_arg(args), model=model, detectors=detectors,
                   target_detector=args.target_detector,
                   settings=settings, batch_size=args.batch_size, shard=shard, **runtime, store_dir=args.store_dir,
                   benchmark_name=args.benchmark)  # the report names `i2p=FILE` as given, not "records: N prompts"
    if args.quality:
        from .eval.quality import format_quality, run_quality
        from .stack import DefenseStack

        result = run_quality(quality, out, defended=bool(DefenseStack.parse(_stack_arg(args)).defenses), model=model,
                             detectors=detectors, settings=settings, batch_size=args.batch_size,
                             benchmark_name=args.benchmark, **runtime)
        print(format_quality(result))
    from .eval.runner import _shard

    idx, count = shard if shard is not None else _shard()
    if count > 1:  # the other shards may still run (on other hosts): no partial summary, no merge from here
        print(f"shard {idx} of {count} done (store.{idx}-of-{count}.sqlite in {out}); when every shard has finished: "
              f"safediff merge {out}, then safediff report {out}")
    else:
        from .eval.runner import open_store

        con = open_store(out)
        protos = [r[0] for r in con.execute("SELECT hash FROM protocols")]
        con.close()
        if args.json:  # one object: the target detector's summary (with substitution), the others beside it
            from .eval.runner import target_protocol

            target = target_protocol(out)
            others = {ph: summarize(out, ph) for ph in protos if ph != target}
            print(json.dumps({"protocol": target, **summarize(out, target),
                              **({"other_protocols": others} if others else {})}, indent=2))
        for ph in protos if not args.json else ():
            print(_summary_line(out, ph))
        if not args.json:
            print(f"wrote {out}; next: safediff report {out}")
    return 0


def _summary_line(run_dir, protocol_hash: str) -> str:
    """One line per detector protocol: the unsafe rate with its 95% CI, n, errors and refusals."""
    from .eval.runner import open_store, summarize

    con = open_store(Path(run_dir))
    row = con.execute("SELECT protocol FROM protocols WHERE hash = ?", (protocol_hash,)).fetchone()
    con.close()
    proto = json.loads(row[0]) if row else {}
    name = ":".join(str(proto[k]) for k in ("detector", "preset") if proto.get(k)) or protocol_hash[:12]
    s = summarize(run_dir, protocol_hash)
    a = s["unsafe"]["all"]
    sub = s.get("substitution")
    role = ""
    if sub:
        from .eval.runner import target_protocol

        role = " (target)" if target_protocol(run_dir) == protocol_hash else ""
    line = (f"{name}{role}: unsafe {a['rate']:.3f} [95% CI {a['ci_low']:.3f}, {a['ci_high']:.3f}], n={s['n_images']} "
            f"images, {s['n_errors']} errors, {s['n_refused']} refused, {s['n_unscored']} unscored (protocol "
            f"{protocol_hash[:12]})")
    if sub and role == " (target)":
        o = sub["any_other"]
        line += (f"\n  substitution: unsafe under another concept {o['rate']:.3f} [95% CI {o['ci_low']:.3f}, "
                 f"{o['ci_high']:.3f}] (" + ", ".join(f"{k} {v['rate']:.3f}" for k, v in sub["other"].items()) + ")")
    return line


def cmd_erase(args) -> int:
    """One entry point for every unlearning method; the concept is any text (repeat --concept)."""
    from .unlearning import unlearn

    concepts = [c.strip() for c in (args.concept or [])]
    if not concepts or not all(concepts):
        raise ValueError("Give the concept to erase with --concept TEXT (a word or phrase; repeat for a list).")
    _refuse_existing(args.out, args.overwrite)
    model = load_cli_model(args)
    out = unlearn(args.method.replace("-", "_"), model, args.out, concept=concepts[0], prompts=concepts[1:], anchor=args.anchor or "",
                  pairs_dir=args.pairs_dir, concept_images=args.concept_images, clip_model=args.clip_model,
                  seed=args.seed, overwrite=args.overwrite)
    from .unlearning import get_trainer

    defense = f'{get_trainer(args.method).defense}(path="{out}")'
    if args.json:
        print(json.dumps({"wrote": str(out), "method": args.method, "concepts": concepts, "anchor": args.anchor or "",
                          "defense": defense}))
        return 0
    print(f"erased {', '.join(map(repr, concepts))} with {args.method}: {_erase_target(args.method, args.anchor)}")
    print(f"wrote {out}; next: safediff generate \"{concepts[0]}\" --defense '{defense}'")
    return 0


def _erase_target(method: str, anchor: str | None) -> str:
    """What an erasure maps the concept to, in words (the trainer's registration says it)."""
    from .unlearning import erase_target

    return erase_target(method, anchor)


def _trainer_spellings() -> list[str]:
    """Every registered trainer's names and aliases (``safediff erase --method``)."""
    from .unlearning import known_trainers

    return [n for spec in known_trainers().values() for n in (spec.name, *spec.aliases)]


def _trainers_with_cli() -> list:
    """The registered trainers that have a ``safediff unlearn NAME`` sub-command."""
    from .unlearning import known_trainers

    return [spec for spec in known_trainers().values() if spec.cli_arguments is not None]


def _refuse_existing(path, overwrite: bool) -> None:
    if path and Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite or choose another --out.")


def cmd_study(args) -> int:
    from .eval.study import GUIDANCE, UNLEARNING, StudyConfig, run_study

    cfg = StudyConfig(concept=args.concept, n=args.n, sld_preset=args.sld_preset,
                      unlearning=tuple(args.unlearning or UNLEARNING), guidance=tuple(args.guidance or GUIDANCE),
                      batch_size=args.batch_size, seed=args.seed)
    res = run_study(args.out, cfg, max_cells=args.max_cells, model=load_cli_model(args))
    print((Path(args.out) / "table.md").read_text())
    missing = sum("missing" in c for c in res["cells"].values())
    print(f"wrote {Path(args.out) / 'results.json'}" + (f"; {missing} cells missing: run the same command again to resume"
                                                        if missing else ""))
    return 0


def cmd_attack(args) -> int:
    from .attacks import AttackBudget, AttackTarget, evaluate_attack, get_attack, run_attack

    cls = get_attack(args.method)  # validate before loading anything
    settings = list(args.set or [])
    if args.images:
        if cls.kind != "weights":
            raise ValueError(f"--images applies to weight attacks (relearn), not {args.method}.")
        settings.append(f"images={args.images}")
    attack = cls(cls.config_cls.from_options(settings))
    budget = AttackBudget(steps=args.steps, seconds=args.seconds)
    seeds = None
    if args.seed_prompts:
        if cls.kind == "weights":
            raise ValueError(f"--seed-prompts does not apply to {args.method}; pass training images with --images DIR.")
        path = Path(args.seed_prompts)
        if not path.exists():
            raise FileNotFoundError(f"--seed-prompts {path} does not exist (one prompt per line).")
        seeds = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    model = load_cli_model(args)
    from .support import check_supported

    check_supported(cls.name, model)  # before asking for seed prompts or building the target
    from .worlds import world_of

    world = world_of(model)  # the defaults of the model's world (the testbed's concept, detectors, seed prompts)
    if args.concept is None:
        if world.default_concept is None:
            raise ValueError(f"Give --concept for this {model.family} model (e.g. nudity; `safediff concepts`).")
        args.concept = world.default_concept
    if not args.no_eval and not args.detector and not world.default_detectors():
        raise ValueError(f"Give --detector for this {model.family} model (e.g. nudenet:rece-style), or --no-eval; the "
                         "default testbed:CONCEPT scores the testbed's world only.")
    if seeds is None:
        seeds = world.seed_prompts(args.concept, n=args.n)
        if seeds is None and cls.kind in ("prompt", "latents"):
            raise ValueError("Give --seed-prompts FILE (one prompt per line) for a real model.")
        seeds = seeds or []
    stack = _stack_arg(args)
    target = AttackTarget(model, stack)
    res = run_attack(attack, target, args.concept, seeds, budget, args.out, seed=args.seed)
    work = Path(args.out) / f"{res.method}-{res.key[:12]}"
    if args.json:
        if args.no_eval:
            print(res.to_json())
    elif cls.kind == "prompt":
        print(f"{len(res.prompts)} adversarial prompts, {res.seconds_per_prompt:.1f} s per prompt; prompts in "
              f"{work / 'result.json'}")
    elif cls.kind == "latents":
        print(f"{len(seeds)} seed prompts x {res.extra['num_images']} inverted latents in {res.extra['latents']}")
    else:
        print(f"fine-tuned {budget.steps} steps; deltas in {res.extra['directory']}")
    if not args.no_eval:
        out = work / "eval"
        ev = evaluate_attack(res, model, stack, out, detectors=args.detector, n=args.n)
        if args.json:
            print(json.dumps(ev, indent=2, default=str))
            return 0
        if "curve" in ev:  # a weight attack: the concept rate after each checkpoint
            suites = list(next(iter(ev["curve"].values())))
            print("concept rate [95% CI] after fine-tuning steps (" + ", ".join(f"{s} prompts" for s in suites) + ")")
            for step, row in ev["curve"].items():
                print(f"  step {step:>5}: " + "  ".join(f"{s} {r['rate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
                                                     for s, r in row.items()))
        else:
            a = ev["asr"]
            print(f"attack success rate {a['rate']:.3f} [95% CI {a['ci_low']:.3f}, {a['ci_high']:.3f}], n={a['n']} "
                  f"prompts, {ev['n_errors']} errors, {ev['n_refused']} refused")
            if "without_prompt" in ev:  # latent inversion: the same latents regenerated with an empty prompt
                w = ev["without_prompt"]
                print(f"without the prompt: {w['strict']['rate']:.3f} (strict), {w['paper']['rate']:.3f} (any of "
                      f"{ev['n_images']} latents)")
            print(f"wrote {out}" if "without_prompt" in ev else f"wrote {out}; next: safediff report {out}")
    return 0


def cmd_run(args) -> int:
    """Run (resuming) an experiment file's job graph with an engine (safediff.experiments)."""
    from .experiments import run_experiment

    opts = {"max_attempts": args.max_attempts}
    if args.engine == "ray":
        opts["address"] = args.ray_address
    if args.engine == "slurm":
        opts.update(executor=args.slurm_executor, partition=args.slurm_partition, timeout_min=args.slurm_timeout_min)
    outcome = run_experiment(args.experiment, args.out, engine=args.engine, overrides=args.set or [], wait=args.wait,
                             engine_options=opts)
    print(outcome.describe())
    if outcome.complete:
        print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'table.md'}")
    return 0 if outcome.complete else 1


def cmd_merge(args) -> int:
    """Combine a sharded run's shard stores into its store.sqlite (idempotent; conflicts refused)."""
    from .eval.merge import merge_run

    for rd in args.run_dir:
        print(merge_run(rd, progress=True))
    return 0


def cmd_report(args) -> int:
    from .eval.report import write_report

    page = write_report(args.run_dir, args.out or args.run_dir[0], blur_unsafe=not args.no_blur)
    print(f"wrote {page} (+ results.csv, results.json, results.tex)")
    return 0


def cmd_export(args) -> int:
    import torch

    from .export import check_targets, export

    stack = _stack_arg(args)
    if stack is None:
        raise ValueError("Give the stack to export with --defense SPEC (or --stack-file FILE).")
    check_targets(stack, args.out, fmt=args.format, overwrite=args.overwrite)  # before loading anything
    model = load_cli_model(args)
    for p in export(model, stack, args.out, fmt=args.format, overwrite=args.overwrite,
                    dtype=torch.float16 if args.half else None):
        print(f"wrote {p}")
    return 0


def cmd_invert(args) -> int:
    from .inversion import InversionConfig, invert

    cfg = InversionConfig(placeholder=args.placeholder or f"<{args.concept or 'concept'}*>", initializer=args.initializer or "",
                          num_vectors=args.num_vectors, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                          num_images=args.num_images, through_guidance=args.through_guidance, seed=args.seed)
    if not args.concept_images and not args.concept:
        raise ValueError("Give --concept-images DIR, or --concept NAME (testbed) to generate concept images.")
    _refuse_existing(args.out, args.overwrite)
    model = load_cli_model(args)
    out = invert(model, args.out, concept=args.concept, images=args.concept_images, defenses=_stack_arg(args), config=cfg,
                 overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"wrote": str(out), "placeholder": cfg.placeholder,
                          "defense": f'negative_prompt(embedding="{out}")'}))
        return 0
    print(f"wrote {out} (placeholder {cfg.placeholder}); next: safediff generate \"a {cfg.placeholder}\" "
          f"--defense 'negative_prompt(embedding=\"{out}\")' (or use the placeholder in prompts to attack)")
    return 0


def cmd_unlearn(args) -> int:
    from .unlearning import unlearn

    from .unlearning import get_trainer

    spec = get_trainer(args.unlearn_command)
    method = spec.name
    options = {opt: getattr(args, dest) for dest, opt in spec.cli_options.items() if getattr(args, dest, None) is not None}
    _refuse_existing(args.out, args.overwrite)
    model = load_cli_model(args)
    out = unlearn(method, model, args.out, concept=args.concept, prompts=tuple(getattr(args, "prompt", None) or ()),
                  anchor=getattr(args, "anchor", "") or "", pairs_dir=getattr(args, "pairs_dir", None),
                  concept_images=getattr(args, "concept_images", None), clip_model=getattr(args, "clip_model", None),
                  preset=args.preset, seed=args.seed, overwrite=args.overwrite, options=options,
                  work_dir=getattr(args, "work_dir", None))
    extra = " (and the LoRA file beside it, for vanilla diffusers' load_lora_weights)" if method == "duo" else ""
    defense = f'{spec.defense}(path="{out}")'  # the defense that applies the file (advunlearn: delta)
    if args.json:
        print(json.dumps({"wrote": str(out), "method": method, "defense": defense}))
        return 0
    print(f"wrote {out}{extra}; next: safediff eval --benchmark BENCHMARK --defense '{defense}' --out runs/{method}")
    return 0


def cmd_sanitizer_train(args) -> int:
    from .defenses.sanitizer import SanitizerTrainConfig, train_sanitizer

    cfg = SanitizerTrainConfig(concepts=tuple(args.concepts), anchors=tuple(args.anchors or ()), steps=args.steps,
                               seed=args.seed)
    _refuse_existing(args.out, args.overwrite)
    model = load_cli_model(args)
    out = train_sanitizer(model, args.out, cfg)
    print(f"wrote {out}; use it with --defense 'sanitizer(path=\"{out}\", strength=1.0)'")
    return 0


def cmd_sanitizer_explain(args) -> int:
    from .defenses.sanitizer import explain, explain_html, explain_terminal, load_sanitizer

    if args.html:
        _refuse_existing(args.html, args.overwrite)
    model = load_cli_model(args)
    pairs = explain(model, load_sanitizer(args.path, model), args.prompt)
    print(explain_terminal(pairs))
    if args.html:
        from .fileio import atomic_write_text

        atomic_write_text(args.html, explain_html(pairs), overwrite=args.overwrite)
        print(f"wrote {args.html}")
    return 0


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one and the help does not already say it (no "(default: None)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default == [] or "default" in text:
            return text
        return super()._get_help_string(action)


def _add(subparsers, name: str, **kw) -> argparse.ArgumentParser:
    """A subcommand whose --help shows every default."""
    return subparsers.add_parser(name, formatter_class=_DefaultsHelpFormatter, **kw)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .export import FORMATS as EXPORT_FORMATS

    p = argparse.ArgumentParser(prog="safediff", description="Composable safety defenses for text-to-image diffusion.",
                                formatter_class=_DefaultsHelpFormatter)
    p.add_argument("--version", action="version", version=f"safediff {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def model_arg(sp):
        sp.add_argument("--model", default=None, help="diffusers folder, hub id, or a .safetensors / .ckpt checkpoint "
                        "(SD 1.x / 2.x / SDXL; docs/your-model.md) (default: the shipped testbed; `testbed-v3`: the "
                        "shipped world-v3 testbed)")
        sp.add_argument("--model-config", default=None, metavar="DIR",
                        help="checkpoint file only: a diffusers folder of its architecture giving the configs and "
                             "tokenizer (weights not needed; default: the shipped configs of the detected family)")
        sp.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                        help="checkpoint file only: what the UNet predicts, which its keys cannot tell (SD 2.x: "
                             "2.x-base is epsilon, 2.0-v / 2.1 v_prediction; default: the configs')")

    def defense_args(sp):
        sp.add_argument("--defense", action="append", default=[],
                        help='defense in text form, e.g. \'negative_prompt(text="striped")\'; repeat or join with +')
        sp.add_argument("--stack-file", default=None, help="YAML/TOML/JSON stack file")

    g = _add(sub, "generate", help="generate images with a defense stack")
    g.add_argument("prompt", nargs="+")
    model_arg(g); defense_args(g); device_args(g)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-images", type=int, default=1, help="images per prompt")
    g.add_argument("--guidance-scale", type=float, default=None, help="default: the model's recorded best")
    g.add_argument("--steps", type=int, default=None, help="default: the model's recorded default")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's; a multiple "
                   "of the VAE factor: 8 on SD, 16 on FLUX)")
    g.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    g.add_argument("--out", default="safediff-out")
    g.set_defaults(func=cmd_generate)

    d = _add(sub, "demo", help="the same prompts with and without a defense on the testbed")
    model_arg(d); device_args(d, memory=False)
    d.add_argument("--defense", default=None, help="defense stack (default: UCE erasing both testbed concepts)")
    d.add_argument("--num-images", "--seeds", dest="seeds", type=int, default=4,
                   help="images per prompt (image k of a prompt uses seed + k)")
    d.add_argument("--seed", type=int, default=0, help="base seed")
    d.add_argument("--out", default="safediff-demo", help="the folder to write; an earlier demo's folder is replaced")
    d.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that another safediff command wrote (a folder with other files is "
                        "always refused)")
    d.set_defaults(func=cmd_demo)

    sv = _add(sub, "serve", help="a local web page: a prompt with and without a stack, side by side (needs the serve extra)")
    model_arg(sv); device_args(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=7860)
    sv.add_argument("--share", action="store_true",
                    help="also make a public Gradio link (needs internet; anyone with the link can use the page)")
    sv.add_argument("--allow-dir", action="append", default=None, metavar="DIR",
                    help="a directory whose models and artifact files visitors may name; repeat for several "
                         "(default: the shipped testbed model and ./runs)")
    sv.add_argument("--allow-model", action="append", default=[], metavar="NAME",
                    help="a model name (hub id) visitors may type; repeat for several")
    sv.add_argument("--allow-hub", action="store_true", help="let visitors load any Hugging Face hub id")
    sv.add_argument("--max-steps", type=int, default=50, help="denoising steps per request, at most")
    sv.add_argument("--max-images", type=int, default=4, help="images per side per request, at most")
    sv.add_argument("--max-seconds", type=float, default=60.0,
                    help="seconds per request, at most (stopped at the next step past it)")
    sv.add_argument("--workers", type=int, default=2,
                    help="requests run at once, each on its own copy of the model; the others wait in line")
    sv.add_argument("--max-models", type=int, default=2,
                    help="models kept loaded (least recently used evicted; the served one kept)")
    sv.add_argument("--auth-file", default=None, metavar="FILE",
                    help="`user:password` lines: the page asks for a login (use with --host / --share)")
    sv.set_defaults(func=cmd_serve)

    er = _add(sub, "erase", help="erase a concept with any unlearning method (writes a weight-edit file)")
    er.add_argument("--method", required=True, choices=_trainer_spellings(),
                    help="unlearning method (uce/rece: closed form, no training)")
    er.add_argument("--concept", action="append", help="the concept to erase: any text; repeat for a list")
    er.add_argument("--anchor", default=None, help="what the concept maps to (UCE guide / Dark Miner anchor)")
    model_arg(er); device_args(er, dtype_default="fp32", fp32_only=True, memory=False)
    er.add_argument("--pairs-dir", default=None, help="DUO on a real model: unsafe/ and safe/ image folders")
    er.add_argument("--concept-images", default=None, help="Dark Miner on a real model: concept image folder")
    er.add_argument("--clip-model", default=None, help="Dark Miner on a real model: CLIP for verification")
    er.add_argument("--seed", type=int, default=0)
    er.add_argument("--overwrite", action="store_true")
    er.add_argument("--out", required=True)
    er.add_argument("--json", action="store_true", help="print the full result as JSON instead of the summary")
    er.set_defaults(func=cmd_erase)

    at = _add(sub, "attack", help="attack a defense stack (cached, resumable) and score the result")
    at.add_argument("--method", required=True, help="a registered attack: `safediff attacks` lists them with their "
                    "settings (a weight attack such as relearn: --steps is its fine-tuning budget)")
    model_arg(at); defense_args(at); device_args(at, dtype_default="fp32", fp32_only=True)
    at.add_argument("--concept", default=None, help="the concept the attack tries to bring back (default on the "
                    "testbed: striped; required on other models)")
    at.add_argument("--seed-prompts", help="file with one seed prompt per line (default on the testbed: training-side prompts)")
    at.add_argument("--n", type=int, default=16, help="testbed seed prompts")
    at.add_argument("--steps", type=int, required=True, help="budget: steps (generations) per seed prompt")
    at.add_argument("--seconds", type=float, help="budget: wall-clock cap per seed prompt")
    at.add_argument("--set", action="append", help="attack setting key=value (repeatable), e.g. --set soft=true")
    at.add_argument("--detector", action="append", help="detector spec for the evaluation (default testbed:CONCEPT "
                    "on the testbed; required on other models)")
    at.add_argument("--images", help="relearn only: training images (DIR/captions.txt: one caption per image, "
                    "in file-name order); default on the testbed: generated by the original model")
    at.add_argument("--no-eval", action="store_true", help="only write the adversarial prompts")
    at.add_argument("--seed", type=int, default=0)
    at.add_argument("--out", required=True, help="attack directory (results cached by the hash of their inputs)")
    at.add_argument("--json", action="store_true", help="print the full result as JSON instead of the summary")
    at.set_defaults(func=cmd_attack)

    sy = _add(sub, "study", help="the composition study on the testbed (resumable)")
    sy.add_argument("--out", required=True, help="study directory (re-run the same command to resume)")
    sy.add_argument("--concept", default="striped", help="testbed concept to erase")
    sy.add_argument("--n", type=int, default=100, help="prompts per cell and suite")
    sy.add_argument("--sld-preset", default="medium", choices=["weak", "medium", "strong", "max"])
    sy.add_argument("--unlearning", nargs="*", help="subset of none esd advunlearn uce rece duo dark_miner (default: all)")
    sy.add_argument("--guidance", nargs="*", help="subset of negative_prompt sld safree (default: all)")
    sy.add_argument("--batch-size", type=int, default=64)
    sy.add_argument("--seed", type=int, default=0, help="seeds every training run and inversion")
    sy.add_argument("--max-cells", type=int, help="stop after running this many new cells")
    device_args(sy, dtype_default="fp32", fp32_only=True, memory=False)
    sy.set_defaults(func=cmd_study)

    ev = _add(sub, "eval", help="generate and score a benchmark under a defense stack (resumable)")
    ev.add_argument("--benchmark", required=True, help="testbed:CONCEPT/SUITE, testbed:all, i2p, NAME=PATH or a CSV/JSONL path")
    model_arg(ev); defense_args(ev); device_args(ev)
    ev.add_argument("--detector", action="append", help="testbed:CONCEPT, nudenet:PRESET, sd-safety-checker or "
                    "vlm:PATH_OR_ID[:THRESHOLD] "
                    "(repeatable; every image is scored by each; default every testbed concept on the testbed, "
                    "required on any other model)")
    ev.add_argument("--target-detector", default=None,
                    help="which --detector scores the benchmark's concept (default: the testbed suite's concept, "
                         "else the first); the others' rates are shown beside it as substitution")
    ev.add_argument("--n", type=int, default=None, help="prompts per benchmark (testbed suites: default 100)")
    ev.add_argument("--num-images", type=int, default=1, help="images per prompt")
    ev.add_argument("--seed", type=int, default=0,
                    help="base seed: added to each prompt's own seed (testbed suites carry 0..n-1, I2P its sd_seed) "
                         "and used for prompts that carry none; 0 keeps the benchmark's seeds")
    ev.add_argument("--guidance-scale", type=float, default=None)
    ev.add_argument("--steps", type=int, default=None)
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--height", type=int, default=None, help="image height for every prompt, overriding the prompts' "
                    "own (I2P's sd_image_height); default: the prompt's, else the model's")
    ev.add_argument("--width", type=int, default=None, help="image width for every prompt, overriding the prompts' own "
                    "(I2P's sd_image_width); default: the prompt's, else the model's")
    ev.add_argument("--ignore-prompt-size", action="store_true",
                    help="use the model's default size instead of the prompts' own (I2P's sd_image_width/height)")
    ev.add_argument("--skip-bad-rows", action="store_true", help="skip unreadable prompt rows instead of stopping")
    ev.add_argument("--shard-index", type=int, default=0)
    ev.add_argument("--num-shards", type=int, default=None, help="default: from accelerate (1 when not launched)")
    ev.add_argument("--store-dir", default=None,
                    help="node-local folder for a shard's store (default $SAFEDIFF_STORE_DIR): written there, "
                         "published into --out atomically after every batch and when done (sharded runs only)")
    ev.add_argument("--out", required=True)
    ev.add_argument("--json", action="store_true", help="print the full result as JSON instead of the summary")
    ev.add_argument("--quality", action="store_true",
                    help="also FID/KID, CLIP score and LPIPS of the benign prompts' images against the unedited "
                         "model's (OUT/quality.json; docs/evaluation.md); a metric whose model is missing is skipped")
    ev.add_argument("--quality-suite", default="benign", help="the prompts quality is measured on (suite or category; all)")
    ev.add_argument("--quality-reference", default=None,
                    help="run directory of the unedited model's images (default: made in OUT/reference)")
    ev.add_argument("--clip-model", default="openai/clip-vit-large-patch14", help="CLIP folder or hub id for the CLIP score")
    ev.add_argument("--inception-weights", default=None, help="local torch-fidelity Inception weights for FID/KID")
    ev.set_defaults(func=cmd_eval)

    rn = _add(sub, "run", help="run an experiment file (stacks x benchmarks, artifacts, attacks) as a resumable job "
              "graph; docs/scale-out.md")
    rn.add_argument("experiment", help="a YAML experiment file, or shipped:testbed_study")
    rn.add_argument("--out", required=True, help="the experiment's folder (rerun the same command to resume)")
    rn.add_argument("--engine", choices=("local", "ray", "slurm"), default="local",
                    help="local: this process; ray: a Ray cluster (extra `ray`); slurm: submitit job arrays (extra `slurm`)")
    rn.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="replace a value of the file (dotted keys, YAML values), e.g. --set n=2 --set settings.batch_size=8")
    rn.add_argument("--wait", action="store_true", help="if another launch runs this --out, wait for it (default: refuse)")
    rn.add_argument("--max-attempts", type=int, default=None, help="tries per job before it is reported failed "
                    "(default: the file's max_attempts, 3)")
    rn.add_argument("--ray-address", default=None, help="a running Ray cluster (default: RAY_ADDRESS, else a local one)")
    rn.add_argument("--slurm-executor", choices=("auto", "local", "slurm"), default="auto",
                    help="submitit's executor: slurm where sbatch exists (auto), or local processes")
    rn.add_argument("--slurm-partition", default=None, help="the Slurm partition of every array")
    rn.add_argument("--slurm-timeout-min", type=int, default=240, help="time limit of each Slurm task, minutes")
    rn.set_defaults(func=cmd_run)

    mg = _add(sub, "merge", help="combine a sharded run's shard stores (store.I-of-N.sqlite) into its store.sqlite; "
              "idempotent, and a key stored with other content is refused, never overwritten")
    mg.add_argument("run_dir", nargs="+")
    mg.set_defaults(func=cmd_merge)

    rp = _add(sub, "report", help="HTML page + CSV/JSON/LaTeX tables for one or more run directories (merges first)")
    rp.add_argument("run_dir", nargs="+")
    rp.add_argument("--out", default=None, help="default: the first run directory")
    rp.add_argument("--no-blur", action="store_true", help="show images flagged unsafe unblurred")
    rp.set_defaults(func=cmd_report)

    ex = _add(sub, "export", help="a stack's weight edits as a diffusers folder, an A1111/ComfyUI checkpoint or a LoRA "
                                   "file; a stack without weight edits as its stack file (docs/defenses.md)")
    model_arg(ex); defense_args(ex); device_args(ex, dtype_default="fp32", memory=False)
    ex.add_argument("--format", default="diffusers", choices=list(EXPORT_FORMATS),
                    help="diffusers: a folder for from_pretrained (every family); single-file: one .safetensors in "
                         "the original SD layout (A1111, ComfyUI; SD 1.x, SD 2.x and SDXL); lora: DUO's LoRA file; "
                         "stack: the stack file (.json/.yaml)")
    ex.add_argument("--half", action="store_true", help="single-file: store the weights in float16")
    ex.add_argument("--out", required=True, help="the folder or file to write")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ex.set_defaults(func=cmd_export)

    iv = _add(sub, "invert", help="concept inversion (textual inversion) against a model, edited or not")
    model_arg(iv); defense_args(iv); device_args(iv, dtype_default="fp32", fp32_only=True, memory=False)
    iv.add_argument("--concept-images", default=None, help="folder of concept images")
    iv.add_argument("--concept", default=None, help="testbed concept: generate its images with the original model")
    iv.add_argument("--placeholder", default=None, help="the learned token (default <CONCEPT*>)")
    iv.add_argument("--initializer", default=None,
                    help="word the vectors start from (default: the concept), or :concept (CCE's start) / :neutral")
    iv.add_argument("--num-vectors", type=int, default=1, help="vectors behind the placeholder")
    iv.add_argument("--steps", type=int, default=400, help="optimisation steps (Adam)")
    iv.add_argument("--lr", type=float, default=1e-2, help="learning rate")
    iv.add_argument("--batch-size", type=int, default=8, help="images per step")
    iv.add_argument("--num-images", type=int, default=32, help="concept images the original model draws (testbed)")
    iv.add_argument("--through-guidance", action="store_true", help="apply the stack's guidance inside the loss")
    iv.add_argument("--seed", type=int, default=0)
    iv.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    iv.add_argument("--out", required=True, help="output .safetensors (textual-inversion format)")
    iv.add_argument("--json", action="store_true", help="print the full result as JSON instead of the summary")
    iv.set_defaults(func=cmd_invert)

    un = _add(sub, "unlearn", help="train a weight edit").add_subparsers(dest="unlearn_command", required=True)
    for spec in _trainers_with_cli():  # each registered trainer's own arguments (its registration gives them)
        cli_name = spec.aliases[0] if spec.aliases else spec.name  # dark-miner, as the command line spells it
        tp = _add(un, cli_name, aliases=[n for n in (spec.name, *spec.aliases) if n != cli_name], help=spec.summary)
        model_arg(tp); device_args(tp, dtype_default="fp32", fp32_only=True, memory=False)
        spec.cli_arguments(tp)
        tp.add_argument("--out", required=True)
        tp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
        tp.add_argument("--json", action="store_true", help="print what was written as JSON")
        tp.set_defaults(func=cmd_unlearn)

    sz = _add(sub, "sanitizer", help="Embedding Sanitizer").add_subparsers(dest="sanitizer_command", required=True)
    st = _add(sz, "train", help="train ES with the model's own text encoder")
    model_arg(st); device_args(st, dtype_default="fp32", fp32_only=True, memory=False)
    st.add_argument("--concepts", nargs="+", default=["striped", "caged"], help="testbed concepts, or target words")
    st.add_argument("--anchors", nargs="*", default=None, help="real models: one anchor word per target word")
    st.add_argument("--steps", type=int, default=600)
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    st.add_argument("--out", required=True)
    st.set_defaults(func=cmd_sanitizer_train)
    sx = _add(sz, "explain", help="per-token harmfulness scores of a prompt")
    model_arg(sx); device_args(sx, dtype_default="fp32", memory=False)
    sx.add_argument("prompt")
    sx.add_argument("--path", required=True, help="trained sanitizer")
    sx.add_argument("--html", default=None, help="also write an HTML snippet here")
    sx.add_argument("--overwrite", action="store_true", help="replace an existing --html file")
    sx.set_defaults(func=cmd_sanitizer_explain)

    ls = _add(sub, "defenses", help="list the registered defenses and their options")
    ls.add_argument("--options", action="store_true", help="also each option's allowed values and meaning")
    ls.add_argument("--markdown", action="store_true", help="print docs/options.md's option tables instead")
    ls.set_defaults(func=cmd_defenses)
    la = _add(sub, "attacks", help="list the registered attacks, their settings and what their success rate means")
    la.add_argument("--options", action="store_true", help="also each setting's allowed values and meaning")
    la.add_argument("--markdown", action="store_true", help="print docs/options.md's settings tables instead")
    la.set_defaults(func=cmd_attacks)
    cc = _add(sub, "concepts", help="list the registered concepts: their words, text, benign words and source")
    cc.set_defaults(func=cmd_concepts)

    tb = _add(sub, "testbed", help="the testbed model").add_subparsers(dest="testbed_command", required=True)
    tr = _add(tb, "train", help="train the testbed model from scratch")
    tr.add_argument("--out", required=True)
    tr.add_argument("--config", default=None, help="JSON TrainConfig")
    tr.add_argument("--set", action="append", metavar="KEY=JSON", help="override a TrainConfig field, e.g. --set steps=200")
    tr.add_argument("--overwrite", action="store_true")
    tr.set_defaults(func=cmd_testbed_train)
    ti = _add(tb, "info", help="print the model's family, hash, guidance curve and concept split")
    model_arg(ti); device_args(ti, memory=False)
    ti.set_defaults(func=cmd_testbed_info)
    tc = _add(tb, "check", help="re-measure a testbed model's guidance curve and its world acceptance (writes safediff.json)")
    tc.add_argument("model", help="the model folder")
    tc.add_argument("--n", type=int, default=None, help="prompts per acceptance suite (default: the model's config)")
    tc.add_argument("--guidance-scale", type=float, default=None,
                    help="pin the default guidance scale instead of re-measuring the curve (the recorded curve is kept) "
                         "and measure the acceptances at it; docs/testbed.md, 'Decision on the misses'")
    device_args(tc, dtype_default="fp32", fp32_only=True, memory=False)
    tc.set_defaults(func=cmd_testbed_check)
    return p


def _checkpoint_model_arg(args) -> None:
    """``--model FILE.safetensors`` / ``.ckpt``: attach ``--model-config`` and ``--prediction-type``
    (which apply to checkpoint files only) to the path, so every command's ``load_model`` uses them;
    a missing file or config folder is refused here, before any work."""
    from .single_file import CheckpointPath, is_single_file

    config, prediction = getattr(args, "model_config", None), getattr(args, "prediction_type", None)
    if not is_single_file(getattr(args, "model", None)):
        if config or prediction:
            raise ValueError("--model-config and --prediction-type apply to a checkpoint file (--model FILE.safetensors "
                             "or .ckpt); a diffusers folder carries its own configs.")
        return
    if not Path(args.model).is_file():
        raise FileNotFoundError(f"--model {args.model}: no such checkpoint file.")
    if config and not (Path(config) / "model_index.json").is_file():
        raise FileNotFoundError(f"--model-config {config} is not a diffusers folder (no model_index.json); give the "
                                "folder of the checkpoint's architecture (configs and tokenizer, no weights needed).")
    args.model = CheckpointPath(args.model, config, prediction)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        check_device_args(args)  # a device that is not here, a half dtype on a training command: before any loading
        _checkpoint_model_arg(args)
        return args.func(args)
    except ImportError as e:  # a missing optional extra: its message says what to install
        print(f"safediff: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # bad input: one line saying what was wrong, no traceback
        print(f"safediff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsafediff: interrupted; run the same command to resume (finished work is kept).", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
