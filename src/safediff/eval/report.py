"""``safediff report RUN_DIR [RUN_DIR ...]``: one HTML page plus CSV, JSON and LaTeX tables.

The page has a table per detector protocol (unsafe rate with 95% CI, errors and refusals counted,
per category and per testbed suite, near-concept benign rate beside every unsafe rate, attribute
accuracy; in a run scored by several concept detectors, the other concepts' rates and, with the
undefended run of the same benchmark given too, the share moved to another concept, on the target
detector's row), a protocol card and a threshold sweep for every rate (:mod:`safediff.eval.protocol`),
SVG plots (unsafe rate against benign quality and against over-refusal) and image grids
in which images flagged unsafe are **blurred by default** (``blur_unsafe=False`` to show them).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import warnings
from pathlib import Path
from typing import Sequence

from ..fileio import read_json
from .protocol import protocol_card, threshold_sweep
from .runner import RunError, load_results, open_store, summarize, target_protocol, verdict_table


#: the files ``write_report`` writes (and regenerates on every run; nothing else in the folder is touched)
REPORT_FILES = ("report.html", "results.csv", "results.json", "results.tex")


def _manifest(rd: Path) -> dict:
    manifest = read_json(rd / "run.json", "the run's manifest")
    missing = [k for k in ("stack", "stack_hash", "benchmark", "model_hash") if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise ValueError(f"{rd / 'run.json'} (the run's manifest) lacks {', '.join(missing) or 'its fields'}; it is not "
                         "a `safediff eval` manifest.")
    return manifest


def _protocols(run_dir: Path) -> dict[str, dict]:
    con = open_store(run_dir)
    out = {h: json.loads(p) for h, p in con.execute("SELECT hash, protocol FROM protocols")}
    con.close()
    return out


def _target(rd: Path) -> str | None:
    """The run's target protocol hash (``None``: several protocols and none named, runs made before)."""
    try:
        return target_protocol(rd)
    except RunError:
        return None


def base_run(rd: Path, run_dirs: Sequence[str | Path]) -> Path | None:
    """Among ``run_dirs``, the undefended run of ``rd``'s benchmark on the same model (its images
    pair with ``rd``'s by prompt id, seed and image index), if one was given."""
    mine = _manifest(rd)
    for other in run_dirs:
        other = Path(other)
        if other.resolve() == rd.resolve() or not (other / "run.json").is_file():
            continue
        m = _manifest(other)
        if (m["stack"] in ("none", "") and m.get("benchmark_hash") == mine.get("benchmark_hash")
                and m["model_hash"] == mine["model_hash"] and mine["stack"] not in ("none", "")):
            return other
    return None


def _substitution_row(sub: dict) -> dict:
    """The report's substitution columns from :func:`safediff.eval.runner.substitution`."""
    row = {"other:any": sub["any_other"], **{f"other:{k}": v for k, v in sub["other"].items()}}
    if "moved" in sub:
        row["moved"] = sub["moved"]
        row["other_minus_base"] = sub["other_minus_base"].get("any_other")
        row["base_run"] = sub["base_run"]
    return row


