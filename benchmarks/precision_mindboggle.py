"""What bfloat16 (or float16) costs in accuracy and saves in time, per shipped checkpoint.

    python -m benchmarks.precision_mindboggle --pairs 1:2,3:4 --finetune-pairs 1:2

Runs ``deepwarp register`` twice per checkpoint and pair, once with ``--precision float32`` and
once with ``--precision bfloat16``, interleaved so both see the same machine load (after one warm-up run). For each pair
it compares:
- the mean Dice over the labels in both maps;
- folding %;
- the wall seconds, files read to files written;
- the two total displacement fields, in mm: the mean and the 99th percentile of ``|u_bf16 -
  u_fp32|`` inside the fixed brain (its label map > 0).

``--finetune-pairs`` / ``--finetune-steps`` also compare ``--finetune N`` for the checkpoints
named in ``--finetune-checkpoints`` (default: the default one). JSON and Markdown go to
``--out``. Needs ../shared/data/mindboggle (not shipped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from benchmarks import report as report_io
from benchmarks.checkpoints_mindboggle import parse_pairs
from benchmarks.register_mindboggle import DATA
from napari_deepwarp.cli import main as deepwarp
from napari_deepwarp.core.checkpoint import default_checkpoint, shipped_checkpoints


def _path(i: int, kind: str) -> str:
    return str(DATA / f"oasis_trt20_{i}_{kind}.nii.gz")


def run(fixed: int, moving: int, extra: list[str], out: Path) -> dict:
    """``deepwarp register`` on one pair into ``out``: metrics, wall seconds, displacement."""
    args = ["register", _path(fixed, "t1"), _path(moving, "t1"), "-o", str(out), "-q"]
    args += ["--fixed-labels", _path(fixed, "labels"), "--moving-labels", _path(moving, "labels")]
    start = time.perf_counter()
    if deepwarp([*args, *extra]) != 0:
        raise SystemExit(f"deepwarp register failed on pair {fixed}:{moving} with {extra}")
    wall = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz")))
    return {"metrics": metrics, "wall_s": wall, "field": field}


def compare(fixed: int, moving: int, extra: list[str], low: str) -> dict:
    """float32 and ``low`` precision on one pair, with ``extra`` register options.
    ``low = "float32 again"`` repeats float32: how far two float32 runs differ."""
    brain = sitk.GetArrayFromImage(sitk.ReadImage(_path(fixed, "labels"))) > 0
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, precision in (("float32", "float32"), (low, low)):
            out = Path(tmp) / str(len(runs))
            flag = precision.split()[0]
            runs[name] = run(fixed, moving, [*extra, "--precision", flag], out)
    diff = np.linalg.norm(runs[low]["field"] - runs["float32"]["field"], axis=-1)[brain]
    row = {"pair": f"{fixed}<-{moving}"}
    for name, r in runs.items():
        m = r["metrics"]
        assert m["precision"] == name.split()[0], m["precision"]
        row[name] = {
            "dice": m["mean_dice_after"],
            "folding_percent": m["folding_percent"],
            "wall_s": r["wall_s"],
            "network_s": m["seconds"].get("predict", 0) + m["seconds"].get("finetune", 0),
        }
    row["dice_affine"] = runs["float32"]["metrics"].get("mean_dice_affine")
    row["field_diff_mean_mm"] = float(diff.mean())
    row["field_diff_p99_mm"] = float(np.percentile(diff, 99))
    return row


def summarise(rows: list[dict], low: str) -> dict:
    def mean(key, precision):
        return statistics.mean(r[precision][key] for r in rows)

    return {
        "dice_float32": mean("dice", "float32"),
        f"dice_{low}": mean("dice", low),
        "dice_change": mean("dice", low) - mean("dice", "float32"),
        "largest_pair_dice_change": max(
            (r[low]["dice"] - r["float32"]["dice"] for r in rows), key=abs
        ),
        "folding_float32": max(r["float32"]["folding_percent"] for r in rows),
        f"folding_{low}": max(r[low]["folding_percent"] for r in rows),
        "network_s_float32": statistics.median(r["float32"]["network_s"] for r in rows),
        f"network_s_{low}": statistics.median(r[low]["network_s"] for r in rows),
        "wall_s_float32": statistics.median(r["float32"]["wall_s"] for r in rows),
        f"wall_s_{low}": statistics.median(r[low]["wall_s"] for r in rows),
        "field_diff_mean_mm": max(r["field_diff_mean_mm"] for r in rows),
        "field_diff_p99_mm": max(r["field_diff_p99_mm"] for r in rows),
    }


def markdown(report: dict) -> str:
    low = report["precision"]
    head = [
        "checkpoint",
        "variant",
        "Dice float32",
        f"Dice {low}",
        "change",
        "folding % float32 / " + low,
        "network s float32 / " + low,
        "wall s float32 / " + low,
        "field change mm (mean / 99th pct)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in report["entries"]:
        s = e["summary"]
        lines.append(
            "| "
            + " | ".join(
                [
                    e["checkpoint"],
                    e["variant"],
                    f"{s['dice_float32']:.4f}",
                    f"{s[f'dice_{low}']:.4f}",
                    f"{s['dice_change']:+.4f}",
                    f"{s['folding_float32']:.3f} / {s[f'folding_{low}']:.3f}",
                    f"{s['network_s_float32']:.2f} / {s[f'network_s_{low}']:.2f}",
                    f"{s['wall_s_float32']:.1f} / {s[f'wall_s_{low}']:.1f}",
                    f"{s['field_diff_mean_mm']:.3f} / {s['field_diff_p99_mm']:.3f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="1:2,3:4", help="fixed:moving subject numbers")
    parser.add_argument("--finetune-pairs", default="1:2", help="pairs for fine-tuning ('' none)")
    parser.add_argument("--finetune-steps", type=int, default=50)
    parser.add_argument(
        "--finetune-checkpoints", nargs="*", help="checkpoints to fine-tune (default: default)"
    )
    parser.add_argument("--checkpoints", nargs="*", help="checkpoint files (default: shipped)")
    parser.add_argument(
        "--precision",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32 again"],
        help="the precision compared with float32 ('float32 again': run-to-run differences)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench_out/precision_mindboggle")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark needs the shared Mindboggle volumes")
    checkpoints = [Path(p) for p in args.checkpoints or [p for p, _ in shipped_checkpoints()]]
    tuned = [Path(p) for p in args.finetune_checkpoints or [default_checkpoint(None)]]
    jobs = [(c, "inference", [], parse_pairs(args.pairs)) for c in checkpoints]
    steps = ["--finetune", str(args.finetune_steps)]
    jobs += [
        (c, f"finetune {args.finetune_steps}", steps, parse_pairs(args.finetune_pairs))
        for c in tuned
    ]
    entries = []
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: the process's first run is slower
        first = (parse_pairs(args.pairs) or parse_pairs(args.finetune_pairs))[0]
        run(*first, ["--checkpoint", str(checkpoints[0]), "--device", args.device], Path(tmp))
    for checkpoint, variant, extra, pairs in jobs:
        if not pairs:
            continue
        base = ["--checkpoint", str(checkpoint), "--device", args.device, *extra]
        rows = [compare(f, m, base, args.precision) for f, m in pairs]
        entry = {
            "checkpoint": Path(checkpoint).name,
            "variant": variant,
            "rows": rows,
            "summary": summarise(rows, args.precision),
        }
        entries.append(entry)
        print(entry["checkpoint"], variant, json.dumps(entry["summary"]), flush=True)
    report = {
        "command": "python -m benchmarks.precision_mindboggle "
        + f"--pairs '{args.pairs}' --finetune-pairs '{args.finetune_pairs}' "
        + f"--finetune-steps {args.finetune_steps} --precision '{args.precision}'",
        "machine": report_io.machine(args.device),
        "precision": args.precision,
        "entries": entries,
    }
    text = report_io.write(args.out, report, markdown(report))
    print(text)


if __name__ == "__main__":
    main()
