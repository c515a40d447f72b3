#!/usr/bin/env bash
# The GPU figures of docs/benchmarks in one short run (about 3-5 minutes on one H100 or H200):
# forward per model at 160x192x224, deepwarp register end to end, 50 refinement and 50
# fine-tuning steps, peak GPU memory, and the warp stage against the copy bandwidth
# (benchmarks/gpu.py says what each figure is). What the lent machine needs carried along:
# benchmarks/device_env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_env.sh
python3 -c "import SimpleITK, isal, torch; assert torch.cuda.is_available(), 'no CUDA GPU'" \
  || { echo "benchmarks/gpu.sh: SimpleITK, isal or a CUDA GPU is missing (see benchmarks/device_env.sh)"; exit 2; }
python3 -m benchmarks.gpu --device cuda --out "${OUT:-bench_out}/gpu.json" "$@"
