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
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
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
from napari_deepwarp.core.io import InputError, check_image, check_labels_match
from napari_deepwarp.core.label_names import name_labels
from napari_deepwarp.core.pipeline import AFFINE_ONLY, RegistrationSettings
from napari_deepwarp.core.progress import STOP
from napari_deepwarp.core.refine import RefineSettings
from napari_deepwarp.layers import (
    LABEL_WORDS,
    data_to_world,
    for_display,
    on_label_names,
    opened_label_names,
    volume_from_layer,
)

from .checkpoint_choice import BROWSE, CheckpointChoice
from .compare import CompareRuns
from .exports import RunExports, notify_error
from .loss_plot import LossPlot
from .readout import metric_rows
from .result_layers import labels_meta
from .result_tab import ResultTab
from .result_view import ResultView
from .setup_tab import NONE, ROLES, SIMILARITIES, SetupTab, VerticalScroll
from .worker import RegistrationFailed, RunRequest, run_job, switch_job


def _ours(layer) -> dict | None:
    """The ``deepwarp`` marker of a layer this widget made (None for the user's layers)."""
    meta = getattr(layer, "metadata", None) or {}
    return meta.get("deepwarp")


class DeepwarpWidget(CheckpointChoice, RunExports, ResultView, QWidget):
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
        default = FinetuneSettings() if mode == "finetune" else RefineSettings()
        self.reg_weight.setValue(default.reg_weight)
        self.steps.setValue(100 if mode == "finetune" else 150)
        self._suggest_max_size()

    # --- layer choosers -------------------------------------------------------------------
    def _on_inserted(self, event) -> None:
        event.value.events.name.connect(self.refresh_layers)
        self.refresh_layers()

    def refresh_layers(self, *_) -> None:
        """Refill the choosers; keep the user's choices, auto-pick the others by name and order."""
        layers = [
            layer for layer in self.viewer.layers if (_ours(layer) or {}).get("kind") != "preview"
        ]
        picked: dict[str, str] = {}
        for role, (kind, optional) in ROLES.items():
            box = self.choosers[role]
            names = [layer.name for layer in layers if isinstance(layer, kind)]
            current = box.currentText()
            if role in self._user_chosen and (current in names or current == NONE):
                choice = current
            else:
                self._user_chosen.discard(role)
                choice = self._auto_pick(role, layers, picked)
            picked[role] = choice
            box.blockSignals(True)
            box.clear()
            box.addItems(([NONE] if optional else []) + names)
            box.setCurrentText(choice if choice else "")
            if not optional and not choice:
                box.setCurrentIndex(-1)
            box.blockSignals(False)
        self._pair_changed()

    @staticmethod
    def _auto_pick(role: str, layers: list, picked: dict) -> str:
        kind, optional = ROLES[role]
        side = role.split()[0]
        other = "moving" if side == "fixed" else "fixed"
        candidates = [
            layer.name for layer in layers if isinstance(layer, kind) and not _ours(layer)
        ]
        if kind is Image:
            candidates = [n for n in candidates if not any(w in n.lower() for w in LABEL_WORDS)]
        named = [n for n in candidates if side in n.lower() and other not in n.lower()]
        if named:
            return named[0]
        if optional:
            unnamed = [
                n for n in candidates if "fixed" not in n.lower() and "moving" not in n.lower()
            ]
            if len(candidates) >= 2 and len(unnamed) == len(candidates):
                return candidates[0] if side == "fixed" else candidates[1]
            return NONE
        taken = picked.get("fixed") if side == "moving" else None
        rest = [n for n in candidates if n != taken and other not in n.lower()]
        rest = rest or [n for n in candidates if n != taken]
        return rest[0] if rest else ""

    def chosen(self, role: str):
        """The layer chosen for ``role`` (None for none)."""
        name = self.choosers[role].currentText()
        if not name or name == NONE or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]

    def _pair(self) -> tuple[str, str]:
        return self.choosers["fixed"].currentText(), self.choosers["moving"].currentText()

    def _pair_changed(self, *_):
        if hasattr(self, "compare"):
            self.compare.set_records(self.records, self._pair())

    # --- a run ----------------------------------------------------------------------------
    def build_request(self) -> RunRequest:
        """Read the chosen layers into volumes (copies) and the settings; ``InputError`` on a
        bad choice (nothing is changed)."""
        fixed_layer, moving_layer = self.chosen("fixed"), self.chosen("moving")
        if fixed_layer is None or moving_layer is None:
            raise InputError("choose a fixed and a moving image layer (3D images)")
        if fixed_layer is moving_layer:
            raise InputError(
                f"{fixed_layer.name}: fixed and moving are the same layer; "
                "choose two different images"
            )
        for layer in (fixed_layer, moving_layer):
            _check_3d(layer)
        fixed, moving = _image_volume(fixed_layer), _image_volume(moving_layer)
        check_image(fixed, "fixed")
        check_image(moving, "moving")
        labels = {}
        for side, image_layer, image in (
            ("fixed", fixed_layer, fixed),
            ("moving", moving_layer, moving),
        ):
            layer = self.chosen(f"{side} labels")
            if layer is None:
                labels[side] = None
                continue
            _check_3d(layer)
            if tuple(layer.data.shape) != tuple(image_layer.data.shape):
                raise InputError(
                    f"{layer.name}: {side} labels have shape {tuple(layer.data.shape)} but "
                    f"{image_layer.name} has {tuple(image_layer.data.shape)}; choose the label "
                    "layer drawn on that image"
                )
            vol = volume_from_layer(layer)
            check_labels_match(vol, image, side)
            labels[side] = vol
        fixed_points, moving_points = self._landmarks()
        settings = self._settings(labels, fixed_points is not None)
        if settings.affine and settings.affine_from == "labels" and None in labels.values():
            raise InputError(
                "affine from labels: choose a label layer for both fixed and moving, or let the "
                "affine stage align the images"
            )
        checkpoint = self.checkpoint.currentData()
        use_checkpoint = checkpoint not in ("", BROWSE) and settings.model != AFFINE_ONLY
        return RunRequest(
            number=len(self.records) + 1,
            name=self._run_name(settings, Path(checkpoint) if use_checkpoint else None),
            fixed=fixed,
            moving=moving,
            settings=settings,
            checkpoint=Path(checkpoint) if use_checkpoint else None,
            fixed_labels=labels["fixed"],
            moving_labels=labels["moving"],
            fixed_landmarks=fixed_points,
            moving_landmarks=moving_points,
            pair=(fixed_layer.name, moving_layer.name),
            label_names=self._names(),
        )

    def _landmarks(self):
        layers = [self.chosen("fixed points"), self.chosen("moving points")]
        if layers == [None, None]:
            return None, None
        if None in layers:
            raise InputError("landmarks: choose a Points layer for both fixed and moving, or none")
        points = []
        for layer in layers:
            if layer.ndim != 3:
                raise InputError(f"{layer.name}: landmarks must be 3D points, got {layer.ndim}D")
            m = data_to_world(
                layer.affine, layer.scale, layer.translate, layer.rotate, layer.shear, 3
            )
            data = np.asarray(layer.data, float)
            world_zyx = data @ m[:3, :3].T + m[:3, 3]
            points.append(world_zyx[:, ::-1].copy())  # (x, y, z) mm LPS
        if len(points[0]) != len(points[1]) or len(points[0]) == 0:
            raise InputError(
                f"landmarks: {layers[0].name} has {len(points[0])} points and {layers[1].name} "
                f"{len(points[1])}; give the same (non-zero) number of corresponding points"
            )
        return points[0], points[1]

    def _settings(self, labels: dict, landmarks: bool) -> RegistrationSettings:
        mode = self.mode.currentData()
        steps = self.steps.value()
        finetune = FinetuneSettings(steps=steps if mode == "finetune" else 0)
        refine = RefineSettings(steps=steps if mode == "refine" else 0)
        target = finetune if mode == "finetune" else refine
        similarity = self.similarity.currentText()
        if similarity != SIMILARITIES[0]:
            target.similarity = similarity
            if similarity == "lncc" and mode == "finetune":
                target.similarity_kwargs = {"window": 7}
            elif mode == "refine":
                target.similarity_kwargs = {"window": 7} if similarity == "lncc" else {}
        target.reg_weight = self.reg_weight.value()
        if labels["fixed"] is not None and labels["moving"] is not None:
            target.labels_weight = self.labels_weight.value()
        if landmarks:
            target.landmarks_weight = self.landmarks_weight.value()
        return RegistrationSettings(
            model=self.model.currentText(),
            affine=self.affine.isChecked(),
            affine_from=self.affine_from.currentText(),
            device=self.device.currentText(),
            precision=self.precision.currentText(),
            max_size=self.max_size.value(),
            finetune=finetune,
            refine=refine,
        )

    def _run_name(self, settings: RegistrationSettings, checkpoint: Path | None) -> str:
        parts = [f"run {len(self.records) + 1}", settings.model]
        if settings.model != AFFINE_ONLY:
            parts.append(checkpoint.stem if checkpoint else "untrained")
        if settings.finetune.steps:
            parts.append(f"finetune {settings.finetune.steps}")
        if settings.refine.steps:
            parts.append(f"refine {settings.refine.steps}")
        for tuned, default in (
            (settings.finetune, FinetuneSettings()),
            (settings.refine, RefineSettings()),
        ):
            if tuned.steps and tuned.similarity != default.similarity:
                parts.append(str(tuned.similarity))
            if tuned.steps and tuned.reg_weight != default.reg_weight:
                parts.append(f"reg {tuned.reg_weight:g}")
        if not settings.affine and settings.model != AFFINE_ONLY:
            parts.append("no affine")
        elif settings.affine and settings.affine_from == "labels":
            parts.append("affine from labels")
        if settings.model != AFFINE_ONLY and settings.precision != "auto":
            parts.append(settings.precision)
        return " · ".join(parts)

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


def _check_3d(layer) -> None:
    if getattr(layer, "rgb", False) or layer.ndim != 3:
        raise InputError(
            f"{layer.name}: the layer is {layer.ndim}D with shape {tuple(layer.data.shape)}"
            f"{' (RGB)' if getattr(layer, 'rgb', False) else ''}; deepwarp registers 3D volumes "
            "(z, y, x) — choose a 3D layer"
        )
    if min(layer.data.shape) < 2:
        raise InputError(f"{layer.name}: shape {tuple(layer.data.shape)} is a single slice")


def _image_volume(layer):
    vol = volume_from_layer(layer)
    vol.array = vol.array.astype(np.float32, copy=False)
    return vol
