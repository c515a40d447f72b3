"""The GPU path in one short run: forward passes, end to end, refinement, fine-tuning, memory,
and the warp stage against the memory-bandwidth bound.

    bash benchmarks/gpu.sh                                  # on a machine with a CUDA GPU
    python -m benchmarks.gpu --device cuda --out bench_out/gpu.json
    python -m benchmarks.gpu --device cpu --size 32 32 32 --volume 48 48 40 --repeats 1  # smoke

Measured (CUDA synchronised around every timed call; medians of ``--repeats`` after a warm-up):

- ``forward``: every registered model, untrained (speed does not depend on the weights), at
  ``--size`` (default 160x192x224), in the precision ``--precision auto`` picks, ms, and its peak
  memory (``torch.cuda.max_memory_allocated`` after a reset);
- ``register``: ``deepwarp register`` files to files on a synthetic pair of ``--volume`` voxels
  (default a brain's 160x256x256, 1 mm; two smooth label-wise phantoms, so the run does real
  work), in one process after a warm-up run: wall seconds and the stages from metrics.json;
  the same with ``--refine 50``, ``--refine accurate`` and ``--finetune 50`` (their stage
  seconds);
- ``warp``: the full-resolution warp stage (``pipeline.warp_full_resolution``: image, field,
  displacement and Jacobian) on that grid, and the bytes it must move at least (the moving
  image read, the warped image, the displacement and the Jacobian written: 24 bytes a voxel)
  over its time, against the device's copy bandwidth measured here (a 1 GiB clone, bytes read
  and written);
- the peak memory of the whole run.

Targets (issue 22): forward <= 20 ms, end to end <= 1 s plus reading and writing, 50
refinement steps <= 1 s, peak <= 3 GB; issue 23: ``--refine accurate`` <= 3 s for a brain. No figure is made up where something cannot run: it is
reported as skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import report as report_io
from benchmarks.run import median_time


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up, CUDA synchronised."""
    return median_time(fn, repeats, device)["median_s"]


def copy_bandwidth(device: torch.device, mib: int = 1024) -> float:
    """Bytes read + written per second by a large device-to-device clone, GB/s."""
    x = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    seconds = timed(lambda: x.clone(), device, 5)
    return 2 * x.numel() * 4 / seconds / 1e9


def forward_times(device: torch.device, size, repeats: int) -> list[dict]:
    from napari_deepwarp.core.models.registry import available_models, create_model
    from napari_deepwarp.core.precision import autocast, precision_name, resolve_precision

    dtype = resolve_precision("auto", device)
    rows = []
    for name in available_models():
        torch.manual_seed(0)
        model = create_model(name)
        layout = torch.channels_last_3d if model.channels_last else torch.contiguous_format
        model = model.to(device, memory_format=layout).eval()
        x = torch.rand(1, 1, *size, device=device).contiguous(memory_format=layout)

        def forward(model=model, x=x):
            with torch.no_grad(), autocast(device, dtype):
                model(x, x)

        _reset_peak(device)
        try:
            ms = 1000 * timed(forward, device, repeats)
            rows.append(
                {
                    "model": name,
                    "ms": ms,
                    "precision": precision_name(dtype),
                    "peak_mib": _peak_mib(device),
                }
            )
        except RuntimeError as exc:  # out of memory and the like: say so, make up nothing
            rows.append({"model": name, "skipped": " ".join(str(exc).split())[:160]})
        del model, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def synthetic_pair(folder: Path, shape) -> tuple[Path, Path]:
    """Two phantoms of ``shape`` (z, y, x) at 1 mm: the same smooth label-wise anatomy, the
    second shifted and warped a little, written as .nii.gz."""
    from napari_deepwarp.core.io import write_volume
    from napari_deepwarp.core.volume import Volume

    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    paths = []
    for k, shift in enumerate((0.0, 0.06)):
        image = np.zeros(shape, np.float32)
        xs = x + shift + 0.03 * np.sin(3 * y)
        for i in range(12):
            c = rng.uniform(-0.5, 0.5, 3)
            r = rng.uniform(0.15, 0.35, 3)
            inside = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((xs - c[2]) / r[2]) ** 2
            image += (0.2 + 0.06 * i) / (1 + np.exp(8 * (inside - 1)))
        rng = np.random.default_rng(0)  # the same anatomy for the second image
        grid_origin = (0.0, 0.0, 0.0)
        vol = Volume(image, (1.0, 1.0, 1.0), grid_origin, np.eye(3), f"phantom{k}")
        paths.append(write_volume(vol, folder / f"phantom{k}.nii.gz"))
    return paths[0], paths[1]


