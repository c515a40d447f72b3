"""The Setup tab: which layers, which method, which label names (widgets only, no run logic).

The dock (:class:`.widget.DeepwarpWidget`) reads these controls, fills the layer choosers and the
checkpoint list, and wires the signals.
"""

from __future__ import annotations

from pathlib import Path

from napari.layers import Image, Labels, Points
from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QLabel,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_deepwarp.core.errors import InputError
from napari_deepwarp.core.label_names import LabelNames, read_label_names
from napari_deepwarp.core.models.registry import available_models
from napari_deepwarp.core.pipeline import AFFINE_ONLY
from napari_deepwarp.core.precision import PRECISIONS
from napari_deepwarp.core.refine import RefineSettings

from .exports import notify_error

NONE = "(none)"
BROWSE_NAMES = "Open a colour table…"
#: the shipped table for FreeSurfer aseg + DKT labels (Mindboggle-101)
BUILTIN_NAMES = "FreeSurfer aseg + DKT (built-in)"
#: role -> (layer class, optional)
ROLES = {
    "fixed": (Image, False),
    "moving": (Image, False),
    "fixed labels": (Labels, True),
    "moving labels": (Labels, True),
    "fixed points": (Points, True),
    "moving points": (Points, True),
}
MODES = (
    ("none", "none"),
    ("network fine-tuning", "finetune"),
    ("field refinement: fast", "refine"),
    ("field refinement: accurate (1.25 mm, no folding)", "refine_accurate"),
)
#: the modes that refine the field
REFINING = ("refine", "refine_accurate")
SIMILARITIES = ("(default)", "lncc", "ncc", "ncc_ssd", "mi", "mse")


class VerticalScroll(QScrollArea):
    """Scrolls its content vertically only, as wide as the content asks (never cut at the side)."""

    def __init__(self, content: QWidget):
        super().__init__()
        self.setWidget(content)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

    def _with_scrollbar(self, size: QSize, height: int) -> QSize:
        return QSize(size.width() + self.verticalScrollBar().sizeHint().width(), height)

    def sizeHint(self) -> QSize:
        hint = self.widget().sizeHint()
        return self._with_scrollbar(hint, hint.height())

    def minimumSizeHint(self) -> QSize:
        return self._with_scrollbar(self.widget().minimumSizeHint(), 120)


def double_spin(lo: float, hi: float, value: float, tip: str) -> QDoubleSpinBox:
    spin = QDoubleSpinBox()
    spin.setRange(lo, hi)
    spin.setDecimals(3)
    spin.setSingleStep(0.5)
    spin.setValue(value)
    spin.setToolTip(tip)
    return spin


