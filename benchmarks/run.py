"""Speed and memory, side by side in one run: models, building blocks, the warp stage, end to end
`deepwarp register` on a Mindboggle pair, and the classical references (ANTs, elastix).

    python -m benchmarks.run                 # everything (CPU, and CUDA where present)
    python -m benchmarks.run --quick         # 48^3, one timed run, no compile, no ANTs/elastix
    python -m benchmarks.run --quick --classical   # ... and the classical references, shortened
    python -m benchmarks.run --update-readme-table

Every figure is the median of ``--repeats`` runs after one warm-up, with torch's threads fixed
(``--threads``, reported) and CUDA synchronised. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on the CPU the growth of
the peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; elsewhere
``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over the resident set just before the first timed
call (model and inputs allocated), in a fresh subprocess per model and size. A measurement that would take too
long (estimated from the working size) or that times out is reported as skipped, never as a
number. Ratios (reference / current) are measured in the same run, so they survive a busy machine
better than absolute seconds do. Writes ``results.json``, ``results.md`` and (with matplotlib)
``results.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mindboggle"
README = ROOT / "benchmarks" / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


# --- timing helpers ---------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, repeats: int, device="cpu", warmup: int = 1) -> dict:
    """Median (and all) wall seconds of ``fn()`` after ``warmup`` calls, CUDA synchronised."""
    for _ in range(warmup):
        fn()
        _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "runs_s": times}


def _status_mib(field: str) -> float | None:
    """``VmRSS``/``VmHWM`` of this process from /proc (Linux), MiB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")
        return True
    except OSError:
        return False


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or the growth of the CPU high-water mark."""

    def __init__(self, device):
        self.device = str(device)

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif _reset_peak_rss() and _status_mib("VmRSS") is not None:
            self.how = "VmHWM"  # the peak resident set since the reset, minus RSS at the start
            self.base = _status_mib("VmRSS")
        else:
            self.how = "ru_maxrss"
            self.base = _rss_mib()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif self.how == "VmHWM":
            self.mib = _status_mib("VmHWM") - self.base
        else:
            self.mib = _rss_mib() - self.base
        return False


def machine_info(threads: int) -> dict:
    import numpy as np
    import SimpleITK as sitk
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch_threads": threads,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "simpleitk": sitk.Version.VersionString(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["memory_gib"] = round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
        )
    except (ValueError, OSError, AttributeError):
        pass
    return info


# --- workers (each in a fresh subprocess) -----------------------------------------------------
def worker_model(name: str, size, device: str, repeats: int, finetune_steps: int) -> dict:
    """Parameters, forward median and peak memory, and (optionally) a fine-tuning step."""
    import torch

    from napari_deepwarp.core.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(name).to(device).eval()
    moving = torch.rand(1, 1, *size, device=device)
    fixed = torch.rand(1, 1, *size, device=device)
    out = {"parameters": sum(p.numel() for p in model.parameters())}
    with torch.no_grad(), PeakMemory(device) as peak:
        out["forward"] = median_time(lambda: model(moving, fixed), repeats, device)
    out["forward_peak_mib"] = peak.mib
    if finetune_steps:
        model.train()
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            optimiser.zero_grad(set_to_none=True)
            loss, _ = model.loss(model(moving, fixed), moving, fixed)
            loss.backward()
            optimiser.step()

        with PeakMemory(device) as peak:
            out["finetune_step"] = median_time(step, finetune_steps, device)
        out["finetune_peak_mib"] = peak.mib
    return out


def worker_variants(name: str, size, device: str, repeats: int, compile_too: bool) -> dict:
    """Forward median of one model in each precision (autocast) x memory layout x (optionally)
    ``torch.compile``, after a warm-up (which for a compiled model includes its compilation,
    reported separately as ``first_call_s``)."""
    import torch

    from napari_deepwarp.core.models.registry import create_model
    from napari_deepwarp.core.precision import autocast

    torch.manual_seed(0)
    base = create_model(name).to(device).eval()
    moving = torch.rand(1, 1, *size, device=device)
    fixed = torch.rand(1, 1, *size, device=device)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if str(device).startswith("cuda"):
        dtypes["float16"] = torch.float16
    layouts = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
    out = {}
    for layout, fmt in layouts.items():
        model = base.to(memory_format=fmt)
        mov, fix = (t.contiguous(memory_format=fmt) for t in (moving, fixed))
        runners = {"eager": model}
        if compile_too:
            runners["compiled"] = torch.compile(model)
        for how, net in runners.items():
            for precision, dtype in dtypes.items():
                key = f"{precision} {layout} {how}"

                def forward(net=net, dtype=dtype, mov=mov, fix=fix):
                    with torch.no_grad(), autocast(device, dtype):
                        return net(mov, fix)

                try:
                    start = time.perf_counter()
                    forward()
                    _sync(device)
                    first = time.perf_counter() - start
                    out[key] = median_time(forward, repeats, device, warmup=0)
                    out[key]["first_call_s"] = first
                except (RuntimeError, NotImplementedError, TypeError) as exc:  # say why
                    out[key] = {"skipped": f"{type(exc).__name__}: {str(exc)[:120]}"}
    return out


def _old_jacobian(disp):
    """The pre-issue-6 cofactor Jacobian (temporaries allocated per product)."""
    from napari_deepwarp.core.spatial import _diff

    j = [[_diff(disp[:, r : r + 1], c) for c in range(3)] for r in range(3)]
    for r in range(3):
        j[r][r] += 1.0
    det = j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
    det -= j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
    det += j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    return det


def worker_blocks(size, device: str, repeats: int) -> dict:
    """Warp, compose, scaling and squaring, local NCC, Parzen MI, Jacobian; reference vs now."""
    import torch
    import torch.nn.functional as F

    from napari_deepwarp.core import losses, spatial

    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 3, 6, 6, 6, generator=g)
    disp = (F.interpolate(coarse, size=size, mode="trilinear", align_corners=True) * 3).to(device)
    img = torch.rand(1, 1, *size, generator=g).to(device)
    img2 = torch.rand(1, 1, *size, generator=g).to(device)

    def reference_warp(image, u):
        coords = spatial.identity_grid(u.shape[2:], u.device, u.dtype) + u
        return spatial.sample(image, coords)

    cases = {
        "warp": (lambda: spatial.warp(img, disp), lambda: reference_warp(img, disp)),
        "compose": (
            lambda: spatial.compose(disp, disp),
            lambda: disp + reference_warp(disp, disp),
        ),
        "integrate_velocity (7 steps)": (lambda: spatial.integrate_velocity(disp / 8), None),
        "local NCC (9^3)": (lambda: losses.local_ncc_loss(img, img2), None),
        "Parzen MI (32 bins)": (lambda: losses.mutual_information_loss(img, img2), None),
        "Jacobian determinant": (
            lambda: spatial.jacobian_determinant(disp),
            lambda: _old_jacobian(disp),
        ),
    }
    out = {}
    with torch.no_grad():
        for name, (now, ref) in cases.items():
            row = {"now": median_time(now, repeats, device)}
            if ref is not None:
                row["reference"] = median_time(ref, repeats, device)
            out[name] = row
    return out


def worker_warp_stage(pair: str, device: str, repeats: int) -> dict:
    """The full-resolution warp stage and the metrics on a Mindboggle pair: reference vs now."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from benchmarks import reference
    from napari_deepwarp.core import metrics as M
    from napari_deepwarp.core import pipeline as P
    from napari_deepwarp.core.io import read_volume
    from napari_deepwarp.core.preprocess import (
        IntensityPreset,
        apply_window,
        intensity_window,
        working_grid,
    )

    f, m = (int(i) for i in pair.split(":"))
    fixed = read_volume(DATA / f"oasis_trt20_{f}_t1.nii.gz")
    moving = read_volume(DATA / f"oasis_trt20_{m}_t1.nii.gz")
    fixed_labels = read_volume(DATA / f"oasis_trt20_{f}_labels.nii.gz", labels=True)
    moving_labels = read_volume(DATA / f"oasis_trt20_{m}_labels.nii.gz", labels=True)
    affine = sitk.AffineTransform(3)  # a fixed, plausible affine and a smooth field
    affine.SetMatrix((1.02, 0.01, 0.0, -0.01, 0.98, 0.02, 0.01, 0.0, 1.01))
    affine.SetTranslation((1.5, -2.0, 1.0))
    grid = working_grid(fixed, None, 96, 16)
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 3, 6, 6, 6, generator=g) * 2
    field = torch.nn.functional.interpolate(coarse, size=grid.shape, mode="trilinear")
    args = (fixed.grid, affine, grid, field, moving, moving_labels, device)

    def pm_wv():
        y = P.physical_map(fixed.grid, affine, grid, field, device)[2]
        P.warp_volume(moving, y, fixed.grid)
        P.warp_volume(moving_labels, y, fixed.grid, labels=True)

    out = {
        "shape_zyx": list(fixed.shape),
        "warp stage (one pass)": {
            "now": median_time(lambda: P.warp_full_resolution(*args), repeats, device),
            "reference": median_time(lambda: reference.warp_stage(*args), repeats, device),
        },
        "physical_map + 2 x warp_volume": {"now": median_time(pm_wv, repeats, device)},
    }
    new, ref = P.warp_full_resolution(*args), reference.warp_stage(*args)
    out["max_abs_difference"] = {
        "warped (intensity)": float(np.abs(new.warped.array - ref["warped"]).max()),
        "warped intensity range": float(np.ptp(moving.array)),
        "labels (voxels differing)": int((new.warped_labels.array != ref["warped_labels"]).sum()),
        "displacement (mm)": float(np.abs(new.displacement - ref["displacement"]).max()),
        "jacobian": float(np.abs(new.jacobian - ref["jacobian"]).max()),
    }
    preset = IntensityPreset()
    fixed_n = apply_window(fixed.array, intensity_window(fixed.array, preset))
    window = intensity_window(moving.array, preset)
    images = [
        apply_window(v, window)
        for v in (P._identity_warp(moving, fixed.grid, False).array, new.warped.array)
    ]
    labels = [P._identity_warp(moving_labels, fixed.grid, True).array, new.warped_labels.array]

    def metrics_now():
        M.intensity_similarity(fixed_n, images)
        M.overlap_per_label_many(fixed_labels.array, labels)

    def metrics_reference():
        for image in images:
            M.ncc(fixed_n, image)
            M.mutual_information(fixed_n, image)
        for lab in labels:
            M.overlap_per_label(fixed_labels.array, lab)

    out["metrics (NCC, MI x2; Dice x2)"] = {
        "now": median_time(metrics_now, repeats, device),
        "reference": median_time(metrics_reference, repeats, device),
    }
    return out


