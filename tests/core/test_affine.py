"""Affine pre-alignment: known transforms recovered on a phantom, cross-modality, real brains.

The phantom is a "tissue class" object (overlapping ellipsoids of four intensities with 1 mm soft
edges) defined in world space and sampled analytically on an anisotropic, oblique grid, so the
moving image is exact (no resampling error). The error of an estimated transform is the largest
distance, over points inside the object, between where it and the true transform send a fixed
point, in units of the smallest voxel size.

Same-contrast recovery uses the correlation metric: on such a phantom ITK's Mattes mutual
information carries a small bias (about 0.1-0.3 voxel, from its Parzen windowing), while
correlation is exact. Mattes is checked on the cross-modality pair instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from napari_deepwarp.core.affine import (
    AffineResult,
    AffineSettings,
    _working,
    align_affine,
    run_affine,
    transform_matrix,
)
from napari_deepwarp.core.progress import Progress
from napari_deepwarp.core.volume import Grid, Volume

DATA = Path(__file__).parents[2].parent / "shared" / "data" / "mindboggle"

# Tight settings for small phantoms: native resolution, every voxel sampled, run to convergence.
EXACT = AffineSettings(
    working_spacing=None,
    sampling_percentage=1.0,
    foreground_margin_mm=5.0,
    shrink_factors=(2, 1),
    smoothing_sigmas=(1.0, 0.0),
    iterations=300,
    min_step=1e-4,
)
CORRELATION = dataclasses.replace(EXACT, metric="correlation")  # same-contrast pairs


def _rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


GRID = Grid(
    shape=(48, 60, 64),  # (z, y, x)
    spacing=(1.0, 1.2, 1.6),  # (x, y, z) mm: anisotropic
    origin=(-20.0, 12.0, 35.0),
    direction=_rotation((1, 2, 3), 25),  # oblique
)
CENTRE = GRID.corners_world().mean(0)
BODY = np.array([20.0, 22.0, 24.0])  # radii (x, y, z) mm of the phantom's outer ellipsoid


def _world_points(grid: Grid) -> np.ndarray:
    """World ``(x, y, z)`` of every voxel, shape ``(z, y, x, 3)``."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1)
    m = grid.index_to_world_matrix()
    return idx @ m[:3, :3].T + m[:3, 3]


def _ellipsoid(points, centre, radii, edge_mm=1.0) -> np.ndarray:
    """Soft indicator (about ``edge_mm`` wide edge) of an axis-aligned ellipsoid in world space."""
    r = np.linalg.norm((points - centre) / radii, axis=-1)
    return 1 / (1 + np.exp((r - 1) * radii.min() / edge_mm))


def _phantom(points: np.ndarray) -> np.ndarray:
    """Tissue-class phantom: ellipsoids painted over each other with 4 intensities, 0 outside."""
    rng = np.random.default_rng(7)
    levels = (0.3, 0.55, 0.8, 1.0)
    body = _ellipsoid(points, CENTRE, BODY)
    out = levels[0] * body
    for _ in range(60):
        d = rng.normal(size=3)
        centre = CENTRE + BODY * d / np.linalg.norm(d) * rng.uniform(0, 0.85)
        e = _ellipsoid(points, centre, rng.uniform(3.0, 8.0, 3))
        out = out * (1 - e) + rng.choice(levels) * e
    return out * body


def _affine(matrix=None, translation=(0, 0, 0), centre=(0, 0, 0)) -> np.ndarray:
    """4x4 world map ``x -> A (x - c) + c + t`` (``A`` defaults to the identity)."""
    matrix = np.eye(3) if matrix is None else np.asarray(matrix)
    m = np.eye(4)
    m[:3, :3] = matrix
    m[:3, 3] = np.asarray(translation) + centre - matrix @ np.asarray(centre)
    return m


