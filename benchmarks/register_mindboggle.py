"""Accuracy and time of `deepwarp register` on Mindboggle pairs (native space, not aligned).

    python -m benchmarks.register_mindboggle --pairs 1:2,3:4 --finetune 200 --max-size 64

Runs the same code path as the command line (files read -> outputs written) and reports, per
pair, mean Dice over the labels present in both maps (before, after the affine stage, after),
folding %, SDlogJ and the seconds of every stage; writes JSON and a Markdown table to --out.
Needs ../shared/data/mindboggle (not shipped: CC BY-NC-SA).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from napari_deepwarp.cli import main as deepwarp

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mindboggle"


def run_pair(fixed: int, moving: int, extra: list[str]) -> dict:
    def path(i, kind):
        return str(DATA / f"oasis_trt20_{i}_{kind}.nii.gz")

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        code = deepwarp(
            [
                "register",
                path(fixed, "t1"),
                path(moving, "t1"),
                "-o",
                out,
                "--fixed-labels",
                path(fixed, "labels"),
                "--moving-labels",
                path(moving, "labels"),
                "-q",
                *extra,
            ]
        )
        wall = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"deepwarp register failed on pair {fixed}:{moving}")
        metrics = json.loads((Path(out) / "metrics.json").read_text(encoding="utf-8"))
    return {
        "pair": f"{fixed}<-{moving}",
        "labels": len(metrics["labels_after"]),
        "dice_before": metrics["mean_dice_before"],
        "dice_affine": metrics.get("mean_dice_affine"),
        "dice_after": metrics["mean_dice_after"],
        "folding_percent": metrics["folding_percent"],
        "sdlogj": metrics["sdlogj"],
        "seconds": metrics["seconds"],
        "wall_s": wall,
    }


def markdown(rows: list[dict]) -> str:
    stages = sorted({k for r in rows for k in r["seconds"] if k != "total"})
    head = [
        "pair",
        "labels",
        "Dice before",
        "Dice affine",
        "Dice after",
        "folding %",
        "SDlogJ",
        *[f"{s} s" for s in stages],
        "wall s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["pair"],
            str(r["labels"]),
            f"{r['dice_before']:.3f}",
            "-" if r["dice_affine"] is None else f"{r['dice_affine']:.3f}",
            f"{r['dice_after']:.3f}",
            f"{r['folding_percent']:.3f}",
            f"{r['sdlogj']:.3f}",
            *[f"{r['seconds'].get(s, 0):.1f}" for s in stages],
            f"{r['wall_s']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    mean = statistics.mean
    lines.append(
        f"\nmean Dice: before {mean(r['dice_before'] for r in rows):.3f}, after "
        f"{mean(r['dice_after'] for r in rows):.3f}; torch threads "
        f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pairs", default="1:2", help="fixed:moving subject numbers, comma-separated"
    )
    parser.add_argument("--out", default="bench_out/register_mindboggle")
    args, extra = parser.parse_known_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark needs the shared Mindboggle volumes")
    rows = [run_pair(*map(int, p.split(":")), extra) for p in args.pairs.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python -m benchmarks.register_mindboggle "
        + " ".join([f"--pairs {args.pairs}", *extra]),
        "rows": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    table = markdown(rows)
    out.with_suffix(".md").write_text(f"`{report['command']}`\n\n{table}\n", encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
