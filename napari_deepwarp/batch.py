"""``deepwarp register-batch PAIRS.csv -o OUTROOT``: register many pairs with one loaded model.

The CSV has one pair per row: ``fixed,moving[,fixed_labels,moving_labels[,name]]`` (a first
row starting with ``fixed`` is a header; empty label cells mean no labels; relative paths are
resolved against the CSV's folder). Each pair is written to ``OUTROOT/<name or row index>/``
exactly as ``deepwarp register`` writes its output folder, and ``OUTROOT/summary.csv`` gets one
row per pair (Dice before/after, folding, the model used, the run's verdict with its similarity
after the affine stage and after, which result was handed back, seconds, status). The next pair
is read in a background thread while the current one runs. A bad row is reported and skipped;
the exit code is 0 when every row succeeded, 3 when the only failures are pairs that
``--if-worse fail`` refused, 2 otherwise.

Under ``torchrun`` (environment ``RANK``/``WORLD_SIZE``) each process takes the rows ``i`` with
``i % WORLD_SIZE == RANK`` on its own GPU (``LOCAL_RANK``) and writes ``summary-rank<R>.csv``;
rank 0 then waits for the other ranks' files, merges them into ``summary.csv`` and removes them
(no process group is needed).
"""

from __future__ import annotations

import csv
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

#: the status of a pair that ``--if-worse fail`` refused (the deformable stage made it worse)
WORSE = "worse than affine"

SUMMARY_FIELDS = (
    "row",
    "name",
    "status",
    "mean_dice_before",
    "mean_dice_affine",
    "mean_dice_after",
    "folding_percent",
    "model",
    "verdict",
    "similarity",
    "similarity_affine",
    "similarity_result",
    "returned",
    "seconds",
    "fixed",
    "moving",
    "message",
)


@dataclass
class Pair:
    """One CSV row: ``row`` is its index among the data rows (0-based, header excluded)."""

    row: int
    name: str
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    error: str | None = None  # a malformed row: reported, not run


def read_pairs(csv_path: str | os.PathLike) -> list[Pair]:
    """Parse the pairs file; malformed rows come back with ``error`` set (never raise for one)."""
    from napari_deepwarp.core.io import InputError

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: no such pairs file; give a CSV of fixed,moving[,...] rows")
    base = csv_path.resolve().parent
    with csv_path.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if rows and rows[0] and rows[0][0].strip().lower() == "fixed":
        rows = rows[1:]
    pairs: list[Pair] = []
    seen: set[str] = set()

    def resolve(cell: str) -> Path | None:
        cell = cell.strip()
        return None if not cell else (base / cell if not Path(cell).is_absolute() else Path(cell))

    for i, cells in enumerate(rows):
        cells = [c.strip() for c in cells] + [""] * max(0, 5 - len(cells))
        name = cells[4] or str(i)
        pair = Pair(i, name, *(resolve(c) for c in cells[:4]))  # type: ignore[arg-type]
        if not cells[0] or not cells[1]:
            pair.error = "row needs at least the fixed and moving image paths"
        elif len(cells) > 5 and any(cells[5:]):
            pair.error = (
                f"{len(cells)} columns; expected fixed,moving[,fixed_labels,moving_labels[,name]]"
            )
        elif bool(cells[2]) != bool(cells[3]):
            pair.error = "give both label maps (fixed_labels and moving_labels) or neither"
        elif name in (".", "..") or "/" in name or "\\" in name:
            pair.error = f"name {name!r} must be a plain folder name"
        elif name in seen:
            pair.error = f"name {name!r} is used by an earlier row"
        seen.add(name)
        pairs.append(pair)
    return pairs


def _read(pair: Pair):
    from napari_deepwarp.core.io import read_volume

    fixed = read_volume(pair.fixed)
    moving = read_volume(pair.moving)
    fixed_labels = read_volume(pair.fixed_labels, labels=True) if pair.fixed_labels else None
    moving_labels = read_volume(pair.moving_labels, labels=True) if pair.moving_labels else None
    return fixed, moving, fixed_labels, moving_labels


def _runner(register, volumes, model):
    """``settings -> register(...)`` for one pair, for :func:`gpu.with_oom_fallback`."""
    fixed, moving, fixed_labels, moving_labels = volumes

    def run(settings):
        return register(fixed, moving, settings, model, fixed_labels, moving_labels)

    return run


