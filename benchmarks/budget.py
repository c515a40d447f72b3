"""Where a fresh `deepwarp register` process spends its time, against ANTs' affine registration
and against the floor of each stage, on a Mindboggle pair (256x256x160).

    python -m benchmarks.budget --pair 1:2 --repeats 3 --out docs/benchmarks/data/budget.json

Each command runs ``--repeats`` times in a fresh process, alternating: ``deepwarp register``
with its defaults, with ``--refine 150``, and ANTs' affine registration (antspyx
``ants.registration(type_of_transform="Affine")``, files read to transform written; skipped
when antspyx is not installed: ``pip install ".[bench]"``). Reported: the median wall seconds
and peak resident memory (the child's ``ru_maxrss``), the ratios to ANTs' affine, and for
``deepwarp`` the median of each stage inside the process:

- ``process start and exit``: the interpreter up to ``main()`` and from its return to the
  process' end (freeing a few hundred MB);
- ``imports and network``: the rest of ``main()`` outside ``register()``: torch imported and the
  network loaded, with the inputs read in two threads beside them (``read wait``: what reading
  still cost after that);
- the stages of ``register()`` from ``metrics.json`` (affine, verdict, predict, refine, warp,
  metrics);
- ``write``: the output files.

The floors, each measured here in its own fresh process or call: ``python -c "import torch"``;
reading one brain (``read_volume``); one trilinear pass over the 10M fixed voxels (the moving
image sampled through an affine, ``spatial.sample_at``); the default network's forward pass at
its working grid (bfloat16 where the CPU computes it); writing ``warped.nii.gz``. Needs
../shared/data (not shipped).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report as report_io

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mindboggle"

# --- the child: one instrumented `deepwarp register` -----------------------------------------
CHILD = """
import json, sys, time
t_main = time.perf_counter()
from napari_deepwarp import cli
from napari_deepwarp.core import pipeline
spans = {}
def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spans[name] = spans.get(name, 0.0) + time.perf_counter() - t
    return wrapper
pipeline.write_result = timed("write", pipeline.write_result)
code = cli.main(sys.argv[1:])
spans["main"] = time.perf_counter() - t_main
print("BUDGET " + json.dumps({"code": code, "spans": spans}))
"""


def _fresh(argv: list[str]) -> tuple[float, float, str]:
    """Run ``argv`` in a fresh process: ``(wall seconds, peak RSS MiB, stdout)``."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{argv[:4]}... exited {process.returncode}")
    return wall, usage.ru_maxrss / 1024.0, out


def run_deepwarp(fixed: Path, moving: Path, options: list[str], out: Path) -> dict:
    argv = [sys.executable, "-c", CHILD, "register", str(fixed), str(moving), "-o", str(out), "-q"]
    wall, peak, stdout = _fresh(argv + options)
    line = next(ln for ln in stdout.splitlines() if ln.startswith("BUDGET "))
    spans = json.loads(line[len("BUDGET ") :])["spans"]
    seconds = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["seconds"]
    # main() less register(), the reading it waited for and the writing: torch and the network
    # loaded (with the inputs read beside them), argument checks, the summary
    rest = spans["main"] - seconds["total"] - seconds.get("read_wait", 0.0) - spans["write"]
    stages = {"process start and exit": wall - spans["main"], "imports and network": rest}
    stages["read wait"] = seconds.get("read_wait", 0.0)
    for key in ("preprocess", "affine", "verdict", "predict", "finetune", "refine", "warp"):
        if key in seconds:
            stages[key] = seconds[key]
    stages["metrics"] = seconds.get("metrics", 0.0)
    stages["write"] = spans["write"]
    return {"wall_s": wall, "peak_mib": peak, "stages": stages}


ANTS_AFFINE = """
import sys, ants
fixed, moving = ants.image_read(sys.argv[1]), ants.image_read(sys.argv[2])
reg = ants.registration(fixed, moving, type_of_transform="Affine", outprefix=sys.argv[3])
print(reg["fwdtransforms"])
"""


def run_ants(fixed: Path, moving: Path, out: Path) -> dict:
    wall, peak, _ = _fresh([sys.executable, "-c", ANTS_AFFINE, str(fixed), str(moving), str(out)])
    return {"wall_s": wall, "peak_mib": peak}


