"""The accurate refinement: a stationary velocity field on a grid of its own, no folding, an
inverse that undoes the forward map in physical space (through the files SimpleITK reads)."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import mean_dice, run_generator

from napari_deepwarp.core import spatial
from napari_deepwarp.core.pipeline import (
    AFFINE_ONLY,
    RegistrationSettings,
    refinement_grid,
    register,
    write_result,
)
from napari_deepwarp.core.refine import PRESETS, RefineSettings, refine_field, refine_settings
from napari_deepwarp.core.volume import Grid


def test_presets_and_step_counts():
    fast = refine_settings("fast")
    assert fast.steps == 150 and not fast.diffeomorphic and fast.spacing_mm is None
    assert fast.preset == "fast"
    accurate = refine_settings("accurate", similarity="mi")
    assert accurate.diffeomorphic and accurate.spacing_mm == PRESETS["accurate"]["spacing_mm"]
    assert accurate.similarity == "mi" and accurate.preset == "accurate"
    assert refine_settings(40).steps == 40 and refine_settings("7").steps == 7
    assert refine_settings(0).steps == 0
    with pytest.raises(ValueError, match="unknown refinement preset 'slow'"):
        refine_settings("slow")


def test_diffeomorphic_refinement_does_not_fold_and_returns_its_inverse(registration_pair):
    moving, fixed, moving_labels, fixed_labels, _ = registration_pair(amplitude=4.0)
    settings = RefineSettings(steps=80, levels=(2, 1), diffeomorphic=True, reg_weight=0.2)
    _, result = run_generator(refine_field(moving, fixed, None, settings))
    u, w = result.displacement, result.inverse
    warped = spatial.warp(moving_labels.float(), u, mode="nearest").long()
    assert mean_dice(fixed_labels, warped) > mean_dice(fixed_labels, moving_labels) + 0.2
    # A weak regulariser, yet every voxel keeps a positive Jacobian...
    assert float(spatial.jacobian_determinant(u).min()) > 0
    # ...which the displacement itself, optimised the same way, does not.
    plain = RefineSettings(steps=80, levels=(2, 1), reg_weight=0.2)
    _, raw = run_generator(refine_field(moving, fixed, None, plain))
    assert float(spatial.jacobian_determinant(raw.displacement).min()) <= 0
    # exp(-v) undoes exp(v) both ways, away from the border (clamped there): a few hundredths
    # of a voxel, a few tenths where the map compresses most.
    inner = (slice(None), slice(None), *[slice(4, -4)] * 3)
    assert u.abs().max() > 1.0
    for first, second in ((u, w), (w, u)):
        error = spatial.compose(first, second)[inner].norm(dim=1).flatten()
        assert error.median() < 0.05 and error.quantile(0.99) < 0.3


def blob_volumes():
    from test_pipeline import FIXED_GRID, MOVING_GRID, blobs, rotation

    shift = sitk.AffineTransform(3)
    shift.SetMatrix(rotation((0, 1, 0), 4).ravel().tolist())
    shift.SetTranslation((1.5, -1.0, 0.5))
    fixed, fixed_labels = blobs(FIXED_GRID)
    moving, moving_labels = blobs(MOVING_GRID, shift)
    return fixed, moving, fixed_labels, moving_labels


def test_refinement_grid_has_its_spacing_and_its_voxel_cap():
    fixed, *_ = blob_volumes()
    grid = refinement_grid(fixed, None, 1.5, 4_000_000)
    assert grid.spacing == (1.5, 1.5, 1.5) and grid.same_as(grid)
    capped = refinement_grid(fixed, None, 1.5, 8000)
    assert np.prod(capped.shape) <= 8000 and capped.spacing[0] > 1.5
    # Never coarser than the network's working grid, never finer than the image.
    working = Grid((16, 16, 16), (1.2,) * 3, (0.0, 0.0, 0.0), np.eye(3))
    assert refinement_grid(fixed, working, 1.5, 4_000_000).spacing[0] == 1.2
    assert refinement_grid(fixed, None, 0.1, 4_000_000).spacing[0] == min(fixed.spacing)


@pytest.fixture(scope="module")
def accurate_run():
    torch.manual_seed(0)
    fixed, moving, fixed_labels, moving_labels = blob_volumes()
    refine = refine_settings("accurate", level_steps=(20, 20, 20), reg_weight=0.5)
    settings = RegistrationSettings(model=AFFINE_ONLY, device="cpu", refine=refine, if_worse="keep")
    result = run_generator(register(fixed, moving, settings, None, fixed_labels, moving_labels))[1]
    return result, fixed_labels, moving_labels


def test_accurate_refinement_from_the_affine_stage(accurate_run):
    result, *_ = accurate_run
    m = result.metrics
    assert m["refine_preset"] == "accurate" and m["refine_diffeomorphic"]
    spacing = PRESETS["accurate"]["spacing_mm"]
    assert 0 < m["refine_steps_run"] <= 60 and m["working_grid"]["spacing_mm"] == spacing
    assert m["mean_dice_after"] > m["mean_dice_affine"]
    assert m["folding_percent"] == 0.0
    assert result.inverse_field is not None
    assert result.inverse_field.shape == result.working_field.shape


def test_inverse_transform_file_undoes_the_forward_one(accurate_run, tmp_path):
    result, _, moving_labels = accurate_run
    write_result(result, tmp_path)
    assert (tmp_path / "inverse_transform.h5").exists()
    forward = sitk.CompositeTransform(sitk.ReadTransform(str(tmp_path / "transform.h5")))
    inverse = sitk.CompositeTransform(sitk.ReadTransform(str(tmp_path / "inverse_transform.h5")))
    from test_pipeline import points_inside

    grid = result.fixed.grid
    points, _ = points_inside(grid, 100)
    errors = [
        np.linalg.norm(np.subtract(inverse.TransformPoint(forward.TransformPoint(tuple(p))), p))
        for p in points
    ]
    # Far below a voxel of the 1.25 mm refinement grid (trilinear fields, squaring error).
    assert np.median(errors) < 0.05 and max(errors) < 0.3, (np.median(errors), max(errors))

    # The moving labels, pulled into fixed space by the run, return to where they came from
    # through the file (nearest neighbour both ways: only voxels at label edges may change).
    def as_tensor(array):
        return torch.from_numpy(array.astype(np.int64))[None, None]

    back = sitk.Resample(
        result.warped_labels.to_sitk(), moving_labels.to_sitk(), inverse, sitk.sitkNearestNeighbor
    )
    inside = (
        sitk.GetArrayFromImage(
            sitk.Resample(sitk.Image(result.warped_labels.to_sitk()) * 0 + 1,
                          moving_labels.to_sitk(), inverse, sitk.sitkNearestNeighbor)
        ) > 0
    )  # fmt: skip
    returned = np.where(inside, sitk.GetArrayFromImage(back), moving_labels.array)
    assert mean_dice(as_tensor(moving_labels.array), as_tensor(returned)) > 0.9


def test_fast_refinement_writes_no_inverse(tmp_path):
    fixed, moving, *_ = blob_volumes()
    settings = RegistrationSettings(
        model="voxelmorph",
        device="cpu",
        max_size=24,
        refine=RefineSettings(steps=4),
        if_worse="keep",
    )
    result = run_generator(register(fixed, moving, settings))[1]
    assert result.inverse_field is None and not result.metrics["refine_diffeomorphic"]
    write_result(result, tmp_path)
    assert not (tmp_path / "inverse_transform.h5").exists()
