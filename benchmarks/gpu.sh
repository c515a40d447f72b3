#!/usr/bin/env bash
# The GPU figures of docs/benchmarks in one short run (about 3-5 minutes on one H100 or H200):
# forward per model at 160x192x224, deepwarp register end to end, 50 refinement and 50
# fine-tuning steps, peak GPU memory, and the warp stage against the copy bandwidth
# (benchmarks/gpu.py says what each figure is).
#
# The lent device machines have torch, numpy, scipy and tqdm but not SimpleITK or ISA-L and no
# network. Once, on the development machine, in the repository's root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl SimpleITK isal
# then run this script there with .whl carried along (the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/deepwarp-site .whl/*.whl
  export PYTHONPATH="/tmp/deepwarp-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -c "import SimpleITK, isal, torch; assert torch.cuda.is_available(), 'no CUDA GPU'" \
  || { echo "benchmarks/gpu.sh: SimpleITK, isal or a CUDA GPU is missing (see the top of this file)"; exit 2; }
python3 -m benchmarks.gpu --device cuda --out "${OUT:-bench_out}/gpu.json" "$@"