def worker_classical(tool: str, pair: str, threads: int, quick: bool) -> dict:
    """ANTs SyN or elastix affine+B-spline on the pair: seconds (registration only) and Dice."""
    import numpy as np

    from napari_deepwarp.core.metrics import overlap_per_label

    f, m = (int(i) for i in pair.split(":"))
    path = {
        k: str(DATA / f"oasis_trt20_{i}_{k.split('_')[1]}.nii.gz")
        for k, i in (("fixed_t1", f), ("moving_t1", m), ("fixed_labels", f), ("moving_labels", m))
    }
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)

    def dice(fixed_labels, warped_labels) -> float:
        per = overlap_per_label(np.rint(fixed_labels), np.rint(warped_labels))
        return float(np.mean([v["dice"] for v in per.values()]))

    if tool == "ants":
        import ants

        fixed, moving = ants.image_read(path["fixed_t1"]), ants.image_read(path["moving_t1"])
        kind = "SyN"
        iterations = (20, 10, 0) if quick else (40, 20, 0)
        start = time.perf_counter()
        reg = ants.registration(fixed, moving, type_of_transform=kind, reg_iterations=iterations)
        seconds = time.perf_counter() - start
        fl, ml = ants.image_read(path["fixed_labels"]), ants.image_read(path["moving_labels"])
        warped = ants.apply_transforms(fl, ml, reg["fwdtransforms"], interpolator="nearestNeighbor")
        return {
            "method": f"ANTs {kind} (antspyx {ants.__version__}), reg_iterations {iterations}",
            "seconds": seconds,
            "dice_after": dice(fl.numpy(), warped.numpy()),
        }
    import itk

    fixed = itk.imread(path["fixed_t1"], itk.F)
    moving = itk.imread(path["moving_t1"], itk.F)
    params = itk.ParameterObject.New()
    for kind in ("affine", "bspline"):
        pmap = params.GetDefaultParameterMap(kind)
        if quick:
            pmap["MaximumNumberOfIterations"] = ["128"]
        params.AddParameterMap(pmap)
    start = time.perf_counter()
    # One thread: with 2 the B-spline stage of itk-elastix 0.25.4 crashed (SIGSEGV) on this
    # pair next to torch; the affine stage alone ran fine with 2.
    _, transform = itk.elastix_registration_method(
        fixed, moving, parameter_object=params, log_to_console=False, number_of_threads=1
    )
    seconds = time.perf_counter() - start
    for i in range(transform.GetNumberOfParameterMaps()):
        transform.SetParameter(i, "FinalBSplineInterpolationOrder", "0")
    fl = itk.imread(path["fixed_labels"], itk.F)
    ml = itk.imread(path["moving_labels"], itk.F)
    warped = itk.transformix_filter(ml, transform, log_to_console=False)
    return {
        "method": f"elastix affine + B-spline (itk-elastix, 1 thread), "
        f"{'128' if quick else 'default'} iterations per level",
        "seconds": seconds,
        "dice_after": dice(itk.array_from_image(fl), itk.array_from_image(warped)),
    }