def collect(run_dirs: Sequence[str | Path]) -> list[dict]:
    """One row per (run, protocol): the summary plus the run's manifest. In a run scored by
    several detectors, the target detector's row also carries the substitution columns (the
    other detectors' rates; with the run's undefended base run among ``run_dirs``, the "moved"
    share and the difference from the base)."""
    rows = []
    for rd in run_dirs:
        rd = Path(rd)
        if not (rd / "run.json").is_file():
            raise FileNotFoundError(f"{rd} is not a run directory (no run.json); give the --out of `safediff eval`.")
        manifest = _manifest(rd)
        protos = _protocols(rd)
        target = _target(rd) if len(protos) > 1 else None
        base = base_run(rd, run_dirs) if target else None
        if base is not None and target not in _protocols(base):
            base = None  # the base run was not scored by the target detector: no pairing
        for ph, proto in protos.items():
            s = summarize(rd, ph, base_dir=base if ph == target else None)
            row = {"run": str(rd), "stack": manifest["stack"], "stack_hash": manifest["stack_hash"],
                   "benchmark": manifest["benchmark"], "model_hash": manifest["model_hash"][:16],
                   "protocol": f"{proto['detector']}:{proto['preset']}", "protocol_hash": ph,
                   "n": s["n_images"], "errors": s["n_errors"], "refused": s["n_refused"], "unscored": s["n_unscored"],
                   "expected": manifest.get("num_prompts", 0) * manifest.get("settings", {}).get("num_images_per_prompt", 1),
                   "unsafe": s["unsafe"]["all"]}
            row["incomplete"] = row["n"] < row["expected"] or row["unscored"] > 0
            row["target"] = None if target is None else ph == target
            if ph == target and s.get("substitution"):
                row.update(_substitution_row(s["substitution"]))
            row["card"] = protocol_card(manifest, proto)
            row["sweep"] = threshold_sweep(rd, ph, proto)
            suites = s.get("suites", {})
            for name, v in suites.items():
                row[f"suite:{name}"] = v["unsafe"]
                if v.get("spoiled"):
                    row[f"spoiled:{name}"] = v["spoiled"]
                if v.get("attributes"):
                    row[f"attr:{name}"] = v["attributes"]["all"]
            row["categories"] = {k: v for k, v in s["unsafe"].items() if k != "all"}
            if (rd / "quality.json").is_file():  # `safediff eval --quality`
                row["quality"] = read_json(rd / "quality.json", "`safediff eval --quality` results")
            rows.append(row)
    return rows


def _status(x: dict) -> str:
    """What a grid image is: refused, a detector error, not scored yet, UNSAFE, or ok."""
    if x["refused"]:
        return "refused"
    if x["error"] is not None:
        return "error"
    if not x["scored"]:
        return "unscored"
    return "UNSAFE" if x["unsafe"] else "ok"


SUBST_HEADERS = {"other:any": "other concept (any) [95% CI]", "other_minus_base": "other - base [95% CI]",
                 "moved": "moved to another concept (k/n)"}


def _fmt_subst(key: str, v: dict | None) -> str:
    """A substitution cell: a rate, a paired difference, or the moved share as k/n."""
    if v is None:
        return ""
    if key == "other_minus_base":
        return "–" if not v["n"] else f"{v['diff']:+.3f} [{v['ci_low']:+.2f}, {v['ci_high']:+.2f}]"
    if key == "moved":
        return "n/a (0 pairs)" if not v["n"] else f"{v['rate']:.3f} ({v['n_positive']}/{v['n']})"
    return _fmt(v)


def _fmt(r: dict | None) -> str:
    if not r or r.get("n", 0) == 0:
        return "–"
    return f"{r['rate']:.3f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"


def svg_scatter(points: list[tuple[float, float, str]], xlabel: str, ylabel: str, w: int = 360, h: int = 260) -> str:
    pad = 40
    items = []
    for x, y, label in points:
        if x != x or y != y:  # NaN
            continue
        cx = pad + x * (w - 2 * pad)
        cy = h - pad - y * (h - 2 * pad)
        items.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="#c33"><title>{html.escape(label)}</title></circle>'
                     f'<text x="{cx + 6:.1f}" y="{cy - 4:.1f}" font-size="9">{html.escape(label[:24])}</text>')
    axes = (f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#000"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#000"/>'
            f'<text x="{w / 2}" y="{h - 8}" font-size="11" text-anchor="middle">{html.escape(xlabel)} (0–1)</text>'
            f'<text x="12" y="{h / 2}" font-size="11" transform="rotate(-90 12 {h / 2})" text-anchor="middle">{html.escape(ylabel)} (0–1)</text>')
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">{axes}{"".join(items)}</svg>'


def _card_html(r: dict) -> str:
    c = r["card"]
    items = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(', '.join(v) if isinstance(v, list) else str(v))}</td></tr>"
                    for k, v in c.items() if v not in ("", None))
    sweep = ""
    if r["sweep"]:
        sweep = ("<table class='sweep'><tr><th>threshold</th><th>unsafe rate [95% CI]</th><th>convention</th></tr>"
                 + "".join(f"<tr{' class=this' if p['this_run'] else ''}><td>{html.escape(p['comparison'])} "
                           f"{p['threshold']}</td><td>{html.escape(_fmt(p['unsafe']))}</td>"
                           f"<td>{html.escape(p['convention'])}{' (this run)' if p['this_run'] else ''}</td></tr>"
                           for p in r["sweep"]) + "</table>")
    return (f"<details class='card'><summary><code>{html.escape(r['stack'])}</code> on {html.escape(r['benchmark'])}, "
            f"{html.escape(r['protocol'])}: <b>{html.escape(_fmt(r['unsafe']))}</b></summary>"
            f"<table>{items}</table>{sweep}</details>")


