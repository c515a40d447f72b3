"""Exact checks of the spatial core on small synthetic volumes."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from napari_deepwarp.core import spatial


def smooth_field(shape, amplitude, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 4, 4, 4, generator=g, dtype=torch.float64)
    field = torch.nn.functional.interpolate(
        coarse, size=shape, mode="trilinear", align_corners=True
    )
    return field * amplitude / field.abs().max()


def smooth_image(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, 6, 6, 6, generator=g, dtype=torch.float64)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def test_identity_warp_returns_the_image():
    img = torch.rand(2, 3, 7, 9, 5, dtype=torch.float64)
    out = spatial.warp(img, torch.zeros(2, 3, 7, 9, 5, dtype=torch.float64))
    assert torch.equal(out, img) or torch.allclose(out, img, atol=1e-12)


def test_integer_shift_along_each_axis():
    img = torch.rand(1, 1, 8, 9, 10, dtype=torch.float64)
    for axis in range(3):
        disp = torch.zeros(1, 3, 8, 9, 10, dtype=torch.float64)
        disp[:, axis] = 2.0
        out = spatial.warp(img, disp, padding="zeros")
        sl = [slice(None)] * 5
        sl[2 + axis] = slice(0, -2)
        src = [slice(None)] * 5
        src[2 + axis] = slice(2, None)
        assert torch.allclose(out[tuple(sl)], img[tuple(src)], atol=1e-12)


def test_warp_matches_simpleitk_displacement_field_transform():
    """Our pull warp on a unit grid equals sitk.Resample with the same field (ITK padding)."""
    shape = (12, 14, 10)
    img = torch.rand(1, 1, *shape, dtype=torch.float64)
    disp = smooth_field(shape, 2.5)
    ours = spatial.warp(img, disp, padding="itk")[0, 0].numpy()
    moving = sitk.GetImageFromArray(img[0, 0].numpy())
    # voxel (dz, dy, dx) on a unit identity grid -> physical (x, y, z) vector
    phys = disp[0].permute(1, 2, 3, 0).flip(-1).numpy()
    field = sitk.GetImageFromArray(phys, isVector=True)
    ref = sitk.Resample(
        moving, moving, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0
    )
    assert np.abs(ours - sitk.GetArrayFromImage(ref)).max() < 1e-9


def test_nearest_sampling_keeps_labels_exact():
    labels = torch.randint(0, 5, (1, 1, 6, 7, 8)).double()
    out = spatial.warp(labels, smooth_field((6, 7, 8), 1.7), mode="nearest")
    assert set(out.unique().tolist()) <= set(labels.unique().tolist())


def test_compose_equals_warping_twice():
    """Affine fields and a linear image make every interpolation exact, so order shows."""
    shape = (16, 18, 14)
    a = torch.tensor(
        [[[0.05, 0.02, 0.0, 1.0], [0.0, -0.04, 0.03, 0.5], [0.02, 0.0, 0.0, -0.8]]],
        dtype=torch.float64,
    )
    b = torch.tensor(
        [[[0.0, 0.0, 0.06, -0.5], [0.03, 0.0, 0.0, 1.2], [0.0, 0.05, 0.02, 0.3]]],
        dtype=torch.float64,
    )
    eye = torch.eye(3, 4, dtype=torch.float64)
    first, second = spatial.affine_to_field(a + eye, shape), spatial.affine_to_field(b + eye, shape)
    p = spatial.identity_grid(shape, dtype=torch.float64)
    img = (p * torch.tensor([0.3, -0.2, 0.7], dtype=torch.float64).view(1, 3, 1, 1, 1)).sum(
        1, keepdim=True
    )
    twice = spatial.warp(spatial.warp(img, second), first)
    once = spatial.warp(img, spatial.compose(first, second))
    swapped = spatial.warp(img, spatial.compose(second, first))
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    assert (twice - once)[inner].abs().max() < 1e-9
    assert (twice - swapped)[inner].abs().max() > 1e-3


def test_integrate_velocity_translation_and_inverse():
    shape = (10, 12, 8)
    v = torch.zeros(1, 3, *shape, dtype=torch.float64)
    v[:, 1] = 1.25
    assert torch.allclose(spatial.integrate_velocity(v), v, atol=1e-9)
    w = smooth_field((20, 22, 18), 2.0, 4)
    forward, backward = spatial.integrate_velocity(w), spatial.integrate_velocity(-w)
    residual = spatial.compose(forward, backward)[:, :, 4:-4, 4:-4, 4:-4]
    # trilinear scaling and squaring: small discretisation error, a wrong sign would be ~4 voxels
    assert residual.abs().mean() < 0.02 and residual.abs().max() < 0.2
    assert spatial.jacobian_determinant(forward).min() > 0


def test_invert_undoes_a_smooth_field():
    d = smooth_field((20, 22, 18), 3.0, 5)
    w = spatial.invert(d)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    # q + w(q) lands where p -> p + d(p) takes it to q: w(q) + d(q + w(q)) = 0
    assert spatial.compose(w, d)[inner].abs().max() < 1e-3
    assert spatial.compose(-d, d)[inner].abs().max() > 0.1  # the naive inverse is not one


def test_resize_field_scales_values_and_keeps_the_map():
    """A linear displacement resized to a finer grid is the same physical map."""
    old, new = (9, 11, 7), (17, 21, 13)
    matrix = torch.tensor(
        [[[0.1, 0.02, 0.0, 0.5], [0.0, -0.05, 0.03, 1.0], [0.01, 0.0, 0.08, -0.7]]],
        dtype=torch.float64,
    )
    coarse = spatial.affine_to_field(matrix + torch.eye(3, 4, dtype=torch.float64), old)
    fine = spatial.resize_field(coarse, new)
    # fine voxel q sits at coarse position p = q * (old-1)/(new-1)
    r = torch.tensor([(o - 1) / (n - 1) for o, n in zip(old, new)], dtype=torch.float64)
    q = spatial.identity_grid(new, dtype=torch.float64)
    p = q * r.view(1, 3, 1, 1, 1)
    expected_coarse = torch.einsum("ij,bjdhw->bidhw", matrix[0, :, :3], p) + matrix[0, :, 3].view(
        1, 3, 1, 1, 1
    )
    expected = expected_coarse / r.view(1, 3, 1, 1, 1)
    assert torch.allclose(fine, expected, atol=1e-9)


def test_jacobian_of_affine_field_is_its_determinant():
    a = torch.tensor(
        [[[1.1, 0.1, 0.0, 2.0], [0.05, 0.9, 0.0, 0.0], [0.0, 0.2, 1.3, -1.0]]], dtype=torch.float64
    )
    disp = spatial.affine_to_field(a, (6, 7, 8))
    det = spatial.jacobian_determinant(disp)
    assert torch.allclose(det, torch.linalg.det(a[0, :, :3]).expand_as(det), atol=1e-9)
    assert torch.allclose(
        spatial.jacobian_determinant(torch.zeros(1, 3, 4, 5, 6)), torch.ones(1, 1, 4, 5, 6)
    )


def test_folding_is_detected():
    disp = torch.zeros(1, 3, 8, 8, 8, dtype=torch.float64)
    disp[0, 2, :, :, 4:] = -3.0  # x jumps back by 3 voxels: the map folds at the seam
    assert spatial.jacobian_determinant(disp).min() <= 0


def test_voxel_to_normalized_corners():
    shape = (5, 6, 7)
    coords = torch.tensor([[0.0, 0.0, 0.0], [4.0, 5.0, 6.0]]).T.reshape(1, 3, 2, 1, 1)
    grid = spatial.voxel_to_normalized(coords, shape)
    assert torch.allclose(grid[0, 0, 0, 0], torch.tensor([-1.0, -1.0, -1.0]))
    assert torch.allclose(grid[0, 1, 0, 0], torch.tensor([1.0, 1.0, 1.0]))


def test_sample_rejects_unknown_modes():
    with pytest.raises(ValueError, match="padding"):
        spatial.sample(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 3, 2, 2, 2), padding="wrap")


# --- issue 6: the fast paths give what the reference paths give ------------------------------


def random_affine(seed, scale=0.05, shift=2.0):
    rng = np.random.default_rng(seed)
    m = np.eye(4)
    m[:3, :3] += rng.uniform(-scale, scale, (3, 3))
    m[:3, 3] = rng.uniform(-shift, shift, 3)
    return m


def apply_reference(matrix, coords):
    """The old way: an einsum over a materialised ``(1, 3, D, H, W)`` point tensor."""
    m = torch.as_tensor(matrix, dtype=coords.dtype)
    return torch.einsum("ij,bjdhw->bidhw", m[:3, :3], coords) + m[:3, 3].view(1, 3, 1, 1, 1)


def test_normalization_matrix_agrees_with_voxel_to_normalized():
    for shape in [(5, 6, 7), (1, 4, 9), (3, 1, 2)]:
        p = spatial.identity_grid(shape, dtype=torch.float64) * 1.3 - 0.4
        by_matrix = apply_reference(spatial.normalization_matrix(shape), p)
        expected = spatial.voxel_to_normalized(p, shape)  # (B, D, H, W, 3) x, y, z
        got = by_matrix.permute(0, 2, 3, 4, 1)
        keep = [i for i, n in enumerate(shape[::-1]) if n > 1]  # length-1 axes: any value
        assert torch.allclose(got[..., keep], expected[..., keep], atol=1e-12)


def test_affine_points_equals_the_index_grid_mapped():
    shape, m = (6, 7, 9), random_affine(0)
    expected = apply_reference(m, spatial.identity_grid(shape, dtype=torch.float64))
    got = spatial.affine_points(m, shape, dtype=torch.float64)
    assert got.shape == (1, *shape, 3)
    assert torch.allclose(got.permute(0, 4, 1, 2, 3), expected, atol=1e-12)


@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("padding", ["border", "zeros", "itk"])
def test_sample_at_equals_sample_of_the_mapped_points(mode, padding):
    """Composed on the host, normalised once: the same values as ``sample`` at ``M p + E u``."""
    shape_in, shape_out = (10, 12, 9), (7, 8, 11)
    img = smooth_image(shape_in) * 10
    if mode == "nearest":
        img = torch.floor(img)
    m, e = random_affine(1, 0.3, 3.0), random_affine(2, 0.2)[:3, :3]
    u = smooth_field(shape_out, 2.0, seed=3)
    p = spatial.identity_grid(shape_out, dtype=torch.float64)
    coords = apply_reference(m, p) + torch.einsum("ij,bjdhw->bidhw", torch.as_tensor(e), u)
    expected = spatial.sample(img, coords, mode, padding)
    # From explicit channels-last points, channels-first points, or implicit voxel indices.
    got = [
        spatial.sample_at(img, p.permute(0, 2, 3, 4, 1).contiguous(), m, mode, padding, u, e),
        spatial.sample_at(img, p.permute(0, 2, 3, 4, 1), m, mode, padding, u, e),
        spatial.sample_at(img, None, m, mode, padding, u, e, shape=shape_out),
    ]
    for out in got:
        assert out.shape == expected.shape
        assert (out - expected).abs().max() < 1e-9
    if padding == "itk":
        assert (expected == 0).any() and (expected != 0).any()  # both sides of the edge seen


def test_sample_many_at_shares_positions_between_image_and_labels():
    shape = (9, 10, 11)
    img = smooth_image(shape)
    labels = torch.randint(0, 6, (1, 1, *shape)).double()
    m = random_affine(4, 0.1, 2.5)
    p = spatial.identity_grid(shape, dtype=torch.float64)
    coords = apply_reference(m, p)
    warped, lab = spatial.sample_many_at(
        [(img, "linear"), (labels, "nearest")], None, m, shape=shape
    )
    assert (warped - spatial.sample(img, coords, "linear", "itk")).abs().max() < 1e-12
    assert torch.equal(lab, spatial.sample(labels, coords, "nearest", "itk"))
    with pytest.raises(ValueError, match="same spatial shape"):
        spatial.sample_many_at(
            [(img, "linear"), (labels[..., :-1], "nearest")], None, m, shape=shape
        )


def test_resample_affine_matches_simpleitk():
    """A 3-vector field resampled through an affine: what sitk.Resample gives per component."""
    shape_in, shape_out = (8, 9, 10), (6, 7, 5)
    img = smooth_image(shape_in)
    m = random_affine(5, 0.1, 1.0)
    ours = spatial.resample_affine(img, m, shape_out, "linear", "itk")[0, 0].numpy()
    # index (z, y, x) -> index (z, y, x) as an ITK affine on (x, y, z) unit-spacing points
    flip = np.eye(4)[[2, 1, 0, 3]]
    xyz = flip @ m @ flip
    transform = sitk.AffineTransform(xyz[:3, :3].ravel().tolist(), xyz[:3, 3].tolist())
    ref = sitk.Image([int(n) for n in shape_out[::-1]], sitk.sitkFloat64)
    moving = sitk.GetImageFromArray(img[0, 0].numpy())
    expected = sitk.Resample(moving, ref, transform, sitk.sitkLinear, 0.0)
    assert np.abs(ours - sitk.GetArrayFromImage(expected)).max() < 1e-9


def test_fast_warp_equals_the_reference_warp_with_gradients():
    shape = (9, 10, 8)
    img = smooth_image(shape).repeat(2, 1, 1, 1, 1)
    disp = smooth_field(shape, 2.0).repeat(2, 1, 1, 1, 1).requires_grad_()
    fast = spatial.warp(img, disp)
    ref_disp = disp.detach().clone().requires_grad_()
    ref = spatial.sample(img, spatial.identity_grid(shape, dtype=torch.float64) + ref_disp)
    assert (fast - ref).abs().max() < 1e-12
    fast.sum().backward()
    ref.sum().backward()
    assert torch.allclose(disp.grad, ref_disp.grad, atol=1e-10)
    single = spatial.warp(img, disp[:1].detach())  # one field for a batch of images
    assert torch.allclose(single, fast.detach(), atol=1e-12)


def test_jacobian_with_a_base_matrix_is_the_determinant_of_the_composed_map():
    """det(B + grad u) by cofactors equals torch.linalg.det on every voxel, edges included."""
    u = smooth_field((6, 7, 5), 1.5, seed=6)
    b = random_affine(7, 0.3)[:3, :3]
    grad = spatial.spatial_gradient(u)[0]  # (3 rows, 3 cols, D, H, W)
    full = grad.permute(2, 3, 4, 0, 1) + torch.as_tensor(b)
    expected = torch.linalg.det(full)
    assert torch.allclose(spatial.jacobian_determinant(u, base=b)[0, 0], expected, atol=1e-12)
    identity = torch.linalg.det(grad.permute(2, 3, 4, 0, 1) + torch.eye(3, dtype=u.dtype))
    assert torch.allclose(spatial.jacobian_determinant(u)[0, 0], identity, atol=1e-12)


def test_the_jacobian_in_slabs_equals_the_whole_volumes(monkeypatch):
    """Large grids are done in z slabs with a one-slice halo: exactly the same determinant."""
    from napari_deepwarp.core import spatial

    torch.manual_seed(0)
    u = torch.randn(1, 3, 23, 16, 20) * 0.5
    base = np.array([[1.1, 0.1, 0.0], [0.0, 0.9, 0.05], [0.02, 0.0, 1.0]])
    whole = spatial.jacobian_determinant(u, base)
    monkeypatch.setattr(spatial, "SLAB_VOXELS", 16 * 20 * 4)  # slabs of 4 slices
    assert torch.equal(spatial.jacobian_determinant(u, base), whole)


def test_fit_affine_recovers_an_affine_and_fits_a_warped_one_best():
    """Exact on an affine's own field; on an affine plus a smooth bump, its residual is smaller
    than that of the affine itself or of the affine with any small change."""
    a = torch.tensor([[[0.97, 0.1, 0.0, 2.0], [-0.1, 0.99, 0.05, -1.5], [0.02, -0.05, 1.06, 0.7]]])
    shape = (9, 12, 7)
    field = spatial.affine_to_field(a, shape)
    assert torch.allclose(spatial.fit_affine(field), a, atol=1e-5)
    z = torch.linspace(-1, 1, 9)[:, None, None].expand(shape)
    bumped = field + torch.stack([torch.exp(-4 * z**2)] * 3)[None]
    fit = spatial.fit_affine(bumped)

    def residual(m):
        return float((spatial.affine_to_field(m, shape) - bumped).square().sum())

    best = residual(fit)
    assert best < residual(a)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert best <= residual(fit + 1e-3 * torch.randn(fit.shape, generator=g))
