"""Screenshot of the demo result in napari, for the README (needs a display: xvfb-run works).

    xvfb-run -a python resources/make_screenshots.py

Registers the built-in sample pair with field refinement and shows the fixed image (green) and
the warped moving image (magenta, additive) before and after, side by side in napari's grid mode
(demo_overlay.png). Then drives the dock widget: a run on the sample pair (widget_run.png) and the
comparison of three runs side by side (compare.png).

    xvfb-run -a -s "-screen 0 1600x1100x24" python resources/make_screenshots.py --real

instead drives the widget on two real Mindboggle brains with their label maps (read from
``../shared/data/mindboggle``, not shipped) and the shipped colour table: the result as it appears
after a run (widget_brains.png), its deformation grid (widget_brains_grid.png), |u| as a volume
rendering inside the fixed brain in napari's 3D view (widget_brains_3d.png), and prints the
largest event-loop gap during the run and the run's time.
"""

import time
from pathlib import Path

import napari

from napari_deepwarp._qt.compare import grid_settings
from napari_deepwarp.api import register
from napari_deepwarp.core.io import read_volume
from napari_deepwarp.core.preprocess import resample
from napari_deepwarp.resources import sample_pair_paths

OUT = Path(__file__).resolve().parent / "screenshots"


def main() -> None:
    paths = sample_pair_paths()
    fixed, moving = read_volume(paths["fixed"]), read_volume(paths["moving"])
    result = register(fixed, moving, refine_steps=150, device="cpu", max_size=64)
    before = resample(moving, fixed.grid)
    viewer = napari.Viewer(show=True, title="napari-deepwarp")
    affine = fixed.grid.napari_affine()
    for name, vol in (("before: moving", before), ("after: warped moving", result.warped)):
        viewer.add_image(
            fixed.array,
            name=f"fixed ({name.split(':')[0]})",
            colormap="green",
            blending="additive",
            affine=affine,
        )
        viewer.add_image(
            vol.array, name=name, colormap="magenta", blending="additive", affine=affine
        )
    grid_settings(viewer).enabled = True
    grid_settings(viewer).stride = 2
    viewer.dims.set_point(0, float(viewer.dims.range[0].start + viewer.dims.range[0].stop) / 2)
    viewer.window.resize(1100, 600)
    OUT.mkdir(exist_ok=True)
    viewer.screenshot(str(OUT / "demo_overlay.png"), canvas_only=True, size=(560, 1100))
    viewer.close()


def _wait(widget) -> None:
    from qtpy.QtWidgets import QApplication

    while widget.worker is not None:
        QApplication.processEvents()
        time.sleep(0.02)
    QApplication.processEvents()


def widget_screenshots() -> None:
    """The dock widget after a run on the sample pair, and the comparison of three runs."""
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True, title="napari-deepwarp")
    viewer.window.resize(1500, 1000)
    _, widget = viewer.window.add_plugin_dock_widget("napari-deepwarp", "Deformable registration")
    viewer.open_sample("napari-deepwarp", "sample_pair")
    widget.device.setCurrentText("cpu")
    widget.max_size.setValue(64)
    widget.mode.setCurrentIndex(2)  # field refinement
    widget.steps.setValue(150)
    widget.run()
    _wait(widget)
    viewer.dims.set_point(0, sum(viewer.dims.range[0][:2]) / 2)
    viewer.reset_view()
    viewer.screenshot(str(OUT / "widget_run.png"), canvas_only=False)

    widget.model.setCurrentText("affine")
    widget.mode.setCurrentIndex(0)
    widget.run()
    _wait(widget)
    widget.model.setCurrentText("voxelmorph")
    widget.mode.setCurrentIndex(2)
    widget.steps.setValue(150)
    widget.reg_weight.setValue(0.5)
    widget.run()
    _wait(widget)
    widget.tabs.setCurrentWidget(widget.compare)
    widget.compare.select_runs({1, 2, 3})
    widget.compare.side_by_side.setChecked(True)
    grid_settings(viewer).stride = 1
    QApplication.processEvents()
    viewer.reset_view()
    QApplication.processEvents()
    viewer.screenshot(str(OUT / "compare.png"), canvas_only=False)
    viewer.close()


def real_screenshots(data: Path) -> None:
    """The widget after the default run on Mindboggle 1 <- 2 with labels and their names."""
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_deepwarp.resources import resources_dir

    viewer = napari.Viewer(show=True, title="napari-deepwarp")
    viewer.window.resize(1550, 1050)
    _, widget = viewer.window.add_plugin_dock_widget("napari-deepwarp", "Deformable registration")
    names = {}
    for side, subject in (("fixed", 1), ("moving", 2)):
        for kind in ("t1", "labels"):
            path = data / f"oasis_trt20_{subject}_{kind}.nii.gz"
            viewer.open(path, plugin="napari-deepwarp")
            names[f"{side} labels" if kind == "labels" else side] = path.name.split(".")[0]
    for role, name in names.items():
        widget.choosers[role].setCurrentText(name)
    viewer.open(
        resources_dir() / "label_names" / "mindboggle_dkt_LUT.txt", plugin="napari-deepwarp"
    )
    widget.device.setCurrentText("cpu")
    QApplication.processEvents()
    gaps = {"largest": 0.0, "last": time.perf_counter()}

    def tick():
        now = time.perf_counter()
        gaps["largest"] = max(gaps["largest"], now - gaps["last"])
        gaps["last"] = now

    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(tick)
    start = time.perf_counter()
    gaps["last"] = start
    timer.start()
    widget.run()
    _wait(widget)
    for _ in range(25):
        QApplication.processEvents()
        time.sleep(0.02)
    timer.stop()
    wall = time.perf_counter() - start - 0.5
    seconds = widget.records[0].result.metrics["seconds"]["total"]
    print(
        f"widget run {wall:.1f} s (pipeline {seconds:.1f} s); largest event-loop gap "
        f"{gaps['largest']:.2f} s"
    )
    widget.structures.filter.setText("hippocampus")
    viewer.dims.set_point(0, sum(viewer.dims.range[0][:2]) / 2 + 20)
    viewer.reset_view()
    QApplication.processEvents()
    viewer.screenshot(str(OUT / "widget_brains.png"), canvas_only=False)
    widget.structures.filter.setText("")
    widget.view_buttons["grid"].click()
    QApplication.processEvents()
    viewer.screenshot(str(OUT / "widget_brains_grid.png"), canvas_only=True)
    widget.view_buttons["|u|"].click()
    while widget.view_worker is not None:
        QApplication.processEvents()
        time.sleep(0.02)
    viewer.dims.ndisplay = 3
    getattr(viewer, "scene", viewer).camera.angles = (0, 30, 60)
    QApplication.processEvents()
    viewer.screenshot(str(OUT / "widget_brains_3d.png"), canvas_only=True)
    viewer.close()


if __name__ == "__main__":
    import sys

    if "--real" in sys.argv:
        real_screenshots(Path(__file__).resolve().parents[2] / "shared" / "data" / "mindboggle")
    else:
        main()
        widget_screenshots()
