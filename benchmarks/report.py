"""What every benchmark report says about where it ran, and how it is written."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def machine(device: str | None = None, threads: int | None = None) -> str:
    """``"x86_64, 2 cores, torch 2.13.0+cpu, 2 threads[, device cpu]"``."""
    threads = torch.get_num_threads() if threads is None else threads
    line = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {threads} threads"
    )
    return line if device is None else f"{line}, device {device}"


def write(out: str | Path, report: dict, table: str) -> str:
    """``OUT.json`` (the whole report) and ``OUT.md`` (its command, machine and ``table``);
    returns the Markdown text."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    text = f"`{report['command']}`\n\n{report['machine']}\n\n{table}\n"
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    return text
