"""Merge of synthetic shard stores (issue 29, 5(c)): time and peak memory against rows.

    OMP_NUM_THREADS=1 python benchmarks/merge_scale.py [--rows 250000 500000 1000000] [--shards 256]

For each row count: a run directory with ``--shards`` shard stores (``store.<i>-of-<n>.sqlite``,
made by the runner's own ``open_store``, each with the run's manifest) holding ``rows`` image rows
and ``rows`` score rows (one detector protocol) in all, then ``merge_run`` in a fresh process,
timed, with its peak resident memory (``wait4``'s ``ru_maxrss``):

* ``first``: the first merge (every row new);
* ``again``: a second merge (every shard store unchanged: skipped by size and modification time);
* ``recheck``: a merge with the record of merged shards cleared, so every row of every shard is
  compared against the merged store and found identical (the worst case of an idempotent merge).

Target (issue 29): 1,000,000 rows in <= 60 s and <= 2 GiB on this CPU. The machine's load
(``uptime``) before and after is recorded, since other jobs may share the cores. Synthetic rows
are drawn with ``random.Random(--seed)``. Writes benchmarks/results/merge_scale.json and .md.
"""

import argparse
import json
import os
import platform
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safediff.eval.merge import shard_store_name
from safediff.eval.runner import open_store

MANIFEST = {"benchmark_hash": "b" * 64, "benchmark": "synthetic", "stack": "", "stack_config": [], "stack_hash": "s" * 16,
            "model": "synthetic", "model_hash": "m" * 64, "settings": {"num_images_per_prompt": 1, "seed": 0},
            "num_prompts": 0, "image_sizes": ["64x64"], "dtype": "fp32"}
PROTOCOL = "p" * 64

_CHILD = """
import json, sys, time
from safediff.eval.merge import merge_run
t = time.perf_counter()
r = merge_run(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - t, "new_images": r.new_images, "new_scores": r.new_scores,
                  "merged": len(r.merged), "unchanged": len(r.unchanged)}))
"""