def worker_register(pair: str, device: str, threads: int, max_size: int) -> dict:
    """`deepwarp register` in-process, files read to files written: wall seconds and stages."""
    import torch

    from napari_deepwarp.cli import main as deepwarp

    torch.set_num_threads(threads)
    f, m = (int(i) for i in pair.split(":"))

    def p(i, kind):
        return str(DATA / f"oasis_trt20_{i}_{kind}.nii.gz")

    with tempfile.TemporaryDirectory() as out:
        args = ["register", p(f, "t1"), p(m, "t1"), "-o", out, "-q", "--device", device]
        args += ["--fixed-labels", p(f, "labels"), "--moving-labels", p(m, "labels")]
        args += ["--max-size", str(max_size)]
        start = time.perf_counter()
        code = deepwarp(args)
        wall = time.perf_counter() - start
        if code != 0:
            raise RuntimeError(f"deepwarp register exited with {code}")
        metrics = json.loads((Path(out) / "metrics.json").read_text(encoding="utf-8"))
    return {
        "command": "deepwarp " + " ".join(a if "/" not in a else Path(a).name for a in args),
        "wall_s": wall,
        "stages_s": metrics["seconds"],
        "model": metrics["model"],
        "dice_before": metrics.get("mean_dice_before"),
        "dice_affine": metrics.get("mean_dice_affine"),
        "dice_after": metrics.get("mean_dice_after"),
        "folding_percent": metrics["folding_percent"],
    }


