"""One registration run as a generator for napari's ``create_worker``: request in, record out.

The widget builds a :class:`RunRequest` on the main thread (volumes already copied from layers),
:func:`run_job` loads the checkpoint, drains ``pipeline.register`` (re-yielding its
:class:`Progress`), measures peak memory, names the labels, prepares what the main thread will
show (the warped layer's data and display limits, the |u| range), and returns a
:class:`RunRecord`. Inspection views, and the fixed labels taken into moving space through the
inverse map, are computed only when asked for (:func:`view_job`, also in a worker). Closing the
generator (``worker.quit()``) cancels at the next yield; a value sent into it (``worker.send``)
reaches the pipeline's yields.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (after a reset); elsewhere the growth of
the process's resident set size (psutil), sampled at every progress event ("RSS, sampled").
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from napari_deepwarp.core.checkpoint import CheckpointError, load_checkpoint
from napari_deepwarp.core.gpu import release_memory, with_oom_fallback
from napari_deepwarp.core.inverse import invert_deformation, warp_to_moving
from napari_deepwarp.core.io import InputError
from napari_deepwarp.core.label_names import LabelNames, name_labels
from napari_deepwarp.core.pipeline import (
    RegistrationResult,
    RegistrationSettings,
    alternative,
    deformation_of,
    inverse_transform,
    register,
)
from napari_deepwarp.core.preprocess import resample
from napari_deepwarp.core.progress import Progress
from napari_deepwarp.core.volume import Volume

from .result_layers import view_layers, warped_layer


class RegistrationFailed(Exception):
    """A run failed for a reason other than bad input (the message says where)."""


@dataclass
class RunRequest:
    """Everything a run needs, read from the layers on the main thread.

    Landmarks: ``(N, 3)`` physical (x, y, z) mm LPS. ``pair``: the (fixed, moving) layer names.
    """

    number: int
    name: str
    fixed: Volume
    moving: Volume
    settings: RegistrationSettings
    checkpoint: Path | None = None
    fixed_labels: Volume | None = None
    moving_labels: Volume | None = None
    fixed_landmarks: np.ndarray | None = None
    moving_landmarks: np.ndarray | None = None
    pair: tuple[str, str] = ("", "")
    label_names: LabelNames | None = None


@dataclass
class RunRecord:
    """A finished run: its request, the pipeline's result and what the widget adds."""

    request: RunRequest
    result: RegistrationResult
    card: dict | None = None
    inverse_labels: Volume | None = None
    peak_memory_mb: float | None = None
    memory_method: str = ""
    layers: dict = field(default_factory=dict)
    #: the warped layer's ``(data, meta, layer_type)``, prepared in the worker
    warped_layer: tuple | None = None
    #: |u| (mm) min, mean, max
    magnitude: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: inspection views already computed: ``{view: [(data, meta, layer_type), ...]}``
    views: dict = field(default_factory=dict)

    @property
    def number(self) -> int:
        return self.request.number

    @property
    def name(self) -> str:
        return self.request.name


class _Memory:
    """Peak memory of a run in MB: CUDA allocator peak, else sampled RSS growth."""

    def __init__(self, device: str):
        self.cuda = device in ("cuda", "auto") and torch.cuda.is_available()
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else "RSS growth, sampled"
        self.process = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                import psutil

                self.process = psutil.Process()
                self.start = self.peak = self.process.memory_info().rss
            except ImportError:  # pragma: no cover - psutil comes with napari
                self.method = "unavailable"

    def sample(self) -> None:
        if self.process is not None:
            self.peak = max(self.peak, self.process.memory_info().rss)

    def peak_mb(self) -> float | None:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        if self.process is None:
            return None
        self.sample()
        return (self.peak - self.start) / 2**20


def _drain(gen: Generator, memory: _Memory):
    """``yield from gen`` that samples memory at every event and closes ``gen`` when closed."""
    value = None
    try:
        while True:
            try:
                event = gen.send(value)
            except StopIteration as stop:
                return stop.value
            memory.sample()
            value = yield event
    finally:
        gen.close()