def _pair(true_fixed_to_moving: np.ndarray, remap=None) -> tuple[Volume, Volume, np.ndarray]:
    """Fixed phantom, moving phantom with ``moving(T x) = fixed(x)``, and the inside points."""
    pts = _world_points(GRID)
    fixed = _phantom(pts)
    inv = np.linalg.inv(true_fixed_to_moving)
    moving = _phantom(pts @ inv[:3, :3].T + inv[:3, 3])
    if remap is not None:
        moving = remap(moving)
    inside = pts[np.linalg.norm((pts - CENTRE) / BODY, axis=-1) <= 1]
    return (
        Volume.on_grid(fixed.astype(np.float32), GRID, "fixed"),
        Volume.on_grid(moving.astype(np.float32), GRID, "moving"),
        inside,
    )


def _error_voxels(result: AffineResult, truth: np.ndarray, points: np.ndarray) -> float:
    est = result.matrix()
    d = points @ (est[:3, :3] - truth[:3, :3]).T + (est[:3, 3] - truth[:3, 3])
    return float(np.linalg.norm(d, axis=-1).max() / min(GRID.spacing))


def test_progress_events_and_result():
    fixed, moving, _ = _pair(_affine(translation=(2.0, -1.5, 1.0)))
    gen = align_affine(fixed, moving, AffineSettings(iterations=20))
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert all(isinstance(e, Progress) for e in events)
    assert events[-1].step == events[-1].total and events[-1].stage == "affine"
    assert events[-1].loss == pytest.approx(result.metric_value)
    assert result.stages == ("rigid", "affine") and result.history and result.seconds > 0
    assert isinstance(result.transform, sitk.AffineTransform)
    # The matrix helper agrees with SimpleITK's own TransformPoint.
    p = np.array([3.0, -7.0, 40.0])
    assert np.allclose(result.matrix() @ [*p, 1], [*result.transform.TransformPoint(p), 1])


def test_none_stage_is_identity_and_bad_stages_raise():
    vol = Volume(np.random.default_rng(0).random((8, 9, 10), dtype=np.float32))
    result = run_affine(vol, vol, AffineSettings(stages=("none",)))
    assert np.allclose(transform_matrix(result.transform), np.eye(4))
    with pytest.raises(ValueError, match="stages"):
        run_affine(vol, vol, AffineSettings(stages=("affine", "rigid")))


def test_initialiser_only_centres_the_object():
    """``stages=()``: the moments initialiser alone recovers a pure translation roughly."""
    truth = _affine(translation=(6.0, -5.0, 7.0))
    fixed, moving, inside = _pair(truth)
    result = run_affine(fixed, moving, AffineSettings(stages=(), working_spacing=None))
    assert result.stages == ()
    assert _error_voxels(result, truth, inside) < 0.25


def test_translation_recovered():
    truth = _affine(translation=(3.3, -2.6, 4.1))
    fixed, moving, inside = _pair(truth)
    mask = np.linalg.norm((_world_points(GRID) - CENTRE) / (BODY + 4), axis=-1) <= 1
    result = run_affine(fixed, moving, CORRELATION, fixed_mask=mask)  # explicit array mask
    assert _error_voxels(result, truth, inside) < 0.1


def test_affine_recovered():
    a = _rotation((0.3, -1, 0.5), 6) @ np.diag([1.06, 0.95, 1.03])
    a[0, 1] += 0.04  # shear
    truth = _affine(a, translation=(-2.0, 1.5, 2.5), centre=CENTRE)
    fixed, moving, inside = _pair(truth)
    result = run_affine(fixed, moving, CORRELATION)
    assert _error_voxels(result, truth, inside) < 0.1


def test_cross_modality_mattes():
    """Non-monotonically remapped moving intensities: Mattes MI (the default) still aligns."""
    truth = _affine(_rotation((1, 0.2, -0.4), 5), translation=(2.5, 2.0, -1.5), centre=CENTRE)
    fixed, moving, inside = _pair(truth, remap=lambda v: 100.0 * np.sin(3.0 * v))
    identity = AffineResult(sitk.AffineTransform(3), 0.0, 0.0, ())
    assert _error_voxels(identity, truth, inside) > 3
    result = run_affine(fixed, moving, EXACT)
    assert _error_voxels(result, truth, inside) < 0.1


