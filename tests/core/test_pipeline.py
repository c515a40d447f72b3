import napari_deepwarp.core.models.voxelmorph  # noqa

"""The whole pipeline in physical space, on volumes with anisotropic spacing and oblique axes."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import run_generator

from napari_deepwarp.core.affine import AffineSettings
from napari_deepwarp.core.finetune import FinetuneSettings
from napari_deepwarp.core.io import InputError
from napari_deepwarp.core.pipeline import (
    AFFINE_ONLY,
    RegistrationSettings,
    deformation_of,
    physical_map,
    register,
    write_result,
)
from napari_deepwarp.core.volume import Grid, Volume


def drain(gen):
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def rotation(axis, degrees):
    return np.array(sitk.VersorTransform(axis, np.deg2rad(degrees)).GetMatrix()).reshape(3, 3)


def blobs(grid: Grid, transform: sitk.Transform | None = None, seed=0):
    """Soft-edged ellipsoids and their labels on ``grid``; ``transform`` maps grid -> anatomy.

    Edges matter: Gaussian blobs let mutual information trade scale for an intensity remap.
    """
    rng = np.random.default_rng(seed)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1).reshape(
        -1, 3
    )
    m = grid.index_to_world_matrix()
    pts = idx @ m[:3, :3].T + m[:3, 3]
    if transform is not None:
        pts = np.array([transform.TransformPoint(tuple(p)) for p in pts])
    image = np.zeros(len(pts), np.float32)
    labels = np.zeros(len(pts), np.int16)
    for k in range(1, 6):
        c, r = rng.uniform(-8, 8, 3), rng.uniform(4, 7, 3)
        inside = (((pts - c) / r) ** 2).sum(1) < 1
        radius = np.sqrt((((pts - c) / r) ** 2).sum(1))
        image += rng.uniform(0.3, 1.0) / (1 + np.exp(8 * (radius - 1)))  # edges ~1 mm wide
        labels[inside] = k
    shape = grid.shape
    return (
        Volume.on_grid(image.reshape(shape), grid, "img"),
        Volume.on_grid(labels.reshape(shape), grid, "lab"),
    )


FIXED_GRID = Grid((32, 36, 40), (1.1, 1.3, 1.7), (-22.0, -24.0, -26.0), rotation((0, 0, 1), 12))
MOVING_GRID = Grid((30, 40, 36), (1.4, 1.2, 1.6), (-25.0, -23.0, -22.0), rotation((1, 0, 0), -9))


def points_inside(grid: Grid, n=200, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.uniform(0.3, 0.7, (n, 3)) * (np.array(grid.shape) - 1)
    m = grid.index_to_world_matrix()
    return idx @ m[:3, :3].T + m[:3, 3], idx


def max_error_in_voxels(result, truth: sitk.Transform, grid: Grid):
    """Largest |exported displacement - true displacement| at central points, in fixed voxels."""
    img = sitk.GetImageFromArray(result.displacement.astype(np.float64), isVector=True)
    grid.apply_to(img)
    field = sitk.DisplacementFieldTransform(img)
    world, _ = points_inside(grid)
    err = [
        np.subtract(field.TransformPoint(tuple(p)), truth.TransformPoint(tuple(p))) for p in world
    ]
    return np.abs(np.array(err)).max() / min(grid.spacing)


@pytest.mark.parametrize("kind", ["translation", "affine"])
def test_known_transform_is_recovered_within_a_tenth_of_a_voxel(kind):
    """Across two different oblique, anisotropic grids, through the whole pipeline.

    Correlation is the metric here: it has no sub-voxel bias on a mono-modal pair, so the check
    isolates the physical-space chain (mutual information's own accuracy: test_affine.py).
    """
    truth = sitk.AffineTransform(3)
    truth.SetTranslation((2.7, -1.9, 1.4))
    if kind == "affine":
        a = rotation((0.3, 1, 0.2), 6) @ np.array(
            [[1.06, 0.03, 0], [0, 0.95, 0.02], [0.01, 0, 1.03]]
        )
        truth.SetMatrix(tuple(a.ravel()))
    fixed, _ = blobs(FIXED_GRID, truth)  # fixed(x) = anatomy(truth(x)), moving = anatomy
    moving, _ = blobs(MOVING_GRID)
    exact = AffineSettings(
        metric="correlation",
        working_spacing=None,
        sampling_percentage=1.0,
        foreground_margin_mm=None,
        smoothing_sigmas=(1.0, 0.0),
        iterations=300,
        learning_rate=1.0,
        min_step=1e-5,
    )
    settings = RegistrationSettings(model="affine", device="cpu", affine_settings=exact)
    result = drain(register(fixed, moving, settings))
    assert max_error_in_voxels(result, truth, FIXED_GRID) < 0.1


@pytest.fixture(scope="module")
def finetuned_run():
    """A short deformable run with labels: the outputs' geometry is what is tested."""
    bump = sitk.AffineTransform(3)
    bump.SetTranslation((1.5, -1.0, 0.5))
    fixed, fixed_labels = blobs(FIXED_GRID, bump)
    moving, moving_labels = blobs(MOVING_GRID)
    settings = RegistrationSettings(
        model="voxelmorph",
        device="cpu",
        max_size=32,
        finetune=FinetuneSettings(steps=6, patience=100),
        if_worse="keep",  # 6 steps from an untrained network: the files of its own result
    )
    result = drain(register(fixed, moving, settings, None, fixed_labels, moving_labels))
    result.moving_labels_array = moving_labels.array
    return result


def test_exported_field_reproduces_the_warp_in_simpleitk(finetuned_run, tmp_path):
    r = finetuned_run
    write_result(r, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "displacement.nii.gz",
        "metrics.json",
        "transform.h5",
        "warped.nii.gz",
        "warped_labels.nii.gz",
    ]
    fixed_img, moving_img = r.fixed.to_sitk(), r.moving.to_sitk()
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "warped.nii.gz")))
    field = sitk.ReadImage(str(tmp_path / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    assert Grid.from_sitk(field).same_as(FIXED_GRID)
    value_range = np.ptp(r.moving.array)
    via_field = sitk.Resample(
        moving_img,
        fixed_img,
        sitk.DisplacementFieldTransform(field),
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    assert np.abs(sitk.GetArrayFromImage(via_field) - warped).max() < 1e-3 * value_range
    composite = sitk.CompositeTransform(sitk.ReadTransform(str(tmp_path / "transform.h5")))
    via_h5 = sitk.Resample(moving_img, fixed_img, composite, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    assert np.abs(sitk.GetArrayFromImage(via_h5) - warped).max() < 1e-3 * value_range
    # The composite's field is the working-grid field (padded to cover the fixed grid), and it
    # gives the same displacement as the full-resolution field at every fixed voxel.
    h5_field = sitk.DisplacementFieldTransform(composite.GetNthTransform(1)).GetDisplacementField()
    assert np.allclose(h5_field.GetSpacing(), r.working_grid.spacing)
    deformation = sitk.DisplacementFieldTransform(composite.GetNthTransform(1))
    world = FIXED_GRID.corners_world().tolist() + points_inside(FIXED_GRID, 50)[0].tolist()
    flat = deformation_of(r).reshape(-1, 3)
    to_index = FIXED_GRID.world_to_index_matrix()
    for p in world:
        idx = np.rint(to_index[:3, :3] @ p + to_index[:3, 3]).astype(int)
        expected = flat[np.ravel_multi_index(tuple(idx), FIXED_GRID.shape)]
        p = FIXED_GRID.index_to_world_matrix() @ np.array([*idx, 1.0])
        moved = np.subtract(deformation.TransformPoint(tuple(p[:3])), p[:3])
        assert np.allclose(moved, expected, atol=1e-4), (idx, moved, expected)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "warped_labels.nii.gz")))
    assert set(np.unique(labels)) <= set(np.unique(r.moving_labels_array))


def test_metrics_are_complete_and_consistent(finetuned_run):
    m = finetuned_run.metrics
    for key in (
        "folding_percent",
        "sdlogj",
        "ncc_before",
        "ncc_after",
        "mi_before",
        "mi_after",
        "mean_dice_before",
        "mean_dice_affine",
        "mean_dice_after",
        "seconds",
        "device",
    ):
        assert key in m, key
    assert m["mean_dice_affine"] > m["mean_dice_before"]
    assert set(m["seconds"]) >= {"affine", "predict", "finetune", "warp", "metrics", "total"}
    assert 0.0 <= m["folding_percent"] <= 100.0


def test_physical_map_of_a_constant_working_field():
    """One working voxel along z becomes one working spacing along the direction's z column."""
    working = Grid((16, 16, 16), (2.0, 2.0, 2.0), (-15.0, -15.0, -15.0), rotation((1, 1, 0), 20))
    u = torch.zeros(1, 3, 16, 16, 16)
    u[:, 0] = 1.0
    x, moved, y = physical_map(FIXED_GRID, None, working, u, "cpu")
    expected = working.direction[:, 2] * 2.0
    d = (moved - x)[0].reshape(3, -1).T.numpy()
    assert np.allclose(d, expected, atol=1e-5)
    assert torch.equal(moved, y)


def test_inputs_are_not_modified(finetuned_run):
    fixed, _ = blobs(FIXED_GRID)
    before = fixed.array.copy()
    drain(register(fixed, fixed, RegistrationSettings(model="affine", device="cpu")))
    assert np.array_equal(fixed.array, before)


def test_stop_during_refinement_finishes_the_run_with_the_current_field():
    from napari_deepwarp.core.progress import STOP
    from napari_deepwarp.core.refine import RefineSettings

    fixed, fixed_labels = blobs(FIXED_GRID)
    moving, moving_labels = blobs(MOVING_GRID)
    settings = RegistrationSettings(
        model="voxelmorph", device="cpu", max_size=24, refine=RefineSettings(steps=100)
    )
    gen = register(fixed, moving, settings, None, fixed_labels, moving_labels)
    command, refine_events = None, 0
    try:
        while True:
            event = gen.send(command)
            refine_events += event.stage == "refine"
            command = STOP if refine_events == 5 else None
    except StopIteration as stop:
        result = stop.value
    assert refine_events == 5
    assert result.metrics["mean_dice_after"] is not None and result.warped.grid.same_as(FIXED_GRID)


@pytest.mark.parametrize(("model", "similarity"), [("voxelmorph", "lncc"), ("mi_unet", "mi")])
def test_refinement_follows_the_models_modality(model, similarity, monkeypatch):
    """A multi-modal model's field is refined with mutual information: local NCC misreads
    pairs of different contrasts."""
    from napari_deepwarp.core import refine
    from napari_deepwarp.core.refine import RefineSettings

    used = []
    real = refine.losses.similarity_loss

    def spy(name, **kwargs):
        used.append(name)
        return real(name, **kwargs)

    monkeypatch.setattr(refine.losses, "similarity_loss", spy)
    fixed, _ = blobs(FIXED_GRID)
    moving, _ = blobs(MOVING_GRID)
    settings = RegistrationSettings(
        model=model,
        device="cpu",
        max_size=24,
        refine=RefineSettings(steps=3, levels=(1,)),
        if_worse="keep",  # 3 steps from an untrained network: the refinement's own result
    )
    result = run_generator(register(fixed, moving, settings))[1]
    assert used == [similarity] and result.metrics["refine_similarity"] == similarity
    assert result.metrics["refine_reg_weight"] == (12.0 if similarity == "mi" else 4.0)


def test_affine_stage_from_labels_aligns_what_intensities_cannot():
    """Noise images, label maps of one ball 3-4 mm apart: only the labels can align them."""
    grid = Grid((32, 32, 32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    z, y, x = np.meshgrid(*[np.arange(32.0)] * 3, indexing="ij")

    def ball(centre):  # (x, y, z) mm
        inside = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 < 8.0**2
        return Volume.on_grid(inside.astype(np.uint8), grid, "labels")

    rng = np.random.default_rng(0)
    fixed, moving = (Volume.on_grid(rng.random((32, 32, 32), np.float32), grid) for _ in "ab")
    fixed_labels, moving_labels = ball((15.0, 16.0, 15.5)), ball((18.0, 13.0, 17.5))
    settings = RegistrationSettings(model=AFFINE_ONLY, device="cpu", affine_from="labels")
    result = run_generator(register(fixed, moving, settings, None, fixed_labels, moving_labels))[1]
    assert result.metrics["affine_from"] == "labels"
    assert result.metrics["mean_dice_before"] < 0.75
    assert result.metrics["mean_dice_after"] > 0.95
    with pytest.raises(InputError, match="label maps on both sides"):
        run_generator(register(fixed, moving, settings, None, fixed_labels, None))


@pytest.mark.parametrize("axes", ["world", "image"])
def test_a_network_on_world_axes_gives_one_answer_however_the_scans_are_stored(axes):
    """The same fixed scan stored in another axis order (DICOMOrient: the array permuted and
    flipped, the direction matrix compensating) is the same physical image. A network whose
    working grid lies along the world's axes sees the same input either way, so the physical
    result is the same; on the image's axes (the default) the network sees a re-oriented array
    and, not being equivariant, answers differently."""
    from napari_deepwarp.core.models.lindef import LinDef, LinDefConfig

    grid = Grid((28, 30, 26), (1.2, 1.0, 1.4), (-16.0, -15.0, -18.0), np.eye(3))
    fixed, _ = blobs(grid, seed=1)
    moving, _ = blobs(grid, seed=2)
    torch.manual_seed(0)
    config = LinDefConfig(enc_channels=(4,) * 5, dec_channels=(4,), working_axes=axes)
    net = LinDef(config).eval()
    with torch.no_grad():  # a non-trivial field: random weights in the gradient head
        for p in net.gradients.parameters():
            p.normal_(0, 0.3)
    stored = Volume.from_sitk(sitk.DICOMOrient(fixed.to_sitk(), "SAR"), "fixed")
    assert stored.shape != fixed.shape  # the array really is stored differently
    settings = RegistrationSettings(model="lindef", device="cpu", affine=False, max_size=16)
    settings.if_worse = "keep"
    a = drain(register(fixed, moving, settings, net))
    b = drain(register(stored, moving, settings, net))
    back = sitk.Resample(b.warped.to_sitk(), fixed.to_sitk(), sitk.Transform(), sitk.sitkLinear)
    difference = np.abs(sitk.GetArrayFromImage(back) - a.warped.array).max()
    assert float(np.abs(a.displacement).max()) > 0.5  # the network moved the image
    if axes == "world":
        assert difference < 1e-4
    else:
        assert difference > 1e-2
