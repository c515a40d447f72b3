"""The Result tab: what the run shown did (summary, verdict, per-structure Dice) and one button per
inspection view (widgets only; the dock wires them to :class:`.result_view.ResultView`)."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from .label_table import StructureTable
from .readout import HEADERS
from .result_layers import VIEWS
from .setup_tab import double_spin
from .tables import CopyableTable

VIEW_TIPS = {
    "overlay": "the fixed image (green) and the warped moving image (magenta): grey where they agree",
    "checkerboard": "tiles of the fixed and the warped image: edges should run on across tiles",
    "difference": "warped minus fixed (normalised intensities): pink/green where they differ",
    "|u|": "the displacement's length (mm) inside the fixed image; in 3D a volume rendering",
    "Jacobian": "det J of the map: < 1 shrinks, > 1 grows; folds (det J <= 0) in red",
    "grid": "a regular grid of the moving image, bent as the warp bends it (on the slice shown)",
    "labels": "the moving labels propagated onto the fixed image, as contours",
    "labels → moving": "the fixed labels taken into moving space (the inverse map; computed on "
    "first use), as contours on the moving image",
}


class ResultTab(QWidget):
    """Summary line, verdict, view buttons, readout, structures table and export buttons."""

    CONTROLS = (
        "run_label",
        "verdict_label",
        "other_button",
        "view_buttons",
        "grid_spacing",
        "keep_runs",
        "readout",
        "structures",
        "copy_button",
        "csv_button",
        "export_button",
        "field_button",
        "save_button",
    )

    def __init__(self, parent=None):
        super().__init__(parent)
        self.run_label = QLabel("no run yet")
        self.run_label.setWordWrap(True)
        # The run's verdict, coloured, and the other result of the same run one click away.
        self.verdict_label = QLabel("")
        self.verdict_label.setWordWrap(True)
        self.verdict_label.setTextFormat(Qt.TextFormat.RichText)
        self.other_button = QPushButton("")
        self.other_button.setVisible(False)
        views = QGridLayout()
        views.setSpacing(2)
        self.view_group = QButtonGroup(self)
        self.view_group.setExclusive(True)
        self.view_buttons: dict[str, QPushButton] = {}
        for i, view in enumerate(VIEWS):
            button = QPushButton(view)
            button.setCheckable(True)
            button.setToolTip(VIEW_TIPS[view])
            self.view_group.addButton(button)
            self.view_buttons[view] = button
            views.addWidget(button, i // 4, i % 4)
        self.view_buttons["overlay"].setChecked(True)
        options = QHBoxLayout()
        self.grid_spacing = double_spin(1, 200, 12.0, "deformation grid spacing (mm)")
        self.keep_runs = QCheckBox("keep earlier runs' layers")
        self.keep_runs.setToolTip(
            "off: a new run replaces the layers of the one before (Compare still shows every run)"
        )
        options.addWidget(QLabel("grid mm"))
        options.addWidget(self.grid_spacing)
        options.addStretch(1)
        options.addWidget(self.keep_runs)
        self.readout = CopyableTable(HEADERS)
        self.structures = StructureTable()
        self.structures.setVisible(False)
        tables = QSplitter(Qt.Orientation.Vertical)
        tables.addWidget(self.readout)
        tables.addWidget(self.structures)
        copy_row = QHBoxLayout()
        self.copy_button = QPushButton("Copy")
        self.csv_button = QPushButton("CSV…")
        self.csv_button.setToolTip("every row, with one row per structure (named)")
        for b in (self.copy_button, self.csv_button):
            copy_row.addWidget(b)
        export_row = QHBoxLayout()
        self.export_button = QPushButton("Export run…")
        self.field_button = QPushButton("Export field…")
        self.save_button = QPushButton("Save checkpoint…")
        for b in (self.export_button, self.field_button, self.save_button):
            export_row.addWidget(b)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.run_label)
        layout.addWidget(self.verdict_label)
        layout.addWidget(self.other_button)
        layout.addLayout(views)
        layout.addLayout(options)
        layout.addWidget(tables, stretch=1)
        layout.addLayout(copy_row)
        layout.addLayout(export_row)

    def check_view(self, view: str) -> None:
        """Mark ``view``'s button as the one shown (no signal)."""
        button = self.view_buttons[view]
        button.blockSignals(True)
        button.setChecked(True)
        button.blockSignals(False)
