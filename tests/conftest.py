"""Shared fixtures: a synthetic registration pair with a known deformation, and a short fit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_deepwarp.core import metrics, spatial


def make_pair(size=(32, 32, 32), n_labels=8, amplitude=3.0, seed=0):
    """A random label-map phantom and a smooth known deformation of it.

    Returns ``moving, fixed`` images ``(1, 1, D, H, W)`` float32 in [0, 1], their label maps
    ``(1, 1, D, H, W)`` int64, and the true pull field ``(1, 3, D, H, W)`` (voxels) with
    ``fixed = warp(moving, field)``.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, n_labels, 8, 8, 8, generator=g)
    logits = torch.nn.functional.interpolate(
        coarse, size=size, mode="trilinear", align_corners=True
    )
    labels = logits.argmax(1, keepdim=True)
    intensities = torch.rand(n_labels, generator=g) * 0.8 + 0.1
    image = intensities[labels]
    image = spatial.warp(image, torch.zeros(1, 3, *size))  # float copy
    field = torch.nn.functional.interpolate(
        torch.randn(1, 3, 4, 4, 4, generator=g), size=size, mode="trilinear", align_corners=True
    )
    field = field * amplitude / field.abs().max()
    fixed = spatial.warp(image, field)
    fixed_labels = spatial.warp(labels.float(), field, mode="nearest").long()
    return image, fixed, labels, fixed_labels, field


RESOURCES = Path(__file__).resolve().parents[1] / "resources"


def load_script(relative: str):
    """A script under ``resources/`` (e.g. ``"training/widen_conv2warp.py"``), imported as a
    module so that tests can call its functions."""
    path = RESOURCES / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_generator(gen):
    """Drain a core progress generator: ``(events, returned value)``."""
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        return events, stop.value


def mean_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    per_label = metrics.overlap_per_label(a[0, 0].numpy(), b[0, 0].numpy())
    return float(np.mean([v["dice"] for v in per_label.values()]))


def fit(model, pair, steps=30, lr=1e-3, seed=0):
    """Adam on the model's own loss; returns losses and label Dice before and after."""
    moving, fixed, moving_labels, fixed_labels, _ = pair
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    history = []
    for _ in range(steps):
        optimiser.zero_grad()
        loss, _ = model.loss(model(moving, fixed), moving, fixed)
        loss.backward()
        optimiser.step()
        history.append(float(loss))
    model.eval()
    with torch.no_grad():
        out = model(moving, fixed)
        final, _ = model.loss(out, moving, fixed)
    warped = spatial.warp(moving_labels.float(), out.displacement, mode="nearest").long()
    return {
        "loss_first": history[0],
        "loss_last": float(final),
        "dice_before": mean_dice(fixed_labels, moving_labels),
        "dice_after": mean_dice(fixed_labels, warped),
        "field": out.displacement,
    }


@pytest.fixture
def registration_pair():
    """Factory: ``registration_pair(size=(32, 32, 32), seed=0)`` -> see :func:`make_pair`."""
    return make_pair


@pytest.fixture
def fit_model():
    """Factory: ``fit_model(model, pair, steps=30, lr=1e-3)`` -> see :func:`fit`."""
    return fit


@pytest.fixture
def one_thread():
    """Small 3D convolutions run faster on one thread than on two busy ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- widget tests (tests/_qt): a real napari viewer under Xvfb, the widget from the manifest
WIDGET = "Deformable registration"


@pytest.fixture
def open_widget(make_napari_viewer):
    """``open_widget(sample=True)`` -> ``(viewer, widget)`` (sample pair loaded first if asked)."""

    def factory(sample: bool = True, **settings):
        viewer = make_napari_viewer()
        _, widget = viewer.window.add_plugin_dock_widget("napari-deepwarp", WIDGET)
        if sample:
            viewer.open_sample("napari-deepwarp", "sample_pair")
        widget.max_size.setValue(settings.get("max_size", 32))
        widget.device.setCurrentText("cpu")
        return viewer, widget

    yield factory


@pytest.fixture
def notes(monkeypatch):
    """Messages passed to napari's show_error / show_info by the widget, in order."""
    from napari.utils import notifications

    seen: list[str] = []
    for name in ("show_error", "show_info", "show_warning"):
        original = getattr(notifications, name)

        def record(message, _original=original, _name=name):
            seen.append(f"{_name}: {message}")
            _original(message)

        monkeypatch.setattr(notifications, name, record)
    return seen
