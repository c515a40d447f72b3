"""What the viewer shows of a run: a calm overlay, and one inspection view at a time.

A mixin of :class:`.widget.DeepwarpWidget` (it uses the dock's ``viewer``, ``records``,
``current``, ``slots``, ``result_tab`` and ``compare``). After a run the fixed image (green) and
the warped moving image (magenta) are shown in additive blending and nothing covers them: the
chosen input label layers are hidden, and the earlier run's warped layer becomes this run's
(with "keep earlier runs' layers" each run keeps its own, hidden; the records stay, so Compare
shows every run, putting a run's warped layer back where needed). An inspection view's layers
are computed on first use in a worker thread (:func:`.worker.view_job`), cached in the record,
and shown in three reused layers ("slots": an image, a labels and a vectors layer), so layers
never pile up.

The main thread never waits on a big volume: a run adds or refills one layer, whose display data
and contrast limits were prepared in the run's worker, and nothing is ever removed from the
layer list (napari runs a full garbage collection for every layer removed, ~0.3 s here).
"""

from __future__ import annotations

from napari.layers import Layer
from napari.qt.threading import create_worker

from .exports import notify_error
from .grid_paths import DeformationGrid
from .result_layers import VIEW_SHOWS_FIXED, VIEW_SHOWS_WARPED, grid_layer, grid_segments
from .worker import view_job