class SetupTab(QWidget):
    """Inputs (layer choosers, label names) and method controls."""

    #: controls the dock exposes as its own attributes (tests and scripts use them)
    CONTROLS = (
        "choosers",
        "label_names",
        "model",
        "checkpoint",
        "card_panel",
        "device",
        "precision",
        "affine",
        "affine_from",
        "mode",
        "steps",
        "similarity",
        "reg_weight",
        "labels_weight",
        "landmarks_weight",
        "max_size",
        "invert",
    )

    def __init__(self, parent=None):
        super().__init__(parent)
        self.tables: dict[str, LabelNames] = {}  # combo text -> table
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        inputs = QGroupBox("Inputs")
        form = QFormLayout(inputs)
        self.choosers: dict[str, QComboBox] = {}
        for role in ROLES:
            box = QComboBox()
            self.choosers[role] = box
            form.addRow(role, box)
        self.label_names = QComboBox()
        self.label_names.addItems([NONE, BUILTIN_NAMES, BROWSE_NAMES])
        self.label_names.setToolTip(
            "a colour table naming the labels (FreeSurfer LUT, 3D Slicer .ctbl/.txt, ITK-SNAP "
            "label descriptions; opening one in napari adds it here): names in the readout, the "
            "exports and the label layers"
        )
        self.label_names.activated.connect(self._names_activated)
        form.addRow("label names", self.label_names)
        layout.addWidget(inputs)
        layout.addWidget(self._method())
        layout.addStretch(1)

    def _method(self) -> QGroupBox:
        method = QGroupBox("Method")
        form = QFormLayout(method)
        self.model = QComboBox()
        for name, cls in available_models().items():
            self.model.addItem(name)
            self.model.setItemData(
                self.model.count() - 1, getattr(cls, "description", ""), Qt.ItemDataRole.ToolTipRole
            )
        self.model.addItem(AFFINE_ONLY)
        self.model.setItemData(
            self.model.count() - 1,
            "the affine stage alone (no network)",
            Qt.ItemDataRole.ToolTipRole,
        )
        self.checkpoint = QComboBox()
        self.card_panel = QLabel("")
        self.card_panel.setWordWrap(True)
        self.card_panel.setStyleSheet("color: #aaa; font-size: 10px;")
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        self.precision = QComboBox()
        self.precision.addItems(list(PRECISIONS))
        self.precision.setToolTip(
            "the network's compute precision; auto: bfloat16 where the device computes it "
            "natively (recent GPUs, CPUs with AVX512-BF16 or AMX), else float32; float16 is "
            "for GPUs (most CPUs emulate it, many times slower)"
        )
        self.affine = QCheckBox("affine pre-alignment")
        self.affine.setChecked(True)
        self.affine_from = QComboBox()
        self.affine_from.addItems(["images", "labels"])
        self.affine_from.setToolTip(
            "what the affine stage aligns: the images (mutual information) or, where their "
            "intensities cannot be related (MR to ultrasound), the two label layers; Dice then "
            "no longer checks that stage independently"
        )
        self.mode = QComboBox()
        for text, key in MODES:
            self.mode.addItem(text, key)
        self.steps = QSpinBox()
        self.steps.setRange(1, 10000)
        self.steps.setValue(150)
        self.similarity = QComboBox()
        self.similarity.addItems(SIMILARITIES)
        self.similarity.setToolTip(
            "(default): the model's own loss when fine-tuning; when refining, mutual "
            "information for a multi-modal model (MI-UNet, with 3x the regularisation "
            "weight), local NCC otherwise"
        )
        self.reg_weight = double_spin(0, 1000, RefineSettings().reg_weight, "regularisation weight")
        self.labels_weight = double_spin(0, 1000, 0.0, "weight of the label (Dice) supervision")
        self.landmarks_weight = double_spin(0, 1000, 0.0, "weight of the landmark supervision")
        self.max_size = QSpinBox()
        self.max_size.setRange(16, 1024)
        self.max_size.setValue(96)
        self.max_size.setToolTip("largest side of the network's working grid (voxels)")
        self.invert = QCheckBox("fixed labels → moving space now (inverse map)")
        self.invert.setChecked(False)
        self.invert.setToolTip(
            "compute the fixed labels in moving space with the run (slow on big volumes); "
            "otherwise the Result tab's 'labels → moving' view computes it when asked"
        )
        for label, control in (
            ("model", self.model),
            ("checkpoint", self.checkpoint),
            (None, self.card_panel),
            ("device", self.device),
            ("precision", self.precision),
            (None, self.affine),
            ("affine aligns", self.affine_from),
            ("optimise on the pair", self.mode),
            ("steps", self.steps),
            ("similarity", self.similarity),
            ("regularisation", self.reg_weight),
            ("labels weight", self.labels_weight),
            ("landmarks weight", self.landmarks_weight),
            ("working grid ≤", self.max_size),
            (None, self.invert),
        ):
            if label is None:
                form.addRow(control)
            else:
                form.addRow(label, control)
        return method

    # --- label names ----------------------------------------------------------------------
    def chosen_names(self) -> LabelNames | None:
        """The colour table chosen (None: none). Reading a file can raise ``InputError``."""
        text = self.label_names.currentText()
        if text in (NONE, BROWSE_NAMES, ""):
            return None
        if text == BUILTIN_NAMES and text not in self.tables:
            from napari_deepwarp.resources import resources_dir

            path = resources_dir() / "label_names" / "mindboggle_dkt_LUT.txt"
            self.tables[text] = read_label_names(path)
        return self.tables.get(text)

    def add_names(self, table: LabelNames, select: bool = True) -> str:
        """Offer ``table`` (named after its file) and choose it if ``select``."""
        text = Path(table.source).name or "colour table"
        self.tables[text] = table
        if self.label_names.findText(text) < 0:
            self.label_names.insertItem(self.label_names.count() - 1, text)
        if select:
            self.label_names.setCurrentText(text)
        return text

    def _names_activated(self, _index: int) -> None:
        if self.label_names.currentText() != BROWSE_NAMES:
            return
        path, _ = QFileDialog.getOpenFileName(
            self, "Colour table", "", "Colour tables (*.txt *.ctbl *.lut *.label);;All files (*)"
        )
        self.label_names.setCurrentText(NONE)
        if path:
            try:
                self.add_names(read_label_names(path))
            except InputError as exc:  # not a colour table: say which line, change nothing
                notify_error(str(exc))