# --- floors ----------------------------------------------------------------------------------
FLOORS = """
import json, sys, time
import numpy as np
t = time.perf_counter(); import torch; floors = {"import torch": time.perf_counter() - t}
from napari_deepwarp.core.io import read_volume, write_volume
from napari_deepwarp.core.spatial import sample_at
from napari_deepwarp.core.checkpoint import default_checkpoint, load_checkpoint, working_size
from napari_deepwarp.core.preprocess import working_grid
from napari_deepwarp.core.precision import autocast, resolve_precision
def best(fn, n=3):
    times = []
    for _ in range(n):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return min(times)
fixed, moving = read_volume(sys.argv[1]), read_volume(sys.argv[2])
floors["read one brain (.nii.gz)"] = best(lambda: read_volume(sys.argv[1]))
image = torch.from_numpy(moving.array)[None, None]
to_moving = moving.grid.world_to_index_matrix() @ fixed.grid.index_to_world_matrix()
floors["one trilinear pass over the fixed grid"] = best(
    lambda: sample_at(image, None, to_moving, "linear", "itk", shape=fixed.shape))
model, card = load_checkpoint(default_checkpoint())
grid = working_grid(
    fixed, None, working_size(card), model.size_multiple, axes=model.working_axes
)
x = torch.rand(1, 1, *grid.shape)
dtype = resolve_precision("auto", torch.device("cpu"))
def forward():
    with torch.no_grad(), autocast(torch.device("cpu"), dtype):
        model(x, x)
floors[f"network forward ({card['architecture']}, {'x'.join(map(str, grid.shape))})"] = best(forward)
floors["write warped.nii.gz"] = best(lambda: write_volume(moving, sys.argv[3]))
print("FLOORS " + json.dumps(floors))
"""


def floors(fixed: Path, moving: Path, out: Path) -> dict:
    wall, _, _ = _fresh([sys.executable, "-c", "import torch"])
    _, _, stdout = _fresh([sys.executable, "-c", FLOORS, str(fixed), str(moving), str(out)])
    line = next(ln for ln in stdout.splitlines() if ln.startswith("FLOORS "))
    return {"python -c 'import torch' (fresh process)": wall, **json.loads(line[7:])}


# --- report ----------------------------------------------------------------------------------
def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(report: dict) -> str:
    """Markdown: commands with medians and ratios; the stage budget; the floors."""
    ants = report.get("ants_affine")
    lines = [
        "| command | median s | ratio to ANTs affine | target | peak MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, target in (("default", 0.2), ("refine 150", 0.4)):
        runs = report["deepwarp"][name]
        wall = _median(runs, "wall_s")
        ratio = f"{wall / _median(ants, 'wall_s'):.2f}" if ants else "-"
        lines.append(
            f"| `deepwarp register` {'' if name == 'default' else '--refine 150'} | {wall:.2f} | "
            f"{ratio} | <= {target} | {_median(runs, 'peak_mib'):.0f} |"
        )
    if ants:
        lines.append(
            f"| ANTs affine (antspyx) | {_median(ants, 'wall_s'):.2f} | 1.00 | | "
            f"{_median(ants, 'peak_mib'):.0f} |"
        )
    stages = sorted({k for runs in report["deepwarp"].values() for r in runs for k in r["stages"]})
    order = [
        "process start and exit",
        "imports and network",
        "read wait",
        "preprocess",
        "affine",
        "verdict",
        "predict",
        "finetune",
        "refine",
        "warp",
        "metrics",
        "write",
    ]
    stages = [s for s in order if s in stages]
    lines += ["", "| stage (median s) | default | --refine 150 |", "|---|---:|---:|"]
    for stage in stages:
        cells = []
        for name in ("default", "refine 150"):
            values = [r["stages"][stage] for r in report["deepwarp"][name] if stage in r["stages"]]
            cells.append(f"{statistics.median(values):.2f}" if values else "-")
        lines.append(f"| {stage} | {' | '.join(cells)} |")
    lines += ["", "| floor | s |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["floors"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", default="1:2", help="Mindboggle pair F:M (M onto F)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per command")
    parser.add_argument("--out", default="bench_out/budget.json", help="JSON report to write")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"benchmarks.budget: {DATA} not found (the shared data is not shipped)")
        return 2
    f, m = args.pair.split(":")
    fixed, moving = (DATA / f"oasis_trt20_{s}_t1.nii.gz" for s in (f, m))
    try:
        import ants  # noqa: F401

        has_ants = True
    except ImportError:
        has_ants = False
    runs: dict = {"default": [], "refine 150": []}
    ants_runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(args.repeats):
            runs["default"].append(run_deepwarp(fixed, moving, [], tmp / "d"))
            runs["refine 150"].append(run_deepwarp(fixed, moving, ["--refine", "150"], tmp / "r"))
            if has_ants:
                ants_runs.append(run_ants(fixed, moving, tmp / "ants_"))
            print(f"round {i + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        floor = floors(fixed, moving, tmp / "floor.nii.gz")
    command = "python -m benchmarks.budget " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": command.strip(),
        "machine": report_io.machine(),
        "pair": args.pair,
        "deepwarp": runs,
        "ants_affine": ants_runs or None,
        "floors": floor,
    }
    print(report_io.write(Path(args.out).with_suffix(""), report, table(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
