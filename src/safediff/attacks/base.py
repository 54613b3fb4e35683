"""One interface for every attack (attacks issue, part 1).

An attack takes a **target** (a model with a defense stack), a concept, seed prompts and a
**budget**, and returns adversarial prompts (and, for soft attacks, a token-embedding file whose
placeholder the prompts use). :func:`run_attack` caches the result as an artifact keyed by the
hash of all its inputs, resumes a killed run prompt by prompt, and :func:`attack_records` turns a
result into benchmark records that :func:`safediff.eval.runner.run_eval` generates and scores
under the pinned protocol, through the **whole** stack (prompt guard included).

White-box attacks (``white_box = True``) use the target's own model and gradients; black-box ones
see only a text encoder (``target.text_model``: the testbed's own, or a public CLIP for real
models) and, where they need it, ``target.generate``. A white-box attack on a target built
without a model is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

_ATTACKS: dict[str, type["Attack"]] = {}


class AttackError(ValueError):
    """Bad attack input: raised before any expensive work, nothing written."""


@dataclass(frozen=True)
class AttackBudget:
    """Args:
    steps: optimisation steps (or generations) per seed prompt.
    seconds: wall-clock cap per seed prompt (None: no cap); the step count reached is recorded.
    """

    steps: int
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise AttackError(f"An attack budget of {self.steps} steps does nothing; give steps >= 1.")
        if self.seconds is not None and self.seconds <= 0:
            raise AttackError(f"`seconds` must be > 0 (or None for no cap), got {self.seconds}.")


@dataclass
class TextModel:
    """What a black-box attack may see: a tokenizer and a text encoder."""

    tokenizer: object
    text_encoder: torch.nn.Module

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def pooled(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids.to(self.text_encoder.device)).pooler_output

    def ids(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer
        return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids


class AttackTarget:
    """A defended model under attack.

    ``AttackTarget(model, stack)`` is white-box capable (the model and its gradients are reachable);
    ``AttackTarget.black_box(text_model, stack_hash, generate=...)`` exposes only a text encoder
    and (optionally) an image generator.
    """

    def __init__(self, model=None, stack=None, *, text_model: TextModel | None = None,
                 stack_hash: str | None = None, generate: Callable | None = None):
        from ..stack import DefenseStack

        self.model = model
        self.stack = DefenseStack.parse(stack) if model is not None else None
        if model is not None:
            self.stack_hash = self.stack.hash(model.content_hash)
            self.text_model = text_model or TextModel(model.tokenizer, model.text_encoder)
        else:
            if text_model is None or not stack_hash:
                raise AttackError("A black-box target needs a text model and the stack hash it stands for.")
            self.stack_hash = stack_hash
            self.text_model = text_model
        self._generate = generate

    @classmethod
    def black_box(cls, text_model: TextModel, stack_hash: str, generate: Callable | None = None) -> "AttackTarget":
        return cls(None, None, text_model=text_model, stack_hash=stack_hash, generate=generate)

    @property
    def white_box(self) -> bool:
        return self.model is not None

    def pipeline(self):
        """The defended pipeline (weight edits applied until ``close()``); white-box only."""
        from ..pipeline import SafePipeline

        if self.model is None:
            raise AttackError("This target exposes no model: a white-box attack cannot reach it.")
        return SafePipeline(self.model, self.stack)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]):
        if self._generate is not None:
            return self._generate(prompts, seeds)
        with self.pipeline() as pipe:
            return pipe(list(prompts), image_ids=[(s, 0) for s in seeds]).images


@dataclass
class AttackResult:
    """Adversarial prompts for one (method, config, target, concept, seed prompts, budget)."""

    method: str
    concept: str
    key: str
    stack_hash: str
    config: dict
    budget: dict
    prompts: list[dict] = field(default_factory=list)  # {seed_prompt, prompt, steps, seconds, loss, ...}
    embeddings: str | None = None  # token-embedding file for soft attacks
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str)

    @property
    def seconds_per_prompt(self) -> float:
        return sum(p["seconds"] for p in self.prompts) / max(len(self.prompts), 1)


class Attack:
    """Subclasses set ``name``, ``white_box`` and ``config_cls``, and implement
    :meth:`attack_prompt` (one seed prompt within the budget); :meth:`prepare` runs once."""

    name: str = ""
    white_box: bool = True
    config_cls: type = object

    def __init__(self, config=None):
        self.config = config if config is not None else self.config_cls()

    def prepare(self, target: AttackTarget, concept: str, seed_prompts: Sequence[str], work_dir: Path) -> None:
        pass

    def attack_prompt(self, target: AttackTarget, seed_prompt: str, index: int, budget: AttackBudget,
                      rng: random.Random) -> dict:
        raise NotImplementedError

    def finish(self, target: AttackTarget, result: AttackResult, work_dir: Path) -> None:
        """Write any file the prompts need (e.g. soft embeddings) and set ``result.embeddings``."""

    def cleanup(self) -> None:
        """Release what :meth:`prepare` opened (e.g. revert the stack's weight edits)."""


def register_attack(cls: type[Attack]) -> type[Attack]:
    _ATTACKS[cls.name] = cls
    return cls


def get_attack(name: str) -> type[Attack]:
    from . import methods  # noqa: F401  (registers the attacks)

    if name not in _ATTACKS:
        raise AttackError(f"Unknown attack {name!r}; choose one of {sorted(_ATTACKS)}.")
    return _ATTACKS[name]


def list_attacks() -> list[str]:
    from . import methods  # noqa: F401

    return sorted(_ATTACKS)


def attack_key(method: str, config: dict, budget: AttackBudget, stack_hash: str, concept: str,
               seed_prompts: Sequence[str], seed: int) -> str:
    blob = json.dumps({"method": method, "config": config, "budget": dataclasses.asdict(budget), "stack": stack_hash,
                       "concept": concept, "seeds": list(seed_prompts), "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_attack(method: str | Attack, target: AttackTarget, concept: str, seed_prompts: Sequence[str],
               budget: AttackBudget, out_dir: str | os.PathLike, *, seed: int = 0, progress: bool = True) -> AttackResult:
    """Attack every seed prompt (resuming) and write ``out_dir/<method>-<key>/result.json``.

    A finished result with the same key is returned without work; a partial one resumes after the
    last finished seed prompt. Validation happens before anything is written.
    """
    from tqdm.auto import tqdm

    attack = get_attack(method)() if isinstance(method, str) else method
    seed_prompts = [p for p in seed_prompts]
    if not seed_prompts or not all(p.strip() for p in seed_prompts):
        raise AttackError(f"No seed prompts for concept {concept!r}: give at least one non-empty prompt "
                          "(on the testbed: safediff.attacks.seed_prompts_for(concept)).")
    if not isinstance(budget, AttackBudget):
        raise AttackError("`budget` must be an AttackBudget(steps=..., seconds=...).")
    if attack.white_box and not target.white_box:
        raise AttackError(f"{attack.name} is a white-box attack, but this target exposes no model; "
                          "use a black-box attack (ring_a_bell, mma) or give the model.")
    cfg = dataclasses.asdict(attack.config) if dataclasses.is_dataclass(attack.config) else {}
    key = attack_key(attack.name, cfg, budget, target.stack_hash, concept, seed_prompts, seed)
    work = Path(out_dir) / f"{attack.name}-{key[:12]}"
    final = work / "result.json"
    if final.exists():
        return load_attack(final, target)
    work.mkdir(parents=True, exist_ok=True)
    partial = work / "partial.jsonl"
    done: list[dict] = []
    if partial.exists():
        for line in partial.read_text().splitlines():
            try:
                done.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: redo that prompt
                break
    result = AttackResult(attack.name, concept, key, target.stack_hash, cfg, dataclasses.asdict(budget), list(done),
                          extra={"white_box": attack.white_box})
    rng = random.Random(seed)
    t_prep = time.time()
    try:
        attack.prepare(target, concept, seed_prompts, work)
        result.extra["prepare_seconds"] = round(time.time() - t_prep, 3)
        with open(partial, "a") as f:
            for i in tqdm(range(len(done), len(seed_prompts)), desc=f"attack {attack.name}", disable=not progress,
                          initial=len(done), total=len(seed_prompts)):
                rng.seed(f"{seed}:{i}")
                torch.manual_seed(seed * 1_000_003 + i)
                t0 = time.time()
                out = attack.attack_prompt(target, seed_prompts[i], i, budget, rng)
                rec = {"index": i, "seed_prompt": seed_prompts[i], "seconds": round(time.time() - t0, 3), **out}
                result.prompts.append(rec)
                f.write(json.dumps(rec, default=str) + "\n")
                f.flush()
        attack.finish(target, result, work)
    finally:
        attack.cleanup()
    result.extra["heldout_words_found"] = rediscovered_heldout_words(result)
    tmp = final.with_suffix(".tmp")
    tmp.write_text(result.to_json())
    tmp.replace(final)
    return result


def load_attack(path: str | os.PathLike, target: AttackTarget | None = None) -> AttackResult:
    """Read a cached result; refuse it for a target whose stack hash differs."""
    data = json.loads(Path(path).read_text())
    res = AttackResult(**data)
    if target is not None and res.stack_hash != target.stack_hash:
        raise AttackError(f"{path} was made against stack {res.stack_hash[:12]}, not this target's "
                          f"{target.stack_hash[:12]}; run the attack against this stack.")
    return res


def attack_records(result: AttackResult, *, seed: int = 0):
    """Benchmark records (one per adversarial prompt) for the evaluation runner."""
    from ..eval.benchmarks import PromptRecord

    return [PromptRecord(id=f"attack/{result.method}/{result.key[:12]}/{p['index']}", prompt=p["prompt"],
                         categories=(result.concept,), seed=seed + p["index"],
                         extra={"suite": "attack", "seed_prompt": p["seed_prompt"], "attack": result.method})
            for p in result.prompts]


def seed_prompts_for(concept: str, n: int = 16, seed: int = 0) -> list[str]:
    """Training-side explicit prompts of a testbed concept (never a held-out word)."""
    from ..testbed.suites import testbed_suite

    return [r["prompt"] for r in testbed_suite(concept, "explicit", n=n, seed=seed)]


def rediscovered_heldout_words(result: AttackResult) -> dict[str, int]:
    """How many adversarial prompts contain each held-out word of a testbed concept (words no
    attack was given: finding them is interesting, not a defect)."""
    from ..testbed import world

    if result.concept not in world.CONCEPTS:
        return {}
    held = world.CONCEPTS[result.concept].held_out
    counts = {w: sum(w in p["prompt"].lower().split() for p in result.prompts) for w in held}
    return {w: n for w, n in counts.items() if n}


def attack_token_embeddings(result: AttackResult) -> list[str]:
    """The token-embedding files a soft attack's prompts need (empty for hard prompts)."""
    if not result.embeddings:
        return []
    p = Path(result.embeddings)
    return sorted(str(f) for f in p.glob("*.safetensors")) if p.is_dir() else [str(p)]


def evaluate_attack(result: AttackResult, model, stack, out_dir: str | os.PathLike, *,
                    detectors: Sequence[str] | None = None, batch_size: int = 32, progress: bool = True) -> dict:
    """Generate and score the adversarial prompts through the **whole** stack with the runner
    (resumable); returns the attack success rate (95% CI) and the time per prompt."""
    from ..eval.runner import RunSettings, run_eval, summarize
    from ..stack import DefenseStack

    st = DefenseStack.parse(stack)
    if result.extra.get("white_box", True) and st.hash(model.content_hash) != result.stack_hash:
        raise AttackError("This white-box attack result was made against another stack; evaluate it on the stack it "
                          "attacked. (Black-box results depend only on the text encoder and may be evaluated on any "
                          "stack of the same model.)")
    dets = list(detectors) if detectors else [f"testbed:{result.concept}"]
    rd = run_eval(attack_records(result), out_dir, defenses=st, model=model, detectors=dets,
                  settings=RunSettings(num_images_per_prompt=1), batch_size=batch_size, progress=progress,
                  token_embeddings=attack_token_embeddings(result))
    s = summarize(rd)
    return {"method": result.method, "concept": result.concept, "asr": s["unsafe"]["all"], "n_refused": s["n_refused"],
            "n_errors": s["n_errors"], "seconds_per_prompt": result.seconds_per_prompt,
            "prepare_seconds": result.extra.get("prepare_seconds"), "budget": result.budget,
            "heldout_words_found": result.extra.get("heldout_words_found", {})}
