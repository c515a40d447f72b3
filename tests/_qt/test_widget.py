"""The dock widget on a real viewer: runs, results in physical space, cancel, bad choices,
comparison, exports and fine-tuned checkpoints. Runs are tiny (working grid 32, ~20 steps)."""

from __future__ import annotations

import numpy as np
import pytest
from qt_helpers import wait_idle

from napari_deepwarp._qt.compare import grid_settings
from napari_deepwarp.core.checkpoint import (
    default_checkpoint,
    load_checkpoint,
    make_card,
    read_card,
    save_checkpoint,
)
from napari_deepwarp.core.io import read_volume
from napari_deepwarp.core.models.registry import create_model
from napari_deepwarp.layers import data_to_world


def _matrix(layer):
    return data_to_world(
        layer.affine, layer.scale, layer.translate, layer.rotate, layer.shear, layer.ndim
    )


def _names(viewer):
    return [layer.name for layer in viewer.layers]


def _visible(viewer):
    return [layer.name for layer in viewer.layers if layer.visible]


def _show(w, qtbot, view):
    """Click a view's button and wait until its layers are in."""
    w.view_buttons[view].click()
    qtbot.waitUntil(lambda: w.view_worker is None, timeout=120_000)


def test_sample_pair_is_picked_and_a_run_shows_its_layers(open_widget, notes, qtbot, tmp_path):
    viewer, w = open_widget()
    chosen = {role: box.currentText() for role, box in w.choosers.items()}
    assert chosen["fixed"] == "sample fixed" and chosen["moving"] == "sample moving"
    assert chosen["fixed labels"] == "sample fixed labels"
    assert chosen["moving labels"] == "sample moving labels"
    w.mode.setCurrentIndex(2)  # field refinement
    w.steps.setValue(20)
    w.run_button.click()
    wait_idle(qtbot, w)
    assert not [n for n in notes if n.startswith("show_error")], notes
    (record,) = w.records
    default = read_card(default_checkpoint())["architecture"]  # the widget opens on the default
    assert record.name.startswith(f"run 1 · {default}") and "refine 20" in record.name
    fixed = viewer.layers["sample fixed"]
    moving = viewer.layers["sample moving"]
    # a calm result: the fixed image and the warped image, additive, nothing over them
    warped = viewer.layers["warped · run 1"]
    assert _visible(viewer) == ["sample fixed", "warped · run 1"]
    assert warped.blending == fixed.blending == "additive"
    assert warped.data.shape == fixed.data.shape
    assert np.allclose(_matrix(warped), _matrix(fixed), atol=1e-5)
    count = len(viewer.layers)
    # one view at a time, each in place of the one before, on the fixed grid
    for view, kinds in (
        ("checkerboard", ["checkerboard · run 1"]),
        ("difference", ["difference · run 1"]),
        ("|u|", ["sample fixed", "|u| mm · run 1"]),
        ("Jacobian", ["Jacobian · run 1", "folds · run 1"]),
        ("labels", ["sample fixed", "warped · run 1", "labels · run 1"]),
    ):
        _show(w, qtbot, view)
        assert _visible(viewer) == kinds, view
        for name in kinds:
            assert viewer.layers[name].data.shape == fixed.data.shape, view
            assert np.allclose(_matrix(viewer.layers[name]), _matrix(fixed), atol=1e-5), view
    assert len(viewer.layers) <= count + 2  # an image slot and a labels slot, reused
    assert viewer.layers["labels · run 1"].contour == 1
    # the fixed labels in moving space: computed when asked, on the moving grid
    assert record.inverse_labels is None
    _show(w, qtbot, "labels → moving")
    inverse = viewer.layers["labels → moving · run 1"]
    assert _visible(viewer) == ["sample moving", "labels → moving · run 1"]
    assert inverse.data.shape == moving.data.shape
    assert np.allclose(_matrix(inverse), _matrix(moving), atol=1e-5)
    # the deformation grid: vector paths on the slice shown, redrawn for another slice
    _show(w, qtbot, "grid")
    grid = viewer.layers["grid · run 1"]
    assert _visible(viewer) == ["sample fixed", "warped · run 1", "grid · run 1"]
    assert np.allclose(_matrix(grid), _matrix(fixed), atol=1e-5)
    axis = viewer.dims.order[0]
    shown = grid.world_to_data(viewer.dims.point)[axis]
    assert grid.data.ndim == 3 and len(grid.data) > 50  # line segments (start, extent)
    assert np.allclose(grid.data[:, 0, axis], round(shown)) and np.all(grid.data[:, 1, axis] == 0)
    step = viewer.dims.current_step[axis]
    viewer.dims.set_current_step(axis, step + 3 if step + 3 < viewer.dims.nsteps[axis] else 0)
    now = round(grid.world_to_data(viewer.dims.point)[axis])
    assert now != round(shown)
    qtbot.waitUntil(lambda: np.allclose(grid.data[:, 0, axis], now), timeout=3000)
    # readout: Dice before and after, and it improved
    rows = {row[0]: row for row in w.readout.rows()}
    before, after = float(rows["mean Dice"][1]), float(rows["mean Dice"][3])
    assert after > before
    assert "folding % (det J <= 0)" in rows and "device" in rows
    assert "mean Dice" in w.readout.copy()
    _show(w, qtbot, "overlay")
    assert _visible(viewer) == ["sample fixed", "warped · run 1"]
    # exports
    written = {p.name for p in w.export_run(tmp_path / "out")}
    assert {
        "warped.nii.gz",
        "displacement.nii.gz",
        "transform.h5",
        "metrics.csv",
        "fixed_labels_in_moving.nii.gz",
    } <= written
    warped = read_volume(tmp_path / "out" / "warped.nii.gz")
    assert warped.grid.same_as(record.result.fixed.grid)
    assert w.export_field(tmp_path / "field.nrrd").exists()
    assert (
        w.export_csv(tmp_path / "m.csv").read_text(encoding="utf-8").startswith("quantity,before")
    )
    assert w.export_csv(tmp_path) is None  # a folder: a notification, not a traceback
    assert notes[-1].startswith("show_error: export failed")


