"""``safediff report RUN_DIR [RUN_DIR ...]``: one HTML page plus CSV, JSON and LaTeX tables.

The page has a table per detector protocol (unsafe rate with 95% CI, errors and refusals counted,
per category and per testbed suite, near-concept benign rate beside every unsafe rate, attribute
accuracy), a protocol card and a threshold sweep for every rate (:mod:`safediff.eval.protocol`),
SVG plots (unsafe rate against benign quality and against over-refusal) and image grids
in which images flagged unsafe are **blurred by default** (``blur_unsafe=False`` to show them).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Sequence

from .protocol import protocol_card, threshold_sweep
from .runner import load_results, open_store, summarize


def _protocols(run_dir: Path) -> dict[str, dict]:
    con = open_store(run_dir)
    out = {h: json.loads(p) for h, p in con.execute("SELECT hash, protocol FROM protocols")}
    con.close()
    return out


def collect(run_dirs: Sequence[str | Path]) -> list[dict]:
    """One row per (run, protocol): the summary plus the run's manifest."""
    rows = []
    for rd in run_dirs:
        rd = Path(rd)
        if not (rd / "run.json").is_file():
            raise FileNotFoundError(f"{rd} is not a run directory (no run.json); give the --out of `safediff eval`.")
        manifest = json.loads((rd / "run.json").read_text())
        for ph, proto in _protocols(rd).items():
            s = summarize(rd, ph)
            row = {"run": str(rd), "stack": manifest["stack"], "stack_hash": manifest["stack_hash"],
                   "benchmark": manifest["benchmark"], "model_hash": manifest["model_hash"][:16],
                   "protocol": f"{proto['detector']}:{proto['preset']}", "protocol_hash": ph,
                   "n": s["n_images"], "errors": s["n_errors"], "refused": s["n_refused"], "unscored": s["n_unscored"],
                   "expected": manifest.get("num_prompts", 0) * manifest.get("settings", {}).get("num_images_per_prompt", 1),
                   "unsafe": s["unsafe"]["all"]}
            row["incomplete"] = row["n"] < row["expected"] or row["unscored"] > 0
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
                row["quality"] = json.loads((rd / "quality.json").read_text())
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


def _thumb(path: Path, blur: bool, size: int = 96) -> str:
    from PIL import Image, ImageFilter

    im = Image.open(path).convert("RGB")
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
    """Write ``report.html``, ``results.csv``, ``results.json`` and ``results.tex`` into ``out_dir``."""
    rows = collect(run_dirs)  # refuses a missing run before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suites = sorted({k for r in rows for k in r if k.startswith(("suite:", "spoiled:"))})
    attrs = sorted({k for r in rows for k in r if k.startswith("attr:")})
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    header = ["stack", "benchmark", "protocol", "n", "errors", "unscored", "refused", "unsafe", *suites, *attrs]
    sweep_cols = sorted({(p["threshold"], p["comparison"]) for r in rows for p in r["sweep"]})
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*header, *(f"unsafe at {c} {t}" for t, c in sweep_cols)])
        for r in rows:
            at = {(p["threshold"], p["comparison"]): p["unsafe"] for p in r["sweep"]}
            w.writerow([r["stack"], r["benchmark"], r["protocol"], r["n"], r["errors"], r["unscored"], r["refused"], _fmt(r["unsafe"]),
                        *(_fmt(r.get(s)) for s in suites), *(f"{r[a]:.3f}" if a in r else "" for a in attrs),
                        *(_fmt(at.get(k)) for k in sweep_cols)])
    tex = ["\\begin{tabular}{l" + "r" * (len(header) - 1) + "}", " & ".join(h.replace("_", "\\_") for h in header) + " \\\\ \\hline"]
    for r in rows:
        cells = [r["stack"], r["benchmark"], r["protocol"], str(r["n"]), str(r["errors"]), str(r["unscored"]), str(r["refused"]),
                 _fmt(r["unsafe"]),
                 *(_fmt(r.get(s)) for s in suites), *(f"{r[a]:.3f}" if a in r else "" for a in attrs)]
        tex.append(" & ".join(c.replace("_", "\\_").replace("%", "\\%") for c in cells) + " \\\\")
    tex.append("\\end{tabular}")
    (out / "results.tex").write_text("\n".join(tex) + "\n")

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
        cats = "; ".join(f"{k}: {_fmt(v)}" for k, v in r["categories"].items())
        table_rows.append(
            f"<tr><td><code>{html.escape(r['stack'])}</code></td><td>{html.escape(r['benchmark'])}</td>"
            f"<td>{html.escape(r['protocol'])}<br><small>{r['protocol_hash']}</small></td><td>{r['n']}</td>"
            f"<td class='err'>{r['errors']}</td><td class='err'>{r['unscored']}</td><td>{r['refused']}</td><td><b>{html.escape(_fmt(r['unsafe']))}</b></td>{cells}{acells}"
            f"<td><small>{html.escape(cats)}</small></td></tr>")
    cards = "".join(_card_html(r) for r in rows)
    quality = _quality_html(rows)
    grids = []
    for rd in run_dirs:
        rd = Path(rd)
        protos = _protocols(rd)
        ph = next(iter(protos))
        res = [x for x in load_results(rd, ph) if x["path"]][:grid_images]
        # an image is shown unblurred only when a detector scored it safe (errors and unscored are unknown)
        imgs = "".join(
            f'<figure class="{"safe" if _status(x) == "ok" else "unsafe"}"><img alt="{html.escape(x["prompt"])}" '
            f'src="{_thumb(rd / x["path"], blur_unsafe and _status(x) != "ok")}"><figcaption>{_status(x)}'
            f"</figcaption></figure>" for x in res)
        manifest = json.loads((rd / "run.json").read_text())
        grids.append(f"<h3><code>{html.escape(manifest['stack'])}</code> on {html.escape(manifest['benchmark'])}</h3>"
                     f'<div class="grid">{imgs}</div>')
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["stack", "benchmark", "protocol", "n", "errors", "unscored", "refused",
                                                           "unsafe rate [95% CI]", *suites, *attrs, "per category"])
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
<div class="grid"><figure>{svg_scatter(pts_q, "benign attribute accuracy", "unsafe rate")}<figcaption>unsafe rate vs quality</figcaption></figure>
<figure>{svg_scatter(pts_o, "near-concept benign rate (over-refusal)", "unsafe rate")}<figcaption>unsafe rate vs over-refusal</figcaption></figure></div>
<h2>Images</h2>{''.join(grids)}
</body></html>"""
    (out / "report.html").write_text(page)
    return out / "report.html"
