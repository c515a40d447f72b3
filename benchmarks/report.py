"""What every benchmark report says about where it ran, and how it is written."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch


def cpu_model() -> str:
    """``"AMD EPYC ..."`` from /proc/cpuinfo where there is one, else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str | None = None, threads: int | None = None) -> str:
    """``"AMD EPYC, 2 cores, torch 2.13.0+cpu, 2 threads[, device cpu]"``."""
    threads = torch.get_num_threads() if threads is None else threads
    line = f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads"
    return line if device is None else f"{line}, device {device}"


def today() -> str:
    """The date and time a report is written, ``"2026-12-05 23:40 UTC"``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write(out: str | Path, report: dict, table: str) -> str:
    """``OUT.json`` (the whole report, with its ``date`` added where it has none) and ``OUT.md``
    (its command, machine, date and ``table``); returns the Markdown text. The documentation's
    benchmark pages are generated from such JSON files (``docs/benchmarks/data/``)."""
    report.setdefault("date", today())
    if hasattr(os, "getloadavg"):  # how busy the machine was when the figures were written
        report.setdefault("load_average_1min", round(os.getloadavg()[0], 2))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    text = f"`{report['command']}`\n\n{report['machine']}, {report['date']}\n\n{table}\n"
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    return text