def tex_escape(text: str) -> str:
    """``text`` with every LaTeX special character (``\\ & % $ # _ { } ~ ^``) escaped."""
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
             "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(table.get(c, c) for c in text)


def grid_selection(results: list[dict], k: int) -> tuple[list[dict], str]:
    """At most ``k`` of a run's images for the grid, flagged ones first (UNSAFE, then detector errors,
    refusals and unscored images, then ones scored safe), each group in stored order; and a sentence
    saying what is shown."""
    order = {"UNSAFE": 0, "error": 1, "refused": 2, "unscored": 3, "ok": 4}
    ranked = sorted(results, key=lambda x: order[_status(x)])  # stable: stored order within a group
    shown = ranked[:k]
    counts = {s: sum(_status(x) == s for x in shown) for s in order}
    flagged = sum(_status(x) == "UNSAFE" for x in results)
    what = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    note = (f"{len(shown)} of {len(results)} images ({what or 'none'}); images flagged unsafe are shown first"
            + (f" ({flagged} in the run)" if flagged else " (none in the run)") + ", then the rest in stored order.")
    return shown, note


def _thumb(path: Path, blur: bool, size: int = 96) -> str:
    """A thumbnail as a data URL; an unreadable image raises ``ValueError`` naming the file."""
    from PIL import Image, ImageFilter

    try:
        with Image.open(path) as src:
            im = src.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these for missing, truncated or foreign files
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    im = im.resize((size, size), Image.NEAREST)
    if blur:
        im = im.filter(ImageFilter.GaussianBlur(radius=size / 8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _quality_html(rows: list[dict]) -> str:
    """The runs' ``quality.json`` (``safediff eval --quality``), one row per run."""
    from .quality import skipped_metrics

    seen, trs = set(), []
    for r in rows:
        q = r.get("quality")
        if not q or r["run"] in seen:
            continue
        seen.add(r["run"])
        m = q.get("metrics", {})
        lp = m.get("lpips")
        cells = [f"{m['fid']:.2f}" if "fid" in m else "–", f"{m['kid']:.4f}" if "kid" in m else "–",
                 f"{m['clip_score']:.2f} ({m['clip_score_reference']:.2f})" if "clip_score" in m else "–",
                 f"{lp['mean']:.4f} [{lp['ci_low']:.4f}, {lp['ci_high']:.4f}]" if lp else "–"]
        skipped = "; ".join(f"{k}: {v}" for k, v in skipped_metrics(q.get("skipped", {})).items())
        trs.append(f"<tr><td><code>{html.escape(r['stack'])}</code></td><td>{q.get('n_pairs', 0)}</td>"
                   + "".join(f"<td>{c}</td>" for c in cells) + f"<td><small>{html.escape(skipped)}</small></td></tr>")
    if not trs:
        return ""
    return ("<h2>Image quality (benign prompts, against the unedited model's images)</h2><table id='quality'><thead><tr>"
            "<th>stack</th><th>image pairs</th><th>FID</th><th>KID</th><th>CLIP score (unedited)</th>"
            "<th>LPIPS [95% CI]</th><th>skipped</th></tr></thead><tbody>" + "".join(trs) + "</tbody></table>"
            "<p>FID is biased upward at small n: compare FIDs only at equal n.</p>")


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, blur_unsafe: bool = True,
                 grid_images: int = 16) -> Path:
    """Write ``report.html``, ``results.csv``, ``results.json`` and ``results.tex`` into ``out_dir``.

    Only these four files are written (each regenerated on every call, atomically: a kill leaves the
    previous version or the new one, never half a file); nothing else in ``out_dir`` is touched. An
    unreadable image becomes an error entry in its grid and in the page's list of problems; the rest
    of the report goes on. The grid shows at most ``grid_images`` images per run, flagged ones first."""
    from ..fileio import atomic_write_text

    rows = collect(run_dirs)  # refuses a missing run before anything is written
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; the report writes a folder of files: choose another --out.")
    files: dict[str, str] = {}
    suites = sorted({k for r in rows for k in r if k.startswith(("suite:", "spoiled:"))})
    attrs = sorted({k for r in rows for k in r if k.startswith("attr:")})
    subst = sorted({k for r in rows for k in r if k.startswith("other:")}, key=lambda k: (k != "other:any", k))
    subst += [k for k in ("other_minus_base", "moved") if any(k in r for r in rows)]
    files["results.json"] = json.dumps(rows, indent=2)
    header = ["stack", "benchmark", "protocol", "n", "errors", "unscored", "refused", "unsafe", *suites, *attrs, *subst]
    sweep_cols = sorted({(p["threshold"], p["comparison"]) for r in rows for p in r["sweep"]})
    with io.StringIO(newline="") as f:
        w = csv.writer(f)
        w.writerow([*header, *(f"unsafe at {c} {t}" for t, c in sweep_cols)])
        for r in rows:
            at = {(p["threshold"], p["comparison"]): p["unsafe"] for p in r["sweep"]}
            w.writerow([r["stack"], r["benchmark"], r["protocol"], r["n"], r["errors"], r["unscored"], r["refused"], _fmt(r["unsafe"]),
                        *(_fmt(r.get(s)) for s in suites), *(f"{r[a]:.3f}" if a in r else "" for a in attrs),
                        *(_fmt_subst(k, r.get(k)) for k in subst), *(_fmt(at.get(k)) for k in sweep_cols)])
        files["results.csv"] = f.getvalue()
    tex = ["\\begin{tabular}{l" + "r" * (len(header) - 1) + "}", " & ".join(tex_escape(h) for h in header) + " \\\\ \\hline"]
    for r in rows:
        cells = [r["stack"], r["benchmark"], r["protocol"], str(r["n"]), str(r["errors"]), str(r["unscored"]), str(r["refused"]),
                 _fmt(r["unsafe"]),
                 *(_fmt(r.get(s)) for s in suites), *(f"{r[a]:.3f}" if a in r else "" for a in attrs),
                 *(_fmt_subst(k, r.get(k)) for k in subst)]
        tex.append(" & ".join(tex_escape(c) for c in cells) + " \\\\")
    tex.append("\\end{tabular}")
    files["results.tex"] = "\n".join(tex) + "\n"

    # plots: unsafe rate vs benign quality, vs over-refusal (near-concept benign rate)
    pts_q, pts_o = [], []
    for r in rows:
        unsafe = r["unsafe"]["rate"] if r["unsafe"]["n"] else float("nan")
        q = r.get("attr:benign", r.get("attr:near_benign"))
        if q is not None:
            pts_q.append((q, unsafe, r["stack"]))
        nb = r.get("spoiled:near_benign")
        if nb and nb["n"]:
            pts_o.append((nb["rate"], unsafe, r["stack"]))
    notices = "".join(
        f"<p class='err'><b>Incomplete run</b> <code>{html.escape(r['run'])}</code> ({html.escape(r['protocol'])}): "
        f"{r['n']} of {r['expected']} images generated, {r['unscored']} not scored yet; rates cover the scored "
        "images only. Run the same <code>safediff eval</code> command again to finish it.</p>" for r in rows if r["incomplete"])
    table_rows = []
    for r in rows:
        cells = "".join(f"<td>{html.escape(_fmt(r.get(s)))}</td>" for s in suites)
        acells = "".join(f"<td>{r[a]:.3f}</td>" if a in r else "<td>–</td>" for a in attrs)
        acells += "".join(f"<td>{html.escape(_fmt_subst(k, r.get(k)) or '–')}</td>" for k in subst)
        cats = "; ".join(f"{k}: {_fmt(v)}" for k, v in r["categories"].items())
        table_rows.append(
            f"<tr><td><code>{html.escape(r['stack'])}</code></td><td>{html.escape(r['benchmark'])}</td>"
            f"<td>{html.escape(r['protocol'])}<br><small>{r['protocol_hash']}</small></td><td>{r['n']}</td>"
            f"<td class='err'>{r['errors']}</td><td class='err'>{r['unscored']}</td><td>{r['refused']}</td><td><b>{html.escape(_fmt(r['unsafe']))}</b></td>{cells}{acells}"
            f"<td><small>{html.escape(cats)}</small></td></tr>")
    cards = "".join(_card_html(r) for r in rows)
    quality = _quality_html(rows)
    grids, problems = [], []
    for rd in run_dirs:
        rd = Path(rd)
        protos = _protocols(rd)
        ph = (_target(rd) if len(protos) > 1 else None) or next(iter(protos))
        results = load_results(rd, ph)
        if len(protos) > 1:  # an image unsafe under any detector is flagged (and blurred), not only the target's
            _, table, _ = verdict_table(rd)
            flagged = [any(v[i] is True for v in table.values()) for i in range(len(results))]
            results = [{**x, "unsafe": True} if f and not x["refused"] and x["error"] is None and x["scored"] else x
                       for x, f in zip(results, flagged)]
        res, note = grid_selection([x for x in results if x["path"]], grid_images)
        figs = []
        for x in res:
            # an image is shown unblurred only when a detector scored it safe (errors and unscored are unknown)
            try:
                src = _thumb(rd / x["path"], blur_unsafe and _status(x) != "ok")
            except ValueError as e:
                problems.append(str(e))
                figs.append(f'<figure class="unsafe"><figcaption>{_status(x)}<br>unreadable image<br>'
                            f'<code>{html.escape(x["path"])}</code></figcaption></figure>')
                continue
            figs.append(f'<figure class="{"safe" if _status(x) == "ok" else "unsafe"}"><img alt="{html.escape(x["prompt"])}" '
                        f'src="{src}"><figcaption>{_status(x)}</figcaption></figure>')
        manifest = _manifest(rd)
        grids.append(f"<h3><code>{html.escape(manifest['stack'])}</code> on {html.escape(manifest['benchmark'])}</h3>"
                     f"<p>{html.escape(note)}</p>" f'<div class="grid">{"".join(figs)}</div>')
    for problem in problems:  # on the page and on stderr; the report goes on without the image
        warnings.warn(f"report: {problem}; shown as an error in its grid.", stacklevel=2)
    notices += "".join(f"<p class='err'><b>Error</b> {html.escape(p)}</p>" for p in problems)
    no_points = ("<br><small>no point: {}</small>")
    note_q = "" if pts_q else no_points.format("no run has a benign suite with attribute accuracy (testbed suites)")
    note_o = "" if pts_o else no_points.format("no run has a near-concept benign suite")
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["stack", "benchmark", "protocol", "n", "errors", "unscored", "refused",
                                                           "unsafe rate [95% CI]", *suites, *attrs,
                                                           *(SUBST_HEADERS.get(k, k) for k in subst), "per category"])
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>safediff report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 6px;font-size:13px}}
.grid{{display:flex;flex-wrap:wrap;gap:6px}} figure{{margin:0;text-align:center;font-size:11px}} figure.unsafe figcaption{{color:#c00}}
img{{image-rendering:pixelated}} .err{{color:#c00}} details.card{{margin:6px 0}} tr.this{{font-weight:bold}}</style></head><body>
<h1>safediff report</h1>
<p>{len(rows)} result row(s) from {len(run_dirs)} run(s). Rates exclude detector errors, which are counted in
the <i>errors</i> column and never as safe. Confidence intervals: 95% bootstrap over prompts.
Images flagged unsafe are {"blurred" if blur_unsafe else "shown unblurred"}.</p>
{notices}<h2>Results</h2><table id="results"><thead><tr>{head}</tr></thead><tbody>{''.join(table_rows)}</tbody></table>
{quality}<h2>Protocol cards and threshold sweeps</h2>
<p>Each rate above, with how it was measured, and the same images at the field's common thresholds,
recomputed from the raw scores stored once (the detector is not run again).</p>
{cards}
<h2>Plots</h2>
<div class="grid"><figure>{svg_scatter(pts_q, "benign attribute accuracy", "unsafe rate")}<figcaption>unsafe rate vs quality{note_q}</figcaption></figure>
<figure>{svg_scatter(pts_o, "near-concept benign rate (over-refusal)", "unsafe rate")}<figcaption>unsafe rate vs over-refusal{note_o}</figcaption></figure></div>
<h2>Images</h2>{''.join(grids)}
</body></html>"""
    files["report.html"] = page
    for name in REPORT_FILES:  # the report's own files, regenerated; the rest of the folder is left alone
        atomic_write_text(out / name, files[name], overwrite=True)
    return out / "report.html"
