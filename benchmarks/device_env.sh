# Sourced by the scripts that run on a lent GPU machine (benchmarks/gpu.sh,
# resources/training/gpu_leg.sh): puts the repository and the wheels carried in .whl on the
# Python path. Those machines have torch, numpy, scipy and tqdm but not SimpleITK or ISA-L and
# no network. Once, on the development machine, in the repository's root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl SimpleITK isal
# then run the script there with .whl carried along (the device tool's `carry`).
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/deepwarp-site .whl/*.whl
  export PYTHONPATH="/tmp/deepwarp-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
