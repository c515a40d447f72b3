"""Supervision by label maps and landmarks: terms, refinement with them, TRE in the pipeline."""

import numpy as np
import pytest
import torch
from conftest import mean_dice, run_generator

from napari_deepwarp.core import spatial
from napari_deepwarp.core.io import InputError
from napari_deepwarp.core.refine import RefineSettings, refine_field
from napari_deepwarp.core.supervision import Supervision, check_landmarks, supervision_on_grid
from napari_deepwarp.core.volume import Grid, Volume


def fractions(labels: torch.Tensor, shape) -> torch.Tensor:
    from napari_deepwarp.core.models.blocks import downsample_image

    values = torch.arange(1, 8).view(-1, 1, 1, 1)  # make_pair's labels 1..7 (0: background)
    onehot = (labels[0] == values).float()[None]
    return onehot if tuple(shape) == onehot.shape[2:] else downsample_image(onehot, shape)


def test_landmark_term_is_the_mean_distance_in_mm():
    shift = torch.tensor([2.0, -1.0, 0.5])  # voxels (z, y, x)
    fixed_points = torch.tensor([[5.0, 6.0, 7.0], [10.0, 3.0, 8.0], [4.0, 9.0, 2.0]])
    sup = Supervision(fixed_points=fixed_points, moving_points=fixed_points + shift, spacing_mm=2)
    zero = torch.zeros(1, 3, 12, 12, 12)
    assert float(sup.landmarks_loss(zero)) == pytest.approx(2 * float(shift.norm()), rel=1e-6)
    exact = zero + shift.view(1, 3, 1, 1, 1)
    assert float(sup.landmarks_loss(exact)) == pytest.approx(0.0, abs=1e-5)


def test_labels_term_is_lower_for_the_true_field(registration_pair):
    _, fixed, moving_labels, fixed_labels, truth = registration_pair()
    full = fixed.shape[2:]
    sup = Supervision(fractions(fixed_labels, full), fractions(moving_labels, full))
    assert float(sup.labels_loss(truth)) < 0.75 * float(sup.labels_loss(torch.zeros_like(truth)))
    loss, terms = sup.loss(truth, labels_weight=2.0, landmarks_weight=1.0)
    assert set(terms) == {"labels"} and float(loss) == pytest.approx(2 * float(terms["labels"]))


def test_label_supervision_makes_refinement_follow_the_labels(registration_pair):
    moving, fixed, moving_labels, fixed_labels, _ = registration_pair()
    full = fixed.shape[2:]
    sup = Supervision(fractions(fixed_labels, full), fractions(moving_labels, full))
    flat = torch.zeros_like(moving)  # no image information at all: only the labels can guide
    plain = RefineSettings(steps=60, levels=(2, 1), reg_weight=0.5)
    guided = RefineSettings(steps=60, levels=(2, 1), reg_weight=0.5, labels_weight=1.0)
    _, without = run_generator(refine_field(flat, flat, None, plain, sup))
    _, with_labels = run_generator(refine_field(flat, flat, None, guided, sup))
    assert without.displacement.abs().max() < 1e-6
    warped = spatial.warp(moving_labels.float(), with_labels.displacement, mode="nearest").long()
    assert mean_dice(fixed_labels, warped) > mean_dice(fixed_labels, moving_labels) + 0.05


def test_landmarks_map_through_the_affine_stage_onto_the_working_grid():
    import SimpleITK as sitk

    grid = Grid((10, 12, 14), (2.0, 2.0, 2.0), (-5.0, 3.0, 1.0), np.eye(3))
    affine = sitk.AffineTransform(3)
    affine.SetTranslation((4.0, 0.0, -2.0))
    fixed_xyz = np.array([[1.0, 9.0, 7.0], [11.0, 15.0, 5.0]])
    moving_xyz = fixed_xyz + [4.0, 0.0, -2.0]  # the affine alone maps fixed onto moving
    sup = supervision_on_grid(grid, affine, "cpu", None, None, fixed_xyz, moving_xyz)
    assert torch.allclose(sup.fixed_points, sup.moving_points, atol=1e-5)
    # index (z, y, x) of the first fixed point: ((7 - 1) / 2, (9 - 3) / 2, (1 + 5) / 2)
    assert torch.allclose(sup.fixed_points[0], torch.tensor([3.0, 3.0, 3.0]))


@pytest.mark.parametrize(
    "fixed, moving, words",
    [
        (np.zeros((3, 2)), np.zeros((3, 2)), "(x, y, z)"),
        (np.zeros((3, 3)), np.zeros((4, 3)), "same number"),
        (np.full((2, 3), np.nan), np.zeros((2, 3)), "NaN"),
    ],
)
def test_bad_landmarks_are_refused_with_the_reason(fixed, moving, words):
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_landmarks(fixed, moving)


def test_labels_without_a_shared_value_are_refused():
    grid = Grid((8, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    ones = Volume.on_grid(np.ones((8, 8, 8), np.int16), grid)
    twos = Volume.on_grid(np.full((8, 8, 8), 2, np.int16), grid)
    with pytest.raises(InputError, match="share no label"):
        supervision_on_grid(grid, None, "cpu", ones, twos)


def test_pipeline_reports_tre_and_landmarks_pull_the_field():
    """A translation the affine stage is not asked to find, on a blank fixed image: only the
    landmarks can guide the field."""
    from test_pipeline import FIXED_GRID, MOVING_GRID, blobs

    from napari_deepwarp.core.pipeline import RegistrationSettings, map_points, register

    moving, _ = blobs(MOVING_GRID)
    blank = Volume.on_grid(np.ones(FIXED_GRID.shape, np.float32), FIXED_GRID)
    blank.array[0, 0, 0] = 2.0  # not constant, so the input check passes
    rng = np.random.default_rng(1)
    index = rng.integers(8, np.array(FIXED_GRID.shape) - 8, (12, 3))  # (z, y, x) voxel centres
    m = FIXED_GRID.index_to_world_matrix()
    fixed_points = index @ m[:3, :3].T + m[:3, 3]
    offset = np.array([2.0, -1.5, 1.0])
    moving_points = fixed_points + offset

    def register_with(weight):
        settings = RegistrationSettings(
            model="voxelmorph",
            affine=False,
            device="cpu",
            max_size=24,
            refine=RefineSettings(steps=60, levels=(2, 1), landmarks_weight=weight),
        )
        gen = register(blank, moving, settings, None, None, None, fixed_points, moving_points)
        return run_generator(gen)

    events, guided = register_with(0.5)
    metrics = guided.metrics
    assert metrics["tre_before_mm"] == pytest.approx(np.linalg.norm(offset), rel=1e-6)
    assert "tre_affine_mm" not in metrics  # no affine stage
    assert metrics["tre_after_mm"] < 0.5 * metrics["tre_before_mm"]
    # the TRE is measured on the map that is exported: at voxel centres they agree
    mapped = map_points(fixed_points, None, guided.working_grid, guided.working_field)
    exported = fixed_points + guided.displacement[tuple(index.T)]
    assert np.abs(mapped - exported).max() < 1e-3
    previews = [e.preview["warped"] for e in events if e.preview and "warped" in e.preview]
    assert previews and previews[-1].grid.same_as(guided.working_grid)
    _, unguided = register_with(0.0)
    assert unguided.metrics["tre_after_mm"] > 0.9 * metrics["tre_before_mm"]