def _shard() -> tuple[int, int]:
    """``(rank, world)`` from torchrun's environment; ``(0, 1)`` outside it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0, 1
    if world < 1 or not 0 <= rank < world:
        return 0, 1
    return rank, world


def bind_local_gpu(device: str, world: int) -> int | None:
    """Under torchrun with several processes, make ``cuda`` mean this process's own GPU
    (``LOCAL_RANK`` modulo the GPUs on the node), so the shards do not all share GPU 0.
    Returns the GPU index chosen, or None when nothing was bound (one process, a CPU run,
    no CUDA)."""
    import torch

    if world <= 1 or device not in ("auto", "cuda") or not torch.cuda.is_available():
        return None
    try:
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        local = 0
    index = local % max(1, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return index


def _row(pair: Pair, status: str, metrics: dict | None = None, seconds=None, message="") -> dict:
    m = metrics or {}

    def fmt(key):
        return _number(m.get(key))

    verdict = m.get("verdict") or {}
    returned = ""
    if verdict:
        returned = "deformable" if verdict["returned"] == "result" else verdict["returned"]
    return {
        "row": pair.row,
        "name": pair.name,
        "status": status,
        "mean_dice_before": fmt("mean_dice_before"),
        "mean_dice_affine": fmt("mean_dice_affine"),
        "mean_dice_after": fmt("mean_dice_after"),
        "folding_percent": fmt("folding_percent"),
        "model": m.get("model", ""),
        "verdict": verdict.get("word", ""),
        "similarity": verdict.get("similarity_name", ""),
        "similarity_affine": _number(verdict.get("similarity_baseline")),
        "similarity_result": _number(verdict.get("similarity_result")),
        "returned": returned,
        "seconds": "" if seconds is None else f"{seconds:.2f}",
        "fixed": str(pair.fixed),
        "moving": str(pair.moving),
        "message": message,
    }


def _number(value) -> str:
    return "" if value is None else f"{value:.6g}"


def _write_csv(path: Path, rows: list[dict], header_note: str | None = None) -> None:
    tmp = path.with_name(f".partial-{path.name}")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        if header_note:
            f.write(f"# {header_note}\n")
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: int(r["row"])))
    tmp.replace(path)


def _read_csv(path: Path) -> tuple[str | None, list[dict]]:
    with path.open(newline="", encoding="utf-8") as f:
        first = f.readline()
        note = first[2:].strip() if first.startswith("# ") else None
        if note is None:
            f.seek(0)
        return note, list(csv.DictReader(f))


def run_batch(args, progress=print) -> int:
    """Register every pair of ``args.pairs`` that falls to this rank; returns the exit code."""
    from napari_deepwarp.cli import drain
    from napari_deepwarp.cli_exits import EXIT_BAD_INPUT, EXIT_WORSE
    from napari_deepwarp.cli_options import settings_and_model
    from napari_deepwarp.core.checkpoint import CheckpointError
    from napari_deepwarp.core.gpu import release_memory, with_oom_fallback
    from napari_deepwarp.core.io import InputError
    from napari_deepwarp.core.label_names import name_labels, read_label_names
    from napari_deepwarp.core.models.registry import create_model
    from napari_deepwarp.core.pipeline import (
        AFFINE_ONLY,
        AUTO,
        WorseThanBaseline,
        register,
        write_result,
    )

    pairs = read_pairs(args.pairs)
    names = read_label_names(args.label_names) if getattr(args, "label_names", None) else None
    rank, world = _shard()
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("DEEPWARP_RUN_ID") or ""
    outroot = Path(args.output)
    outroot.mkdir(parents=True, exist_ok=True)
    rank_file = outroot / f"summary-rank{rank}.csv"
    if world > 1:
        rank_file.unlink(missing_ok=True)  # a stale file from an earlier, interrupted run
    settings, model = settings_and_model(args)
    gpu = bind_local_gpu(settings.device, world)
    if model is None and settings.model not in (AFFINE_ONLY, AUTO):
        # What register() would build for every pair, built once (same seed, same weights).
        import torch

        torch.manual_seed(settings.seed)
        model = create_model(settings.model)
    mine = [p for p in pairs if p.row % world == rank]
    expected = (InputError, CheckpointError, OSError, RuntimeError, ValueError)
    rows: list[dict] = []
    say = (lambda *a: None) if args.quiet else progress
    if gpu is not None:
        say(f"rank {rank}: GPU {gpu}")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepwarp-prefetch") as pool:

        def submit(i: int) -> Future | None:
            if i >= len(mine) or mine[i].error:
                return None
            return pool.submit(_read, mine[i])

        nxt = submit(0)
        for i, pair in enumerate(mine):
            current, nxt = nxt, submit(i + 1)  # read the next pair while this one runs
            tag = f"[{i + 1}/{len(mine)}{'' if world == 1 else f' rank {rank}'}] {pair.name}"
            if pair.error:
                rows.append(_row(pair, "failed", message=pair.error))
                say(f"{tag}: skipped: {pair.error}")
                continue
            start = time.perf_counter()
            try:
                volumes = current.result()
                result = drain(with_oom_fallback(_runner(register, volumes, model), settings), True)
                name_labels(result.metrics, names)  # --label-names
                write_result(result, outroot / pair.name, args.outputs)
                seconds = time.perf_counter() - start
                rows.append(_row(pair, "ok", result.metrics, seconds))
                say(f"{tag}: {_describe(result.metrics)}, {seconds:.1f} s")
                del result, volumes
            except WorseThanBaseline as exc:  # --if-worse fail: nothing written for this pair
                seconds = time.perf_counter() - start
                rows.append(_row(pair, WORSE, seconds=seconds, message=str(exc)))
                say(f"{tag}: {exc}; nothing written (--if-worse fail)")
            except expected as exc:
                message = " ".join(str(exc).split())
                rows.append(
                    _row(pair, "failed", seconds=time.perf_counter() - start, message=message)
                )
                say(f"{tag}: failed: {message}")
            finally:
                release_memory(settings.device if settings.device != "auto" else None)
    failed = sum(r["status"] != "ok" for r in rows)
    if world == 1:
        _write_csv(outroot / "summary.csv", rows)
        return _report(len(rows), failed, outroot, _bad_exit(rows, EXIT_BAD_INPUT, EXIT_WORSE))
    _write_csv(rank_file, rows, header_note=f"run {run_id} world {world}")
    if rank != 0:
        say(f"rank {rank}: {len(rows)} pairs, {failed} failed; rank 0 writes summary.csv")
        return EXIT_BAD_INPUT if failed else 0
    merged = _merge(outroot, world, run_id, args.merge_timeout, say)
    if merged is None:
        return EXIT_BAD_INPUT
    failed = sum(r["status"] != "ok" for r in merged)
    return _report(len(merged), failed, outroot, _bad_exit(merged, EXIT_BAD_INPUT, EXIT_WORSE))


def _bad_exit(rows: list[dict], bad_input: int, worse: int) -> int:
    """The exit code when some rows are not ok: ``worse`` (3) when every one of them was only
    worse than its affine stage under ``--if-worse fail``, else ``bad_input`` (2)."""
    bad = [r["status"] for r in rows if r["status"] != "ok"]
    return worse if bad and all(status == WORSE for status in bad) else bad_input


def _describe(metrics: dict) -> str:
    parts = []
    for stage in ("before", "after"):
        if metrics.get(f"mean_dice_{stage}") is not None:
            parts.append(f"Dice {stage} {metrics[f'mean_dice_{stage}']:.3f}")
    parts.append(f"folding {metrics['folding_percent']:.3f}%")
    if metrics.get("verdict"):
        parts.append(metrics["verdict"]["line"])
    return "; ".join(parts)


def _merge(outroot: Path, world: int, run_id: str, timeout: float, say) -> list[dict] | None:
    """Rank 0: wait for every rank's file of this run, merge into summary.csv, remove them."""
    files = [outroot / f"summary-rank{r}.csv" for r in range(world)]
    deadline = time.monotonic() + timeout
    while True:
        ready = []
        for path in files:
            if path.exists():
                note, rows = _read_csv(path)
                if note == f"run {run_id} world {world}":
                    ready.append(rows)
        if len(ready) == world:
            break
        if time.monotonic() > deadline:
            missing = world - len(ready)
            print(
                f"deepwarp: error: {missing} rank(s) did not write their summary within "
                f"{timeout:.0f} s; summary.csv not written (see {outroot}/summary-rank*.csv)",
                file=sys.stderr,
            )
            return None
        time.sleep(0.5)
    rows = [r for part in ready for r in part]
    _write_csv(outroot / "summary.csv", rows)
    for path in files:
        path.unlink(missing_ok=True)
    return rows