def test_random_sampling_is_repeatable():
    """A fixed sampling seed: the same inputs give the same transform (SimpleITK's seed 0 would
    be its wall clock)."""
    fixed, moving, _ = _pair(_affine(translation=(2.0, -1.5, 1.0)))
    settings = AffineSettings(working_spacing=2.0, iterations=30)
    assert settings.sampling_percentage < 1
    first, second = (run_affine(fixed, moving, settings) for _ in range(2))
    # equal up to the order of the threads' sums; another sample set moves it by ~1e-2 mm
    assert np.abs(first.matrix() - second.matrix()).max() < 1e-6


def _run_with_messages(fixed, moving, settings):
    gen, messages = align_affine(fixed, moving, settings), []
    while True:
        try:
            messages.append(next(gen).message)
        except StopIteration as stop:
            return stop.value, messages


def test_scans_aligned_by_their_headers_stay_aligned():
    """Two fields of view of one aligned scene: the foreground centres differ by centimetres,
    so the centre-of-mass start is far off; the headers' alignment scores better and is kept."""
    pts = _world_points(GRID)
    fixed = Volume.on_grid(_phantom(pts).astype(np.float32), GRID, "fixed")
    crop = (slice(0, 30), slice(None), slice(0, 36))  # the low corner: same origin and axes
    cropped = Grid(
        shape=(30, 60, 36), spacing=GRID.spacing, origin=GRID.origin, direction=GRID.direction
    )
    moving = Volume.on_grid(_phantom(pts[crop]).astype(np.float32), cropped, "moving")
    inside = pts[crop][np.linalg.norm((pts[crop] - CENTRE) / BODY, axis=-1) <= 1]
    start = run_affine(fixed, moving, dataclasses.replace(EXACT, stages=()))
    assert _error_voxels(start, np.eye(4), inside) > 5  # the moments start alone
    result, messages = _run_with_messages(fixed, moving, EXACT)
    assert any("headers' alignment" in m for m in messages)
    assert _error_voxels(result, np.eye(4), inside) < 1


def test_small_fields_of_view_keep_enough_working_voxels():
    small = sitk.Image([40, 30, 20], sitk.sitkFloat32)  # 1 mm voxels: 40 mm across
    assert _working(small, 3.0, min_voxels=0).GetSize() == (13, 10, 6)
    assert _working(small, 3.0, min_voxels=48).GetSize() == (40, 30, 20)
    brain = sitk.Image([256, 256, 160], sitk.sitkFloat32)
    assert _working(brain, 3.0, min_voxels=48).GetSize() == (85, 85, 53)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.int64), b.ravel().astype(np.int64)
    n = int(max(a.max(), b.max())) + 1
    sa, sb = np.bincount(a, minlength=n), np.bincount(b, minlength=n)
    both = np.bincount(a[a == b], minlength=n)
    labels = [k for k in range(1, n) if sa[k] and sb[k]]
    return float(np.mean([2 * both[k] / (sa[k] + sb[k]) for k in labels]))


def test_mindboggle_pair_improves_dice():
    files = [DATA / f"oasis_trt20_{i}_{kind}.nii.gz" for i in (1, 2) for kind in ("t1", "labels")]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        pytest.skip(f"Mindboggle data not found under {DATA} (missing {', '.join(missing)})")
    f_t1, f_lab, m_t1, m_lab = (sitk.ReadImage(str(f)) for f in files)
    result = run_affine(Volume.from_sitk(f_t1), Volume.from_sitk(m_t1))
    fixed_labels = sitk.GetArrayFromImage(f_lab)

    def dice_after(tx):
        warped = sitk.Resample(m_lab, f_lab, tx, sitk.sitkNearestNeighbor, 0)
        return _dice(fixed_labels, sitk.GetArrayFromImage(warped))

    before, after = dice_after(sitk.Transform()), dice_after(result.transform)
    assert after > before + 0.1, (before, after)
