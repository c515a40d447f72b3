"""Field refinement against the best optimiser, side by side on Mindboggle pairs.

    python -m benchmarks.refine_mindboggle --pairs 1:2,3:4,5:1 \\
        --fireants docs/benchmarks/data/fireants/fireants_mindboggle.json \\
        --out docs/benchmarks/data/refine_mindboggle

For every pair, in one run and on one machine: the affine stage alone; ``deepwarp register
--refine fast`` and ``--refine accurate`` (the shipped default network, then refinement);
``--model affine --refine accurate`` (refinement from the affine stage alone, no network: what
the network's prediction saves); and the FireANTs rows that ``benchmarks.fireants_mindboggle``
wrote (``--fireants``: FireANTs takes about an hour per pair on this CPU, so it is run apart and
its rows are read here; the table says so). Dice: mean over the labels present in both maps,
folding: % of fixed voxels with det J <= 0, seconds: the whole command (files read -> written).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.register_mindboggle import DATA, run_pair

#: (row name, extra `deepwarp register` arguments)
CONFIGS = (
    ("--refine fast", ["--refine", "fast"]),
    ("--refine accurate", ["--refine", "accurate"]),
    ("--model affine --refine accurate", ["--model", "affine", "--refine", "accurate"]),
)


def markdown(rows: list[dict], pairs: list[str]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = ["method", *[f"Dice {p}" for p in pairs], "mean Dice", "max folding %", "mean s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for method in methods:
        mine = {r["pair"]: r for r in rows if r["method"] == method}
        dice = [mine[p]["dice"] if p in mine else None for p in pairs]
        have = [d for d in dice if d is not None]
        cells = [
            method,
            *["-" if d is None else f"{d:.4f}" for d in dice],
            f"{statistics.mean(have):.4f}" + ("" if len(have) == len(pairs) else " (partial)"),
            f"{max(r['folding_percent'] for r in mine.values()):.4f}",
            f"{statistics.mean(r['seconds'] for r in mine.values()):.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(report: dict) -> str:
    """The Markdown table of a report this script wrote (the docs render it from the JSON)."""
    return markdown(report["rows"], report["pairs"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pairs", default="1:2", help="fixed:moving subject numbers, comma-separated"
    )
    parser.add_argument("--fireants", type=Path, help="rows of benchmarks.fireants_mindboggle")
    parser.add_argument("--out", default="bench_out/refine_mindboggle")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark needs the shared Mindboggle volumes")
    rows: list[dict] = []
    pairs = []
    for spec in args.pairs.split(","):
        f, m = (int(i) for i in spec.split(":"))
        pairs.append(f"{f}<-{m}")
        for name, extra in CONFIGS:
            start = time.perf_counter()
            r = run_pair(f, m, extra)
            seconds = time.perf_counter() - start
            if name == CONFIGS[0][0]:
                rows.append(
                    {"method": "affine stage alone", "pair": r["pair"], "folding_percent": 0.0,
                     "dice": r["dice_affine"], "seconds": r["seconds"].get("affine", 0.0)}
                )  # fmt: skip
            rows.append(
                {"method": name, "pair": r["pair"], "dice": r["dice_after"],
                 "folding_percent": r["folding_percent"], "seconds": seconds,
                 "stages": r["seconds"]}
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    if args.fireants and args.fireants.exists():
        for r in json.loads(args.fireants.read_text(encoding="utf-8")):
            if r["pair"] in pairs:
                rows.append(
                    {"method": r["method"] + " (run apart)", "pair": r["pair"],
                     "dice": r["dice_after"], "folding_percent": r["folding_percent"],
                     "seconds": r["seconds"]["total"], "settings": r["settings"]}
                )  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else argv
    command = "python -m benchmarks.refine_mindboggle " + " ".join(given)
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    report = {
        "command": command.strip(),
        "machine": machine,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_1min": os.getloadavg()[0],
        "pairs": pairs,
        "rows": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    table = markdown(rows, pairs)
    out.with_suffix(".md").write_text(
        f"`{report['command']}`\n\n{machine}\n\n{table}\n", encoding="utf-8"
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