def _report(total: int, failed: int, outroot: Path, bad_exit: int) -> int:
    line = f"register-batch: {total} pairs, {total - failed} ok, {failed} failed"
    print(
        f"{line}; summary in {outroot / 'summary.csv'}", file=sys.stderr if failed else sys.stdout
    )
    return bad_exit if failed else 0


def cmd_register_batch(args) -> int:
    return run_batch(args)


def add_register_batch(sub) -> None:
    """Add the ``register-batch`` subcommand to ``deepwarp``'s subparsers."""
    from napari_deepwarp.cli_options import add_method_options
    from napari_deepwarp.cli_types import positive_float

    p = sub.add_parser(
        "register-batch",
        help="register every pair of a CSV (fixed,moving[,fixed_labels,moving_labels[,name]])",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("pairs", help="CSV: fixed,moving[,fixed_labels,moving_labels[,name]] per row")
    p.add_argument("-o", "--output", required=True, help="output root: one folder per pair")
    add_method_options(p)
    p.add_argument(
        "--label-names",
        metavar="FILE",
        help="colour table naming the labels (FreeSurfer LUT, 3D Slicer .ctbl/.txt, ITK-SNAP "
        "label descriptions): names beside each label's Dice in each pair's metrics.json",
    )
    p.add_argument(
        "--merge-timeout",
        type=positive_float,
        default=24 * 3600.0,
        metavar="S",
        help="under torchrun: how long rank 0 waits for the other ranks' summaries",
    )
    p.set_defaults(func=cmd_register_batch)
