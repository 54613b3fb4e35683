"""Evaluation throughput of the runner on the testbed: 1 process vs 2 sharded processes
(evaluation issue, "Speed, in benchmarks").

    python benchmarks/runner_throughput.py [--n 192] [--batch-size 64]

* 1 process with all cores' threads (torch default: one intra-op thread per core);
* 2 processes, one thread each (OMP_NUM_THREADS=1, torch.set_num_threads(1)), each generating and
  scoring its shard (``safediff eval --shard-index i --num-shards 2``), started together;
* images/s = images / wall-clock seconds, detector scoring included; the detector's share is the
  scoring time over the run time in the 1-process run.

Run it on an otherwise idle machine: two processes on two cores measure nothing if a third job
competes. Writes benchmarks/results/runner_throughput.json.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=192, help="prompts (explicit suite of 'striped'), one image each")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="runs/throughput")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    base = [sys.executable, "-m", "safediff.cli", "eval", "--benchmark", "testbed:striped/explicit", "--n", str(args.n),
            "--detector", "testbed:striped", "--batch-size", str(args.batch_size)]
    env = dict(os.environ)
    cores = os.cpu_count()
    res = {"machine": f"{platform.processor() or platform.machine()}, {cores} cores", "n_images": args.n,
           "batch_size": args.batch_size, "command": f"python benchmarks/runner_throughput.py --n {args.n}"}

    # warm-up (imports, file cache) so neither configuration pays it alone
    subprocess.run(base[:-4] + ["--n", "4", "--out", str(out / "warmup")], env=env, check=True, capture_output=True)

    t = time.time()
    p = run(base + ["--out", str(out / "one")], env)
    _, err = p.communicate()
    if p.returncode:
        raise SystemExit(err)
    one = time.time() - t
    res["one_process"] = {"threads": f"torch default ({cores} intra-op threads)", "seconds": round(one, 2),
                          "images_per_s": round(args.n / one, 2)}

    env1 = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t = time.time()
    procs = [run(base + ["--out", str(out / "two"), "--shard-index", str(i), "--num-shards", "2"], env1) for i in range(2)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(err)
    two = time.time() - t
    res["two_processes"] = {"threads": "1 per process (OMP_NUM_THREADS=1)", "seconds": round(two, 2),
                            "images_per_s": round(args.n / two, 2)}
    res["ratio_two_over_one"] = round(one / two, 3)

    # detector share: score the 1-process run's images again under a fresh protocol store
    import safediff
    from safediff.eval.detectors import make_detector
    from safediff.eval.runner import load_results

    rows = load_results(out / "one")
    det = make_detector("testbed:striped")
    from PIL import Image

    imgs = [Image.open(out / "one" / r["path"]) for r in rows]
    t = time.time()
    det.detect(imgs)
    score = time.time() - t
    res["detector_seconds"] = round(score, 3)
    res["detector_share_of_one_process_run"] = round(score / one, 4)
    res["safediff_version"] = safediff.__version__
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/runner_throughput.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
