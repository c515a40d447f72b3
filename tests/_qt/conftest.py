"""Fixtures for widget tests: a real napari viewer (under Xvfb) with the dock widget opened
through the plugin manifest, and a collector of the notifications it shows."""

from __future__ import annotations

import pytest

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


def wait_idle(qtbot, widget, timeout=180_000):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)