def register_times(device: torch.device, fixed: Path, moving: Path, folder: Path) -> dict:
    from napari_deepwarp.cli import main as deepwarp

    out = {}
    base = ["register", str(fixed), str(moving), "-q", "--device", device.type]
    deepwarp([*base, "-o", str(folder / "warm")])  # warm-up: kernels, allocator, file cache
    for name, options in (
        ("default", []),
        ("refine 50", ["--refine", "50"]),
        ("refine accurate", ["--refine", "accurate"]),
        ("finetune 50", ["--finetune", "50"]),
    ):
        _reset_peak(device)
        start = time.perf_counter()
        code = deepwarp([*base, "-o", str(folder / "out"), *options])
        wall = time.perf_counter() - start
        if code != 0:
            out[name] = {"skipped": f"exit code {code}"}
            continue
        metrics = json.loads((folder / "out" / "metrics.json").read_text(encoding="utf-8"))
        seconds = metrics["seconds"]
        out[name] = {
            "wall_s": wall,
            "register_s": seconds["total"],
            "stages_s": seconds,
            "model": metrics["model"],
            "peak_mib": _peak_mib(device),
        }
    return out


def warp_throughput(
    device: torch.device, fixed_path: Path, moving_path: Path, repeats: int, bandwidth: float
) -> dict:
    from napari_deepwarp.core.io import read_volume
    from napari_deepwarp.core.pipeline import warp_full_resolution
    from napari_deepwarp.core.preprocess import working_grid

    fixed, moving = read_volume(fixed_path), read_volume(moving_path)
    grid = working_grid(fixed, None, 96, 16)
    field = torch.randn(1, 3, *grid.shape, device=device)
    seconds = timed(
        lambda: warp_full_resolution(fixed.grid, None, grid, field, moving, None, device, False),
        device,
        repeats,
    )
    voxels = int(np.prod(fixed.shape))
    gb = 24 * voxels / 1e9
    return {
        "seconds": seconds,
        "voxels": voxels,
        "min_bytes_gb": gb,
        "gb_per_s": gb / seconds,
        "copy_bandwidth_gb_per_s": bandwidth,
        "fraction_of_bound": gb / seconds / bandwidth,
    }


def table(report: dict) -> str:
    lines = ["| model | forward ms | precision | peak MiB |", "|---|---:|---|---:|"]
    for r in report["forward"]:
        if "skipped" in r:
            lines.append(f"| {r['model']} | skipped: {r['skipped']} | | |")
        else:
            peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            lines.append(f"| {r['model']} | {r['ms']:.1f} | {r['precision']} | {peak} |")
    lines += ["", "| run | wall s | register() s | model | peak MiB |", "|---|---:|---:|---|---:|"]
    for name, r in report["register"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | |")
            continue
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        stage = {"refine 50": "refine", "refine accurate": "refine", "finetune 50": "finetune"}
        stage = stage.get(name)
        extra = f" ({stage} {r['stages_s'].get(stage, 0):.2f} s)" if stage else ""
        lines.append(
            f"| {name}{extra} | {r['wall_s']:.2f} | {r['register_s']:.2f} | {r['model']} | {peak} |"
        )
    w = report["warp"]
    lines += [
        "",
        (
            f"Warp stage on {w['voxels']:,} voxels: {w['seconds'] * 1000:.1f} ms, at least "
            f"{w['min_bytes_gb']:.2f} GB moved: {w['gb_per_s']:.0f} GB/s against a copy "
            f"bandwidth of {w['copy_bandwidth_gb_per_s']:.0f} GB/s "
            f"({100 * w['fraction_of_bound']:.0f} % of the bound)."
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test)")
    parser.add_argument(
        "--size", type=int, nargs=3, default=[160, 192, 224], metavar=("D", "H", "W")
    )
    parser.add_argument(
        "--volume", type=int, nargs=3, default=[160, 256, 256], metavar=("D", "H", "W")
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="bench_out/gpu.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA GPU here; run it where one is (bash benchmarks/gpu.sh)")
        return 2
    start = time.perf_counter()
    bandwidth = copy_bandwidth(device, 1024 if device.type == "cuda" else 64)
    _reset_peak(device)
    forward = forward_times(device, tuple(args.size), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fixed, moving = synthetic_pair(folder, tuple(args.volume))
        registered = register_times(device, fixed, moving, folder)
        warp = warp_throughput(device, fixed, moving, args.repeats, bandwidth)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    command = "python -m benchmarks.gpu " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": command.strip(),
        "machine": f"{report_io.machine(str(device))}, {name}",
        "device": name,
        "size": args.size,
        "volume": args.volume,
        "forward": forward,
        "register": registered,
        "warp": warp,
        "seconds": time.perf_counter() - start,
    }
    print(report_io.write(Path(args.out).with_suffix(""), report, table(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