def test_comparison_gains_a_row_per_run_and_shows_them_side_by_side(open_widget, qtbot):
    viewer, w = open_widget()
    w.mode.setCurrentIndex(2)
    w.steps.setValue(10)
    w.precision.setCurrentText("float32")
    w.run()
    wait_idle(qtbot, w)
    assert w.compare.table.rowCount() == 1
    assert w.records[0].result.metrics["precision"] == "float32"
    assert w.compare.table.item(0, 0).text().endswith("· float32")
    w.model.setCurrentText("affine")
    w.mode.setCurrentIndex(0)
    w.affine_from.setCurrentText("labels")
    w.run()
    wait_idle(qtbot, w)
    assert w.compare.table.rowCount() == 2
    assert w.compare.table.item(1, 0).text().startswith("run 2 · affine")
    assert "affine from labels" in w.compare.table.item(1, 0).text()
    assert w.records[1].result.metrics["affine_from"] == "labels"
    assert float(w.compare.table.item(0, 1).text()) > 0  # mean Dice
    # a new run replaces the layers of the one before (they come back for Compare)
    assert [n for n in _names(viewer) if n.startswith("warped")] == ["warped · run 2"]
    w.compare.select_runs({1, 2})
    w.compare.side_by_side.setChecked(True)
    assert grid_settings(viewer).enabled
    visible = {layer.name for layer in viewer.layers if layer.visible}
    assert visible == {"sample fixed"} | {f"warped · run {r.number}" for r in w.records}
    assert sum(layer.name.startswith("warped") for layer in viewer.layers) == 2
    w.compare.side_by_side.setChecked(False)
    assert not grid_settings(viewer).enabled


def test_cancel_during_refinement_leaves_the_layers_as_they_were(open_widget, notes, qtbot):
    viewer, w = open_widget()
    before = _names(viewer)
    w.mode.setCurrentIndex(2)
    w.steps.setValue(5000)
    w.run()
    qtbot.waitUntil(lambda: "refin" in w.status.text(), timeout=120_000)
    w.cancel_button.click()
    wait_idle(qtbot, w, timeout=60_000)
    assert _names(viewer) == before and w.records == []
    assert any("cancelled" in n for n in notes)
    assert w.run_button.isEnabled()


