"""The default `deepwarp register` against its affine stage: the verdict, the guard, --model auto.

    python -m benchmarks.verdict --out docs/benchmarks/data/verdict.json

Runs the command line's own code path (files read to files written, default options) on:

- the shared spine pair both ways (T1 onto T2, T2 onto T1) and a two-modality brain made from
  Mindboggle subject 1 (its labels given random intensities, a non-monotonic map as T1 against
  T2 is, moved by a known 12 degree rotation and (8, -6, 4) mm: the true answer brings every
  label back onto itself), each without label maps (the similarity decides) and with them (the
  mean Dice decides);
- the prostate MR/ultrasound pair with ``--affine-from labels`` (gland label only);
- Mindboggle pairs (``--pairs``), with the default guard and with ``--if-worse keep``: where the
  network helps, the two give the same Dice.

For each run: what ``--model auto`` chose, the verdict's word, its similarity after the affine
stage and after the network, which result was handed back, mean Dice after the affine stage and
of the result handed back, and seconds. Needs ../shared/data (not shipped).
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
import SimpleITK as sitk

from benchmarks import report as report_io
from benchmarks.multimodal import first_volume
from napari_deepwarp.cli import main as deepwarp

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def brain_two_modalities(folder: Path, subject: int = 1) -> tuple[Path, ...]:
    """A Mindboggle subject and a T2-like copy of it moved by a known rigid transform:
    ``(fixed, moving, fixed labels, moving labels)``, the copy written under ``folder``
    (``brain{subject}_t2like.nii.gz`` and its labels). Subject 1 is the benchmark's pair; another
    subject gives a pair to choose between trainings on, kept out of the figures."""
    from napari_deepwarp.core.io import read_volume, write_volume
    from napari_deepwarp.core.preprocess import resample
    from napari_deepwarp.core.volume import Volume

    mindboggle = DATA / "mindboggle"
    t1_path = mindboggle / f"oasis_trt20_{subject}_t1.nii.gz"
    labels_path = mindboggle / f"oasis_trt20_{subject}_labels.nii.gz"
    t1 = read_volume(t1_path)
    labels = read_volume(labels_path, labels=True)
    rng = np.random.default_rng(7)
    lookup = rng.uniform(0.1, 1.0, int(labels.array.max()) + 1).astype(np.float32)
    lookup[0] = 0.0
    other = lookup[labels.array] * 800 + rng.normal(0, 10, labels.shape).astype(np.float32)
    moved = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, np.deg2rad(12), (8.0, -6.0, 4.0))
    centre = t1.grid.index_to_world_matrix() @ np.array([*(np.array(t1.shape) / 2), 1.0])
    moved.SetCenter(tuple(centre[:3]))
    image = resample(Volume.on_grid(other, t1.grid, "t2-like"), t1.grid, moved)
    moving = folder / f"brain{subject}_t2like.nii.gz"
    moving_labels = folder / f"brain{subject}_t2like_labels.nii.gz"
    write_volume(image, moving)
    write_volume(resample(labels, t1.grid, moved, "nearest"), moving_labels)
    return t1_path, moving, labels_path, moving_labels


def cases(folder: Path, pairs: list[tuple[int, int]]) -> list[tuple[str, tuple, list[str]]]:
    """``(name, (fixed, moving, fixed labels, moving labels), extra options)`` per run."""
    spine = DATA / "spine_t1_t2"
    t1, t2 = spine / "t1w.nii.gz", spine / "t2.nii.gz"
    t1_cord, t2_cord = spine / "t1w_seg-manual.nii.gz", spine / "t2_seg-manual.nii.gz"
    prostate = DATA / "prostate_mr_us"
    us, mr = (prostate / f"{k}_images_case000025.nii.gz" for k in ("fixed", "moving"))
    gland = [
        first_volume(str(prostate / f"{k}_labels_case000025.nii.gz"), str(image), folder)
        for k, image in (("fixed", us), ("moving", mr))
    ]
    brain = brain_two_modalities(folder)
    out = []
    for name, files in (
        ("spine T1 <- T2", (t1, t2, t1_cord, t2_cord)),
        ("spine T2 <- T1", (t2, t1, t2_cord, t1_cord)),
        ("brain 1 T1 <- T2-like copy (known answer)", brain),
    ):
        out.append((name, (*files[:2], None, None), []))
        out.append((f"{name}, labels", files, []))
    out.append(("prostate US <- MR, gland", (us, mr, *gland), ["--affine-from", "labels"]))
    for f, m in pairs:
        files = tuple(
            DATA / "mindboggle" / f"oasis_trt20_{s}_{kind}.nii.gz"
            for kind in ("t1", "labels")
            for s in (f, m)
        )
        out.append((f"Mindboggle {f} <- {m}", files, []))
        out.append((f"Mindboggle {f} <- {m}", files, ["--if-worse", "keep"]))
    return out


def run(name: str, files: tuple, options: list[str], folder: Path) -> dict:
    fixed, moving, fixed_labels, moving_labels = files
    out = folder / "out"
    argv = ["register", str(fixed), str(moving), "-o", str(out), "-q", *options]
    if fixed_labels is not None:
        argv += ["--fixed-labels", str(fixed_labels), "--moving-labels", str(moving_labels)]
    start = time.perf_counter()
    code = deepwarp(argv)
    seconds = time.perf_counter() - start
    if code != 0:
        return {"pair": name, "options": " ".join(options), "exit_code": code}
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    verdict = metrics["verdict"]
    return {
        "pair": name,
        "options": " ".join(options),
        "labels": fixed_labels is not None,
        "model": metrics["model"],
        "auto": (metrics.get("auto") or {}).get("checkpoint"),
        "modality": "two" if verdict["modality"]["multimodal"] else "one",
        "word": verdict["word"],
        "similarity": verdict["similarity_name"],
        "similarity_affine": verdict["similarity_baseline"],
        "similarity_network": verdict["similarity_result"],
        "returned": "network" if verdict["returned"] == "result" else verdict["returned"],
        "dice_affine": verdict["dice_baseline"],
        "dice_returned": metrics.get("mean_dice_after"),
        "folding_percent_network": verdict["folding_percent"],
        "seconds": seconds,
        "line": verdict["line"],
    }


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(report: dict) -> str:
    """The report as a Markdown table, one row per run."""
    head = (
        "| pair | options | chose | modalities | verdict | similarity | after affine | "
        "after network | handed back | Dice affine | Dice handed back | s |\n"
        "|---|---|---|---|---|---|---:|---:|---|---:|---:|---:|"
    )
    rows = []
    for r in report["runs"]:
        if "word" not in r:
            rows.append(f"| {r['pair']} | {r['options']} | exit code {r['exit_code']} |" + " |" * 9)
            continue
        rows.append(
            f"| {r['pair']} | {r['options'] or 'default'} | {r['auto'] or r['model']} | "
            f"{r['modality']} | {r['word']} | {r['similarity']} | {_f(r['similarity_affine'])} | "
            f"{_f(r['similarity_network'])} | {r['returned']} | {_f(r['dice_affine'])} | "
            f"{_f(r['dice_returned'])} | {r['seconds']:.1f} |"
        )
    return head + "\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default="1:2,3:4", help="Mindboggle pairs F:M, comma-separated")
    parser.add_argument("--out", default="bench_out/verdict.json", help="JSON report to write")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"benchmarks.verdict: {DATA} not found (the shared data is not shipped)")
        return 2
    pairs = [tuple(int(s) for s in p.split(":")) for p in args.pairs.split(",") if p]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, files, options in cases(folder, pairs):
            runs.append(run(name, files, options, folder))
            print(table({"runs": runs[-1:]}).splitlines()[-1], flush=True)
    command = "python -m benchmarks.verdict " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = {"command": command.strip(), "machine": report_io.machine(), "runs": runs}
    print(report_io.write(Path(args.out).with_suffix(""), report, table(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
