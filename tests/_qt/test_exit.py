"""napari exits cleanly after a run: a fresh interpreter registers in the widget, shows the views
whose layers and threads outlive the run (inverse map, grid, labels), closes the viewer, exits.

Issue 20 saw a segmentation fault on exit under PyQt6 (exit code -11/139); it did not reproduce
here under PySide6 nor PyQt6 6.11 (with napari 0.9.2), before or after the widget started to stop
and wait for its worker threads on close, so this test guards the exit code rather than a known
cause. Each Qt binding that is installed is tried (QT_API picks it)."""

import importlib.util
import os
import subprocess
import sys

import pytest

SCRIPT = """
import time
import napari
from qtpy.QtWidgets import QApplication

viewer = napari.Viewer(show=True)
_, w = viewer.window.add_plugin_dock_widget("napari-deepwarp", "Deformable registration")
viewer.open_sample("napari-deepwarp", "sample_pair")
w.device.setCurrentText("cpu")
w.max_size.setValue(32)
w.mode.setCurrentIndex(2)
w.steps.setValue(10)
w.run()
while w.worker is not None:
    QApplication.processEvents()
    time.sleep(0.01)
for view in ("labels → moving", "grid", "labels"):
    w.set_view(view)
    while w.view_worker is not None:
        QApplication.processEvents()
        time.sleep(0.01)
assert len(w.records) == 1 and len(w.records[0].views) == 2
w.steps.setValue(5000)
w.run()  # still running when the viewer closes: the widget stops it and waits
for _ in range(100):
    QApplication.processEvents()
    time.sleep(0.01)
viewer.close()
print("closed", flush=True)
"""

BINDINGS = [
    b
    for b in ("pyside6", "pyqt6", "pyqt5")
    if importlib.util.find_spec({"pyside6": "PySide6", "pyqt6": "PyQt6", "pyqt5": "PyQt5"}[b])
]


@pytest.mark.parametrize("api", BINDINGS)
def test_napari_exits_with_code_0_after_a_run(api):
    env = {**os.environ, "QT_API": api}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert "closed" in done.stdout
