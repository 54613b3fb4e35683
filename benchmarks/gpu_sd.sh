#!/usr/bin/env bash
# Full-size Stable Diffusion architecture timings on a GPU machine (random weights: no hub there).
# Run from the repository root with the diffusers wheel in .gpu/wheels (pip download diffusers --no-deps -d .gpu/wheels).
set -euo pipefail
OUT=${OUT:-benchmarks/results}
python3 -m pip install --no-deps -q .gpu/wheels/*.whl
export PYTHONPATH=src TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "from safediff.testing import save_full_size_pipeline as s; s('/tmp/sd1', 'sd1'); s('/tmp/sd2v', 'sd2-v')"
python3 benchmarks/core_overhead.py --model /tmp/sd1 --device cuda --dtype float16 --batch 4 --steps 25 --repeats 5 --out "$OUT/core_overhead_sd1_cuda.json"
python3 benchmarks/core_overhead.py --model /tmp/sd2v --device cuda --dtype float16 --batch 4 --steps 25 --repeats 3 --size 768 --out "$OUT/core_overhead_sd2v_cuda.json"
python3 benchmarks/stack_cost.py --model /tmp/sd1 --device cuda --dtype float16 --batch 4 --steps 25 --out "$OUT/stack_cost_sd1_cuda.json"
# NAG against true CFG on the full-size SD3-medium architecture (random bf16 weights, 1024 x 1024, 28 steps)
python3 -c "from safediff.testing import save_full_size_pipeline as s; s('/tmp/sd3', 'sd3')"
python3 benchmarks/nag_cost.py --family sd3 --model /tmp/sd3 --device cuda --dtype bfloat16 --batch 1 --steps 28 --repeats 3 --out "$OUT/nag_cost_sd3_cuda"