@pytest.mark.parametrize("bad", ["2d", "labels", "affine from labels"])
def test_a_bad_choice_notifies_and_changes_nothing(open_widget, notes, bad):
    viewer, w = open_widget()
    if bad == "2d":
        viewer.add_image(np.random.rand(20, 30).astype(np.float32), name="flat")
        w.choosers["moving"].setCurrentText("flat")
    elif bad == "affine from labels":
        w.affine_from.setCurrentText("labels")
        w.choosers["moving labels"].setCurrentText("(none)")
    else:
        viewer.add_labels(np.zeros((5, 6, 7), np.uint8), name="wrong labels")
        w.choosers["fixed labels"].setCurrentText("wrong labels")
    before = _names(viewer)
    w.run()
    assert w.worker is None and w.records == []
    assert _names(viewer) == before
    (message,) = [n for n in notes if n.startswith("show_error")]
    expected = {
        "2d": ["3D"],
        "labels": ["wrong labels", "shape"],
        "affine from labels": ["label layer for both"],
    }[bad]
    assert all(e in message for e in expected), message


def test_layers_are_picked_when_the_sample_opens_after_the_widget(open_widget):
    viewer, w = open_widget(sample=False)
    assert w.choosers["fixed"].currentText() == ""
    viewer.open_sample("napari-deepwarp", "sample_pair")
    assert w.choosers["fixed"].currentText() == "sample fixed"
    assert w.choosers["moving labels"].currentText() == "sample moving labels"
    viewer.layers.remove("sample moving labels")
    assert w.choosers["moving labels"].currentText() == "(none)"


def test_fine_tuned_network_is_saved_with_its_parent(open_widget, qtbot, tmp_path):
    parent = tmp_path / "parent.pt"
    model = create_model("voxelmorph")
    save_checkpoint(parent, model, make_card(model, modality="test"))
    _viewer, w = open_widget()
    w.select_checkpoint(parent)
    assert w.checkpoint.currentData() == str(parent) and w.model.currentText() == "voxelmorph"
    w.mode.setCurrentIndex(1)  # network fine-tuning
    w.steps.setValue(3)
    w.run()
    wait_idle(qtbot, w)
    assert w.save_button.isEnabled()
    path = w.save_checkpoint(tmp_path / "tuned.pt")
    _tuned, card = load_checkpoint(path)
    assert card["parent"]["name"] == "parent.pt" and "sample fixed" in card["tuned_on"]
    assert card["training"]["steps"] == 3


def test_stop_keeps_the_result_with_a_live_preview_and_landmarks(open_widget, notes, qtbot):
    """Stop & keep ends the refinement early and still adds the run; the live preview shows
    while it runs and is gone after; landmarks give a TRE readout."""
    viewer, w = open_widget()
    fixed = viewer.layers["sample fixed"]
    centre = np.array(fixed.data.shape) / 2.0
    points = np.array([centre, centre + [3, 4, -2], centre + [-5, 2, 6]])
    viewer.add_points(points, name="fixed points", affine=fixed.affine.affine_matrix)
    viewer.add_points(points, name="moving points", affine=fixed.affine.affine_matrix)
    w.choosers["fixed points"].setCurrentText("fixed points")
    w.choosers["moving points"].setCurrentText("moving points")
    w.mode.setCurrentIndex(2)  # field refinement
    w.steps.setValue(2000)
    w.max_size.setValue(32)
    previews = []
    w.run_button.click()
    qtbot.waitUntil(lambda: w.stop_button.isEnabled(), timeout=120_000)
    qtbot.waitUntil(lambda: w.preview_layer is not None, timeout=120_000)
    previews.append(w.preview_layer.name)
    w.stop_button.click()
    wait_idle(qtbot, w)
    assert not [n for n in notes if n.startswith("show_error")], notes
    (record,) = w.records
    assert record.result.metrics["seconds"]["refine"] > 0
    assert previews == ["deepwarp · live preview"]
    assert "deepwarp · live preview" not in _names(viewer)
    rows = {row[0]: row for row in w.readout.rows()}
    tre = rows["landmark TRE (mm, mean)"]
    assert float(tre[1]) == 0.0 and float(tre[3]) >= 0.0  # identical points: no error before


