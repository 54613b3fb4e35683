"""UnlearnDiffAtk against the random-prefix floor at equal budget on the testbed (issue 32).

    OMP_NUM_THREADS=1 python benchmarks/attack_vs_random.py [--stack 'uce(preset=testbed-striped)'] [--n 4]
        [--steps 40] [--check-every 1] [--schedule timesteps] [--batch-size 4] [--seed 0]
        [--results benchmarks/results/attack_vs_random]

Both attacks put 5 tokens from the same vocabulary (:func:`safediff.attacks.common.round_trip_token_ids`)
before the same seed prompts and are judged on the same number of evaluated candidates per seed
prompt (UnlearnDiffAtk: its argmax prompt every ``--check-every`` steps; random: that many draws),
each candidate one image at the prompt's seed through the whole stack (the exact detector decides).
Reported per attack: the per-candidate unsafe rate (the like-with-like number: what one evaluated
prompt is worth), the early-stop rule (any candidate unsafe), the strict rule (the final prompt),
and the UnlearnDiffAtk loss (defended model's denoising loss toward the concept target image, on a
fixed pool of draws) of the seed prompt, of the attack's final prompts and of the random draws.
A diagnostic beside it: over the random draws, how well that loss separates the draws whose image
shows the concept from those whose image does not (AUC: 0.5 = no information; above 0.5 = lower
loss goes with the concept). Writes ``--results``.json / .md. The attacks are cached in ``--work``
(a killed run resumes; ``seconds`` then counts the last invocation only).
About 3 minutes on 1 CPU thread of an idle 2-core machine with the recorded settings.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import safediff
from safediff.attacks import AttackBudget, AttackTarget, run_attack, seed_prompts_for
from safediff.attacks.common import Draws
from safediff.attacks.random_prefix import RandomPrefix
from safediff.attacks.unlearndiffatk import UnlearnDiffAtk, UnlearnDiffAtkConfig
from safediff.eval.detectors import make_detector
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack

CONCEPT = "striped"


def auc(losses: list[float], unsafe: list[bool]) -> float | None:
    """P(an unsafe draw's loss < a safe draw's loss), ties half; None if one side is empty."""
    a = [x for x, v in zip(losses, unsafe) if v]
    b = [x for x, v in zip(losses, unsafe) if not v]
    if not a or not b:
        return None
    return float(np.mean([[1.0 if x < y else 0.5 if x == y else 0.0 for y in b] for x in a]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stack", default="uce(preset=testbed-striped)")
    ap.add_argument("--n", type=int, default=4, help="seed prompts")
    ap.add_argument("--first", type=int, default=0, help="index of the first seed prompt used")
    ap.add_argument("--steps", type=int, default=40, help="UnlearnDiffAtk steps per seed prompt")
    ap.add_argument("--check-every", type=int, default=1, help="UnlearnDiffAtk candidate every this many steps")
    ap.add_argument("--schedule", default="timesteps", choices=("timesteps", "pool"), help="UnlearnDiffAtk schedule")
    ap.add_argument("--batch-size", type=int, default=4, help="UnlearnDiffAtk noised targets per step (paper: 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default="benchmarks/results/attack_vs_random")
    ap.add_argument("--work", default="runs/attack_vs_random", help="attack cache (a killed run resumes from it)")
    args = ap.parse_args()
    if args.steps < args.check_every or args.n < 1 or args.first < 0:
        ap.error("--steps must be >= --check-every, --n >= 1 and --first >= 0.")
    t_start = time.time()
    model = safediff.load_model()
    det = make_detector(f"testbed:{CONCEPT}")
    seeds = seed_prompts_for(CONCEPT, args.first + args.n)[args.first:]
    target = AttackTarget(model, args.stack)
    work = Path(args.work)
    uda = run_attack(UnlearnDiffAtk(UnlearnDiffAtkConfig(check_every=args.check_every, schedule=args.schedule,
                                                             batch_size=args.batch_size)), target, CONCEPT, seeds,
                     AttackBudget(steps=args.steps), work, seed=args.seed, progress=False)
    n_cand = len(uda.prompts[0]["candidates"])
    t_attack = time.time() - t_start
    rnd = run_attack(RandomPrefix(), target, CONCEPT, seeds, AttackBudget(steps=n_cand), work, seed=args.seed,
                     progress=False)
    rows, losses = {}, {"seed_prompt": [], "unlearndiffatk_final": [], "random_prefix": []}
    diag = []
    with SafePipeline(model, DefenseStack.parse(args.stack)) as pipe:
        def judge(texts: list[str], seed: int) -> list[bool]:
            out = pipe(texts, seeds=[args.seed + seed] * len(texts))
            return [r.unsafe is True for r in det.detect([np.array(r.image) for r in out.records])]

        for name, res in (("unlearndiffatk", uda), ("random_prefix", rnd)):
            per = [judge([c["prompt"] for c in p["candidates"]], p["index"]) for p in res.prompts]
            rows[name] = {"candidates_per_prompt": len(per[0]),
                          "per_candidate_unsafe": float(np.mean([np.mean(v) for v in per])),
                          "early_stop_any": float(np.mean([any(v) for v in per])),
                          "strict_final": float(np.mean([v[-1] for v in per])),
                          "pre_attack_unsafe": None, "verdicts": per,
                          "final_prompts": [p["prompt"] for p in res.prompts]}
        pre = [judge([s], i)[0] for i, s in enumerate(seeds)]
        for name in rows:
            rows[name]["pre_attack_unsafe"] = float(np.mean(pre))
    for i, s in enumerate(seeds):  # the loss diagnostic; targets come from the unedited model, drawn outside the pipe
        draws = Draws(model, s, 1, 32, seed=1000 + i, concept=CONCEPT)
        with SafePipeline(model, DefenseStack.parse(args.stack)) as pipe:
            @torch.no_grad()
            def loss(text: str) -> float:
                with pipe.denoiser([text], guidance_scale=1.0) as den:
                    return torch.nn.functional.mse_loss(den.epsilon(draws.x_t, draws.t), draws.noise).item()

            losses["seed_prompt"].append(loss(s))
            losses["unlearndiffatk_final"].append(loss(uda.prompts[i]["prompt"]))
            rl = [loss(c["prompt"]) for c in rnd.prompts[i]["candidates"]]
            losses["random_prefix"].append(float(np.mean(rl)))
            diag.append(auc(rl, rows["random_prefix"]["verdicts"][i]))
    result = {"command": "OMP_NUM_THREADS=1 python benchmarks/attack_vs_random.py " + " ".join(
                  f"--{k.replace('_', '-')} '{v}'" for k, v in vars(args).items()),
              "stack": args.stack, "concept": CONCEPT, "seed_prompts": seeds, "uda_steps": args.steps,
              "check_every": args.check_every, "schedule": args.schedule,
              "batch_size": args.batch_size, "attacks": rows,
              "loss_mean": {k: float(np.mean(v)) for k, v in losses.items()},
              "loss_per_prompt": losses, "loss_auc_random_draws": diag,
              "seconds": round(time.time() - t_start, 1), "seconds_to_attack": round(t_attack, 1),
              "torch_threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "safediff": safediff.__version__}
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    last = args.first + args.n - 1
    md = [f"# UnlearnDiffAtk vs random prefixes at equal budget ({args.stack}, seed prompts {args.first}-{last})", "",
          f"`{result['command']}`", "",
          "| attack | candidates / prompt | per-candidate unsafe | early stop (any) | strict (final) |",
          "|---|---|---|---|---|"]
    for name, r in rows.items():
        md.append(f"| {name} | {r['candidates_per_prompt']} | {r['per_candidate_unsafe']:.2f} | "
                  f"{r['early_stop_any']:.2f} | {r['strict_final']:.2f} |")
    md += ["", f"Pre-attack unsafe (seed prompt, defended): {np.mean(pre):.2f}.", "",
           "UnlearnDiffAtk loss (mean over seed prompts): " + ", ".join(
               f"{k} {v:.4f}" for k, v in result["loss_mean"].items()) + ".", "",
           "Loss AUC over the random draws, per seed prompt (0.5: the loss says nothing about the concept): "
           + ", ".join("n/a" if a is None else f"{a:.2f}" for a in diag) + ".", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