class ResultView:
    view_worker = None
    shown_view = "overlay"
    #: the inspection layers, reused by every view and run: {"image": Layer, "labels": Layer}
    slots: dict

    # --- a new run ------------------------------------------------------------------------
    def _add_run(self, record) -> None:
        """Show ``record``: its warped layer over the fixed image, earlier runs out of the way
        (their warped layer is reused for this run's, or hidden with "keep earlier runs'
        layers"; the inspection slots are hidden until a view is chosen)."""
        keep = self.result_tab.keep_runs.isChecked()
        reuse = None
        for previous in self.records:
            layer = previous.layers.get("warped")
            if layer is not None and layer in self.viewer.layers:
                layer.visible = False
                if not keep and reuse is None:
                    reuse = previous.layers.pop("warped")
        for layer in self.slots.values():
            if layer in self.viewer.layers:
                layer.visible = False
        for layer in (self.chosen("fixed labels"), self.chosen("moving labels")):
            if layer is not None:
                layer.visible = False
        if reuse is not None:
            record.layers["warped"] = reuse
            self._fill(reuse, record.warped_layer)
        else:
            layer = record.layers["warped"] = Layer.create(*record.warped_layer)
            self.viewer.add_layer(layer)
        record.layers["warped"].visible = True
        fixed, moving = self._pair_layers(record)
        if fixed is not None:
            fixed.visible = True
            fixed.colormap, fixed.blending = "green", "additive"
        if moving is not None:
            moving.visible = False
        self.records.append(record)
        self.current = record
        self.shown_view = "overlay"
        self.result_tab.check_view("overlay")

    def _pair_layers(self, record):
        by_name = {layer.name: layer for layer in self.viewer.layers}
        return tuple(by_name.get(n) for n in record.request.pair)

    def ensure_warped(self, record):
        """``record``'s warped layer in the viewer (added back, hidden, if it was removed)."""
        layer = record.layers.get("warped")
        if layer is None:
            layer = record.layers["warped"] = Layer.create(*record.warped_layer)
        if layer not in self.viewer.layers:
            layer.visible = False
            self.viewer.add_layer(layer)
        return layer

    # --- inspection views -----------------------------------------------------------------
    def set_view(self, view: str) -> None:
        """Show one view of the current run (see :data:`.result_layers.VIEWS`); the previous
        view's layers leave the layer list. Views not computed yet are computed in a worker."""
        record = self.current
        if record is None:
            return
        self.result_tab.check_view(view)
        self.shown_view = view
        if view in ("overlay", "grid") or view in record.views:
            self._show_view(record, view)
            return
        if view in ("labels", "labels → moving") and not self._has_labels(record, view):
            notify_error(f"{view}: this run has no {self._labels_side(view)} labels")
            self._show_view(record, "overlay")
            return
        if self.view_worker is not None:
            return
        self.status.setText(f"{record.name}: preparing the {view} view…")
        worker = create_worker(view_job, record, view, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(lambda event: self.status.setText(event.message))
        worker.returned.connect(lambda _layers: self._view_ready(record, view))
        worker.errored.connect(lambda exc: notify_error(f"{view} view failed: {exc}"))
        worker.finished.connect(self._view_finished)
        self.view_worker = worker
        worker.start()

    @staticmethod
    def _labels_side(view: str) -> str:
        return "moving" if view == "labels" else "fixed"

    @staticmethod
    def _has_labels(record, view: str) -> bool:
        if view == "labels":
            return record.result.warped_labels is not None
        return record.request.fixed_labels is not None

    def _view_ready(self, record, view: str) -> None:
        self.status.setText(f"{record.name}: {view}")
        if self.current is record and self.shown_view == view:
            self._show_view(record, view)

    def _view_finished(self) -> None:
        self.view_worker = None

    def _show_view(self, record, view: str) -> None:
        """Put ``view``'s layers in the inspection slots (one image, one labels layer: their
        data and look change in place) and hide what the view does not show. Nothing is
        removed: napari runs a full garbage collection for every layer removed (~0.3 s here)."""
        used = set()
        for data in record.views.get(view, []):
            slot = data[2]
            used.add(slot)
            self._fill_slot(slot, data)
        for slot, layer in self.slots.items():
            if slot not in used and slot != "vectors" and layer in self.viewer.layers:
                layer.visible = False
        grid = self.slots.get("vectors")
        if view != "grid" and grid is not None and grid in self.viewer.layers:
            grid.visible = False
        if view == "grid":
            self._fill_slot("vectors", self._grid_data(record))
            used.add("vectors")
        warped = record.layers.get("warped")
        if warped is not None:
            warped.visible = view in VIEW_SHOWS_WARPED
        fixed, moving = self._pair_layers(record)
        if fixed is not None:
            fixed.visible = VIEW_SHOWS_FIXED[view]
        if moving is not None:
            moving.visible = view == "labels → moving"

    def _fill_slot(self, slot: str, data: tuple) -> None:
        """Show ``(data, meta, layer_type)`` in the slot's layer (made on first use)."""
        layer = self.slots.get(slot)
        if layer is None or layer not in self.viewer.layers:
            layer = self.slots[slot] = Layer.create(*data)
            if slot == "vectors":
                layer.events.visible.connect(self._schedule_regrid)
            self.viewer.add_layer(layer)
        else:
            self._fill(layer, data)
        if slot == "labels":
            layer.contour = data[1]["metadata"]["deepwarp"].get("contour", 0)
        layer.visible = True

    @staticmethod
    def _fill(layer, data: tuple) -> None:
        """Give an existing layer new ``(data, meta, layer_type)`` (same layer type)."""
        array, meta, _ = data
        visible = layer.visible
        layer.visible = False
        layer.affine = meta["affine"]
        layer.data = array
        for key in ("colormap", "blending", "opacity", "rendering", "features", "edge_color"):
            if key in meta:
                setattr(layer, key, meta[key])
        if "contrast_limits" in meta:
            layer.contrast_limits_range = meta["contrast_limits"]
            layer.contrast_limits = meta["contrast_limits"]
        layer.name = meta["name"]
        layer.metadata = meta["metadata"]
        layer.visible = visible

    def _grid_data(self, record) -> tuple:
        deformation = DeformationGrid(record.result.displacement, record.result.fixed.grid)
        axes, point = self._displayed_slice()
        data = grid_segments(deformation, self.grid_spacing.value(), axes, point)
        return grid_layer(deformation, record.number, data)

    # --- the grid follows the slice -------------------------------------------------------
    def _displayed_slice(self):
        """The two displayed axes and the world point of the slice shown (None: unknown)."""
        import numpy as np

        dims = self.viewer.dims
        if dims.ndim != 3:  # the run layers are 3D; with other layers about, draw the middle
            return (1, 2), None
        return tuple(int(a) for a in dims.order[-2:]), np.asarray(dims.point, float)

    def _schedule_regrid(self, *_args) -> None:
        self._regrid_timer.start()

    def _regrid(self, *_args) -> None:
        """Redraw the deformation grid of the run shown for the slice shown and the spacing."""
        layer = self.slots.get("vectors")
        if layer is None or layer not in self.viewer.layers or not layer.visible:
            return
        if self.current is not None:
            layer.data = self._grid_data(self.current)[0]
