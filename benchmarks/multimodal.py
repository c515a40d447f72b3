"""Multi-modal pairs: `deepwarp register` on the shared prostate MR/US and spine T1/T2 pairs.

    python -m benchmarks.multimodal --checkpoints mi_unet_synth_bg.pt voxelmorph_synth_bg.pt

For the affine stage alone and for each checkpoint (a shipped name or a path), it runs the
command line's own code path (files read to files written) on each pair and reports Dice of the
label maps (prostate gland: the first of the three volumes of the 4D label file, written to a
temporary 3D file on the image's grid; spinal cord) before, after the affine stage and after,
folding % and seconds, and the similarity the verdict measured (mutual information for two
modalities) after the affine stage and after. Every run keeps its own result (``--if-worse
keep``): the table shows what the network did, not the guard's fallback. A third pair has a
known answer: Mindboggle subject 1 against a T2-like copy of itself (label-wise random
intensities, moved by a known rigid transform; see ``benchmarks.verdict``), 98 labels;
``--brain-subject N`` builds it from another subject instead, a pair to choose between
trainings on outside the reported figures. With ``--refine N`` each checkpoint is also run with
``--refine N``; with ``--affine-from-labels`` everything is run again with the affine stage
aligning the label maps (``--affine-from labels``; Dice is then not an independent check of
that stage). Writes ``multimodal.json`` and ``multimodal.md`` into the folder ``--out``. Needs
../shared/data (not shipped).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from benchmarks import report as report_io
from napari_deepwarp.cli import main as deepwarp
from napari_deepwarp.core.checkpoint import shipped_checkpoints

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# name: (fixed image, moving image, fixed labels, moving labels), relative to DATA
PAIRS = {
    "prostate US <- MR": (
        "prostate_mr_us/fixed_images_case000025.nii.gz",
        "prostate_mr_us/moving_images_case000025.nii.gz",
        "prostate_mr_us/fixed_labels_case000025.nii.gz",
        "prostate_mr_us/moving_labels_case000025.nii.gz",
    ),
    "spine T2 <- T1": (
        "spine_t1_t2/t2.nii.gz",
        "spine_t1_t2/t1w.nii.gz",
        "spine_t1_t2/t2_seg-manual.nii.gz",
        "spine_t1_t2/t1w_seg-manual.nii.gz",
    ),
}


def first_volume(labels: str, image: str, out: Path) -> str:
    """The first 3D volume of a 4D label file, on ``image``'s grid, written under ``out``."""
    stack = sitk.ReadImage(labels)
    if stack.GetDimension() == 3:
        return labels
    volume = sitk.GetImageFromArray(sitk.GetArrayFromImage(stack)[0].astype("uint8"))
    volume.CopyInformation(sitk.ReadImage(image))
    path = out / Path(labels).name.replace(".nii.gz", "_first.nii.gz")
    sitk.WriteImage(volume, str(path))
    return str(path)


#: the pair built from one brain (see ``benchmarks.verdict.brain_two_modalities``)
BRAIN = "brain T1 <- T2-like (subject {subject})"


def pair_files(pair: str, folder: Path, subject: int = 1) -> tuple[str, ...]:
    if pair == BRAIN.format(subject=subject):
        from benchmarks.verdict import brain_two_modalities

        mindboggle, copy = DATA / "mindboggle", folder / f"brain{subject}_t2like"
        if not Path(f"{copy}.nii.gz").exists():  # made once per folder
            brain_two_modalities(folder, subject)
        return (
            str(mindboggle / f"oasis_trt20_{subject}_t1.nii.gz"),
            f"{copy}.nii.gz",
            str(mindboggle / f"oasis_trt20_{subject}_labels.nii.gz"),
            f"{copy}_labels.nii.gz",
        )
    return tuple(str(DATA / p) for p in PAIRS[pair])


