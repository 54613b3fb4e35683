"""One interface for every attack: config classes, a registry that validates, cached and
resumable runs, evaluation through the whole stack.

An attack takes a **target** (a model with a defense stack), a concept, seed prompts and a
**budget**. A *prompt* attack returns adversarial prompts (and, for soft attacks, a token-embedding
file whose placeholder the prompts use); a *weight* attack (fine-tune relearning) returns weight
changes. :func:`run_attack` caches the result keyed by the hash of all its inputs and resumes a
killed run; :func:`evaluate_attack` generates and scores it with the runner under the pinned
protocol, through the **whole** stack (prompt guard and output filter included).

White-box attacks (``white_box = True``) use the target's own model and gradients, through the
pipeline's defended denoiser; black-box ones see only a text encoder (``target.text_model``: the
testbed's own, or a public CLIP for real models). A white-box attack on a target built without a
model is an error.

One module per attack (:mod:`.concept_inversion`, :mod:`.p4d`, :mod:`.unlearndiffatk`,
:mod:`.ring_a_bell`, :mod:`.mma`, :mod:`.relearning`); shared helpers in :mod:`.common`.
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
from typing import Any, ClassVar, Sequence

import torch

from ..encoding import clip_ids, clip_pooled
from ..options import check_options, config_from_options
from ..worlds import world_of

_ATTACKS: dict[str, type["Attack"]] = {}


class AttackError(ValueError):
    """Bad attack input: raised before any expensive work, nothing written."""


class AttackConfig:
    """Base of every attack config (a frozen dataclass): options are declared with
    :func:`safediff.options.option` and judged from that schema (:func:`~safediff.options.check_options`);
    :meth:`from_options` builds one from a dict or ``key=value`` text (CLI ``--set``), typed by
    the fields, with the parser every method shares, and refuses unknown keys."""

    #: the attack's name (set by :func:`register_attack`; it names the attack in error messages)
    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        """Judge every option from its schema; a subclass with its own ``__post_init__`` calls
        this first, then checks what relates options."""
        check_options(self, error=AttackError)

    @classmethod
    def from_options(cls, options: dict[str, Any] | Sequence[str] | None) -> "AttackConfig":
        return config_from_options(cls, options, kind="attack", from_text=True, error=AttackError)


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
        return self.text_encoder(ids.to(self.text_encoder.device)).last_hidden_state

    @torch.no_grad()
    def pooled(self, ids: torch.Tensor) -> torch.Tensor:
        return clip_pooled(self.text_encoder(ids.to(self.text_encoder.device)))

    def ids(self, prompts: Sequence[str]) -> torch.Tensor:
        return clip_ids(self.tokenizer, prompts)


class AttackTarget:
    """A defended model under attack.

    ``AttackTarget(model, stack)`` is white-box capable (the model and its gradients are reachable);
    ``AttackTarget.black_box(text_model, stack_hash)`` exposes only a text encoder.
    """

    def __init__(self, model=None, stack=None, *, text_model: TextModel | None = None,
                 stack_hash: str | None = None):
        from ..stack import DefenseStack

        self.model = model
        self.stack = DefenseStack.parse(stack) if model is not None else None
        if model is not None:
            from ..defenses.base import check_config_for_model

            for cfg in self.stack.active().defenses:  # testbed-only settings refused before the attack runs
                check_config_for_model(cfg, model)
            self.stack_hash = self.stack.hash(model.content_hash)
            self.text_model = text_model or TextModel(model.tokenizer, model.text_encoder)
        else:
            if text_model is None or not stack_hash:
                raise AttackError("A black-box target needs a text model and the stack hash it stands for.")
            self.stack_hash = stack_hash
            self.text_model = text_model

    @classmethod
    def black_box(cls, text_model: TextModel, stack_hash: str) -> "AttackTarget":
        return cls(None, None, text_model=text_model, stack_hash=stack_hash)

    @property
    def white_box(self) -> bool:
        return self.model is not None

    def pipeline(self):
        """The defended pipeline (weight edits applied until ``close()``); white-box only."""
        from ..pipeline import SafePipeline

        if self.model is None:
            raise AttackError("This target exposes no model: a white-box attack cannot reach it.")
        return SafePipeline(self.model, self.stack)


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
    """Subclasses set ``name``, ``white_box``, ``kind`` and ``config_cls``.

    A prompt attack (``kind = "prompt"``) implements :meth:`attack_prompt` (one seed prompt within
    the budget); :meth:`prepare` runs once, :meth:`finish` writes what the prompts need,
    :meth:`cleanup` releases what ``prepare`` opened. A weight attack (``kind = "weights"``)
    implements :meth:`run` and :meth:`evaluate`. A latent attack (``kind = "latents"``: latent
    inversion) implements :meth:`run` (its starting latents) and ``evaluate_latents`` (regeneration
    through a stack, both counting rules)."""

    name: ClassVar[str] = ""
    white_box: ClassVar[bool] = True
    kind: ClassVar[str] = "prompt"
    config_cls: ClassVar[type] = AttackConfig
    #: the family capabilities this attack needs (:data:`safediff.families.CAPABILITIES`; checked by
    #: :func:`safediff.support.check_supported` before any work)
    requires: ClassVar[frozenset[str]] = frozenset()
    #: what this attack's success rate means here and in its paper (the protocol card's ``asr``;
    #: :data:`safediff.eval.protocol.ASR_DEFINITIONS` is read from it)
    asr_definition: ClassVar[str] = ""
    #: how its paper's code counts success, ``{"rule", "n_images", "text"}`` (None: no paper rule;
    #: :data:`safediff.eval.protocol.PAPER_RULES` is read from it)
    paper_rule: ClassVar[dict | None] = None

    def __init__(self, config=None):
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise AttackError(f"{self.name} takes a {self.config_cls.__name__}, got {type(self.config).__name__}.")

    def run(self, target: AttackTarget, concept: str, seed_prompts: Sequence[str], budget: AttackBudget,
            work_dir: Path, *, seed: int, progress: bool) -> dict:
        """Weight attacks: do the whole attack in ``work_dir`` (resumable); returns ``extra``."""
        raise NotImplementedError

    def evaluate(self, result: "AttackResult", model, out_dir: Path, *, detectors, n: int, progress: bool) -> dict:
        """Weight attacks: measure the result through the whole stack."""
        raise NotImplementedError

    def evaluate_latents(self, result: "AttackResult", model, stack, out_dir: Path, *, detectors=None,
                         progress: bool = False) -> dict:
        """Latent attacks: regenerate from the result's latents through ``stack``; both rules."""
        raise NotImplementedError

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
    """Register an attack class (a decorator, used once by the attack's own module)."""
    if not cls.name or not cls.name.isidentifier() or not cls.name.islower():
        raise ValueError(f"Attack names must be lower-case identifiers, got {cls.name!r}.")
    if cls.name in _ATTACKS and _ATTACKS[cls.name] is not cls:
        raise KeyError(f"An attack called {cls.name!r} is already registered by {_ATTACKS[cls.name].__module__}.")
    if cls.kind not in ("prompt", "weights", "latents"):
        raise ValueError(f"{cls.__name__}.kind must be 'prompt', 'weights' or 'latents', got {cls.kind!r}.")
    if not (dataclasses.is_dataclass(cls.config_cls) and issubclass(cls.config_cls, AttackConfig)):
        raise TypeError(f"{cls.__name__}.config_cls must be a dataclass subclassing AttackConfig.")
    if cls.paper_rule is not None and cls.paper_rule.get("rule") not in ("early_stop", "ideal_any_of_n", "any_of_n"):
        raise ValueError(f"{cls.__name__}.paper_rule['rule'] must be early_stop, ideal_any_of_n or any_of_n, got "
                         f"{cls.paper_rule.get('rule')!r}.")
    if "name" not in vars(cls.config_cls):
        cls.config_cls.name = cls.name  # names the attack in its options' error messages
    _ATTACKS[cls.name] = cls
    return cls


