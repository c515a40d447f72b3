"""Tests for napari_deepwarp.core.metrics on hand-made volumes with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_deepwarp.core import metrics as M
from napari_deepwarp.core.spatial import jacobian_determinant

# ---------------------------------------------------------------------------------------------
# Overlap
# ---------------------------------------------------------------------------------------------


def _two_label_maps():
    fixed = np.zeros((12, 10, 10), dtype=np.uint8)
    warped = np.zeros_like(fixed)
    fixed[2:8, 2:8, 2:8] = 3  # 216 voxels
    warped[4:10, 2:8, 2:8] = 3  # 216 voxels, 4 * 6 * 6 = 144 shared
    fixed[0, 0, :4] = 7  # 4 voxels, 2 shared
    warped[0, 0, 2:6] = 7
    fixed[11, 9, 9] = 9  # only in fixed
    return fixed, warped


def test_overlap_two_cubes_exact():
    fixed, warped = _two_label_maps()
    out = M.overlap_per_label(fixed, warped)
    assert list(out) == [3, 7]  # present in both, 0 and 9 excluded
    assert out[3]["dice"] == pytest.approx(2 * 144 / 432)
    assert out[3]["jaccard"] == pytest.approx(144 / 288)
    assert out[7] == {"dice": pytest.approx(0.5), "jaccard": pytest.approx(1 / 3)}
    assert isinstance(out[3]["dice"], float)
    assert M.dice_per_label(fixed, warped) == {3: pytest.approx(2 / 3), 7: pytest.approx(0.5)}
    assert M.jaccard_per_label(fixed, warped)[3] == pytest.approx(0.5)
    assert M.mean_dice(fixed, warped) == pytest.approx((2 / 3 + 0.5) / 2)


def test_overlap_explicit_labels_and_inputs():
    fixed, warped = _two_label_maps()
    out = M.overlap_per_label(fixed, warped, labels=[9, 0, 42])
    assert out[9] == {"dice": 0.0, "jaccard": 0.0}
    assert math.isnan(out[42]["dice"]) and math.isnan(out[42]["jaccard"])
    assert out[0]["dice"] == pytest.approx(2 * (1200 - 216 - 4 - 1 - 72 - 2) / (2 * 1200 - 441))
    assert M.mean_dice(fixed, warped, labels=[3, 42]) == pytest.approx(2 / 3)
    # Torch tensors, float maps and negative label values give the same answer.
    ref = M.overlap_per_label(fixed, warped)
    assert M.overlap_per_label(torch.from_numpy(fixed), torch.from_numpy(warped)) == ref
    assert M.overlap_per_label(fixed.astype(np.float32), warped.astype(np.float64)) == ref
    shifted = M.overlap_per_label(fixed.astype(int) - 5, warped.astype(int) - 5, labels=[-2, 2])
    assert shifted == {-2: ref[3], 2: ref[7]}
    with pytest.raises(ValueError):
        M.overlap_per_label(fixed, warped[:-1])


def test_overlap_many_labels_matches_naive_loop():
    rng = np.random.default_rng(3)
    fixed = rng.integers(0, 40, size=(14, 15, 16))
    warped = np.where(rng.random(fixed.shape) < 0.7, fixed, rng.integers(0, 40, size=fixed.shape))
    out = M.overlap_per_label(fixed, warped)
    assert len(out) == 39
    for label, values in out.items():
        a, b = fixed == label, warped == label
        inter = np.logical_and(a, b).sum()
        assert values["dice"] == pytest.approx(2 * inter / (a.sum() + b.sum()))
        assert values["jaccard"] == pytest.approx(inter / np.logical_or(a, b).sum())


# ---------------------------------------------------------------------------------------------
# HD95
# ---------------------------------------------------------------------------------------------


def test_hd95_concentric_boxes_anisotropic():
    """Box B = box A grown by 2 mm on every side (1, 2, 4 voxels at 2, 1, 0.5 mm).

    Every A surface voxel is exactly 2 mm from B's surface. A B surface voxel is at the distance
    from its centre to A's box (clamping gives the nearest point, a voxel of A's surface).
    """
    spacing = np.array([2.0, 1.0, 0.5])
    grow = np.array([1, 2, 4])
    a0, a1 = np.array([3, 4, 6]), np.array([8, 11, 17])  # inclusive voxel bounds
    b0, b1 = a0 - grow, a1 + grow
    shape = (12, 16, 24)
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    a[a0[0] : a1[0] + 1, a0[1] : a1[1] + 1, a0[2] : a1[2] + 1] = True
    b[b0[0] : b1[0] + 1, b0[1] : b1[1] + 1, b0[2] : b1[2] + 1] = True

    axes = [np.arange(lo, hi + 1) for lo, hi in zip(b0, b1)]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    surface_b = idx[((idx == b0) | (idx == b1)).any(axis=1)]
    outside = np.maximum(a0 - surface_b, 0) + np.maximum(surface_b - a1, 0)
    b_to_a = np.sqrt(((outside * spacing) ** 2).sum(axis=1))
    expected = max(2.0, float(np.percentile(b_to_a, 95)))
    assert expected == pytest.approx(math.sqrt(8.0))  # edge voxels 2 mm out along two axes

    assert M.hd95(a, b, spacing) == pytest.approx(expected, abs=1e-12)
    assert M.hd95(b, a, tuple(spacing)) == pytest.approx(expected, abs=1e-12)
    assert M.hd95(torch.from_numpy(a), torch.from_numpy(b), spacing) == pytest.approx(expected)
    # The plain Hausdorff distance is the corner one, sqrt(3) * 2 mm.
    assert M.hd95(a, b, spacing, percentile=100) == pytest.approx(2.0 * math.sqrt(3.0))
    assert M.hd95(a, a, spacing) == 0.0


def test_hd95_concentric_spheres_anisotropic():
    spacing = (2.0, 1.0, 0.5)
    shape = (16, 28, 56)
    centre = [(n - 1) / 2 * s for n, s in zip(shape, spacing)]
    zyx = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    radius = np.sqrt(sum((c - x0) ** 2 for c, x0 in zip(zyx, centre)))
    hd = M.hd95(radius <= 6.0, radius <= 11.0, spacing)
    assert hd == pytest.approx(5.0, abs=0.5 * max(spacing))


def test_hd95_empty_masks_and_per_label():
    a = np.zeros((6, 6, 6), bool)
    assert M.hd95(a, a, (1, 1, 1)) == 0.0
    b = a.copy()
    b[2, 2, 2] = True
    assert M.hd95(a, b, (1, 1, 1)) == math.inf

    labels_a = np.zeros((10, 12, 14), np.int16)
    labels_b = np.zeros_like(labels_a)
    labels_a[1:4, 1:5, 1:6] = 1
    labels_b[1:4, 1:5, 3:8] = 1  # shifted 2 voxels along x
    labels_a[6:9, 6:10, 6:12] = 5
    labels_b[6:9, 6:10, 6:12] = 5
    labels_a[0, 11, 13] = 8  # only in a
    spacing = (3.0, 2.0, 0.5)
    out = M.hd95_per_label(labels_a, labels_b, spacing)
    assert list(out) == [1, 5]
    assert out[5] == 0.0
    assert out[1] == pytest.approx(M.hd95(labels_a == 1, labels_b == 1, spacing))
    assert out[1] == pytest.approx(1.0)  # the x faces moved by 2 * 0.5 mm
    explicit = M.hd95_per_label(labels_a, labels_b, spacing, labels=[8, 9])
    assert explicit == {8: math.inf, 9: 0.0}


# ---------------------------------------------------------------------------------------------
# Jacobian-based
# ---------------------------------------------------------------------------------------------


def _folded_field() -> torch.Tensor:
    """dx = -2 x on the first two z slices (det = 1 - 2 = -1 there), identity elsewhere."""
    u = torch.zeros(1, 3, 4, 3, 5, dtype=torch.float64)
    x = torch.arange(5, dtype=torch.float64)
    u[0, 2, :2] = -2.0 * x
    return u


def test_folding_percent_on_hand_made_field():
    det = jacobian_determinant(_folded_field())
    assert torch.allclose(det[0, 0, :2], torch.tensor(-1.0, dtype=torch.float64))
    assert torch.allclose(det[0, 0, 2:], torch.tensor(1.0, dtype=torch.float64))
    assert M.folding_percent(det) == pytest.approx(50.0)
    assert M.folding_percent(det.numpy()) == pytest.approx(50.0)
    mask = np.zeros((4, 3, 5), bool)
    mask[1:] = True  # one folded slice of three
    assert M.folding_percent(det, mask=mask) == pytest.approx(100.0 / 3)
    assert M.folding_percent(np.array([0.0, 1.0, 2.0, 3.0])) == pytest.approx(25.0)


def test_sdlogj():
    det = jacobian_determinant(_folded_field())
    # Half the voxels at log(1e-9), half at log(1) = 0: population std is |log(1e-9)| / 2.
    assert M.sdlogj(det) == pytest.approx(-math.log(1e-9) / 2)
    mask = np.zeros((4, 3, 5), bool)
    mask[2:] = True
    assert M.sdlogj(det, mask=mask) == pytest.approx(0.0, abs=1e-12)
    values = np.array([1.0, math.e, math.e**-1, 1.0])
    assert M.sdlogj(values) == pytest.approx(np.std([0.0, 1.0, -1.0, 0.0]))


# ---------------------------------------------------------------------------------------------
# Landmarks
# ---------------------------------------------------------------------------------------------


def test_tre_mm():
    a = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [10.0, 10.0, 10.0]])
    b = a + np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [0.0, 6.0, 8.0]])
    out = M.tre_mm(a, torch.from_numpy(b))
    assert out["mean"] == pytest.approx(5.0)
    assert out["median"] == pytest.approx(5.0)
    assert out["max"] == pytest.approx(10.0)
    assert out["std"] == pytest.approx(math.sqrt(50.0 / 3.0))
    # Voxel indices with (x, y, z) spacing: (1, 0, 0) voxels at 2 mm along x.
    vox = M.tre_mm(np.zeros((1, 3)), np.array([[1.0, 0.0, 0.0]]), spacing_xyz=(2.0, 1.0, 3.0))
    assert vox["mean"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        M.tre_mm(np.zeros((2, 3)), np.zeros((3, 3)))


# ---------------------------------------------------------------------------------------------
# Intensity similarity
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def volumes():
    rng = np.random.default_rng(7)
    a = rng.random((12, 13, 14))
    return a, a + 0.2 * rng.random(a.shape), rng.random(a.shape)


def test_ncc(volumes):
    a, b, _ = volumes
    assert M.ncc(a, a) == pytest.approx(1.0)
    assert M.ncc(a, -2.0 * a + 1.0) == pytest.approx(-1.0)
    assert M.ncc(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-12)
    assert M.ncc(torch.from_numpy(a), torch.from_numpy(3.0 * b + 1.0)) == pytest.approx(M.ncc(a, b))
    assert M.ncc(a, np.ones_like(a)) == 0.0


def test_mutual_information(volumes):
    a, _, noise = volumes
    monotone = M.mutual_information(a, np.sqrt(a) * 5.0 + 1.0)
    assert monotone > M.mutual_information(a, noise) + 1.0
    hist, _, _ = np.histogram2d(a.ravel(), noise.ravel(), bins=16)
    p = hist / hist.sum()
    outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
    nz = p > 0
    expected = float((p[nz] * np.log(p[nz] / outer[nz])).sum())
    assert M.mutual_information(a, noise, bins=16) == pytest.approx(expected, abs=1e-12)
    # MI of an image with itself is its histogram entropy.
    counts = np.histogram(a, bins=16)[0] / a.size
    entropy = -float((counts[counts > 0] * np.log(counts[counts > 0])).sum())
    assert M.mutual_information(a, a, bins=16) == pytest.approx(entropy, abs=1e-12)


def test_ssim_and_psnr(volumes):
    a, b, noise = volumes
    assert M.ssim(a, a) == pytest.approx(1.0)
    assert M.ssim(a, noise, data_range=1.0) < 0.1 < M.ssim(a, b, data_range=1.0) < 1.0
    assert M.psnr(a, a) == math.inf
    assert M.psnr(a, a + 0.1, data_range=1.0) == pytest.approx(20.0)
    with pytest.raises(ValueError):
        M.ssim(a[:5], b[:5])  # window 7 does not fit along z


def test_ssim_and_psnr_match_skimage(volumes):
    metrics = pytest.importorskip("skimage.metrics")
    a, b, _ = volumes
    assert M.ssim(a, b, data_range=1.0) == pytest.approx(
        metrics.structural_similarity(a, b, data_range=1.0), abs=1e-10
    )
    gauss = metrics.structural_similarity(
        a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert M.ssim(a, b, data_range=1.0, window=11, gaussian=True) == pytest.approx(gauss, abs=1e-10)
    assert M.psnr(a, b, data_range=1.0) == pytest.approx(
        metrics.peak_signal_noise_ratio(a, b, data_range=1.0)
    )


def test_intensity_similarity_equals_the_single_metrics(volumes):
    a, b, noise = volumes
    images = [b, noise, np.full_like(a, 2.0)]
    together = M.intensity_similarity(a.astype(np.float32), [x.astype(np.float32) for x in images])
    for values, image in zip(together, images):
        assert values["ncc"] == pytest.approx(M.ncc(a.astype(np.float32), image.astype(np.float32)))
        assert values["mi"] == M.mutual_information(a.astype(np.float32), image.astype(np.float32))
    assert together[2]["ncc"] == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        M.intensity_similarity(a, [a[:-1]])


def test_overlap_per_label_many_equals_one_call_per_map():
    rng = np.random.default_rng(3)
    fixed = rng.integers(0, 7, (9, 10, 11)).astype(np.int32)
    warped = [rng.integers(0, 9, fixed.shape).astype(np.int16), fixed.copy(), -fixed]
    many = M.overlap_per_label_many(fixed, warped)
    assert many == [M.overlap_per_label(fixed, w) for w in warped]
    assert M.overlap_per_label_many(fixed, warped[:1], labels=[1, 42]) == [
        M.overlap_per_label(fixed, warped[0], labels=[1, 42])
    ]