def run(pair: str, extra: list[str], folder: Path, subject: int = 1) -> dict:
    fixed, moving, fixed_labels, moving_labels = pair_files(pair, folder, subject)
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as scratch:
        fixed_labels = first_volume(fixed_labels, fixed, Path(scratch))
        moving_labels = first_volume(moving_labels, moving, Path(scratch))
        start = time.perf_counter()
        args = ["register", fixed, moving, "-o", out, "-q", "--if-worse", "keep"]
        args += ["--fixed-labels", fixed_labels, "--moving-labels", moving_labels, *extra]
        if deepwarp(args) != 0:
            raise SystemExit(f"deepwarp {' '.join(args)} failed")
        wall = time.perf_counter() - start
        metrics = json.loads((Path(out) / "metrics.json").read_text(encoding="utf-8"))
    return {
        "dice_before": metrics["mean_dice_before"],
        "dice_affine": metrics.get("mean_dice_affine"),
        "dice_after": metrics["mean_dice_after"],
        "folding_percent": metrics["folding_percent"],
        "similarity": metrics["verdict"]["similarity"],
        "similarity_affine": metrics["verdict"]["similarity_baseline"],
        "similarity_after": metrics["verdict"]["similarity_result"],
        "wall_s": wall,
    }


def resolve(name: str) -> Path:
    """A checkpoint path, or the shipped checkpoint of that file name."""
    path = Path(name)
    if path.exists():
        return path
    shipped = {p.name: p for p, _ in shipped_checkpoints()}
    if name in shipped:
        return shipped[name]
    raise SystemExit(f"{name}: no such file and no shipped checkpoint of that name")


def markdown(rows: list[dict]) -> str:
    lines = [
        (
            "| pair | method | Dice before | after affine | after | similarity after affine | "
            "after | folding % | s |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        affine = "-" if r["dice_affine"] is None else f"{r['dice_affine']:.3f}"
        if "similarity" in r:
            name = {"mi": "MI", "lncc": "LNCC"}.get(r["similarity"], r["similarity"])
            sim = f"{name} {r['similarity_affine']:.3f} | {name} {r['similarity_after']:.3f}"
        else:  # measured before the benchmark recorded it
            sim = "- | -"
        lines.append(
            f"| {r['pair']} | {r['method']} | {r['dice_before']:.3f} | {affine} | "
            f"{r['dice_after']:.3f} | {sim} | {r['folding_percent']:.3f} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", default=["mi_unet_synth_bg.pt"])
    parser.add_argument("--refine", type=int, default=0, help="also run with --refine N")
    parser.add_argument("--affine-from-labels", action="store_true")
    parser.add_argument(
        "--brain-subject",
        type=int,
        default=1,
        help="Mindboggle subject of the T2-like pair (1: the figures; another: to choose on)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench_out/multimodal")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark needs the shared volumes")
    methods = [("affine stage alone", ["--model", "affine"])]
    for name in args.checkpoints:
        path = resolve(name)
        methods.append((path.name, ["--checkpoint", str(path)]))
        if args.refine:
            extra = ["--checkpoint", str(path), "--refine", str(args.refine)]
            methods.append((f"{path.name} --refine {args.refine}", extra))
    if args.affine_from_labels:
        methods += [
            (f"{method}, affine from labels", [*extra, "--affine-from", "labels"])
            for method, extra in methods
        ]
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="multimodal-"))
    for pair in (*PAIRS, BRAIN.format(subject=args.brain_subject)):
        for method, extra in methods:
            row = {
                "pair": pair,
                "method": method,
                **run(pair, [*extra, "--device", args.device], scratch, args.brain_subject),
            }
            rows.append(row)
            print(f"{pair} | {method}: Dice {row['dice_after']:.3f}", flush=True)
    report = {
        "command": "python -m benchmarks.multimodal --checkpoints "
        + " ".join(args.checkpoints)
        + (f" --refine {args.refine}" if args.refine else "")
        + (" --affine-from-labels" if args.affine_from_labels else "")
        + (f" --brain-subject {args.brain_subject}" if args.brain_subject != 1 else "")
        + (f" --out {args.out}" if args.out != parser.get_default("out") else ""),
        "machine": report_io.machine(args.device),
        "rows": rows,
    }
    print(report_io.write(Path(args.out) / "multimodal", report, markdown(rows)))


if __name__ == "__main__":
    main()
