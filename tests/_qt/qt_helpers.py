"""Helpers for widget tests."""


def wait_idle(qtbot, widget, timeout=180_000):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)
