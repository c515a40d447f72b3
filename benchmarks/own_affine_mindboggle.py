"""A network's own affine branch (LinDef) against our affine stage, on native-space brains.

    python -m benchmarks.own_affine_mindboggle --pairs 1:2,3:4,5:1 --checkpoints A.pt B.pt

The Mindboggle volumes are in their scanners' space: before any alignment the brains overlap
little (mean Dice 0.01 to 0.12). For each pair this reports the mean Dice over the labels
present in both maps

- unaligned, and with the intensity centroids aligned (SimpleITK's moments initialiser, a
  translation only: what a network that learnt only the shift would reach);
- after our affine stage alone (``deepwarp register --model affine``);
- for each checkpoint, with its own branch doing the linear part (``--no-affine``), and after
  our affine stage; both the network's own result (``--if-worse keep``) at the card's grid,

with folding % and seconds. Writes JSON and a Markdown table to ``--out``. Needs
../shared/data/mindboggle (not shipped).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from benchmarks import report as report_io
from benchmarks.checkpoints_mindboggle import parse_pairs
from benchmarks.register_mindboggle import DATA, run_pair
from napari_deepwarp.core.metrics import dice_per_label


def _read(subject: int, kind: str) -> sitk.Image:
    return sitk.ReadImage(str(DATA / f"oasis_trt20_{subject}_{kind}.nii.gz"))


def centroid_dice(fixed: int, moving: int) -> float:
    """Mean Dice after moving the moving image's intensity centroid onto the fixed one's."""
    images = [sitk.Cast(_read(s, "t1"), sitk.sitkFloat32) for s in (fixed, moving)]
    moments = sitk.CenteredTransformInitializerFilter.MOMENTS
    shift = sitk.CenteredTransformInitializer(*images, sitk.Euler3DTransform(), moments)
    fixed_labels, moving_labels = _read(fixed, "labels"), _read(moving, "labels")
    warped = sitk.Resample(moving_labels, fixed_labels, shift, sitk.sitkNearestNeighbor, 0)
    per_label = dice_per_label(sitk.GetArrayFromImage(fixed_labels), sitk.GetArrayFromImage(warped))
    return float(np.mean(list(per_label.values())))


def _summary(rows: list[dict]) -> dict:
    return {
        "dice": statistics.mean(r["dice_after"] for r in rows),
        "folding_percent": max(r["folding_percent"] for r in rows),
        "wall_s": statistics.median(r["wall_s"] for r in rows),
        "rows": rows,
    }


def markdown(report: dict) -> str:
    """The report as a Markdown table: a row per reference and per checkpoint."""
    rows = [
        "| | its own linear part (`--no-affine`) | folding % | s | after our affine stage |",
        "|---|---:|---:|---:|---:|",
        f"| unaligned | {report['unaligned']:.3f} | - | - | - |",
        f"| intensity centroids aligned | {report['centroids']:.3f} | - | - | - |",
        f"| our affine stage alone | - | - | - | {report['affine_stage']['dice']:.3f} |",
    ]
    for name, entry in report["checkpoints"].items():
        own, after = entry["no_affine"], entry["after_affine_stage"]
        rows.append(
            f"| {name} | {own['dice']:.3f} | {own['folding_percent']:.3f} | "
            f"{own['wall_s']:.1f} | {after['dice']:.3f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="1:2,3:4,5:1", help="fixed:moving subject numbers")
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench_out/own_affine_mindboggle")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark needs the shared Mindboggle volumes")
    pairs = parse_pairs(args.pairs)
    affine = [run_pair(f, m, ["--model", "affine", "--device", args.device]) for f, m in pairs]
    report = {
        "command": "python -m benchmarks.own_affine_mindboggle --pairs "
        f"{args.pairs} --checkpoints {' '.join(args.checkpoints)}",
        "machine": report_io.machine(args.device),
        "date": report_io.today(),
        "pairs": [r["pair"] for r in affine],
        "unaligned": statistics.mean(r["dice_before"] for r in affine),
        "centroids": statistics.mean(centroid_dice(f, m) for f, m in pairs),
        "affine_stage": _summary(affine),
        "checkpoints": {},
    }
    for path in map(Path, args.checkpoints):
        base = ["--checkpoint", str(path), "--device", args.device, "--if-worse", "keep"]
        own = _summary([run_pair(f, m, [*base, "--no-affine"]) for f, m in pairs])
        after = _summary([run_pair(f, m, base) for f, m in pairs])
        report["checkpoints"][path.name] = {"no_affine": own, "after_affine_stage": after}
        print(path.name, round(own["dice"], 3), round(after["dice"], 3), flush=True)
    print(report_io.write(args.out, report, markdown(report)))


if __name__ == "__main__":
    main()