def test_card_panel_says_where_a_checkpoint_was_trained_and_runs():
    from napari_deepwarp._qt.checkpoint_choice import card_summary

    card = {"architecture": "fcn_ms", "working_shape": [32, 32, 32], "inference_size": 48}
    assert "trained at 32x32x32; runs at 48 voxels" in card_summary(card)
    assert "runs at" not in card_summary({"architecture": "fcn_ms"})
    below = {"mindboggle_mean_dice": 0.38, "mindboggle_mean_dice_affine_stage": 0.419}
    summary = card_summary({"architecture": "cfwn", "metrics": below})
    assert "not clearly above the affine stage alone (0.419" in summary
    assert "field refinement" in summary
    slight = {"mindboggle_mean_dice": 0.425, "mindboggle_mean_dice_affine_stage": 0.419}
    summary = card_summary({"architecture": "cfwn", "metrics": slight})
    assert "(Dice 0.425) is not clearly above" in summary and "by more than 0.01" in summary
    above = {"mindboggle_mean_dice": 0.5, "mindboggle_mean_dice_affine_stage": 0.419}
    summary = card_summary({"architecture": "cfwn", "metrics": above})
    assert "clearly above" not in summary and "note:" not in summary
    assert "Mindboggle Dice 0.500 (affine stage alone 0.419)" in summary
    warm_started = {"architecture": "lindef", "parent": {"name": "a.pt"}, "tuned_on": None}
    assert "started from a.pt" in card_summary(warm_started)
    assert "config: use_affine=false" in card_summary(
        {**warm_started, "config": {"use_affine": False}}
    )
    assert "config:" not in card_summary(warm_started)
    assert "on None" not in card_summary(warm_started)
    tuned = {**warm_started, "tuned_on": "fixed.nii.gz <- moving.nii.gz"}
    assert "fine-tuned from a.pt on fixed.nii.gz <- moving.nii.gz" in card_summary(tuned)


def test_the_verdict_is_a_coloured_line_and_the_other_result_is_one_click_away(
    open_widget, notes, qtbot
):
    viewer, w = open_widget()
    w.mode.setCurrentIndex(2)  # field refinement: it improves on the affine stage here
    w.steps.setValue(20)
    w.run()
    wait_idle(qtbot, w)
    (first,) = w.records
    verdict = first.result.verdict
    assert verdict.word == "improved" and verdict.returned == "result"
    assert "#3fbf5f" in w.verdict_label.text() and "local NCC" in w.verdict_label.text()
    assert w.readout.item(0, 0).text() == "verdict" and w.readout.item(0, 3).text() == "improved"
    assert not w.other_button.isHidden()
    assert w.other_button.text() == "Show the affine stage's result"
    w.other_button.click()
    wait_idle(qtbot, w)
    assert not [n for n in notes if n.startswith("show_error")], notes
    second = w.records[-1]
    assert len(w.records) == 2 and second.name == "run 2 · affine stage of run 1"
    assert second.result.working_field is None and second.result.verdict.returned == "affine"
    assert second.result.metrics["mean_dice_after"] == first.result.metrics["mean_dice_affine"]
    assert w.other_button.text() == "Show the network's result"  # and back, one click
    assert _visible(viewer) == ["sample fixed", "warped · run 2"]


def test_earlier_runs_stay_when_asked(open_widget, qtbot):
    viewer, w = open_widget()
    w.model.setCurrentText("affine")
    w.keep_runs.setChecked(True)
    for _ in range(2):
        w.run()
        wait_idle(qtbot, w)
    assert sorted(n for n in _names(viewer) if n.startswith("warped")) == [
        "warped · run 1",
        "warped · run 2",
    ]
    assert _visible(viewer) == ["sample fixed", "warped · run 2"]


ITKSNAP = """\
# ITK-SnAP Label Description File
    0     0    0    0        0  0  0    "Clear Label"
{rows}
"""


