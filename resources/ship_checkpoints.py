"""Copy trained checkpoints into resources/checkpoints with what was measured in their cards.

    python resources/ship_checkpoints.py --trained bench_out/train \
        --benchmark bench_out/checkpoints_mindboggle.json

Each ``*.pt`` written by ``deepwarp train`` in ``--trained`` is loaded (weights only, card
checked), its card gains the Mindboggle figures of the benchmark (inference Dice and folding,
with field refinement and fine-tuning, the commands that measured them), and the checkpoint with
the best inference Dice is marked ``"default": true`` (the one ``deepwarp register`` uses when no
model is named) *only if* it beats the affine stage alone, measured in the same run, by more
than :data:`MARGIN`: a default
must never make a registration worse than the affine stage would. Shipped checkpoints that the
benchmark also measured (in ``--out``, not in ``--trained``) compete for the default, so one new
checkpoint can be shipped alone; only their default flag is rewritten. A checkpoint measured again
loses its earlier Mindboggle figures. The training command, hardware and duration in the card
are left as training wrote them; its config is written as the model now loads it (a card written
before its architecture gained a config field lacks that field, and loads with its default).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from napari_deepwarp.core.checkpoint import AFFINE_MARGIN, load_checkpoint, save_checkpoint

HERE = Path(__file__).resolve().parent
LIMIT_MB = 50.0
#: Dice above the affine stage that a default must reach ("clearly above", not run-to-run noise)
MARGIN = AFFINE_MARGIN


def _gain(measured: dict, affine: dict, path: Path) -> float:
    """Inference Dice above the affine stage alone, in the same benchmark run."""
    return measured[path.name]["inference"]["dice"] - affine[path.name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trained", default="bench_out/train", help="folder of trained .pt")
    parser.add_argument(
        "--benchmark", nargs="*", default=[], help="JSONs of benchmarks.checkpoints_mindboggle"
    )
    parser.add_argument("--out", default=str(HERE / "checkpoints"))
    parser.add_argument(
        "--inference-size",
        nargs="*",
        default=[],
        metavar="FILE=SIZE",
        help="working-grid side to run FILE.pt at, chosen on pairs outside the benchmark",
    )
    args = parser.parse_args()
    sizes = {k: int(v) for k, v in (item.split("=") for item in args.inference_size)}
    measured, commands, affine = {}, {}, {}
    for path in args.benchmark:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
        if report.get("max_size"):  # not the grid the card runs at: not the card's figures
            print(f"{path}: measured at --max-size {report['max_size']}, left out of the cards")
            continue
        reference = next(e for e in report["checkpoints"] if "path" not in e)
        affine_dice = reference["results"].get("inference", {}).get("dice")  # none: fine-tune only
        for entry in report["checkpoints"]:
            if "path" in entry:
                name = Path(entry["path"]).name
                if affine_dice is not None:
                    affine[name] = affine_dice
                measured.setdefault(name, {}).update(entry["results"])
                commands.setdefault(name, []).append(report["command"])
    trained = sorted(p for p in Path(args.trained).glob("*.pt") if not p.name.endswith(".state.pt"))
    out = Path(args.out)
    # shipped checkpoints measured in the same run compete for the default too, so that shipping
    # one new checkpoint cannot take the default from a better one already shipped
    names = {p.name for p in trained}
    others = sorted(p for p in out.glob("*.pt") if p.name in measured and p.name not in names)
    better = [
        p
        for p in trained + others
        if "inference" in measured.get(p.name, {}) and _gain(measured, affine, p) > MARGIN
    ]
    best = max(better, key=lambda p: _gain(measured, affine, p), default=None)
    if best is None:
        print("no checkpoint beats the affine stage on the benchmark: none is marked default")
    for path in others:  # only their default flag follows this run; their figures stay
        model, card = load_checkpoint(path)
        if bool(card.get("default")) != (path == best):
            save_checkpoint(
                path, model, {**card, "config": model.config_dict(), "default": path == best}
            )
            print(f"{path}: default={path == best} (measured in this run, not re-shipped)")
    for path in trained:
        model, card = load_checkpoint(path)
        results = measured.get(path.name, {})
        metrics = dict(card["metrics"])
        if results:  # figures of an earlier benchmark would mix two versions of the pipeline
            metrics = {k: v for k, v in metrics.items() if not k.startswith("mindboggle_")}
        for variant, key in (("inference", ""), ("refine", "_refine")):
            if variant in results:
                r = results[variant]
                metrics[f"mindboggle_mean_dice{key}"] = round(r["dice"], 4)
                metrics[f"mindboggle_folding_percent{key}"] = round(r["folding_percent"], 4)
                metrics[f"mindboggle_seconds{key}"] = round(r["wall_s"], 1)
                metrics[f"mindboggle_pairs{key}"] = r["pairs"]
        if path.name in affine:
            metrics["mindboggle_mean_dice_affine_stage"] = round(affine[path.name], 4)
        if path.name in commands:
            metrics["mindboggle_commands"] = commands[path.name]
        for variant, r in results.items():
            if variant.startswith("finetune"):
                steps = variant.split()[1]
                metrics[f"mindboggle_mean_dice_finetune{steps}"] = round(r["dice"], 4)
                metrics[f"mindboggle_seconds_finetune{steps}"] = round(r["wall_s"], 1)
        card = {**card, "config": model.config_dict(), "metrics": metrics, "default": path == best}
        if path.stem in sizes:
            card["inference_size"] = sizes[path.stem]
        save_checkpoint(out / path.name, model, card)
        print(f"{out / path.name}: default={path == best} {metrics.get('mindboggle_mean_dice')}")
    total = sum(p.stat().st_size for p in out.glob("*.pt")) / 2**20
    print(f"{total:.1f} MB in {out}")
    if total > LIMIT_MB:
        raise SystemExit(f"shipped checkpoints take {total:.1f} MB, over the {LIMIT_MB} MB budget")


if __name__ == "__main__":
    main()
