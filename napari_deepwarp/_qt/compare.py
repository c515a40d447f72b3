"""Comparison of runs: one row per run on the current pair, and a side-by-side grid view.

Peak memory is what :mod:`._qt.worker` measured (CUDA allocator peak, else sampled RSS growth;
the column's tooltip says which). Selecting rows while "side by side" is on shows the fixed image
and the selected runs' warped images in napari's grid mode, every other layer hidden; turning it
off restores each layer's visibility and leaves grid mode. A run whose layers were removed (a
newer run replaced them) gets its warped layer back for the view.
"""

from __future__ import annotations

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_deepwarp._qt.readout import _fmt
from napari_deepwarp._qt.tables import CopyableTable

HEADERS = [
    "run",
    "mean Dice",
    "mean Jaccard",
    "TRE mm",
    "folding %",
    "time s",
    "peak MB",
    "device",
]


def compare_row(record) -> list[str]:
    m = record.result.metrics
    return [
        record.name,
        _fmt(m.get("mean_dice_after")),
        _fmt(m.get("mean_jaccard_after")),
        _fmt(m.get("tre_after_mm")),
        _fmt(m.get("folding_percent")),
        _fmt((m.get("seconds") or {}).get("total"), 3),
        _fmt(record.peak_memory_mb, 4),
        str(m.get("device", "")),
    ]


class CompareRuns(QWidget):
    """Table of runs on the current pair plus the side-by-side toggle."""

    current_changed = Signal(int)  # the run number of the newest selected row

    def __init__(self, viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.records: list = []
        self.shown: list = []  # records in table order
        self._saved_visibility: dict | None = None
        #: ``ensure_warped(record)``: puts a run's warped layer back in the viewer (the dock's)
        self.ensure_warped = None
        self.table = CopyableTable(HEADERS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.horizontalHeaderItem(HEADERS.index("peak MB")).setToolTip(
            "CUDA: torch.cuda.max_memory_allocated; CPU: growth of the process RSS, sampled at "
            "every progress event"
        )
        self.side_by_side = QPushButton("Side by side")
        self.side_by_side.setCheckable(True)
        self.side_by_side.setToolTip(
            "show the fixed image and the selected runs' warped images in napari's grid mode"
        )
        copy = QPushButton("Copy")
        copy.clicked.connect(self.table.copy)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.table)
        row = QHBoxLayout()
        row.addWidget(self.side_by_side)
        row.addWidget(copy)
        layout.addLayout(row)
        self.side_by_side.toggled.connect(self._toggle_grid)
        self.table.itemSelectionChanged.connect(self._selection_changed)

    # --- rows -----------------------------------------------------------------------------
    def set_records(self, records: list, pair: tuple[str, str]) -> None:
        """Show the runs whose (fixed, moving) layer names are ``pair``."""
        self.records = records
        self.shown = [r for r in records if r.request.pair == pair]
        self.table.blockSignals(True)
        self.table.set_rows([compare_row(r) for r in self.shown])
        self.table.blockSignals(False)

    def select_runs(self, numbers) -> None:
        self.table.clearSelection()
        mode = self.table.selectionMode()
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.MultiSelection)
        for i, record in enumerate(self.shown):
            if record.number in numbers:
                self.table.selectRow(i)
        self.table.setSelectionMode(mode)

    def selected(self) -> list:
        rows = sorted({i.row() for i in self.table.selectedIndexes()})
        return [self.shown[r] for r in rows if r < len(self.shown)]

    def _selection_changed(self) -> None:
        chosen = self.selected()
        if chosen:
            self.current_changed.emit(chosen[-1].number)
        if self.side_by_side.isChecked():
            self._show_grid(chosen)

    # --- grid view ------------------------------------------------------------------------
    def _toggle_grid(self, on: bool) -> None:
        if on:
            self._saved_visibility = {id(layer): layer.visible for layer in self.viewer.layers}
            self._show_grid(self.selected() or self.shown[-1:])
        else:
            self.restore()

    def _show_grid(self, chosen: list) -> None:
        for record in chosen:  # a run whose layers left the list comes back for the view
            if self.ensure_warped is not None:
                self.ensure_warped(record)
        keep = {id(r.layers["warped"]) for r in chosen if "warped" in r.layers}
        fixed = [r.request.pair[0] for r in chosen]
        for layer in self.viewer.layers:
            layer.visible = id(layer) in keep or layer.name in fixed[:1]
        grid = grid_settings(self.viewer)
        grid.enabled = True
        grid.stride = 1

    def restore(self) -> None:
        """Leave grid mode and restore the layers' visibility from before."""
        saved = self._saved_visibility or {}
        for layer in self.viewer.layers:
            if id(layer) in saved:
                layer.visible = saved[id(layer)]
        self._saved_visibility = None
        grid_settings(self.viewer).enabled = False
        if self.side_by_side.isChecked():
            self.side_by_side.blockSignals(True)
            self.side_by_side.setChecked(False)
            self.side_by_side.blockSignals(False)


def grid_settings(viewer):
    """napari's grid-mode settings: ``viewer.canvas.grid`` from napari 0.9 on, else ``viewer.grid``."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid
