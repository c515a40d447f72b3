"""What the widget writes for the current run: metrics CSV, every output file, the field, and
the fine-tuned network as a checkpoint. A mixin of :class:`.widget.DeepwarpWidget`: it uses the
widget's ``current`` run record and ``readout`` table; each method takes a path (tests, scripts)
or asks with a file dialog, and reports failures as notifications."""

from __future__ import annotations

from pathlib import Path

from napari.utils import notifications
from qtpy.QtWidgets import QFileDialog


def notify_error(message: str) -> None:
    notifications.show_error(message)


class RunExports:
    def _save_path(self, path, title: str, suggested: str, filters: str):
        """``path`` as given, else the one the user picks (None: cancelled)."""
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, title, suggested, filters)
        return path or None

    def _write_metrics(self, path) -> Path:
        """The readout with one row per label (named where the run has label names)."""
        from .readout import HEADERS, metric_rows
        from .tables import write_csv

        return write_csv(path, HEADERS, metric_rows(self.current))

    def export_csv(self, path=None):
        if self.current is None:
            return None
        path = self._save_path(path, "Metrics as CSV", "metrics.csv", "*.csv")
        if path is None:
            return None
        try:
            return self._write_metrics(path)
        except OSError as exc:
            notify_error(f"export failed: {exc}")
            return None

    def export_run(self, folder=None):
        """pipeline.write_result into ``folder`` (+ fixed labels in moving space, metrics CSV)."""
        from napari_deepwarp.core.io import write_volume
        from napari_deepwarp.core.pipeline import write_result

        if self.current is None:
            return None
        if folder is None:
            folder = QFileDialog.getExistingDirectory(self, "Export the run into a folder")
            if not folder:
                return None
        try:
            written = write_result(self.current.result, folder)
            if self.current.inverse_labels is not None:
                written.append(
                    write_volume(
                        self.current.inverse_labels, Path(folder) / "fixed_labels_in_moving.nii.gz"
                    )
                )
            written.append(self._write_metrics(Path(folder) / "metrics.csv"))
        except (OSError, ValueError, RuntimeError) as exc:
            notify_error(f"export failed: {exc}")
            return None
        notifications.show_info(f"wrote {len(written)} files into {folder}")
        return written

    def export_field(self, path=None):
        """The total displacement field ((x, y, z) mm, fixed -> moving) as an ITK vector image."""
        from napari_deepwarp.core.io import write_field

        if self.current is None:
            return None
        path = self._save_path(
            path, "Displacement field", "displacement.nii.gz", "*.nii.gz *.nrrd *.mha"
        )
        if path is None:
            return None
        try:
            return write_field(
                self.current.result.displacement, self.current.result.fixed.grid, path
            )
        except (OSError, ValueError, RuntimeError) as exc:
            notify_error(f"export failed: {exc}")
            return None

    def save_checkpoint(self, path=None):
        """Write the fine-tuned network with a card naming its parent and the pair."""
        from napari_deepwarp.core.checkpoint import finetuned_card
        from napari_deepwarp.core.checkpoint import save_checkpoint as save

        record = self.current
        if (
            record is None
            or record.result.model is None
            or record.request.settings.finetune.steps == 0
        ):
            notify_error("no fine-tuned network in this run (choose network fine-tuning)")
            return None
        path = self._save_path(path, "Save the fine-tuned network", "finetuned.pt", "*.pt")
        if path is None:
            return None
        req = record.request
        tuned_on = (
            f"fixed {req.pair[0]} {list(req.fixed.shape)}, moving {req.pair[1]} "
            f"{list(req.moving.shape)}"
        )
        try:
            card = finetuned_card(
                record.result,
                tuned_on,
                "napari-deepwarp widget: network fine-tuning",
                req.checkpoint,
            )
            card["name"] = f"{req.settings.model} fine-tuned ({record.name})"
            return save(path, record.result.model, card)
        except (OSError, ValueError, TypeError) as exc:
            notify_error(f"could not save the checkpoint: {exc}")
            return None