def get_attack(name: str) -> type[Attack]:
    if name not in _ATTACKS:
        raise AttackError(f"Unknown attack {name!r}; choose one of {sorted(_ATTACKS)}.")
    return _ATTACKS[name]


def list_attacks() -> list[str]:
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
    if getattr(target, "model", None) is not None:
        from ..support import check_supported

        check_supported(attack.name, target.model)  # before any seed prompt is read or work is done
        from ..models import require_fp32

        require_fp32(target.model, f"The {attack.name} attack")  # it optimises through the model (or fine-tunes it)
    seed_prompts = [p for p in seed_prompts]
    if attack.kind in ("prompt", "latents") and (not seed_prompts or not all(isinstance(p, str) and p.strip() for p in seed_prompts)):
        raise AttackError(f"No seed prompts for concept {concept!r}: give at least one non-empty prompt "
                          "(on the testbed: safediff.attacks.seed_prompts_for(concept)).")
    if not isinstance(budget, AttackBudget):
        raise AttackError("`budget` must be an AttackBudget(steps=..., seconds=...).")
    if not concept or not str(concept).strip():
        raise AttackError("Give the concept the attack tries to bring back (e.g. 'striped').")
    if attack.white_box and not target.white_box:
        raise AttackError(f"{attack.name} is a white-box attack, but this target exposes no model; "
                          "use a black-box attack (ring_a_bell, mma) or give the model.")
    cfg = dataclasses.asdict(attack.config) if dataclasses.is_dataclass(attack.config) else {}
    key = attack_key(attack.name, cfg, budget, target.stack_hash, concept, seed_prompts, seed)
    work = Path(out_dir) / f"{attack.name}-{key[:12]}"
    final = work / "result.json"
    if final.exists():
        return load_attack(final, target)
    result = AttackResult(attack.name, concept, key, target.stack_hash, cfg, dataclasses.asdict(budget), [],
                          extra={"white_box": attack.white_box, "kind": attack.kind})
    if attack.kind in ("weights", "latents"):
        work.mkdir(parents=True, exist_ok=True)
        result.extra.update(attack.run(target, concept, seed_prompts, budget, work, seed=seed, progress=progress))
        return _write_result(result, final)
    work.mkdir(parents=True, exist_ok=True)
    partial = work / "partial.jsonl"
    done: list[dict] = []
    if partial.exists():
        for line in partial.read_text().splitlines():
            try:
                done.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: redo that prompt
                break
    result.prompts = list(done)
    rng = random.Random(seed)
    t_prep = time.time()
    attack.progress = progress
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
    return _write_result(result, final)


