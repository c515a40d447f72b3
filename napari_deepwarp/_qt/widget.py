"""The dock widget: choose layers and a method, run ``pipeline.register`` in a worker, show results.

Three tabs, each a small widget: :class:`.setup_tab.SetupTab` (layers, method, label names),
:class:`.result_tab.ResultTab` (summary, verdict, one button per inspection view, per-structure
Dice) and :class:`.compare.CompareRuns`. Layers are read into :class:`Volume` copies on the main
thread; the run happens in a napari generator worker (:func:`._qt.worker.run_job`), which also
prepares what will be shown; the result's one layer is added when the run returns
(:class:`.result_view.ResultView`), so Cancel (``worker.quit()``, honoured at the next step)
leaves the layer list as it was and the event loop never waits on a big volume. Every bad
choice and every failure ends in a napari notification, never an exception in Qt.
"""

from __future__ import annotations

import html
from dataclasses import replace

from napari.layers import Labels
from napari.qt.threading import create_worker
from napari.utils import notifications
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QApplication,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_deepwarp.core.checkpoint import CheckpointError
from napari_deepwarp.core.finetune import FinetuneSettings
from napari_deepwarp.core.io import InputError
from napari_deepwarp.core.label_names import name_labels
from napari_deepwarp.core.progress import STOP
from napari_deepwarp.core.refine import refine_settings
from napari_deepwarp.layers import (
    for_display,
    on_label_names,
    opened_label_names,
)

from .checkpoint_choice import CheckpointChoice
from .compare import CompareRuns
from .exports import RunExports, notify_error
from .inputs import InputChoice
from .loss_plot import LossPlot
from .readout import metric_rows
from .result_layers import labels_meta
from .result_tab import ResultTab
from .result_view import ResultView
from .setup_tab import NONE, SetupTab, VerticalScroll
from .worker import RegistrationFailed, RunRequest, run_job, switch_job


