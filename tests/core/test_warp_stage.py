"""The one-pass warp stage (issue 6) gives what the step-by-step code and SimpleITK give."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from napari_deepwarp.core.pipeline import (
    _matrix,
    physical_map,
    warp_full_resolution,
    warp_volume,
)
from napari_deepwarp.core.spatial import identity_grid, jacobian_determinant, sample
from napari_deepwarp.core.volume import Grid, Volume


def rotation(axis, degrees):
    return np.array(sitk.VersorTransform(axis, np.deg2rad(degrees)).GetMatrix()).reshape(3, 3)


FIXED = Grid((20, 22, 18), (1.1, 1.3, 1.7), (-12.0, -14.0, -15.0), rotation((0, 0, 1), 12))
MOVING = Grid((18, 24, 20), (1.4, 1.2, 1.6), (-14.0, -13.0, -12.0), rotation((1, 0, 0), -9))
WORKING = Grid((10, 12, 11), (2.5, 2.5, 2.5), (-12.0, -13.0, -14.0), rotation((0, 0, 1), 12))


def affine():
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple((rotation((0.3, 1, 0.2), 5) @ np.diag([1.04, 0.97, 1.02])).ravel()))
    t.SetTranslation((1.2, -0.8, 0.5))
    t.SetCenter((0.5, 1.0, -0.5))
    return t


def volumes(seed=0):
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 1, 5, 6, 5)))
    image = torch.nn.functional.interpolate(coarse, size=MOVING.shape, mode="trilinear")
    image = (image[0, 0].numpy() * 500).astype(np.float32)
    labels = rng.integers(0, 7, MOVING.shape).astype(np.int16)
    return Volume.on_grid(image, MOVING, "moving"), Volume.on_grid(labels, MOVING, "labels")


def field(seed=1, amplitude=1.5):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 4, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=WORKING.shape, mode="trilinear") * amplitude


def reference(fixed, a, working, u, moving, labels):
    """The pre-issue-6 warp block: einsums over a materialised index grid."""

    def apply(matrix, coords):
        m = torch.as_tensor(matrix, dtype=coords.dtype)
        return torch.einsum("ij,bjdhw->bidhw", m[:3, :3], coords) + m[:3, 3].view(1, 3, 1, 1, 1)

    idx = identity_grid(fixed.shape)
    x = apply(fixed.index_to_world_matrix(), idx)
    moved = x
    if u is not None:
        q = apply(working.world_to_index_matrix() @ fixed.index_to_world_matrix(), idx)
        w = sample(u.float(), q, "linear", "border")
        step = torch.as_tensor(working.index_to_world_matrix()[:3, :3], dtype=w.dtype)
        moved = x + torch.einsum("ij,bjdhw->bidhw", step, w)
    y = apply(_matrix(a), moved)
    img_idx = apply(moving.grid.world_to_index_matrix(), y)
    warped = sample(torch.from_numpy(moving.array)[None, None], img_idx, "linear", "itk")
    lab_idx = apply(labels.grid.world_to_index_matrix(), y)
    lab = sample(
        torch.from_numpy(labels.array.astype(np.float32))[None, None], lab_idx, "nearest", "itk"
    )
    to_index = torch.as_tensor(fixed.world_to_index_matrix(), dtype=y.dtype)
    u_vox = torch.einsum("ij,bjdhw->bidhw", to_index[:3, :3], y - x)
    return {
        "warped": warped[0, 0].numpy(),
        "labels": lab[0, 0].numpy().astype(labels.array.dtype),
        "displacement": (y - x)[0].permute(1, 2, 3, 0).numpy(),
        "deformation": (moved - x)[0].permute(1, 2, 3, 0).numpy(),
        "jacobian": jacobian_determinant(u_vox)[0, 0].numpy(),
    }


@pytest.mark.parametrize("with_affine", [True, False])
@pytest.mark.parametrize("with_field", [True, False])
def test_one_pass_equals_the_step_by_step_warp(with_affine, with_field):
    moving, labels = volumes()
    a = affine() if with_affine else None
    u = field() if with_field else None
    out = warp_full_resolution(FIXED, a, WORKING, u, moving, labels, "cpu")
    ref = reference(FIXED, a, WORKING, u, moving, labels)
    assert np.abs(out.warped.array - ref["warped"]).max() < 1e-4 * np.ptp(moving.array)
    assert (out.warped_labels.array != ref["labels"]).mean() < 1e-3  # ties at .5 may flip
    assert out.warped_labels.array.dtype == labels.array.dtype
    assert np.abs(out.displacement - ref["displacement"]).max() < 1e-4
    assert np.abs(out.deformation - ref["deformation"]).max() < 1e-4
    assert np.abs(out.jacobian - ref["jacobian"]).max() < 1e-4
    assert out.warped.grid.same_as(FIXED) and out.displacement.shape == (*FIXED.shape, 3)
    # The step-by-step public functions agree too (channels-last storage from physical_map).
    x, moved, y = physical_map(FIXED, a, WORKING, u, "cpu")
    assert np.abs((moved - x)[0].permute(1, 2, 3, 0).numpy() - out.deformation).max() < 1e-4
    step_labels = warp_volume(labels, y, FIXED, labels=True).array
    assert (step_labels != out.warped_labels.array).mean() < 1e-3
    assert np.abs((y - x)[0].permute(1, 2, 3, 0).numpy() - out.displacement).max() < 1e-4
    assert np.abs(warp_volume(moving, y, FIXED).array - out.warped.array).max() < 1e-4 * 500


def test_one_pass_warp_matches_simpleitk_through_the_exported_field():
    moving, labels = volumes(2)
    out = warp_full_resolution(FIXED, affine(), WORKING, field(3), moving, labels, "cpu")
    disp = sitk.GetImageFromArray(out.displacement.astype(np.float64), isVector=True)
    FIXED.apply_to(disp)
    transform = sitk.DisplacementFieldTransform(disp)
    ref = FIXED.reference_image()
    via_sitk = sitk.Resample(moving.to_sitk(), ref, transform, sitk.sitkLinear, 0.0)
    assert np.abs(sitk.GetArrayFromImage(via_sitk) - out.warped.array).max() < 1e-3 * 500
    lab_sitk = sitk.Resample(labels.to_sitk(), ref, transform, sitk.sitkNearestNeighbor, 0)
    assert (sitk.GetArrayFromImage(lab_sitk) != out.warped_labels.array).mean() < 2e-3


def test_labels_on_their_own_grid_and_affine_only_jacobian():
    moving, _ = volumes()
    other = Grid((15, 16, 17), (1.5, 1.5, 1.5), (-13.0, -12.0, -11.0), rotation((0, 1, 0), 7))
    labels = Volume.on_grid(np.arange(np.prod(other.shape)).reshape(other.shape) % 5, other)
    a = affine()
    out = warp_full_resolution(FIXED, a, None, None, moving, labels, "cpu")
    ref = reference(FIXED, a, None, None, moving, labels)
    assert (out.warped_labels.array != ref["labels"]).mean() < 1e-3
    assert np.allclose(out.jacobian, np.linalg.det(_matrix(a)[:3, :3]), atol=1e-6)
    assert not out.deformation.any()
    assert warp_full_resolution(FIXED, a, None, None, moving, None, "cpu").warped_labels is None