def run_job(
    request: RunRequest, invert_labels: bool = False
) -> Generator[Progress, None, RunRecord]:
    """Run one registration; yields :class:`Progress`, returns a :class:`RunRecord`.

    ``invert_labels``: also take the fixed labels into moving space now (the inverse map, slow
    on big volumes; otherwise the Result tab's "labels → moving" view computes it when asked).
    Bad input raises ``InputError``/``CheckpointError``; any other failure ``RegistrationFailed``
    (never a bare ``RuntimeError``, which napari's worker would swallow as an aborted thread).
    """
    try:
        yield Progress(0, 1, "starting", stage="load")
        model, card = None, None
        if request.checkpoint is not None:
            model, card = load_checkpoint(request.checkpoint, device="cpu")
        memory = _Memory(request.settings.device)

        def attempt(settings):
            return register(
                request.fixed,
                request.moving,
                settings,
                model,
                request.fixed_labels,
                request.moving_labels,
                request.fixed_landmarks,
                request.moving_landmarks,
            )

        # out of GPU memory: a smaller working grid, then the CPU (a progress message says so)
        result = yield from _drain(with_oom_fallback(attempt, request.settings), memory)
        release_memory(request.settings.device)
        record = RunRecord(request=request, result=result, card=card)
        return (yield from _finish(record, memory, invert_labels))
    except (InputError, CheckpointError, FileNotFoundError):
        raise
    except Exception as exc:
        raise RegistrationFailed(f"{request.name}: {type(exc).__name__}: {exc}") from exc


def switch_job(
    record: RunRecord, request: RunRequest, invert_labels: bool = False
) -> Generator[Progress, None, RunRecord]:
    """The other result of ``record``'s run (:func:`pipeline.alternative`: the network's result
    that the guard set aside, or the affine stage's) as a new record for ``request`` (the same
    request with its own number and name)."""
    try:
        memory = _Memory(request.settings.device)
        result = yield from _drain(alternative(record.result), memory)
        new = RunRecord(request=request, result=result, card=record.card)
        return (yield from _finish(new, memory, invert_labels))
    except Exception as exc:
        raise RegistrationFailed(f"{request.name}: {type(exc).__name__}: {exc}") from exc


def _finish(record: RunRecord, memory: _Memory, invert_labels: bool) -> Generator:
    """Names, display data and memory of a finished run (worker thread, not the main one)."""
    request, result = record.request, record.result
    yield Progress(0, 1, "preparing the display", stage="display")
    name_labels(result.metrics, request.label_names)
    record.warped_layer = warped_layer(result, request.number)
    magnitude = np.linalg.norm(result.displacement, axis=-1)
    record.magnitude = (float(magnitude.min()), float(magnitude.mean()), float(magnitude.max()))
    del magnitude
    if invert_labels:
        record.inverse_labels = yield from _inverse_labels(request, result)
    record.peak_memory_mb = memory.peak_mb()
    record.memory_method = memory.method
    return record


def view_job(record: RunRecord, view: str) -> Generator[Progress, None, list]:
    """The layers of an inspection ``view`` of ``record`` (computing the inverse map first for
    "labels → moving"); cached in ``record.views``."""
    if view not in record.views:
        if view == "labels → moving" and record.inverse_labels is None:
            record.inverse_labels = yield from _inverse_labels(record.request, record.result)
        yield Progress(0, 1, f"preparing the {view} view", stage="display")
        record.views[view] = view_layers(
            record.result, view, record.number, record.request.label_names, record.inverse_labels
        )
    return record.views[view]


def _inverse_labels(request: RunRequest, result: RegistrationResult) -> Generator:
    """The fixed labels taken into moving space through the inverse map (None without them)."""
    if request.fixed_labels is None:
        return None
    t = time.perf_counter()
    yield Progress(0, 1, "fixed labels into moving space (inverse map)", stage="inverse")
    if result.inverse_field is not None:  # a diffeomorphic refinement's exact inverse
        transform = inverse_transform(result)
        inverse = resample(request.fixed_labels, request.moving.grid, transform, "nearest")
    else:
        d = deformation_of(result)
        w = invert_deformation(d, result.fixed.grid, iterations=30, tolerance_mm=0.01)
        inverse = warp_to_moving(
            request.fixed_labels, request.moving.grid, w, result.fixed.grid, result.affine, True
        )
    inverse.name = f"{request.fixed_labels.name} in moving space"
    result.metrics.setdefault("seconds", {})["inverse"] = time.perf_counter() - t
    return inverse