class DeepwarpWidget(CheckpointChoice, InputChoice, RunExports, ResultView, QWidget):
    """Deformable registration of two 3D image layers (the napari dock widget)."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.records: list = []
        self.current = None  # the RunRecord shown in the readout
        self.worker = None
        self.preview_layer = None
        self._runs_started = 0
        self._user_chosen: set[str] = set()
        self.slots: dict = {}  # the inspection layers (see ResultView)
        self._build()
        events = self.viewer.layers.events
        events.inserted.connect(self._on_inserted)
        events.removed.connect(self.refresh_layers)
        for layer in self.viewer.layers:
            layer.events.name.connect(self.refresh_layers)
        self.refresh_layers()
        for table in opened_label_names():
            self.setup_tab.add_names(table)
        on_label_names(self._names_opened)
        app = QApplication.instance()
        if app is not None:  # a worker thread still running as Qt tears down must not crash it
            app.aboutToQuit.connect(self.shutdown)

    # --- UI -------------------------------------------------------------------------------
    def _build(self) -> None:
        layout = QVBoxLayout(self)
        self.setup_tab = SetupTab()
        self.result_tab = ResultTab()
        for tab in (self.setup_tab, self.result_tab):
            for name in tab.CONTROLS:
                setattr(self, name, getattr(tab, name))
        for role, box in self.choosers.items():
            box.activated.connect(lambda _i, r=role: self._user_chosen.add(r))
            box.currentTextChanged.connect(self._pair_changed)
        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.stop_button = QPushButton("Stop && keep")
        self.stop_button.setToolTip("end fine-tuning now and finish the run with the current field")
        self.cancel_button = QPushButton("Cancel")
        self.stop_button.setEnabled(False)
        self.cancel_button.setEnabled(False)
        for b in (self.run_button, self.stop_button, self.cancel_button):
            buttons.addWidget(b)
        layout.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.status = QLabel("ready")
        self.loss_plot = LossPlot()
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.loss_plot)
        self.compare = CompareRuns(self.viewer)
        self.compare.ensure_warped = self.ensure_warped
        self.tabs = QTabWidget()
        # scrolls rather than squeezing rows (a long card summary was cut off on short screens)
        self.tabs.addTab(VerticalScroll(self.setup_tab), "Setup")
        self.tabs.addTab(self.result_tab, "Result")
        self.tabs.addTab(self.compare, "Compare")
        layout.insertWidget(0, self.tabs, stretch=1)

        self._fill_checkpoints()
        self.model.currentTextChanged.connect(self._model_changed)
        self.checkpoint.activated.connect(self._checkpoint_activated)
        self.checkpoint.currentIndexChanged.connect(self._show_card)
        self.mode.currentIndexChanged.connect(self._mode_changed)
        self.label_names.currentTextChanged.connect(self._names_changed)
        self.run_button.clicked.connect(self.run)
        self.stop_button.clicked.connect(self.stop)
        self.cancel_button.clicked.connect(self.cancel)
        for view, button in self.view_buttons.items():
            button.clicked.connect(lambda _c=False, v=view: self.set_view(v))
        self.grid_spacing.valueChanged.connect(self._regrid)
        # The grid is drawn on the slice shown: redraw it, once scrolling pauses, on a new slice.
        self._regrid_timer = QTimer(self)
        self._regrid_timer.setSingleShot(True)
        self._regrid_timer.setInterval(60)
        self._regrid_timer.timeout.connect(self._regrid)
        self.viewer.dims.events.current_step.connect(self._schedule_regrid)
        self.viewer.dims.events.order.connect(self._schedule_regrid)
        self.copy_button.clicked.connect(self.readout.copy)
        self.other_button.clicked.connect(self.show_other_result)
        self.csv_button.clicked.connect(lambda: self.export_csv())
        self.export_button.clicked.connect(lambda: self.export_run())
        self.field_button.clicked.connect(lambda: self.export_field())
        self.save_button.clicked.connect(lambda: self.save_checkpoint())
        self.compare.current_changed.connect(self._show_run_number)
        self._mode_changed()
        self._update_result_buttons()

    # --- checkpoints ----------------------------------------------------------------------
    def _mode_changed(self, *_):
        mode = self.mode.currentData()
        for w in (self.steps, self.similarity, self.reg_weight):
            w.setEnabled(mode != "none")
        self.steps.setEnabled(mode not in ("none", "refine_accurate"))  # the preset's own steps
        if mode == "finetune":
            default = FinetuneSettings()
        else:
            default = refine_settings("accurate" if mode == "refine_accurate" else "fast")
        self.reg_weight.setValue(default.reg_weight)
        self.steps.setValue(100 if mode == "finetune" else default.steps)
        self._suggest_max_size()

    def run(self) -> None:
        """Start a run with the current choices (a notification instead when they are bad)."""
        if self.worker is not None:
            return
        try:
            request = self.build_request()
        except (InputError, ValueError) as exc:
            notify_error(str(exc))
            return
        self.start(request)

    def start(self, request: RunRequest, job=run_job, *head) -> None:
        """Run ``job(*head, request, invert_labels)`` in a worker thread (a registration, or the
        other result of an earlier run); its record becomes a new run."""
        worker = create_worker(
            job, *head, request, self.invert.isChecked(), _start_thread=False, _ignore_errors=True
        )
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.loss_plot.clear()
        self.progress.setValue(0)
        self.status.setText(f"{request.name}: starting")
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        worker.start()

    def cancel(self) -> None:
        """Cancel the running registration at its next step; nothing it made is kept."""
        if self.worker is not None:
            self.status.setText("cancelling…")
            self.cancel_button.setEnabled(False)
            self.stop_button.setEnabled(False)
            self.worker.quit()

    def stop(self) -> None:
        """End fine-tuning / refinement now and finish the run with the current field."""
        if self.worker is not None:
            self.status.setText("stopping the optimisation; finishing the run…")
            self.stop_button.setEnabled(False)
            self.worker.send(STOP)

    def _on_progress(self, event) -> None:
        self.progress.setValue(int(event.fraction * 1000))
        text = f"{event.stage}: {event.message}"
        if event.loss is not None:
            text += f" — loss {event.loss:.4g}"
            self.loss_plot.add(event.loss, event.stage)
        self.status.setText(text)
        optimising = event.stage in ("finetune", "refine")
        self.stop_button.setEnabled(optimising)
        preview = (event.preview or {}).get("warped")
        if preview is not None and hasattr(preview, "grid"):
            self._show_preview(preview)

    def _show_preview(self, vol) -> None:
        data, affine = for_display(vol.array, vol.grid)
        if self.preview_layer is None or self.preview_layer not in self.viewer.layers:
            self.preview_layer = self.viewer.add_image(
                data,
                name="deepwarp · live preview",
                colormap="magenta",
                blending="additive",
                affine=affine,
                metadata={"deepwarp": {"kind": "preview"}},
            )
        else:
            self.preview_layer.data = data
            self.preview_layer.affine = affine

    def _drop_preview(self) -> None:
        if self.preview_layer is not None and self.preview_layer in self.viewer.layers:
            self.viewer.layers.remove(self.preview_layer)
        self.preview_layer = None

    def _on_returned(self, record) -> None:
        self._drop_preview()
        try:
            self._add_run(record)
            self.compare.set_records(self.records, self._pair())
            self.show_run(record)
        except Exception as exc:  # noqa: BLE001 - a display failure must not crash napari
            for layer in record.layers.values():
                if layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
            notify_error(f"{record.name}: could not show the result: {exc}")
            return
        self.progress.setValue(1000)
        self.tabs.setCurrentWidget(self.result_tab)
        self.status.setText(
            f"{record.name}: done in {record.result.metrics['seconds']['total']:.1f} s"
        )

    def _on_error(self, exc) -> None:
        self._drop_preview()
        if isinstance(exc, (InputError, CheckpointError, FileNotFoundError)):
            notify_error(str(exc))
        elif isinstance(exc, RegistrationFailed):
            notify_error(f"registration failed: {exc}")
        else:
            notify_error(f"registration failed: {type(exc).__name__}: {exc}")
        self.status.setText("failed (see the notification)")

    def _on_aborted(self) -> None:
        self._drop_preview()
        self.status.setText("cancelled; nothing was added")
        notifications.show_info("registration cancelled; nothing was added")

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.stop_button.setEnabled(False)
        self._update_result_buttons()

    # --- results --------------------------------------------------------------------------
    def show_run(self, record) -> None:
        self.current = record
        m = record.result.metrics
        lo, _mean, hi = record.magnitude
        self.run_label.setText(
            f"<b>{html.escape(record.name)}</b><br>Dice {_f(m.get('mean_dice_before'))} → "
            f"{_f(m.get('mean_dice_after'))}; folding {_f(m.get('folding_percent'))} %; "
            f"|u| {lo:.2g}–{hi:.3g} mm"
        )
        self.readout.set_rows(metric_rows(record, per_label=False))
        self.structures.set_metrics(m)
        self._show_verdict(record)
        self._update_result_buttons()

    def _show_verdict(self, record) -> None:
        """The verdict as one coloured line: green improved, amber no better, red worse."""
        verdict = record.result.verdict
        self.other_button.setVisible(verdict is not None and _other_stage(record) is not None)
        if verdict is None:
            self.verdict_label.setText("")
            return
        colour = {"improved": "#3fbf5f", "no better": "#e0a030"}.get(
            next((w for w in ("improved", "no better") if verdict.word.startswith(w)), ""),
            "#f05050",
        )
        self.verdict_label.setText(
            f'<span style="color:{colour}"><b>{html.escape(verdict.word)}</b></span>: '
            f"{html.escape(verdict.line().split(': ', 1)[1])}"
        )
        self.other_button.setText(f"Show the {_other_stage(record)}'s result")

    def show_other_result(self) -> None:
        """Add the other result of the run shown as a new run: the network's result that the
        guard set aside, or the affine stage's instead of the network's (one warp, no new
        registration)."""
        record = self.current
        if self.worker is not None or record is None or record.result.verdict is None:
            return
        number = len(self.records) + 1
        which = _other_stage(record)
        name = f"run {number} · {which} of run {record.number}"
        request = replace(record.request, number=number, name=name)
        self.start(request, switch_job, record)

    def _show_run_number(self, number: int) -> None:
        for record in self.records:
            if record.number == number:
                self.show_run(record)

    def _update_result_buttons(self) -> None:
        have = self.current is not None
        for b in (self.copy_button, self.csv_button, self.export_button, self.field_button):
            b.setEnabled(have)
        tuned = (
            have
            and self.current.request.settings.finetune.steps > 0
            and self.current.result.model is not None
        )
        self.save_button.setEnabled(bool(tuned))

    # --- label names ----------------------------------------------------------------------
    def _names(self):
        """The chosen colour table (None: none, or it could not be read: a notification)."""
        try:
            return self.setup_tab.chosen_names()
        except InputError as exc:
            notify_error(str(exc))
            self.label_names.setCurrentText(NONE)
            return None

    def _names_opened(self, table) -> None:
        """A colour table opened in napari (the plugin's reader): offer it and choose it."""
        self.setup_tab.add_names(table)

    def _names_changed(self, *_):
        """Name the chosen label layers (hovering shows the structure) and the readout."""
        names = self._names()
        meta = labels_meta(names) if names is not None else {"features": {}}
        layers = [self.chosen("fixed labels"), self.chosen("moving labels")]
        if self.current is not None:
            layers += [self.current.layers.get(k) for k in ("labels", "labels → moving")]
        for layer in layers:
            if isinstance(layer, Labels):
                layer.features = meta["features"]
        if self.current is not None and names is not None:
            name_labels(self.current.result.metrics, names)
            self.current.request.label_names = names
            self.show_run(self.current)

    # --- cleanup --------------------------------------------------------------------------
    def closeEvent(self, event):
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Stop the workers and wait for their threads (a thread alive while Qt tears down
        crashed napari on exit)."""
        running = [w for w in (self.worker, self.view_worker) if w is not None]
        for worker in running:
            worker.quit()
        if running:
            type(running[0]).await_workers(msecs=30_000)


def _other_stage(record) -> str | None:
    """What :meth:`DeepwarpWidget.show_other_result` would show for ``record``."""
    result = record.result
    if result.rejected is not None:
        return "network"
    if result.working_field is not None and result.affine is not None:
        return "affine stage"
    return None


def _f(value) -> str:
    return "–" if value is None else f"{value:.3f}"
