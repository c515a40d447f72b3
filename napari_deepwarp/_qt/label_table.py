"""Per-structure overlap of a run: one row per label, sortable, worst first, with a filter."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLineEdit,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

HEADERS = ["structure", "label", "Dice before", "affine", "after", "Δ"]


def structure_rows(metrics: dict) -> list[list]:
    """``[name, label, dice before, affine, after, after - before]`` per label (values float or
    None), worst Dice after first. Names come from ``metrics["label_names"]`` (see
    :func:`core.label_names.name_labels`), else ``"label N"``."""
    per_stage = {s: metrics.get(f"labels_{s}") or {} for s in ("before", "affine", "after")}
    names = metrics.get("label_names") or {}
    rows = []
    for key in set().union(*per_stage.values()):
        dice = [per_stage[s].get(key, {}).get("dice") for s in per_stage]
        change = None if None in (dice[0], dice[2]) else dice[2] - dice[0]
        label = int(float(key))
        rows.append([names.get(key, f"label {label}"), label, *dice, change])
    return sorted(rows, key=lambda r: (np.inf if r[4] is None else r[4], r[1]))


class _Number(QTableWidgetItem):
    """A cell that sorts by its number (empty cells last)."""

    def __init__(self, value, text: str):
        super().__init__(text)
        self.value = np.inf if value is None else float(value)

    def __lt__(self, other):
        if isinstance(other, _Number):
            return self.value < other.value
        return super().__lt__(other)


class StructureTable(QWidget):
    """The per-structure Dice table with a filter line (matches structure names and numbers)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.filter = QLineEdit()
        self.filter.setPlaceholderText("filter structures (e.g. hippocampus)")
        self.filter.setClearButtonEnabled(True)
        self.table = QTableWidget(0, len(HEADERS))
        self.table.setHorizontalHeaderLabels(HEADERS)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.table.setSortingEnabled(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.filter)
        layout.addWidget(self.table)
        self.filter.textChanged.connect(self._apply_filter)

    def set_metrics(self, metrics: dict) -> None:
        """Fill from a run's metrics, sorted by Dice after, worst first."""
        rows = structure_rows(metrics)
        self.table.setSortingEnabled(False)
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            self.table.setItem(r, 0, QTableWidgetItem(row[0]))
            self.table.setItem(r, 1, _Number(row[1], str(row[1])))
            for c, value in enumerate(row[2:], start=2):
                text = "" if value is None else f"{value:+.3f}" if c == 5 else f"{value:.3f}"
                self.table.setItem(r, c, _Number(value, text))
        self.table.setSortingEnabled(True)
        self.table.sortItems(4, Qt.SortOrder.AscendingOrder)
        self._apply_filter(self.filter.text())
        self.setVisible(bool(rows))

    def _apply_filter(self, text: str) -> None:
        needle = text.strip().lower()
        for r in range(self.table.rowCount()):
            cells = (self.table.item(r, c) for c in (0, 1))
            words = " ".join(c.text().lower() for c in cells if c is not None)
            self.table.setRowHidden(r, bool(needle) and needle not in words)

    def visible_rows(self) -> list[list[str]]:
        """The rows shown (after the filter), in table order, as text."""
        return [
            [self.table.item(r, c).text() for c in range(self.table.columnCount())]
            for r in range(self.table.rowCount())
            if not self.table.isRowHidden(r)
        ]