def make_run(run_dir: Path, rows: int, shards: int, rng: random.Random) -> None:
    """A run directory whose ``shards`` shard stores hold ``rows`` image rows and as many score rows."""
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({**MANIFEST, "num_prompts": rows}))
    for i in range(shards):
        con = open_store(run_dir, (i, shards))
        con.execute("PRAGMA synchronous=OFF")  # generation only; the merge below uses the store's defaults
        con.execute("INSERT INTO meta VALUES ('manifest', ?), ('shard', ?)", (json.dumps(MANIFEST), f"{i}/{shards}"))
        con.execute("INSERT INTO protocols VALUES (?, ?)", (PROTOCOL, json.dumps({"detector": "synthetic"})))
        own = range(i, rows, shards)
        images, scores = [], []
        for j in own:
            key = f"p{j}|{j}|0|{'s' * 16}"
            unsafe = rng.random() < 0.3
            images.append((key, f"p{j}", j, 0, "s" * 16, f"prompt number {j}", '["striped"]', f"images/p{j}_{j:016x}.png",
                           0, '{"suite": "synthetic"}', 0.05, 1.7e9, 32, f"{rng.getrandbits(256):064x}"))
            scores.append((key, PROTOCOL, int(unsafe), rng.random(), json.dumps({"striped": unsafe}), None))
        con.executemany("INSERT INTO images (key, prompt_id, seed, image_index, stack_hash, prompt, categories, path, "
                        "refused, extra, seconds, created, batch_size, png_sha256) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        images)
        con.executemany("INSERT INTO scores (key, protocol_hash, unsafe, score, details, error) VALUES (?,?,?,?,?,?)", scores)
        con.commit()
        con.close()


def timed_merge(run_dir: Path) -> dict:
    """``merge_run`` in a fresh process: its own timing and the process's peak resident memory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(run_dir)], stdout=subprocess.PIPE, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"merge of {run_dir} failed")
    return {**json.loads(out), "process_seconds": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[250_000, 500_000, 1_000_000])
    ap.add_argument("--shards", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the synthetic runs are made (default: a temporary folder)")
    ap.add_argument("--out", default="benchmarks/results/merge_scale")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite OUT.md from OUT.json, measuring nothing")
    args = ap.parse_args()
    if args.markdown_only:
        write_markdown(json.loads(Path(args.out + ".json").read_text()), Path(args.out + ".md"))
        return
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="merge_scale_"))
    results = []
    for rows in args.rows:
        run_dir = work / f"run_{rows}"
        shutil.rmtree(run_dir, ignore_errors=True)
        t = time.perf_counter()
        make_run(run_dir, rows, args.shards, rng)
        made = time.perf_counter() - t
        entry = {"rows": rows, "shards": args.shards, "make_seconds": round(made, 1), "load_before": load()}
        entry["first"] = timed_merge(run_dir)
        entry["again"] = timed_merge(run_dir)
        con = sqlite3.connect(run_dir / "store.sqlite")
        con.execute("DELETE FROM merged_shards")
        con.commit()
        con.close()
        entry["recheck"] = timed_merge(run_dir)
        entry["load_after"] = load()
        entry["store_mib"] = round((run_dir / "store.sqlite").stat().st_size / 2**20, 1)
        entry["shard_stores_mib"] = round(sum(p.stat().st_size for p in run_dir.glob("store.*-of-*.sqlite")) / 2**20, 1)
        assert entry["first"]["new_images"] == rows and entry["first"]["new_scores"] == rows
        assert entry["again"]["merged"] == 0 and entry["recheck"]["new_images"] == 0
        results.append(entry)
        print(json.dumps(entry), flush=True)
        shutil.rmtree(run_dir)
    per_row = [r["first"]["seconds"] / r["rows"] * 1e6 for r in results]
    summary = {
        "command": " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", ""), "python"] + sys.argv),
        "seed": args.seed, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
        "target": "1,000,000 rows <= 60 s and <= 2 GiB", "microseconds_per_row_first_merge": [round(x, 2) for x in per_row],
        "results": results,
    }
    Path(args.out + ".json").write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(summary, Path(args.out + ".md"))


def write_markdown(summary: dict, path: Path) -> None:
    """The results table (``--markdown-only`` rewrites it from the JSON without measuring again)."""
    results, per_row = summary["results"], summary["microseconds_per_row_first_merge"]
    lines = ["# Merge of synthetic shard stores (issue 29, 5(c))", "",
             f"`{summary['command']}`; {results[0]['shards']} shard stores; image rows = score rows = rows; SQLite "
             f"{summary['sqlite']}, {summary['cores']} cores shared with other jobs (load below).", "",
             "| rows | first merge s | peak MiB | us/row | second merge s | recheck s | recheck peak MiB | store MiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r, us in zip(results, per_row):
        lines.append(f"| {r['rows']:,} | {r['first']['seconds']:.1f} | {r['first']['peak_rss_mib']:.0f} | {us:.1f} | "
                     f"{r['again']['seconds']:.2f} | {r['recheck']['seconds']:.1f} | {r['recheck']['peak_rss_mib']:.0f} | "
                     f"{r['store_mib']:.0f} |")
    lines += ["", f"Target: {summary['target']}. Seconds are `merge_run`'s own; peak MiB is the merge process's peak "
              "resident memory, of which about "
              f"{min(r['again']['peak_rss_mib'] for r in results):.0f} MiB is the imports (the second merge, which "
              "reads nothing, peaks there); the rest is SQLite's page caches of the merged store and the staging "
              "tables (at most 512 MiB each, `MERGE_CACHE_KIB`): past them SQLite spills to temporary files instead "
              "of growing (not measured above the largest size here). Second merge: every shard store unchanged, skipped. Recheck: "
              "the record of merged shards cleared, so every row is compared with the merged store again.", "",
              "Load (uptime) before/after each size:", ""]
    lines += [f"- {r['rows']:,}: {r['load_before']} / {r['load_after']}" for r in results]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
