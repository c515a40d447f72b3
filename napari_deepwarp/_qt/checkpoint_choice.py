"""Choosing a checkpoint in the widget: the shipped ones (with their cards as tooltips and in a
panel), "(none: untrained)" and "Browse…"; the model follows the checkpoint and the working
size follows its card. A mixin of :class:`.widget.DeepwarpWidget`, which owns the ``model``,
``checkpoint``, ``mode``, ``max_size`` and ``card_panel`` controls."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFileDialog

from napari_deepwarp.core.checkpoint import (
    CheckpointError,
    below_affine_stage,
    benchmark_dice,
    config_changes,
    default_checkpoint,
    read_card,
    shipped_checkpoints,
    working_size,
)
from napari_deepwarp.core.models.registry import available_models
from napari_deepwarp.core.pipeline import AFFINE_ONLY

from .exports import notify_error
from .setup_tab import REFINING

UNTRAINED = "(none: untrained)"
BROWSE = "Browse…"


def _working(card: dict) -> str:
    shape = card.get("working_shape")
    text = "trained at " + ("x".join(map(str, shape)) if shape else "?")
    if card.get("working_spacing_mm"):
        text += f", {card['working_spacing_mm']} mm"
    if card.get("inference_size"):
        text += f"; runs at {card['inference_size']} voxels"
    return text


def card_summary(card: dict) -> str:
    """A few lines about a checkpoint card, for tooltips and the card panel; a caveat first."""
    training = card.get("training") or {}
    metrics = card.get("metrics") or {}
    caveat = below_affine_stage(card)
    lines = [
        f"{card.get('name') or card['architecture']} ({card['architecture']})",
        "note: " + caveat.replace("(--refine 150)", "(fine-tuning: field refinement)")
        if caveat
        else "",
        card.get("description") or "",
        f"modality: {card.get('modality') or '?'}; {_working(card)}",
        f"config: {changed}" if (changed := config_changes(card)) else "",
        f"trained on: {training.get('data') or '?'} ({training.get('steps') or '?'} steps)",
        _metrics_line(metrics),
    ]
    if card.get("parent"):
        parent = card["parent"].get("name")
        tuned_on = card.get("tuned_on")  # None: a training run warm-started from the parent
        lines.append(
            f"fine-tuned from {parent} on {tuned_on}" if tuned_on else f"started from {parent}"
        )
    return "\n".join(line for line in lines if line)


def _metrics_line(metrics: dict) -> str:
    """The benchmark Dice (beside the affine stage's) and the validation Dice where the card
    has them, else its first few metrics."""
    parts = [benchmark_dice(metrics)] if benchmark_dice(metrics) else []
    if metrics.get("validation_mean_dice") is not None:
        parts.append(f"validation Dice {metrics['validation_mean_dice']:.3f}")
    if not parts:
        parts = [
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in list(metrics.items())[:4]
        ]
    return ("metrics: " + "; ".join(parts)) if parts else ""


class CheckpointChoice:
    def _fill_checkpoints(self) -> None:
        self.checkpoint.clear()
        self.checkpoint.addItem(UNTRAINED, "")  # not None: PySide6 miscounts None refs
        for path, card in shipped_checkpoints():
            self._add_checkpoint_item(path, card)
        self.checkpoint.addItem(BROWSE, BROWSE)
        best = default_checkpoint()
        if best is not None:
            self.select_checkpoint(best)
        else:
            self.model.setCurrentText("voxelmorph")
            self.mode.setCurrentIndex(2)  # untrained networks need refinement to do anything

    def _add_checkpoint_item(self, path: Path, card: dict) -> int:
        index = (
            max(self.checkpoint.count() - 1, 1)
            if self.checkpoint.findData(BROWSE) >= 0
            else self.checkpoint.count()
        )
        label = f"{card.get('name') or Path(path).stem} · {card['architecture']}"
        self.checkpoint.insertItem(index, label, str(path))
        self.checkpoint.setItemData(index, card_summary(card), Qt.ItemDataRole.ToolTipRole)
        return index

    def select_checkpoint(self, path) -> None:
        """Select (adding it if new) the checkpoint file ``path``; notify when it is unusable."""
        index = self.checkpoint.findData(str(path))
        if index < 0:
            try:
                card = read_card(path)
            except (CheckpointError, OSError) as exc:
                notify_error(str(exc))
                return
            if card["architecture"] not in available_models():
                notify_error(f"{path}: checkpoint of unknown model {card['architecture']!r}")
                return
            index = self._add_checkpoint_item(Path(path), card)
        self.checkpoint.setCurrentIndex(index)
        card = read_card(path)
        self.model.blockSignals(True)
        self.model.setCurrentText(card["architecture"])
        self.model.blockSignals(False)
        self._show_card()

    def _checkpoint_activated(self, index: int) -> None:
        if self.checkpoint.itemData(index) != BROWSE:
            path = self.checkpoint.itemData(index)
            if path:
                self.select_checkpoint(path)
            return
        self.checkpoint.setCurrentIndex(0)
        path, _ = QFileDialog.getOpenFileName(self, "Checkpoint", "", "checkpoints (*.pt)")
        if path:
            self.select_checkpoint(path)

    def _suggest_max_size(self) -> None:
        """The working size the checkpoint was trained at (96 when refining or untrained)."""
        path = self.checkpoint.currentData()
        card = None
        if path and path != BROWSE:
            try:
                card = read_card(path)
            except (CheckpointError, OSError):
                card = None
        self.max_size.setValue(working_size(card, refining=self.mode.currentData() in REFINING))

    def _show_card(self, *_):
        self._suggest_max_size()
        path = self.checkpoint.currentData()
        if not path or path == BROWSE:
            self.card_panel.setText(
                "untrained network (use refinement or fine-tuning)"
                if self.model.currentText() != AFFINE_ONLY
                else ""
            )
            return
        try:
            self.card_panel.setText(card_summary(read_card(path)))
        except (CheckpointError, OSError) as exc:
            self.card_panel.setText(str(exc))

    def _model_changed(self, name: str) -> None:
        self.checkpoint.setEnabled(name != AFFINE_ONLY)
        path = self.checkpoint.currentData()
        if path and path != BROWSE and read_card(path)["architecture"] == name:
            return
        best = default_checkpoint(name) if name != AFFINE_ONLY else None
        if best is not None:
            self.select_checkpoint(best)
        else:
            self.checkpoint.setCurrentIndex(0)
        self._show_card()