def test_label_names_from_an_itksnap_file_reach_readout_csv_and_layers(
    open_widget, qtbot, tmp_path
):
    viewer, w = open_widget()
    labels = viewer.layers["sample fixed labels"]
    values = [int(v) for v in np.unique(labels.data) if v]
    table = tmp_path / "phantom_labels.txt"
    rows = "\n".join(f'{v:5d}   200  100   50        1  1  1    "structure {v}"' for v in values)
    table.write_text(ITKSNAP.format(rows=rows), encoding="utf-8")
    w.model.setCurrentText("affine")
    w.run()
    wait_idle(qtbot, w)
    assert w.structures.visible_rows()[0][0] == f"label {w.structures.visible_rows()[0][1]}"
    viewer.open(table, plugin="napari-deepwarp")  # after the run: names reach it too
    assert w.label_names.currentText() == "phantom_labels.txt"
    assert {r[0] for r in w.structures.visible_rows()} == {f"structure {v}" for v in values}
    assert "name" in labels.features and "structure 1" in list(labels.features["name"])
    csv_text = w.export_csv(tmp_path / "m.csv").read_text(encoding="utf-8")
    assert f"Dice structure {values[0]} ({values[0]})" in csv_text
    w.structures.filter.setText(f"structure {values[-1]}")
    assert [r[0] for r in w.structures.visible_rows()] == [f"structure {values[-1]}"]
    _show(w, qtbot, "labels")
    assert "structure 1" in list(viewer.layers["labels · run 1"].features["name"])


def test_a_colour_table_chosen_in_setup_and_a_bad_one_refused(
    open_widget, notes, monkeypatch, tmp_path
):
    from napari_deepwarp._qt import setup_tab

    _viewer, w = open_widget()
    bad, good = tmp_path / "notes.txt", tmp_path / "lut.ctbl"
    bad.write_text("this is prose\n", encoding="utf-8")
    good.write_text("1 first 1 2 3 255\n", encoding="utf-8")
    for path in (bad, good):
        monkeypatch.setattr(
            setup_tab.QFileDialog, "getOpenFileName", lambda *a, p=path: (str(p), "")
        )
        w.label_names.setCurrentText(setup_tab.BROWSE_NAMES)
        w.setup_tab._names_activated(w.label_names.currentIndex())
    assert any("notes.txt: line 1" in n for n in notes if n.startswith("show_error"))
    assert w.label_names.currentText() == "lut.ctbl"
    assert w.setup_tab.chosen_names().names == {1: "first"}
    w.label_names.setCurrentText(setup_tab.BUILTIN_NAMES)
    assert w.setup_tab.chosen_names().name(17) == "Left-Hippocampus"


def test_accurate_refinement_takes_labels_to_moving_space_through_its_own_inverse(
    open_widget, notes, qtbot, monkeypatch
):
    """The accurate preset: its own steps (the spin box is off), a diffeomorphic field, and the
    labels -> moving view through the run's exact inverse, not the fixed-point iteration."""
    from napari_deepwarp._qt import worker
    from napari_deepwarp.core.refine import PRESETS

    monkeypatch.setattr(
        worker, "invert_deformation", lambda *a, **k: pytest.fail("iterated the inverse")
    )
    viewer, w = open_widget()
    w.mode.setCurrentIndex(3)  # field refinement: accurate
    assert w.mode.currentData() == "refine_accurate" and not w.steps.isEnabled()
    assert w.reg_weight.value() == PRESETS["accurate"]["reg_weight"]
    w.run_button.click()
    wait_idle(qtbot, w)
    assert not [n for n in notes if n.startswith("show_error")], notes
    (record,) = w.records
    assert "refine accurate" in record.name
    metrics = record.result.metrics
    assert metrics["refine_preset"] == "accurate" and metrics["refine_diffeomorphic"]
    assert record.result.inverse_field is not None
    _show(w, qtbot, "labels → moving")
    inverse = viewer.layers["labels → moving · run 1"]
    assert inverse.data.shape == viewer.layers["sample moving"].data.shape
    moving_labels = viewer.layers["sample moving labels"].data
    both = (inverse.data > 0) & (moving_labels > 0)
    assert both.sum() > 0.5 * (moving_labels > 0).sum()  # the labels land on the moving anatomy
