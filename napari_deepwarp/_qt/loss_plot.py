"""A tiny live loss curve: a QWidget that paints one polyline (no plotting library)."""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget


class LossPlot(QWidget):
    """Loss per optimisation step, scaled to fit; the latest value and stage are written on top."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.values: list[float] = []
        self.stage = ""
        self.setMinimumHeight(70)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("loss per fine-tuning / refinement step")

    def clear(self) -> None:
        self.values, self.stage = [], ""
        self.update()

    def add(self, value: float, stage: str = "") -> None:
        if value is not None and math.isfinite(value):
            self.values.append(float(value))
            self.stage = stage
            self.update()

    def paintEvent(self, event):
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        rect = self.rect().adjusted(4, 16, -4, -4)
        painter.fillRect(self.rect(), QColor(30, 30, 36))
        painter.setPen(QPen(QColor(90, 90, 100), 1))
        painter.drawRect(rect)
        painter.setPen(QColor(200, 200, 210))
        if not self.values:
            painter.drawText(6, 12, "loss: (no optimisation yet)")
            painter.end()
            return
        lo, hi = min(self.values), max(self.values)
        span = hi - lo or 1.0
        n = max(len(self.values) - 1, 1)
        points = QPolygonF(
            [
                QPointF(
                    rect.left() + rect.width() * i / n,
                    rect.bottom() - rect.height() * (v - lo) / span,
                )
                for i, v in enumerate(self.values)
            ]
        )
        painter.drawText(
            6, 12, f"{self.stage} loss {self.values[-1]:.4g}  (step {len(self.values)})"
        )
        painter.setPen(QPen(QColor(255, 120, 220), 1.5))
        painter.drawPolyline(points)
        painter.setPen(QColor(150, 150, 160))
        painter.drawText(rect.adjusted(0, 0, -2, 0), Qt.AlignmentFlag.AlignRight, f"{hi:.3g}")
        painter.drawText(
            rect.adjusted(0, 0, -2, -2),
            Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignBottom,
            f"{lo:.3g}",
        )
        painter.end()
