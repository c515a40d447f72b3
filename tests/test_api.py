"""The one-call Python API: paths in, a result out; progress; the default model."""

import numpy as np

import napari_deepwarp
from napari_deepwarp import resources
from napari_deepwarp.resources import sample_pair_paths


def test_register_from_paths_with_landmarks_and_progress(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "checkpoints_dir", lambda: tmp_path)  # nothing shipped
    paths = sample_pair_paths()
    events = []
    points = np.array([[0.0, 0.0, 0.0], [5.0, -5.0, 2.0]])
    result = napari_deepwarp.register(
        paths["fixed"],
        paths["moving"],
        "voxelmorph",
        fixed_labels=paths["fixed_labels"],
        moving_labels=paths["moving_labels"],
        refine_steps=5,
        fixed_landmarks=points,
        moving_landmarks=points,
        progress=events.append,
        device="cpu",
        max_size=24,
    )
    assert result.metrics["model"] == "voxelmorph"  # untrained, as nothing is shipped here
    # the default, "auto", finds no shipped checkpoint here: the affine stage alone, and it says so
    alone = napari_deepwarp.register(paths["fixed"], paths["moving"], device="cpu")
    assert (
        alone.metrics["model"] == "affine" and "affine stage alone" in alone.metrics["auto"]["line"]
    )
    assert result.metrics["mean_dice_after"] > result.metrics["mean_dice_before"]
    assert result.metrics["tre_before_mm"] == 0.0
    assert result.warped.grid.same_as(result.fixed.grid)
    assert {e.stage for e in events} >= {"predict", "refine", "warp", "done"}
