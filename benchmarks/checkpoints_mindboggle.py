"""Every checkpoint on Mindboggle pairs: inference only, with field refinement, with fine-tuning.

    python -m benchmarks.checkpoints_mindboggle --pairs 1:2,3:4 --finetune-pairs 1:2

For each checkpoint (default: the shipped ones; ``--checkpoints A.pt B.pt`` for others) and for
the affine stage alone as the reference, it runs ``deepwarp register`` (files read to files
written, the command line's own code path) on each pair and reports mean Dice over the labels
present in both maps, folding %, and seconds end to end:

- inference: the checkpoint at its training size, no optimisation;
- refine: the same plus ``--refine 150`` (at least a 96-voxel working grid);
- fine-tune 50 / 200: ``--finetune N`` on ``--finetune-pairs`` only (slow on a CPU).

Writes JSON and a Markdown table to ``--out``. Needs ../shared/data/mindboggle (not shipped).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks import report as report_io
from benchmarks.register_mindboggle import DATA, run_pair
from napari_deepwarp.core.checkpoint import read_card, shipped_checkpoints

VARIANTS = {"inference": [], "refine": ["--refine", "150"]}


def parse_pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(map(int, p.split(":"))) for p in text.split(",") if p]


def measure(
    checkpoint: Path | None,
    pairs,
    finetune_pairs,
    finetune_steps,
    device: str,
    refine_pairs=None,
    max_size: int | None = None,
) -> dict:
    """Mean Dice, folding and wall seconds of each variant for one checkpoint (None: affine);
    ``max_size``: a working grid other than the checkpoint's own (``--max-size``)."""
    base = ["--device", device] + ([] if max_size is None else ["--max-size", str(max_size)])
    base += ["--model", "affine"] if checkpoint is None else ["--checkpoint", str(checkpoint)]
    variants = {"inference": VARIANTS["inference"]} if checkpoint is None else dict(VARIANTS)
    runs: dict[str, list[tuple[int, int]]] = dict.fromkeys(variants, pairs)
    if refine_pairs is not None and "refine" in runs:
        runs["refine"] = refine_pairs
    if checkpoint is not None:
        for steps in finetune_steps:
            variants[f"finetune {steps}"] = ["--finetune", str(steps)]
            runs[f"finetune {steps}"] = finetune_pairs
    result = {}
    for name, extra in variants.items():
        rows = [run_pair(f, m, [*base, *extra]) for f, m in runs[name]]
        if not rows:
            continue
        result[name] = {
            "pairs": [r["pair"] for r in rows],
            "dice": statistics.mean(r["dice_after"] for r in rows),
            "dice_affine": statistics.mean(r["dice_affine"] or r["dice_after"] for r in rows),
            "folding_percent": max(r["folding_percent"] for r in rows),
            "wall_s": statistics.median(r["wall_s"] for r in rows),
            "rows": rows,
        }
    return result


def markdown(report: dict) -> str:
    variants = sorted({v for entry in report["checkpoints"] for v in entry["results"]}, key=_order)
    head = ["checkpoint", "trained"]
    for v in variants:
        head += [f"{v} Dice", f"{v} folding %", f"{v} s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in report["checkpoints"]:
        cells = [entry["name"], entry["trained"]]
        for v in variants:
            r = entry["results"].get(v)
            cells += (
                ["-", "-", "-"]
                if r is None
                else [f"{r['dice']:.3f}", f"{r['folding_percent']:.3f}", f"{r['wall_s']:.1f}"]
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _order(variant: str) -> tuple:
    kind, _, steps = variant.partition(" ")
    return (["inference", "refine", "finetune"].index(kind), int(steps or 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="1:2,3:4", help="fixed:moving subject numbers")
    parser.add_argument("--refine-pairs", help="pairs for field refinement (default: --pairs)")
    parser.add_argument("--finetune-pairs", default="1:2", help="pairs for fine-tuning ('' none)")
    parser.add_argument("--finetune-steps", default="50,200", help="comma-separated ('' none)")
    parser.add_argument("--checkpoints", nargs="*", help="checkpoint files (default: shipped)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--max-size", type=int, help="working-grid side for every run (default: each card's)"
    )
    parser.add_argument("--out", default="bench_out/checkpoints_mindboggle")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark needs the shared Mindboggle volumes")
    checkpoints = (
        [Path(p) for p in args.checkpoints]
        if args.checkpoints
        else [p for p, _ in shipped_checkpoints()]
    )
    pairs, finetune_pairs = parse_pairs(args.pairs), parse_pairs(args.finetune_pairs)
    steps = [int(s) for s in args.finetune_steps.split(",") if s]
    entries = [
        {
            "name": "affine stage alone",
            "trained": "-",
            "results": measure(None, pairs, [], [], args.device),
        }
    ]
    for path in checkpoints:
        card = read_card(path)
        training = card["training"]
        trained = (
            f"{training['steps']} steps at {'x'.join(map(str, card['working_shape']))}, "
            f"{training['duration_s'] / 60:.0f} min"
        )
        refine_pairs = None if args.refine_pairs is None else parse_pairs(args.refine_pairs)
        results = measure(
            path, pairs, finetune_pairs, steps, args.device, refine_pairs, args.max_size
        )
        entries.append(
            {"name": path.name, "path": str(path), "trained": trained, "results": results}
        )
        print(path.name, {k: round(v["dice"], 3) for k, v in results.items()}, flush=True)
    report = {
        "command": "python -m benchmarks.checkpoints_mindboggle "
        + f"--pairs {args.pairs} --refine-pairs "
        + (args.pairs if args.refine_pairs is None else f"'{args.refine_pairs}'")
        + " "
        + f"--finetune-pairs '{args.finetune_pairs}' --finetune-steps '{args.finetune_steps}'"
        + (f" --max-size {args.max_size}" if args.max_size else "")
        + (" --checkpoints " + " ".join(args.checkpoints) if args.checkpoints else "")
        + (f" --out {args.out}" if args.out != parser.get_default("out") else ""),
        "machine": report_io.machine(args.device),
        "max_size": args.max_size,
        "checkpoints": entries,
    }
    text = report_io.write(args.out, report, markdown(report))
    print(text)


if __name__ == "__main__":
    main()