def _write_result(result: AttackResult, final: Path) -> AttackResult:
    from ..fileio import atomic_write_text

    atomic_write_text(final, result.to_json(), overwrite=True)  # the cache entry of this input hash
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


def evaluate_attack_rules(result: AttackResult, model, stack, out_dir: str | os.PathLike, *,
                          detectors: Sequence[str] | None = None, batch_size: int = 32, progress: bool = True,
                          n_images: int | None = None, seed: int = 0) -> dict:
    """The strict and the paper's attack success rates of a prompt attack's result, through the
    whole stack (resumable; each part in its own run directory under ``out_dir``). Generates what
    the paper's rule (:data:`safediff.eval.protocol.PAPER_RULES`) needs: the final prompts at N
    images (image 0 is the strict rule's image), the seed prompts on the defended stack
    (pre-attack) and, for P4D, on the undefended model (ideal prompts), and, for the early-stop
    rule, every distinct recorded candidate prompt at its seed prompt's seed. Counting is
    :func:`safediff.eval.protocol.attack_success_rates`."""
    from ..eval.benchmarks import PromptRecord
    from ..eval.protocol import PAPER_RULES, attack_success_rates
    from ..eval.runner import RunSettings, load_results, run_eval
    from ..stack import DefenseStack

    if result.extra.get("kind") == "weights":
        raise AttackError("Paper rules count prompt attacks; a weight attack is measured by its own evaluation.")
    if result.extra.get("kind") == "latents":  # regenerated from its latents, both rules counted by the attack
        return get_attack(result.method)().evaluate_latents(result, model, stack, Path(out_dir), detectors=detectors,
                                                            progress=progress)
    if result.method not in PAPER_RULES:
        raise AttackError(f"No paper rule is recorded for {result.method!r}; known: {sorted(PAPER_RULES)}.")
    rule = PAPER_RULES[result.method]
    n = int(n_images if n_images is not None else rule["n_images"])
    if n < 1:
        raise AttackError(f"n_images must be >= 1, got {n}.")
    st = DefenseStack.parse(stack)
    if result.extra.get("white_box", True) and st.hash(model.content_hash) != result.stack_hash:
        raise AttackError("This white-box attack result was made against another stack; evaluate it on the stack it "
                          "attacked.")
    if rule["rule"] == "early_stop" and not all("candidates" in p for p in result.prompts):
        raise AttackError(f"This {result.method} result records no per-step candidate prompts (made before they were "
                          "recorded); rerun the attack to count the early-stop rule.")
    dets = list(detectors) if detectors else [f"testbed:{result.concept}"]
    out = Path(out_dir)

    def verdicts(records, rd: Path, defenses, images: int, embeddings=()) -> dict[str, list]:
        run_eval(records, rd, defenses=defenses, model=model, detectors=dets,
                 settings=RunSettings(num_images_per_prompt=images), batch_size=batch_size, progress=progress,
                 token_embeddings=list(embeddings), benchmark_name=f"attack-rules:{result.method}")
        by: dict[str, dict[int, bool | None]] = {}
        for r in load_results(rd):
            by.setdefault(r["prompt_id"], {})[r["image_index"]] = None if r["error"] is not None else r["unsafe"]
        return {pid: [d.get(k) for k in range(images)] for pid, d in by.items()}

    recs = attack_records(result, seed=seed)
    final = verdicts(recs, out / f"final_n{n}", st, n, attack_token_embeddings(result))
    seeds = [PromptRecord(id=f"seed/{p['index']}", prompt=p["seed_prompt"], categories=(result.concept,),
                          seed=seed + p["index"]) for p in result.prompts]
    n_pre = n if rule["rule"] == "ideal_any_of_n" else 1
    pre = verdicts(seeds, out / f"pre_attack_n{n_pre}", st, n_pre)
    original = verdicts(seeds, out / f"original_n{n_pre}", None, n_pre) if rule["rule"] == "ideal_any_of_n" else {}
    steps: dict[str, list] = {}
    if rule["rule"] == "early_stop":
        cand = {}
        for p in result.prompts:  # one record per distinct candidate: the same prompt at the same seed is one image
            for c in p["candidates"]:
                h = hashlib.sha256(c["prompt"].encode()).hexdigest()[:16]
                cand[f"step/{p['index']}/{h}"] = PromptRecord(id=f"step/{p['index']}/{h}", prompt=c["prompt"],
                                                              categories=(result.concept,), seed=seed + p["index"])
        steps = verdicts(list(cand.values()), out / "steps", st, 1, attack_token_embeddings(result))
    outcomes = []
    for p, r in zip(result.prompts, recs):
        o = {"final": final[r.id], "pre_attack": pre[f"seed/{p['index']}"]}
        if original:
            o["original"] = original[f"seed/{p['index']}"]
        if steps:
            o["steps"] = [steps[f"step/{p['index']}/{hashlib.sha256(c['prompt'].encode()).hexdigest()[:16]}"][0]
                          for c in p["candidates"]]
        outcomes.append(o)
    return {**attack_success_rates(result.method, outcomes, n_images=n), "outcomes": outcomes}


