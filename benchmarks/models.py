"""Parameters and forward time of every registered model, measured in one run on this machine.

    python -m benchmarks.models --size 64 64 64 --repeats 3

Median of ``--repeats`` timed forward passes (batch 1, no gradient, eval mode) after one
warm-up, at the given working size; torch threads are fixed and reported. Writes JSON and a
Markdown table to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from napari_deepwarp.core.models.registry import available_models


def time_forward(model, size, repeats: int, device: str) -> float:
    x = torch.rand(1, 1, *size, device=device)
    y = torch.rand(1, 1, *size, device=device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x, y)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first pass is the warm-up
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=[64, 64, 64], metavar=("D", "H", "W"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=",".join(available_models()))
    parser.add_argument("--out", default="bench_out/models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        model = available_models()[name]().to(args.device).eval()
        params = sum(p.numel() for p in model.parameters())
        seconds = time_forward(model, args.size, args.repeats, args.device)
        rows.append({"model": name, "parameters": params, "forward_s": seconds})
        print(f"{name:<11} {params:>9,} parameters  forward {seconds:.2f} s", flush=True)
    command = (
        f"python -m benchmarks.models --size {' '.join(map(str, args.size))} "
        f"--repeats {args.repeats} --threads {args.threads} --device {args.device}"
    )
    where = f"{args.device}, {args.threads} threads, {platform.machine()}"
    table = [
        f"`{command}` ({where}; size {tuple(args.size)}, median of {args.repeats})",
        "",
        "| model | parameters | forward (s) |",
        "|---|---:|---:|",
    ]
    table += [f"| {r['model']} | {r['parameters']:,} | {r['forward_s']:.2f} |" for r in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"command": command, "where": where, "rows": rows}, indent=2), encoding="utf-8"
    )
    out.with_suffix(".md").write_text("\n".join(table) + "\n", encoding="utf-8")
    print("\n".join(table))


if __name__ == "__main__":
    main()