WORKERS = {
    "model": worker_model,
    "variants": worker_variants,
    "blocks": worker_blocks,
    "warp_stage": worker_warp_stage,
    "classical": worker_classical,
    "register": worker_register,
}


def _worker_main(spec: str) -> None:
    import torch

    job = json.loads(spec)
    torch.set_num_threads(job.pop("threads_"))
    result = WORKERS[job.pop("kind")](**job)
    print("RESULT " + json.dumps(result))


def run_worker(kind: str, timeout: float, nthreads: int, **kwargs) -> dict:
    """Run a worker in a fresh interpreter; ``{"skipped": reason}`` on timeout or failure."""
    spec = json.dumps({"kind": kind, "threads_": nthreads, **kwargs})
    env = dict(os.environ, OMP_NUM_THREADS=str(nthreads), MKL_NUM_THREADS=str(nthreads))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.run", "--worker", spec],
            capture_output=True,
            check=False,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if "No module named" in tail:
        return {"skipped": f"not installed ({tail.split('No module named')[-1].strip()})"}
    return {"skipped": f"failed: {tail[:200]}"}


# --- report -----------------------------------------------------------------------------------
def _s(entry) -> str:
    if entry is None:
        return "-"
    if isinstance(entry, dict) and "skipped" in entry:
        return f"skipped ({entry['skipped']})"
    value = entry["median_s"] if isinstance(entry, dict) else entry
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _ratio(row) -> str:
    if "reference" not in row or "now" not in row:
        return "-"
    return f"{row['reference']['median_s'] / row['now']['median_s']:.2f}x"


