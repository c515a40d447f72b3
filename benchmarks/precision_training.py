"""Training in float32 against mixed precision: seconds and how the loss falls, per model.

    python -m benchmarks.precision_training --models voxelmorph:40,cfwn:20,lindef:10

Each model trains ``steps`` steps on synthetic pairs at ``--shape`` from the same seed (so the
same pairs) once per precision, in this process, one after the other; the figures are the
wall seconds of ``train()`` (validation and the checkpoint at the end included) and the mean
loss over the first and the last ten logged steps. Writes JSON and Markdown to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import report as report_io
from napari_deepwarp.cli import drain
from napari_deepwarp.core.train import TrainSettings, train


def run(model: str, steps: int, shape, precision: str, folder: Path) -> dict:
    output = folder / f"{model}_{precision}.pt"
    settings = TrainSettings(
        model=model,
        output=output,
        shape=tuple(shape),
        steps=steps,
        learning_rate=1e-3,
        checkpoint_every=steps,
        validate_every=steps,
        validation_count=1,
        log_every=1,
        precision=precision,
        command="benchmarks.precision_training",
    )
    start = time.perf_counter()
    drain(train(settings), True)
    seconds = time.perf_counter() - start
    log = output.with_suffix(".log.jsonl").read_text(encoding="utf-8").splitlines()
    losses = [r["loss"] for r in map(json.loads, log) if "loss" in r]
    k = min(10, len(losses))
    return {
        "seconds": seconds,
        "loss_first": statistics.mean(losses[:k]),
        "loss_last": statistics.mean(losses[-k:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="voxelmorph:40,cfwn:20,lindef:10", help="NAME:STEPS")
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 32, 32])
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_out/precision_training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    precisions = args.precisions.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for item in args.models.split(","):
            name, steps = item.split(":")
            row = {"model": name, "steps": int(steps)}
            for precision in precisions:
                row[precision] = run(name, int(steps), args.shape, precision, Path(tmp))
                print(name, precision, json.dumps(row[precision]), flush=True)
            rows.append(row)
    head = ["model", "steps"] + [f"{p} s (loss first 10 -> last 10)" for p in precisions]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        cells = [row["model"], str(row["steps"])]
        for p in precisions:
            r = row[p]
            cells.append(f"{r['seconds']:.1f} ({r['loss_first']:.4f} -> {r['loss_last']:.4f})")
        lines.append("| " + " | ".join(cells) + " |")
    command = (
        f"python -m benchmarks.precision_training --models {args.models} --shape "
        f"{' '.join(map(str, args.shape))} --precisions {args.precisions} --threads {args.threads}"
    )
    report = {"command": command, "machine": report_io.machine(threads=args.threads), "rows": rows}
    text = report_io.write(args.out, report, "\n".join(lines))
    print(text)


if __name__ == "__main__":
    main()
