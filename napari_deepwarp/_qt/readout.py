"""A run's metrics as table rows ``[quantity, before, affine, after]`` (text, for copy and CSV)."""

from __future__ import annotations

import numpy as np

HEADERS = ["quantity", "before", "affine", "after"]


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}g}"
    return str(value)


def metric_rows(record, per_label: bool = True) -> list[list[str]]:
    """Rows for one :class:`~napari_deepwarp._qt.worker.RunRecord`: the verdict and the similarity
    it judged by, overlap (mean and, with ``per_label``, per label, named as
    ``"Dice Left-Hippocampus (17)"`` where the run has label names), landmark TRE, similarity,
    field quality, deformation range, time per stage, device, memory."""
    m = record.result.metrics
    rows: list[list[str]] = []

    def stages(label: str, key: str):
        values = [m.get(f"{key}_{s}") for s in ("before", "affine", "after")]
        if any(v is not None for v in values):
            rows.append([label, *(_fmt(v) for v in values)])

    verdict = m.get("verdict")
    if verdict:
        rows.append(["verdict", "", "", verdict["word"]])
        rows.append(
            [
                f"{verdict['similarity_name']}, fixed foreground (judged result)",
                _fmt(verdict["similarity_before"]),
                _fmt(verdict["similarity_baseline"]) if verdict["baseline"] == "affine" else "",
                _fmt(verdict["similarity_result"]),
            ]
        )
    stages("mean Dice", "mean_dice")
    stages("mean Jaccard", "mean_jaccard")
    show = per_label
    per_label = {s: m.get(f"labels_{s}") or {} for s in ("before", "affine", "after")}
    labels = sorted(set().union(*per_label.values()), key=lambda k: (len(k), k)) if show else []
    names = m.get("label_names") or {}
    for what in ("dice", "jaccard"):
        for label in labels:
            name = f"{names[label]} ({label})" if label in names else f"label {label}"
            rows.append(
                [f"{what.capitalize()} {name}"]
                + [_fmt(per_label[s].get(label, {}).get(what)) for s in per_label]
            )
    if any(f"tre_{s}_mm" in m for s in ("before", "affine", "after")):
        rows.append(
            ["landmark TRE (mm, mean)"]
            + [_fmt(m.get(f"tre_{s}_mm")) for s in ("before", "affine", "after")]
        )
    rows.append(["NCC", _fmt(m.get("ncc_before")), "", _fmt(m.get("ncc_after"))])
    rows.append(["MI (nats)", _fmt(m.get("mi_before")), "", _fmt(m.get("mi_after"))])
    rows.append(["folding % (det J <= 0)", "", "", _fmt(m.get("folding_percent"))])
    rows.append(["SD log det J", "", "", _fmt(m.get("sdlogj"))])
    lo, mean, hi = record.magnitude
    rows.append(
        ["deformation |u| (mm) min / mean / max", "", "", f"{lo:.3g} / {mean:.3g} / {hi:.3g}"]
    )
    for stage, seconds in (m.get("seconds") or {}).items():
        rows.append([f"time {stage} (s)", "", "", _fmt(seconds, 3)])
    rows.append(["device", "", "", str(m.get("device", ""))])
    if m.get("precision"):
        rows.append(["network precision", "", "", str(m["precision"])])
    if record.peak_memory_mb is not None:
        rows.append(
            [f"peak memory (MB, {record.memory_method})", "", "", _fmt(record.peak_memory_mb)]
        )
    return rows


def mean_tre(metrics: dict) -> float | None:
    return metrics.get("tre_after_mm")