def markdown(report: dict) -> str:
    mi = report["machine"]
    intro = (
        f"`{report['command']}`, {report.get('date', 'date not recorded')}, on {mi['cpu']} "
        f"({mi['cpu_count']} cores, load "
        f"{mi['load_average_1min']:.1f} at the start), torch {mi['torch']}, "
        f"{mi['torch_threads']} threads; CUDA: {mi['cuda'] or 'none'}. Median of "
        f"{report['repeats']} after a warm-up; seconds."
    )
    lines = [intro, ""]
    for device, models in report["models"].items():
        sizes = list(next(iter(models.values()))["sizes"])
        head = ["model", "parameters"]
        for size in sizes:
            head += [f"forward {size}", f"peak MiB {size}"]
        head += ["fine-tune step " + sizes[0]]
        lines += [f"### Models on {device}", "", "| " + " | ".join(head) + " |"]
        lines.append("|---" + "|---:" * (len(head) - 1) + "|")
        for name, row in models.items():
            cells = [name, f"{row.get('parameters', 0):,}"]
            for size in sizes:
                r = row["sizes"][size]
                if "skipped" in r:
                    cells += [_s(r), "-"]
                else:
                    cells += [_s(r["forward"]), f"{r['forward_peak_mib']:.0f}"]
            first = row["sizes"][sizes[0]]
            cells.append(_s(first.get("finetune_step")) if "skipped" not in first else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for device, by_model in report.get("variants", {}).items():
        keys = list(next(iter(by_model.values()), {}))
        size = "x".join(map(str, report.get("working_size", [])))
        lines += [
            (
                f"### Precision, memory layout and torch.compile on {device} (forward {size}, "
                "seconds and speed-up over float32 contiguous eager; compiled: after compiling)"
            ),
            "",
            "| model | " + " | ".join(keys) + " |",
            "|---" + "|---:" * len(keys) + "|",
        ]
        for name, row in by_model.items():
            ref = row.get("float32 contiguous eager", {}).get("median_s")
            cells = [name]
            for key in keys:
                r = row.get(key, {})
                if "median_s" not in r:
                    cells.append(_s(r) if r else "-")
                    continue
                speed = f" ({ref / r['median_s']:.2f}x)" if ref and key != keys[0] else ""
                cells.append(f"{r['median_s']:.3f}{speed}")
            lines.append("| " + " | ".join(cells) + " |")
        first = {
            name: row[k]["first_call_s"]
            for name, row in by_model.items()
            for k in ("float32 contiguous compiled",)
            if "first_call_s" in row.get(k, {})
        }
        if first:
            lines += [
                "",
                "First call of the compiled model (compiling included), float32 contiguous: "
                + ", ".join(f"{name} {s:.0f} s" for name, s in first.items())
                + ".",
            ]
        lines.append("")
    for device, by_size in report["blocks"].items():
        lines += [f"### Building blocks on {device} (forward, no gradient)", ""]
        sizes = list(by_size)
        head = ["block"]
        for size in sizes:
            head += [f"{size} now", f"{size} reference", f"{size} speed-up"]
        lines += ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
        names = next((list(v) for v in by_size.values() if "skipped" not in v), [])
        for name in names:
            cells = [name]
            for size in sizes:
                row = by_size[size]
                if "skipped" in row:
                    cells += [_s(row), "-", "-"]
                    continue
                row = row[name]
                cells += [_s(row["now"]), _s(row.get("reference")), _ratio(row)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    ws = report.get("warp_stage")
    if ws and "skipped" not in ws:
        lines += [
            f"### Full-resolution warp stage on {report['pair']} ({ws['shape_zyx']}), CPU",
            "",
            "| step | now | reference | speed-up |",
            "|---|---:|---:|---:|",
        ]
        for name in (
            "warp stage (one pass)",
            "physical_map + 2 x warp_volume",
            "metrics (NCC, MI x2; Dice x2)",
        ):
            row = ws[name]
            lines.append(
                f"| {name} | {_s(row['now'])} | {_s(row.get('reference'))} | {_ratio(row)} |"
            )
        diff = ws["max_abs_difference"]
        lines += [
            "",
            "Largest difference to the reference: "
            + ", ".join(f"{k} {v:.3g}" for k, v in diff.items())
            + ".",
            "",
        ]
    elif ws:
        lines += [f"Warp stage: {_s(ws)}", ""]
    if not report["register"] and not report["classical"]:
        return "\n".join(lines) + "\n"
    lines += [
        f"### Registering Mindboggle {report['pair']} (fixed<-moving), files read to files written",
        "",
        "| method | device | seconds | Dice before | Dice after | stages (s) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for device, r in report["register"].items():
        if "skipped" in r:
            lines.append(f"| deepwarp register | {device} | {_s(r)} | - | - | - |")
            continue
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages_s"].items())
        lines.append(
            f"| deepwarp register ({r['model']}, --max-size {report['max_size']}) | {device} | "
            f"{r['wall_s']:.1f} | {r['dice_before']:.3f} | {r['dice_after']:.3f} | {stages} |"
        )
    for tool, r in report["classical"].items():
        if "skipped" in r:
            lines.append(f"| {tool} | cpu | {_s(r)} | - | - | - |")
        else:
            lines.append(
                f"| {r['method']} | cpu | {r['seconds']:.1f} | - | {r['dice_after']:.3f} | "
                "registration only |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    for device, models in report["models"].items():
        names, values = [], []
        for name, row in models.items():
            first = next(iter(row["sizes"].values()))
            if "forward" in first:
                names.append(name)
                values.append(first["forward"]["median_s"])
        size = next(iter(next(iter(models.values()))["sizes"]))
        ax.bar([f"{n}\n{device}" for n in names], values, label=f"{device}, {size}")
    ax.set_ylabel("forward, s (median)")
    ax.set_title("Model forward time at the working size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def update_readme(table: str) -> None:
    text = (
        README.read_text(encoding="utf-8")
        if README.exists()
        else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    )
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1] if END in rest else ""
    README.write_text(f"{head}{BEGIN}\n{table}{END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    import torch

    from napari_deepwarp.core.models.registry import available_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="about a minute: working size 48^3 and no big size, one timed run after the warm-up "
        "(five for the millisecond building blocks), "
        "no torch.compile, no ANTs/elastix (unless --classical), no pre-issue-6 warp stage "
        "(unless --warp-stage)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs after a warm-up (3; 1 with --quick)"
    )
    parser.add_argument(
        "--working-size",
        type=int,
        nargs=3,
        default=None,
        help="models and blocks (64 64 64; 48 48 48 with --quick)",
    )
    parser.add_argument("--big-size", type=int, nargs=3, default=[160, 192, 224])
    parser.add_argument("--models", default=",".join(available_models()))
    parser.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pair", default="1:2", help="Mindboggle fixed:moving subjects")
    parser.add_argument("--max-size", type=int, default=96, help="deepwarp register --max-size")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="skip a model at the big size when its estimated forward exceeds this",
    )
    parser.add_argument("--classical-timeout", type=float, default=900.0)
    parser.add_argument(
        "--classical", action="store_true", help="with --quick: run ANTs and elastix all the same"
    )
    parser.add_argument(
        "--warp-stage", action="store_true", help="with --quick: time the warp stage all the same"
    )
    parser.add_argument(
        "--classical-quick",
        action="store_true",
        help="fewer iterations for ANTs and elastix (implied by --quick)",
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma list of: models,variants,blocks,warp,register,classical",
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="variants: leave torch.compile out"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench_out"),
        help="folder for results.json/.md/.png, or a file NAME.json (NAME.md, NAME.png beside it; "
        "the documentation reads docs/benchmarks/data/run-*.json)",
    )
    parser.add_argument("--update-readme-table", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        _worker_main(args.worker)
        return 0
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.working_size is None:
        args.working_size = [48, 48, 48] if args.quick else [64, 64, 64]
    if args.quick:
        args.no_compile = True
        if not args.classical:
            skip.add("classical")
        if not args.warp_stage:
            skip.add("warp")
    devices = [d for d in args.devices.split(",") if d]
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
    small, big = tuple(args.working_size), tuple(args.big_size)
    sizes = [small] if args.quick else [small, big]
    label = {s: "x".join(map(str, s)) for s in sizes}
    have_data = DATA.is_dir()
    report: dict = {
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "skipped_parts": sorted(skip),
        "machine": machine_info(args.threads),
        "repeats": args.repeats,
        "pair": args.pair,
        "max_size": args.max_size,
        "working_size": list(small),
        "cpu_peak_memory": "peak resident set (VmHWM after resetting it through "
        "/proc/self/clear_refs; else ru_maxrss) minus the resident set before the first timed "
        "call, fresh subprocess per measurement",
        "models": {},
        "variants": {},
        "blocks": {},
        "warp_stage": None,
        "register": {},
        "classical": {},
    }

    def say(msg):
        print(msg, flush=True)

    t_all = time.perf_counter()
    if "models" not in skip:
        for device in devices:
            rows = report["models"][device] = {}
            for name in args.models.split(","):
                row = rows[name] = {"sizes": {}}
                estimate = None
                for size in sizes:
                    key = label[size]
                    if estimate is not None and device == "cpu" and estimate > args.max_seconds:
                        row["sizes"][key] = {
                            "skipped": f"estimated {estimate:.0f} s per forward > --max-seconds"
                        }
                        say(f"{device} {name} {key}: skipped (estimate {estimate:.0f} s)")
                        continue
                    result = run_worker(
                        "model",
                        60 * 10,
                        args.threads,
                        name=name,
                        size=list(size),
                        device=device,
                        repeats=args.repeats,
                        finetune_steps=max(1, args.repeats - 1) if size == small else 0,
                    )
                    row["sizes"][key] = result
                    if "parameters" in result:
                        row["parameters"] = result["parameters"]
                        ratio = (big[0] * big[1] * big[2]) / (small[0] * small[1] * small[2])
                        estimate = result["forward"]["median_s"] * ratio * 1.2
                    say(f"{device} {name} {key}: {_s(result.get('forward', result))} s")
    if "variants" not in skip:
        for device in devices:
            rows = report["variants"][device] = {}
            for name in args.models.split(","):
                rows[name] = run_worker(
                    "variants",
                    60 * 10,
                    args.threads,
                    name=name,
                    size=list(small),
                    device=device,
                    repeats=args.repeats,
                    compile_too=not args.no_compile,
                )
                say(f"{device} {name} variants done")
    if "blocks" not in skip:
        for device in devices:
            report["blocks"][device] = {
                label[size]: run_worker(
                    "blocks",
                    60 * 10,
                    args.threads,
                    size=list(size),
                    device=device,
                    repeats=max(args.repeats, 5) if args.quick else args.repeats,
                )
                for size in sizes
            }
            say(f"{device} building blocks done")
    if "warp" not in skip:
        report["warp_stage"] = (
            run_worker(
                "warp_stage",
                60 * 15,
                args.threads,
                pair=args.pair,
                device="cpu",
                repeats=args.repeats,
            )
            if have_data
            else {"skipped": f"no data at {DATA}"}
        )
        say("warp stage done")
    if "register" not in skip:
        for device in devices:
            report["register"][device] = (
                run_worker(
                    "register",
                    60 * 15,
                    args.threads,
                    pair=args.pair,
                    device=device,
                    threads=args.threads,
                    max_size=args.max_size,
                )
                if have_data
                else {"skipped": f"no data at {DATA}"}
            )
            say(f"register on {device}: {report['register'][device].get('wall_s', '-')}")
    if "classical" not in skip:
        for tool, module in (("ANTs", "ants"), ("elastix", "itk")):
            try:
                __import__(module)
            except ImportError:
                report["classical"][tool] = {
                    "skipped": "not installed (pip install napari-deepwarp[bench])"
                }
                continue
            if not have_data:
                report["classical"][tool] = {"skipped": f"no data at {DATA}"}
                continue
            report["classical"][tool] = run_worker(
                "classical",
                args.classical_timeout,
                args.threads,
                tool=module.replace("itk", "elastix"),
                pair=args.pair,
                threads=args.threads,
                quick=args.quick or args.classical_quick,
            )
            say(f"{tool}: {report['classical'][tool]}")
    report["total_s"] = time.perf_counter() - t_all
    out = args.out if args.out.suffix == ".json" else args.out / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    table = markdown(report)
    out.with_suffix(".md").write_text(table, encoding="utf-8")
    plotted = plot(report, out.with_suffix(".png")) if report["models"] else False
    print(table)
    print(
        f"wrote {out}, {out.with_suffix('.md')}"
        + (f", {out.with_suffix('.png')}" if plotted else "")
    )
    if args.update_readme_table:
        update_readme(table)
        print(f"updated {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