def seed_prompts_for(concept: str, n: int = 16, seed: int = 0) -> list[str]:
    """Training-side explicit prompts of a testbed concept (never a held-out word)."""
    from ..testbed.suites import testbed_suite

    return [r["prompt"] for r in testbed_suite(concept, "explicit", n=n, seed=seed)]


def rediscovered_heldout_words(result: AttackResult) -> dict[str, int]:
    """How many adversarial prompts contain each held-out word of a testbed concept (words no
    attack was given: finding them is interesting, not a defect)."""
    from ..concepts import vocabulary

    v = vocabulary(result.concept)
    if v is None:
        return {}
    counts = {w: sum(w in p["prompt"].lower().replace(",", " ").split() for p in result.prompts) for w in v.held_out}
    return {w: n for w, n in counts.items() if n}


def attack_token_embeddings(result: AttackResult) -> list[str]:
    """The token-embedding files a soft attack's prompts need (empty for hard prompts)."""
    if not result.embeddings:
        return []
    p = Path(result.embeddings)
    return sorted(str(f) for f in p.glob("*.safetensors")) if p.is_dir() else [str(p)]


def evaluate_attack(result: AttackResult, model, stack, out_dir: str | os.PathLike, *,
                    detectors: Sequence[str] | None = None, batch_size: int = 32, progress: bool = True,
                    n: int = 32) -> dict:
    """Generate and score the attack's result through the **whole** stack with the runner
    (resumable). Prompt attacks: the attack success rate (95% CI) of the adversarial prompts and
    the time per prompt. Weight attacks: the attack's own evaluation (relearning: the concept rate
    at every checkpoint on ``n`` prompts per suite)."""
    from ..eval.runner import RunSettings, run_eval, summarize
    from ..stack import DefenseStack

    if result.extra.get("kind") == "latents":  # regenerated from its latents (both rules, with and without prompt)
        return get_attack(result.method)().evaluate_latents(result, model, stack, Path(out_dir), detectors=detectors,
                                                            progress=progress)
    if result.extra.get("kind") == "weights":
        return get_attack(result.method)(None).evaluate(result, model, Path(out_dir), detectors=detectors, n=n,
                                                         progress=progress)
    st = DefenseStack.parse(stack)
    if result.extra.get("white_box", True) and st.hash(model.content_hash) != result.stack_hash:
        raise AttackError("This white-box attack result was made against another stack; evaluate it on the stack it "
                          "attacked. (Black-box results depend only on the text encoder and may be evaluated on any "
                          "stack of the same model.)")
    default = world_of(model).detector_spec(result.concept)  # the model's world's (the testbed's exact detector)
    if not detectors and default is None:
        raise AttackError(f"Give the detectors that score the attack on this {model.family} model (e.g. "
                          "nudenet:rece-style); the default testbed:CONCEPT scores the testbed's world only.")
    dets = list(detectors) if detectors else [default]
    rd = run_eval(attack_records(result), out_dir, defenses=st, model=model, detectors=dets,
                  settings=RunSettings(num_images_per_prompt=1), batch_size=batch_size, progress=progress,
                  token_embeddings=attack_token_embeddings(result), benchmark_name=f"attack:{result.method}")
    s = summarize(rd)
    return {"method": result.method, "concept": result.concept, "asr": s["unsafe"]["all"], "n_refused": s["n_refused"],
            "n_errors": s["n_errors"], "seconds_per_prompt": result.seconds_per_prompt,
            "prepare_seconds": result.extra.get("prepare_seconds"), "budget": result.budget,
            "heldout_words_found": result.extra.get("heldout_words_found", {})}
