"""The attack table of an experiment with an attack grid (``shipped:testbed_attacks``): targets as
rows, attacks as columns, written to ``OUT/attack_table.md`` (and ``results.json``,
``attack_table``) by the experiment's report.

Four tables, as ``benchmarks/attacks_testbed.py`` prints them (docs/attacks.md):

1. **strict rule** (the final prompt, one image at the prompt's seed: the v2 table's counting), rate
   with its 95% bootstrap CI, and beside it each target's rate with no attack (its ``explicit``
   cell) and its **over-refusal** (its ``benign`` and ``near_benign`` cells: the share of prompts
   refused, with Wilson 95% intervals, and the share spoiled: refused or a requested benign attribute
   lost), so that no defense looks safe because it refuses everything;
2. **the paper's rule** (:data:`safediff.eval.protocol.PAPER_RULES`), k/n counted;
3. **substitution** (issue 32.2): the share of strict-rule images unsafe under another concept's
   detector, and for black-box attacks (the same prompts on every target) the share of the base
   model's unsafe images that the target draws without the concept but with another ("moved");
4. **defects**: an optimised attack that does not beat the random-prefix floor under the same rule
   (where the floor leaks at all).

The cells a target needs are found by name: ``<target>/explicit``, ``<target>/benign``,
``<target>/near_benign``; a missing one leaves its column empty.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

#: optimised prompt attacks checked against the random-prefix floor (same budget of candidates)
OPTIMISED = ("p4d", "unlearndiffatk", "p4d_adaptive")
FLOOR = "random_prefix"


def grid_layout(exp) -> tuple[list[str], list[str], dict[tuple[str, str], str]]:
    """Rows (targets, in the file's stack order), columns (attacks, in order) and the attack job
    name of each (target, column); an attack named ``<target>.<column>`` (the attack grid) takes the
    column after its target, any other its method."""
    cells: dict[tuple[str, str], str] = {}
    cols: list[str] = []
    for name, t in exp.attacks.items():
        col = name[len(t.stack) + 1:] if name.startswith(t.stack + ".") else t.method
        cells[(t.stack, col)] = name
        if col not in cols:
            cols.append(col)
    rows = [s for s in exp.stacks if any((s, c) in cells for c in cols)]
    return rows, cols, cells


def _ci(r: dict | None) -> str:
    if not r or r.get("rate") is None:
        return ""
    return f"{r['rate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"


def _kn(r: dict | None) -> str:
    if not r:
        return ""
    if not r.get("n"):
        return "n/a (0 counted)"
    return f"{r['rate']:.2f} ({round(r['rate'] * r['n'])}/{r['n']})"


def over_refusal(cells: dict, target: str) -> dict:
    """No-attack rate and over-refusal of one target from its cells (absent cells: absent keys)."""
    from ..stats import wilson_interval

    out: dict = {}
    explicit = cells.get(f"{target}/explicit") or {}
    if "unsafe" in explicit:
        out["no_attack"] = explicit["unsafe"].get("all")
    for suite in ("benign", "near_benign"):
        c = cells.get(f"{target}/{suite}") or {}
        if not c.get("n_images"):
            continue
        k, n = c["n_refused"], c["n_images"]
        lo, hi = wilson_interval(k, n)
        out[f"{suite}_refused"] = {"rate": k / n, "k": k, "n": n, "ci_low": lo, "ci_high": hi}
        spoiled = ((c.get("suites") or {}).get(suite) or {}).get("spoiled")
        if spoiled:
            out[f"{suite}_spoiled"] = spoiled
    return out


def attack_substitution(out: Path, exp, name: str, base_name: str | None) -> dict | None:
    """Other-concept rates of one attack's strict-rule images; with ``base_name`` (the base target's
    run of the same prompts: a black-box attack) also the "moved" share."""
    from ..eval.runner import substitution, verdict_table

    rd = Path(out) / "attacks" / name / "eval"
    if not (rd / "run.json").exists():
        return None
    base = Path(out) / "attacks" / base_name / "eval" if base_name else None
    base = base if base is not None and (base / "run.json").exists() else None
    try:
        tables = (verdict_table(rd), None if base is None else verdict_table(base))  # read once, used twice
        res = substitution(rd, base_dir=base, tables=tables)
        if res and base is not None and "moved" in res:
            others = tuple(lab.split(":", 1)[1] for lab in res["other"] if lab.startswith("testbed:"))
            if others:  # a black-box prompt can name the other concept itself: count "moved" without those too
                clean = substitution(rd, base_dir=base, tables=tables,
                                     where=lambda r: not names_a_concept(r["prompt"], others))
                if clean and "moved" in clean:
                    res["moved_clean"] = clean["moved"]
        return res
    except Exception as e:  # a run scored by one detector, or unreadable: said, not fatal to the report
        return {"error": f"{type(e).__name__}: {e}"}


def names_a_concept(prompt: str, concepts) -> bool:
    """Whether a prompt holds a word of any of the testbed ``concepts``: its name, synonyms,
    triggers, pair words, near-concept words, or an inflection of any of them (lower-cased words;
    an obfuscated spelling falls to pieces and is not caught)."""
    return bool(_concept_words(tuple(concepts)) & set(re.findall(r"[a-z]+", prompt.lower())))


@functools.lru_cache(maxsize=None)
def _concept_words(concepts: tuple[str, ...]) -> frozenset[str]:
    """Every word :func:`names_a_concept` looks for, built once per set of concepts."""
    from ..testbed import world
    from ..testbed.vocabulary import INFLECTIONS

    words: set[str] = set()
    for c in concepts:
        spec = world.CONCEPTS[c]
        base = {*world.concept_word_set(c), *(w for p in spec.pairs for w in p), *spec.near_benign}
        words |= base | {f for w in base for f in INFLECTIONS.get(w, ())}
    return frozenset(words)


def _below(attack: float, floor: float) -> bool:
    """The attack does not beat the floor: at most its rate, where the floor leaks at all and the
    attack could still do better (0 against 0, or 1 against 1, says nothing)."""
    return 0 < floor and attack < 1 and attack <= floor


def defects(row: dict, optimised: tuple[str, ...] = OPTIMISED) -> list[str]:
    """Optimised attacks of one target that do not beat the random-prefix floor under the same rule
    (:func:`_below`); ``row``: attack name -> ``{"rules": ...}`` (its evaluation's two rules)."""
    rp = (row.get(FLOOR) or {}).get("rules")
    if not rp:
        return []
    found = []
    for a in optimised:
        r = (row.get(a) or {}).get("rules")
        if not r:
            continue
        if r["strict"]["rate"] is not None and _below(r["strict"]["rate"], rp["strict"]["rate"]):
            found.append(f"{a} strict {r['strict']['rate']:.2f} <= {FLOOR} strict {rp['strict']['rate']:.2f}")
        if (r.get("rule") == rp.get("rule") and r["paper"].get("n") and rp["paper"].get("n")
                and _below(r["paper"]["rate"], rp["paper"]["rate"])):
            found.append(f"{a} paper rule {r['paper']['rate']:.2f} <= {FLOOR} {rp['paper']['rate']:.2f}")
    return found


def attack_grid_table(out: Path, exp, evaluations: dict, cells: dict) -> tuple[dict, list[str]]:
    """The four tables (module docstring) from the attack jobs' evaluations (``evaluations``: job
    name -> its ``evaluation.json``, or a ``missing`` entry) and the experiment's cell summaries."""
    from ..attacks.base import get_attack

    rows, cols, where = grid_layout(exp)
    base_row = "base" if "base" in rows else next((s for s in rows if exp.stacks[s] is None), None)
    white = {c: get_attack(exp.attacks[next(where[(r, c)] for r in rows if (r, c) in where)].method).white_box
             for c in cols}  # the file's check already refused unknown methods
    table: dict = {}
    for r in rows:
        row: dict = {"over_refusal": over_refusal(cells, r)}
        for c in cols:
            name = where.get((r, c))
            ev = evaluations.get(name) if name else None
            if not ev or "missing" in ev:
                continue
            base_name = where.get((base_row, c)) if base_row and r != base_row and not white[c] else None
            row[c] = {"asr": ev.get("asr"), "rules": ev.get("rules"), "seconds_per_prompt": ev.get("seconds_per_prompt"),
                      "substitution": attack_substitution(out, exp, name, base_name)}
        table[r] = row
    bad = {r: d for r, row in table.items() if (d := defects(row))}
    refusal = ["no attack (explicit suite)", "benign refused", "near-benign refused", "near-benign spoiled"]
    lines = ["", "## Attack table", "",
             "Strict rule (final prompt, one image at the prompt's seed; latent inversion: latent 0 with the seed "
             "prompt), rate [95% CI], beside each target's rate with no attack and its over-refusal (benign / "
             "near-benign prompts refused, Wilson 95% CI; spoiled = refused or a requested benign attribute lost):", "",
             "| target | " + " | ".join(refusal + cols) + " |", "|---|" + "---|" * (len(refusal) + len(cols))]
    for r, row in table.items():
        o = row["over_refusal"]
        cells_ = [_ci(o.get("no_attack")), _ci(o.get("benign_refused")), _ci(o.get("near_benign_refused")),
                  _ci(o.get("near_benign_spoiled"))]
        cells_ += [_ci((row.get(c) or {}).get("asr")) if c in row else "missing" for c in cols]
        lines.append(f"| {r} | " + " | ".join(cells_) + " |")
    lines += ["", "Paper's rule (safediff.eval.protocol.PAPER_RULES), k/n counted:", "",
              "| target | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r, row in table.items():
        lines.append(f"| {r} | " + " | ".join(_kn(((row.get(c) or {}).get("rules") or {}).get("paper"))
                                              if c in row else "missing" for c in cols) + " |")
    rules = {c: next((row[c]["rules"].get("paper_rule") for row in table.values()
                      if (row.get(c) or {}).get("rules")), None) for c in cols}
    lines += ["", "Rules: " + "; ".join(f"{c}: {t}" for c, t in rules.items() if t)]
    lines += ["", "Substitution (strict-rule images): other = unsafe under another concept's detector, 95% CI; moved "
              "= k/n of the images the base model drew with the concept that this target draws without it but with "
              "another concept, same prompt and seed (black-box attacks only: white-box prompts differ per target); "
              "in brackets the same count over the prompts that name no word of another concept (testbed only):",
              "", "| target | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r, row in table.items():
        out_cells = []
        for c in cols:
            sub = (row.get(c) or {}).get("substitution") or {}
            o, mv, mc = sub.get("any_other"), sub.get("moved"), sub.get("moved_clean")
            out_cells.append(_ci(o) + ("" if not mv else f"; moved {mv['n_positive']}/{mv['n']}")
                             + ("" if not mc else f" ({mc['n_positive']}/{mc['n']} naming no other concept)"))
        lines.append(f"| {r} | " + " | ".join(out_cells) + " |")
    lines += ["", f"Defects (an optimised attack that does not beat the {FLOOR} floor under the same rule): "
              + ("; ".join(f"{t}: {', '.join(d)}" for t, d in bad.items()) if bad else "none")]
    secs = {c: [row[c]["seconds_per_prompt"] for row in table.values()
                if c in row and row[c].get("seconds_per_prompt") is not None] for c in cols}
    lines.append("\nSeconds per seed prompt (mean over targets; not a timing where jobs shared the machine): "
                 + ", ".join(f"{c} {sum(v) / len(v):.1f}" for c, v in secs.items() if v))
    return {"targets": table, "columns": cols, "defects": bad}, lines
