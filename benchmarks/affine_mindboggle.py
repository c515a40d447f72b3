"""Accuracy and time of the affine pre-alignment on Mindboggle pairs (native space, not aligned).

    python -m benchmarks.affine_mindboggle --pairs 1:2,3:4,5:1 --repeats 3

A pair ``F:M`` registers subject M (moving) to subject F (fixed) with
:func:`napari_deepwarp.core.affine.align_affine` (default settings), propagates M's labels with
nearest neighbour and reports mean Dice over the labels present in both label maps (0 excluded),
unregistered vs affine, and the median wall time of the affine stage over ``--repeats`` runs
(file reading and label resampling not included). Prints a Markdown table and writes JSON to
``--out``. Needs ../shared/data/mindboggle (not shipped: CC BY-NC-SA).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from benchmarks import report as report_io
from napari_deepwarp.core.affine import AffineSettings, run_affine
from napari_deepwarp.core.volume import Volume

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mindboggle"

try:
    from napari_deepwarp.core.metrics import overlap_per_label
except ImportError:  # metrics.py not there yet: a local bincount version

    def overlap_per_label(fixed_labels, warped_labels, labels=None):
        f = np.asarray(fixed_labels).ravel().astype(np.int64)
        w = np.asarray(warped_labels).ravel().astype(np.int64)
        n = int(max(f.max(), w.max())) + 1
        nf, nw = np.bincount(f, minlength=n), np.bincount(w, minlength=n)
        nb = np.bincount(f[f == w], minlength=n)
        if labels is None:
            labels = [k for k in range(1, n) if nf[k] and nw[k]]
        out = {}
        for k in labels:
            a, b, both = (int(x[k]) if k < n else 0 for x in (nf, nw, nb))
            out[k] = {"dice": 2 * both / (a + b), "jaccard": both / (a + b - both)}
        return out


def mean_dice(fixed_labels: np.ndarray, warped_labels: np.ndarray, labels: list[int]) -> float:
    per_label = overlap_per_label(fixed_labels, warped_labels, labels=labels)
    return float(np.mean([v["dice"] for v in per_label.values()]))


def run_pair(fixed: int, moving: int, repeats: int, settings: AffineSettings) -> dict:
    def read(i, kind):
        return sitk.ReadImage(str(DATA / f"oasis_trt20_{i}_{kind}.nii.gz"))

    f_t1, m_t1 = Volume.from_sitk(read(fixed, "t1")), Volume.from_sitk(read(moving, "t1"))
    f_lab, m_lab = read(fixed, "labels"), read(moving, "labels")
    fixed_labels = sitk.GetArrayFromImage(f_lab)
    # Labels present in both maps, 0 excluded (a label lost by the warp then counts as Dice 0).
    labels = sorted(
        set(np.unique(fixed_labels).tolist())
        & set(np.unique(sitk.GetArrayFromImage(m_lab)).tolist()) - {0}
    )

    def dice(transform: sitk.Transform) -> float:
        warped = sitk.Resample(m_lab, f_lab, transform, sitk.sitkNearestNeighbor, 0)
        return mean_dice(fixed_labels, sitk.GetArrayFromImage(warped), labels)

    runs = [run_affine(f_t1, m_t1, settings) for _ in range(repeats)]
    dices = [dice(r.transform) for r in runs]
    return {
        "pair": f"{fixed}<-{moving}",
        "labels": len(labels),
        "dice_before": dice(sitk.Transform()),
        "dice_affine": statistics.median(dices),
        "dice_affine_runs": dices,
        "seconds_median": statistics.median(r.seconds for r in runs),
        "seconds_runs": [r.seconds for r in runs],
        "iterations": [len(r.history) for r in runs],
    }


def markdown(rows: list[dict]) -> str:
    head = ["pair (fixed<-moving)", "labels", "Dice before", "Dice affine", "affine s (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["pair"],
            str(r["labels"]),
            f"{r['dice_before']:.3f}",
            f"{r['dice_affine']:.3f}",
            f"{r['seconds_median']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="1:2,3:4,5:1", help="fixed:moving subject pairs")
    parser.add_argument("--repeats", type=int, default=3, help="runs per pair (median time)")
    parser.add_argument("--out", type=Path, default=Path("bench_out/affine.json"))
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        raise SystemExit(f"Mindboggle data not found at {DATA}")

    settings = AffineSettings()
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    pairs = [tuple(int(i) for i in p.split(":")) for p in args.pairs.split(",")]
    rows = []
    for fixed, moving in pairs:
        rows.append(run_pair(fixed, moving, args.repeats, settings))
        r = rows[-1]
        print(
            f"{r['pair']}: Dice {r['dice_before']:.3f} -> {r['dice_affine']:.3f}, "
            f"{r['seconds_median']:.2f} s",
            flush=True,
        )
    table = markdown(rows)
    mean_row = (
        f"mean Dice before {np.mean([r['dice_before'] for r in rows]):.3f}, "
        f"affine {np.mean([r['dice_affine'] for r in rows]):.3f}; "
        f"SimpleITK threads {threads}, {args.repeats} repeats"
    )
    print(f"\n{table}\n\n{mean_row}")
    report = {
        "command": "python -m benchmarks.affine_mindboggle "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "date": report_io.today(),
        "machine": report_io.machine(),
        "settings": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()
        },
        "threads": threads,
        "repeats": args.repeats,
        "platform": {"platform": platform.platform(), "python": platform.python_version()},
        "simpleitk": sitk.Version.VersionString(),
        "pairs": rows,
        "markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
