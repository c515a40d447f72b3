"""On a real Mindboggle pair, the widget's Dice readout is what `deepwarp register` writes."""

import json
from pathlib import Path

import pytest
from qt_helpers import wait_idle

from napari_deepwarp.cli import main

MINDBOGGLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "mindboggle"
pytestmark = pytest.mark.skipif(
    not MINDBOGGLE.is_dir(), reason=f"real data not found at {MINDBOGGLE} (not shipped)"
)


def test_widget_dice_equals_the_command_line(open_widget, notes, qtbot, tmp_path):
    paths = {
        f"{side} {kind}": MINDBOGGLE / f"oasis_trt20_{subject}_{kind}.nii.gz"
        for side, subject in (("fixed", 1), ("moving", 2))
        for kind in ("t1", "labels")
    }
    viewer, w = open_widget(sample=False)
    for path in paths.values():
        viewer.open(path, plugin="napari-deepwarp")
    for role, key in (
        ("fixed", "fixed t1"),
        ("moving", "moving t1"),
        ("fixed labels", "fixed labels"),
        ("moving labels", "moving labels"),
    ):
        w.choosers[role].setCurrentText(paths[key].name.split(".")[0])
    w.model.setCurrentText("voxelmorph")
    w.checkpoint.setCurrentIndex(0)  # untrained: the same seeded weights as --checkpoint none
    w.affine.setChecked(False)  # the affine stage's threaded metric varies in the 3rd decimal
    w.mode.setCurrentIndex(2)  # field refinement
    w.steps.setValue(20)
    w.max_size.setValue(32)
    w.invert.setChecked(False)  # the inverse map is not part of the comparison (and slow here)
    w.run_button.click()
    wait_idle(qtbot, w, timeout=600_000)
    assert not [n for n in notes if n.startswith("show_error")], notes
    widget_metrics = w.records[0].result.metrics
    args = ["register", str(paths["fixed t1"]), str(paths["moving t1"]), "-o", str(tmp_path)]
    args += ["--fixed-labels", str(paths["fixed labels"]), "--moving-labels"]
    args += [str(paths["moving labels"]), "--checkpoint", "none", "--no-affine", "--refine", "20"]
    assert main([*args, "--max-size", "32", "--device", "cpu", "-q"]) == 0
    cli_metrics = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("mean_dice_before", "mean_dice_after", "mean_jaccard_after"):
        assert widget_metrics[key] == pytest.approx(cli_metrics[key], abs=1e-4), key
    rows = {row[0]: row for row in w.readout.rows()}
    assert float(rows["mean Dice"][3]) == pytest.approx(cli_metrics["mean_dice_after"], abs=1e-4)
