"""Choose the working-grid size a checkpoint runs at, on pairs kept out of the benchmark.

    python -m benchmarks.inference_size --pairs 5:3,2:5 --sizes 32,48,64 --checkpoints A.pt B.pt

The networks are fully convolutional, so a checkpoint trained on 32^3 pairs can run on a finer
working grid. For each checkpoint and size this runs ``deepwarp register --max-size SIZE`` (files
to files, the command line's own path) on ``--pairs`` and reports mean Dice, the worst folding
and the median seconds; the chosen size is the one with the best Dice among those folding below
1 %. Use pairs other than the ones the accuracy benchmark reports (1:2, 3:4), so that the choice
is not fitted to the figures it is judged by. Pass the choice to
``resources/ship_checkpoints.py --inference-size FILE=SIZE``. Needs ../shared/data/mindboggle.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.checkpoints_mindboggle import parse_pairs
from benchmarks.register_mindboggle import DATA, run_pair

MAX_FOLDING_PERCENT = 1.0


def scan(checkpoint: Path, pairs, sizes: list[int], device: str) -> dict[int, dict]:
    """Mean Dice, worst folding % and median seconds per working-grid size."""
    results = {}
    for size in sizes:
        extra = ["--checkpoint", str(checkpoint), "--max-size", str(size), "--device", device]
        rows = [run_pair(f, m, extra) for f, m in pairs]
        results[size] = {
            "dice": statistics.mean(r["dice_after"] for r in rows),
            "dice_affine": statistics.mean(r["dice_affine"] for r in rows),
            "folding_percent": max(r["folding_percent"] for r in rows),
            "wall_s": statistics.median(r["wall_s"] for r in rows),
        }
    return results


def choose(results: dict[int, dict]) -> int | None:
    """The size with the best Dice among those folding below the limit (None: no such size)."""
    ok = {s: r for s, r in results.items() if r["folding_percent"] < MAX_FOLDING_PERCENT}
    return max(ok, key=lambda s: ok[s]["dice"], default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="5:3,2:5", help="held-out fixed:moving pairs")
    parser.add_argument("--sizes", default="32,48,64")
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench_out/inference_size.json")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark needs the shared Mindboggle volumes")
    pairs, sizes = parse_pairs(args.pairs), [int(s) for s in args.sizes.split(",")]
    report = {"pairs": args.pairs, "checkpoints": {}}
    lines = [
        "| checkpoint | size | Dice (affine stage) | folding % | s |",
        "|---|---:|---|---:|---:|",
    ]
    for path in map(Path, args.checkpoints):
        results = scan(path, pairs, sizes, args.device)
        best = choose(results)
        report["checkpoints"][path.name] = {"results": results, "chosen": best}
        for size, r in results.items():
            mark = " (chosen)" if size == best else ""
            lines.append(
                f"| {path.name} | {size}{mark} | {r['dice']:.3f} ({r['dice_affine']:.3f}) | "
                f"{r['folding_percent']:.3f} | {r['wall_s']:.1f} |"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
