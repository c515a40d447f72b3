"""LinDef (Christodoulidis et al. 2018): integration, composition, the exact loss, fitting."""

from __future__ import annotations

import pytest
import torch

from napari_deepwarp.core import spatial
from napari_deepwarp.core.models import available_models, create_model
from napari_deepwarp.core.models.lindef import (
    LinDef,
    LinDefConfig,
    affine_from_keypoints,
    apply_affine,
    compose_affines,
    first_moments,
    integrate_gradients,
    normalized_to_voxel_affine,
    positive_gradients,
    second_moments,
    symmetric_affine,
    voxel_to_normalized_affine,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Same layout as the default (five dilated convolutions, SE, decoder), far fewer channels.
NARROW = {"enc_channels": (8, 8, 8, 8, 8), "dec_channels": (8, 8)}


def random_logits(shape, seed, low=-8.0, high=8.0):
    """Arbitrary network outputs: independent uniform logits per voxel (no smoothness at all).

    ``[-8, 8]`` spans the gradients ``(0.0007, 1.9993)``, i.e. saturated sigmoids, while every
    gradient stays above the float32 rounding of a running sum over a few dozen voxels.
    """
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(2, 3, *shape, generator=g)


def test_registered_with_its_config():
    assert available_models()["lindef"] is LinDef
    model = create_model("lindef", enc_channels=[4, 4, 4], enc_dilations=[1, 2, 3])
    assert isinstance(model, LinDef)
    assert model.config.enc_dilations == (1, 2, 3) and model.merged_channels == 14
    assert LinDef().merged_channels == 290  # the paper's merged feature count
    with pytest.raises(ValueError, match="dilation"):
        LinDef(LinDefConfig(enc_channels=(4, 4), enc_dilations=(1,)))
    with pytest.raises(ValueError, match="max_gradient"):
        LinDef(LinDefConfig(max_gradient=1.0))


@pytest.mark.parametrize("shape", [(37, 45, 29), (32, 48, 32)])
def test_output_shapes_and_identity_at_init(shape):
    torch.manual_seed(0)
    model = LinDef().eval()
    moving, fixed = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    with torch.no_grad():
        out = model(moving, fixed)
    assert out.displacement.shape == (1, 3, *shape)
    assert out.extras["warped"].shape == (1, 1, *shape)
    assert out.extras["spatial_gradients"].shape == (1, 3, *shape)
    assert out.extras["deformable"].shape == (1, 3, *shape)
    assert out.multiscale == [] and out.velocity is None
    # Zero weights + identity bias: exactly the identity matrix, in both frames.
    assert torch.equal(out.extras["affine_normalized"], torch.eye(3, 4)[None])
    torch.testing.assert_close(out.affine, torch.eye(3, 4)[None], atol=1e-6, rtol=0)
    # Gradients ~1 (the head's tiny init) integrate to (near) zero displacement.
    assert (out.extras["spatial_gradients"] - 1).abs().max() < 1e-3
    assert out.displacement.abs().max() < 0.05


def test_integration_of_unit_gradients_is_the_identity():
    grid = integrate_gradients(torch.ones(1, 3, 5, 6, 7))
    assert torch.equal(grid, spatial.identity_grid((5, 6, 7)))
    assert positive_gradients(torch.zeros(3)).eq(1).all()
    assert positive_gradients(torch.zeros(3), max_gradient=4.0).eq(1).all()


def test_grid_is_strictly_monotone_along_each_axis_for_any_output():
    """The paper's guarantee: spacing along each axis is the positive gradient, in (0, 2)."""
    logits = random_logits((12, 14, 16), seed=1)
    phi = positive_gradients(logits)
    assert phi.min() > 0 and phi.max() < 2
    grid = integrate_gradients(phi)
    u = grid - spatial.identity_grid(grid.shape[2:])
    for axis in range(3):
        step = grid[:, axis].diff(dim=axis + 1)  # G_d(p + e_d) - G_d(p)
        assert step.min() > 0, axis
        assert step.max() < 2, axis
        torch.testing.assert_close(step, phi[:, axis].narrow(axis + 1, 1, phi.shape[axis + 2] - 1))
    # The diagonal of the Jacobian (central differences, as jacobian_determinant uses) is > 0.
    jac = spatial.spatial_gradient(u)  # (B, 3 components, 3 axes, D, H, W)
    for axis in range(3):
        assert (1 + jac[:, axis, axis]).min() > 0


def test_off_axis_folding_is_not_prevented():
    """What the cumulative sum does NOT guarantee: a positive 3D Jacobian determinant.

    ``dG_z/dy`` sums differences of ``Phi_z`` down a whole column and is unbounded, so arbitrary
    outputs can fold although each grid line is monotone. Smooth, moderate gradients do not.
    """
    logits = random_logits((12, 14, 16), seed=1)
    grid = integrate_gradients(positive_gradients(logits))
    u = grid - spatial.identity_grid(grid.shape[2:])
    assert spatial.jacobian_determinant(u).min() < 0
    smooth = torch.nn.functional.interpolate(
        random_logits((3, 3, 3), seed=2, low=-1.0, high=1.0), size=(12, 14, 16), mode="trilinear"
    )
    grid = integrate_gradients(positive_gradients(smooth))
    u = grid - spatial.identity_grid(grid.shape[2:])
    assert spatial.jacobian_determinant(u).min() > 0


def test_total_jacobian_is_the_affine_determinant_times_the_deformable_one():
    """``u = A(G(p)) - p``: det J_total = det(M) * det J_G, voxel by voxel.

    With the identity affine the total Jacobian is the deformable one; any orientation-preserving
    affine keeps its sign everywhere.
    """
    shape = (12, 14, 16)
    torch.manual_seed(0)
    model = LinDef(LinDefConfig(**NARROW)).eval()
    with torch.no_grad():
        model.gradients.conv.weight.normal_(0, 0.005)  # a real but mild deformable part
    x, y = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    with torch.no_grad():
        out = model(x, y)
        det_def = spatial.jacobian_determinant(out.extras["deformable"])
        torch.testing.assert_close(spatial.jacobian_determinant(out.displacement), det_def)
        assert det_def.min() > 0 and out.extras["deformable"].abs().max() > 0.5
        model.affine.bias.add_(0.1 * torch.randn(12))
        out = model(x, y)
        det_m = torch.linalg.det(out.affine[:, :, :3]).view(-1, 1, 1, 1, 1)
        det_total = spatial.jacobian_determinant(out.displacement)
    assert (det_m > 0).all()
    torch.testing.assert_close(det_total, det_m * det_def, atol=1e-4, rtol=1e-4)
    assert det_total.min() > 0


def test_displacement_is_deformable_then_affine_in_voxels():
    """``u(p) = A_v(G(p)) - p``; ``A_v`` is the voxel form of the normalised matrix."""
    shape = (10, 12, 14)
    torch.manual_seed(0)
    model = LinDef(LinDefConfig(**NARROW)).eval()
    matrix = torch.tensor([[1.05, 0.02, 0.0, 0.04], [-0.03, 0.97, 0.01, -0.02], [0, 0.02, 1, 0.03]])
    with torch.no_grad():
        model.gradients.conv.weight.normal_(0, 0.05)
        model.affine.bias.copy_(matrix.flatten())
        moving, fixed = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
        out = model(moving, fixed)
    a_n, a_v = out.extras["affine_normalized"], out.affine
    torch.testing.assert_close(voxel_to_normalized_affine(a_v, shape), a_n)
    # A_v acts on voxels exactly as A_n acts on normalised coordinates (align_corners=True).
    p = spatial.identity_grid(shape)
    scale = torch.tensor([2.0 / (n - 1) for n in shape]).view(1, 3, 1, 1, 1)
    via_normalized = (apply_affine(a_n, p * scale - 1) + 1) / scale
    torch.testing.assert_close(apply_affine(a_v, p), via_normalized, atol=1e-5, rtol=1e-5)
    # The total field: first the deformable grid, then the affine, as positions.
    u_g = out.extras["deformable"]
    expected = apply_affine(a_v, p + u_g) - p
    torch.testing.assert_close(out.displacement, expected)
    # ... which is compose(u_G, affine field) where p + u_G stays inside the grid.
    composed = spatial.compose(u_g, spatial.affine_to_field(a_v, shape))
    q = p + u_g
    upper = torch.tensor(shape, dtype=q.dtype).view(1, 3, 1, 1, 1) - 1
    inside = ((q >= 0) & (q <= upper)).all(dim=1, keepdim=True).expand_as(q)
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(composed[inside], out.displacement[inside], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.extras["warped"], spatial.warp(moving, out.displacement))


def test_without_affine_the_field_is_the_deformable_part():
    torch.manual_seed(0)
    model = LinDef(LinDefConfig(use_affine=False, **NARROW)).eval()
    x = torch.rand(1, 1, 8, 10, 12)
    with torch.no_grad():
        out = model(x, x)
    assert out.affine is None and model.affine is None
    assert torch.equal(out.displacement, out.extras["deformable"])
    _, terms = model.loss(out, x, x)
    assert set(terms) == {"similarity", "deformable_regularisation"}


def test_loss_is_mse_plus_l1_sums_to_identity():
    torch.manual_seed(0)
    model = LinDef(LinDefConfig(alpha=1e-3, beta=2e-4, **NARROW))
    with torch.no_grad():
        model.gradients.conv.weight.normal_(0, 0.05)
        model.affine.bias.add_(0.01 * torch.randn(12))
    moving, fixed = torch.rand(2, 1, 8, 10, 12), torch.rand(2, 1, 8, 10, 12)
    out = model(moving, fixed)
    total, terms = model.loss(out, moving, fixed)
    phi, a_n = out.extras["spatial_gradients"], out.extras["affine_normalized"]
    mse = ((out.extras["warped"] - fixed) ** 2).mean()
    affine_sum = (a_n - torch.eye(3, 4)).abs().sum() / 2  # per item, averaged over the batch
    gradient_sum = (phi - 1).abs().sum() / 2
    torch.testing.assert_close(total, mse + 1e-3 * affine_sum + 2e-4 * gradient_sum)
    assert float(terms["similarity"]) == pytest.approx(float(mse.detach()), rel=1e-5)
    assert float(terms["affine_regularisation"]) == pytest.approx(
        float(affine_sum.detach()), rel=1e-5
    )
    assert float(terms["deformable_regularisation"]) == pytest.approx(
        float(gradient_sum.detach()), rel=1e-5
    )
    assert LinDef().config.alpha == LinDef().config.beta == 1e-6  # the paper's weights


def test_affine_frame_conversions_round_trip():
    torch.manual_seed(0)
    matrix = torch.randn(3, 3, 4)
    for shape in [(5, 7, 9), (1, 6, 8)]:
        back = voxel_to_normalized_affine(normalized_to_voxel_affine(matrix, shape), shape)
        torch.testing.assert_close(back, matrix, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = LinDef(LinDefConfig(**NARROW))
    moving, fixed = torch.rand(2, 1, 10, 12, 14), torch.rand(2, 1, 10, 12, 14)
    total, _ = model.loss(model(moving, fixed), moving, fixed)
    total.backward()
    params = dict(model.named_parameters())
    # enc: 5 x (conv weight, IN weight, IN bias); SE: 2 x 2; dec: 2 x 3; head 2; affine 2.
    assert len(params) == 15 + 4 + 6 + 2 + 2
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_identical_inputs_keep_the_field_near_zero(registration_pair):
    torch.manual_seed(0)
    image = registration_pair(size=(16, 24, 24), seed=3)[1]
    model = LinDef(LinDefConfig(**NARROW))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Adam's first steps kick the field (up to ~1 voxel here: every weight moves by ~lr whatever
    # its gradient, and the cumulative sum adds the kicks up); the loss then pulls it back.
    for _ in range(30):
        total, _ = model.loss(model(image, image), image, image)
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
    with torch.no_grad():
        u = model(image, image).displacement
    assert u.abs().max() < 0.5


def test_short_fit_reduces_loss_and_raises_dice(registration_pair, fit_model):
    torch.manual_seed(0)
    model = LinDef(LinDefConfig(**NARROW))
    result = fit_model(model, registration_pair(), steps=40, lr=5e-4)
    assert result["loss_last"] < 0.7 * result["loss_first"], result
    assert result["dice_after"] > result["dice_before"] + 0.01, result


def test_first_moments_are_coordinate_weighted_means():
    spike = torch.zeros(1, 2, 5, 3, 1)
    spike[0, 0, 4, 0, 0] = 15.0  # 15 voxels: the mean over the grid is 1 at the spike
    spike[0, 1] = 1.0  # a constant has no moment
    moments = first_moments(spike)
    # Grouped by axis (z, y, x), channels within; the x axis has size 1, so its moment is 0.
    torch.testing.assert_close(moments, torch.tensor([[1.0, 0.0, -1.0, 0.0, 0.0, 0.0]]))


def test_second_moments_are_products_of_coordinates_weighted_means():
    spike = torch.zeros(1, 1, 5, 3, 4)
    spike[0, 0, 4, 0, 3] = 60.0  # at z = +1, y = -1, x = +1; the grid mean is 1 there
    expected = torch.tensor([[1.0, 1.0, 1.0, -1.0, 1.0, -1.0]])  # zz yy xx zy zx yx
    torch.testing.assert_close(second_moments(spike), expected)
    features = torch.rand(2, 3, 6, 7, 8)
    z, y, x = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in (6, 7, 8)], indexing="ij")
    direct = [
        (features * c).mean(dim=(2, 3, 4)) for c in (z * z, y * y, x * x, z * y, z * x, y * x)
    ]
    torch.testing.assert_close(second_moments(features), torch.cat(direct, dim=1))


def test_moments_pooling_starts_from_a_mean_checkpoint_unchanged():
    torch.manual_seed(0)
    mean = LinDef(LinDefConfig(**NARROW)).eval()
    torch.nn.init.normal_(mean.affine.weight, std=0.05)  # a head that has learnt something
    moments = LinDef(LinDefConfig(**NARROW, affine_pooling="moments")).eval()
    missing = moments.load_state_dict(mean.state_dict(), strict=False).missing_keys
    assert missing == ["affine_moments.weight"]
    second = LinDef(LinDefConfig(**NARROW, affine_pooling="moments2")).eval()
    missing = second.load_state_dict(moments.state_dict(), strict=False).missing_keys
    assert missing == ["affine_moments2.weight"]
    moving, fixed = torch.rand(1, 1, 12, 10, 14), torch.rand(1, 1, 12, 10, 14)
    with torch.no_grad():
        a, b, c = mean(moving, fixed), moments(moving, fixed), second(moving, fixed)
    assert a.affine.sub(torch.eye(3, 4)).abs().max() > 1e-3
    torch.testing.assert_close(b.displacement, a.displacement, atol=0, rtol=0)
    torch.testing.assert_close(c.displacement, a.displacement, atol=0, rtol=0)
    moments.train()
    total, _ = moments.loss(moments(moving, fixed), moving, fixed)
    total.backward()
    assert moments.affine_moments.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="affine_pooling"):
        LinDef(LinDefConfig(affine_pooling="max"))


def _translation_fit_error(pooling: str) -> float:
    """Held-out RMS error (voxels) of the best linear map from the affine head's input to the
    shift of a pair of blobs, on an untrained network: what the head can read at all."""
    torch.manual_seed(0)
    model = LinDef(LinDefConfig(**NARROW, affine_pooling=pooling)).eval()
    axes = torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij")
    g = torch.Generator().manual_seed(1)

    def blob(centre):
        r2 = sum((a - c) ** 2 for a, c in zip(axes, centre, strict=True))
        return torch.exp(-r2 / 18.0)[None, None]

    inputs, shifts = [], []
    for _ in range(250):
        centre = 7.5 + 2 * (torch.rand(3, generator=g) - 0.5)
        shift = 6 * (torch.rand(3, generator=g) - 0.5)
        with torch.no_grad():
            merged = model.features(blob(centre + shift), blob(centre))
        pooled = [merged.mean(dim=(2, 3, 4))]
        if pooling == "moments":
            pooled.append(first_moments(merged))
        inputs.append(torch.cat(pooled + [torch.ones(1, 1)], dim=1))
        shifts.append(shift[None])
    x, y = torch.cat(inputs).double(), torch.cat(shifts).double()
    ridge = 1e-6 * torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(x[:200].T @ x[:200] + ridge, x[:200].T @ y[:200])
    return float((x[200:] @ w - y[200:]).pow(2).mean().sqrt())


def test_moments_let_the_affine_head_read_a_shift_better_than_the_mean():
    # Shifts of up to 3 voxels (RMS 1.7). The instance-normalised features' plain means carry a
    # shift only through their histograms (held-out error about 0.2 voxel); their first moments
    # carry where things are (about 0.02).
    mean_error, moments_error = _translation_fit_error("mean"), _translation_fit_error("moments")
    assert moments_error < 0.05
    assert mean_error > 4 * moments_error


def _homogeneous(m):
    return torch.cat([m, torch.tensor([[[0.0, 0.0, 0.0, 1.0]]]).expand(len(m), 1, 4)], dim=1)


def test_symmetric_affine_keeps_a_consistent_pair_and_cancels_a_shared_bias():
    torch.manual_seed(0)
    a = torch.eye(3, 4)[None] + 0.2 * torch.randn(2, 3, 4)
    inverse = torch.linalg.inv(_homogeneous(a))[:, :3]
    torch.testing.assert_close(symmetric_affine(a, inverse), a, atol=1e-5, rtol=1e-5)
    # An aligned pair read with the same bias both ways: the bias cancels to first order.
    bias = 0.01 * torch.randn(2, 3, 4)
    aligned = torch.eye(3, 4)[None] + bias
    error = (symmetric_affine(aligned, aligned) - torch.eye(3, 4)).abs().max()
    assert error < 0.05 * bias.abs().max()


def test_compose_affines_applies_the_second_then_the_first():
    torch.manual_seed(0)
    first, then = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    point = torch.randn(2, 3)

    def apply(m, q):
        return (m[:, :, :3] @ q[:, :, None])[:, :, 0] + m[:, :, 3]

    torch.testing.assert_close(
        apply(compose_affines(first, then), point), apply(first, apply(then, point))
    )


def test_affine_iterations_compose_each_pass_and_warp_once():
    torch.manual_seed(0)
    shape = (12, 10, 14)
    model = LinDef(LinDefConfig(**NARROW, affine_iterations=2)).eval()
    step = torch.eye(3, 4)[None].clone()
    step[0, :, 3] = torch.tensor([0.1, -0.2, 0.05])  # every pass asks for the same shift
    with torch.no_grad():
        model.affine.bias.copy_(step.flatten())
        out = model(torch.rand(1, 1, *shape), torch.rand(1, 1, *shape))
    twice = step.clone()
    twice[0, :, 3] *= 2
    torch.testing.assert_close(out.extras["affine_normalized"], twice)
    torch.testing.assert_close(out.affine, normalized_to_voxel_affine(twice, shape))
    grid = out.extras["deformable"] + spatial.identity_grid(shape)
    total = apply_affine(out.affine, grid) - spatial.identity_grid(shape)
    torch.testing.assert_close(out.displacement, total)
    with pytest.raises(ValueError, match="affine_iterations"):
        LinDef(LinDefConfig(affine_iterations=0))


def test_deformable_after_affine_reads_the_aligned_pair_and_adds_no_affine_after_it():
    torch.manual_seed(0)
    shape = (12, 10, 14)
    model = LinDef(LinDefConfig(**NARROW, deformable_after_affine=True)).eval()
    step = torch.eye(3, 4)[None].clone()
    step[0, :, 3] = torch.tensor([0.1, -0.2, 0.05])  # the head's shift for any pair
    seen = []
    features = model.features
    model.features = lambda m, f: seen.append(m) or features(m, f)
    moving, fixed = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    with torch.no_grad():
        model.affine.bias.copy_(step.flatten())
        out = model(moving, fixed)
    # One affine read (not two, as affine_iterations=1 with the paper's order would compose).
    torch.testing.assert_close(out.extras["affine_normalized"], step)
    shift = spatial.affine_to_field(normalized_to_voxel_affine(step, shape), shape)
    assert len(seen) == 2 and torch.equal(seen[0], moving)
    torch.testing.assert_close(seen[1], model.transformer(moving, shift))  # G reads this pair
    grid = out.extras["deformable"] + spatial.identity_grid(shape)
    total = apply_affine(out.affine, grid) - spatial.identity_grid(shape)
    torch.testing.assert_close(out.displacement, total)
    with pytest.raises(ValueError, match="working_axes"):
        LinDef(LinDefConfig(working_axes="scanner"))
    with pytest.raises(ValueError, match="keypoint_size must be 0"):
        LinDef(LinDefConfig(affine_pooling="keypoints", keypoint_size=1))
    assert LinDef(LinDefConfig(**NARROW, working_axes="world")).working_axes == "world"
    assert LinDef(LinDefConfig(**NARROW)).working_axes == "image"


def test_symmetric_head_cancels_an_order_blind_shift():
    torch.manual_seed(0)
    model = LinDef(LinDefConfig(**NARROW, affine_symmetric=True)).eval()
    shift = torch.eye(3, 4)[None].clone()
    shift[0, :, 3] = torch.tensor([0.3, -0.1, 0.2])  # what the head says for any pair
    with torch.no_grad():
        model.affine.bias.copy_(shift.flatten())
        out = model(torch.rand(1, 1, 9, 10, 11), torch.rand(1, 1, 9, 10, 11))
    torch.testing.assert_close(out.extras["affine_normalized"], torch.eye(3, 4)[None])


def test_affine_from_keypoints_recovers_rotation_scaling_and_shift():
    torch.manual_seed(0)
    fixed_points = 2 * torch.rand(2, 16, 3) - 1
    angle = torch.tensor(0.35)  # 20 degrees about z
    c, s = torch.cos(angle), torch.sin(angle)
    linear = torch.tensor([[1.0, 0, 0], [0, c, -s], [0, s, c]]) @ torch.diag(
        torch.tensor([1.1, 0.9, 1.05])
    )
    truth = torch.cat([linear, torch.tensor([[0.1], [-0.2], [0.05]])], dim=1)
    moving_points = fixed_points @ truth[:, :3].T + truth[:, 3]
    fitted = affine_from_keypoints(fixed_points, moving_points, ridge=1e-6)
    torch.testing.assert_close(fitted, truth.expand(2, 3, 4), atol=1e-4, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in training: still float32
        in_autocast = affine_from_keypoints(fixed_points, moving_points, ridge=1e-6)
        composed = compose_affines(fitted, fitted)
    assert in_autocast.dtype == composed.dtype == torch.float32
    torch.testing.assert_close(in_autocast, fitted, atol=1e-6, rtol=0)
    # Points that all sit in one place say nothing of the linear part: the ridge keeps it I.
    shift = torch.tensor([0.2, -0.1, 0.3])
    one_place = affine_from_keypoints(torch.zeros(1, 8, 3), shift.expand(1, 8, 3), ridge=0.1)
    torch.testing.assert_close(one_place[0, :, :3], torch.eye(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(one_place[0, :, 3], shift * 8 / 8.1, atol=1e-6, rtol=0)


def test_symmetric_keypoint_affine_averages_the_fits_both_ways():
    """With keypoints, ``affine_symmetric`` averages the fit with the inverse of the fit from
    the moving points to the fixed ones: exact points give the exact map (the pooled head's
    swapped read, the identity here, would have halved it)."""
    torch.manual_seed(0)
    config = LinDefConfig(
        **NARROW, affine_pooling="keypoints", affine_symmetric=True, keypoint_ridge=1e-6
    )
    model = LinDef(config).eval()
    truth = torch.tensor([[1.1, 0.1, 0.0, 0.1], [0.0, 0.9, 0.05, -0.2], [0.02, 0.0, 1.05, 0.05]])
    fixed_points = 2 * torch.rand(1, 16, 3) - 1
    moving_points = fixed_points @ truth[:, :3].T + truth[:, 3]
    moving, fixed = torch.rand(1, 1, 10, 10, 10), torch.rand(1, 1, 10, 10, 10)
    model.keypoints.forward = lambda image: moving_points if image is moving else fixed_points
    with torch.no_grad():
        out = model(moving, fixed)
    torch.testing.assert_close(out.extras["affine_normalized"][0], truth, atol=1e-4, rtol=0)


def test_keypoint_size_shows_the_detector_the_grid_it_was_trained_on():
    """``keypoint_size``: on a finer working grid the detector reads the image resampled to
    its own grid, so it finds the points it finds there (normalised coordinates agree)."""
    from torch.nn import functional as F

    from napari_deepwarp.core.models.lindef import KeypointDetector, resize_longest_side

    torch.manual_seed(0)
    coarse = F.interpolate(torch.rand(1, 1, 5, 5, 5), size=(17, 17, 17), mode="trilinear")
    fine = F.interpolate(coarse, size=(33, 33, 33), mode="trilinear", align_corners=True)
    assert resize_longest_side(torch.zeros(1, 1, 80, 96, 80), 32).shape[2:] == (27, 32, 27)
    assert resize_longest_side(coarse, 17) is coarse
    detector = KeypointDetector(8, (4, 4), (1, 2), 0.2, size=17)
    with torch.no_grad():
        for p in detector.parameters():  # heatmaps smooth enough to compare points
            p.normal_(0, 0.1)
        on_coarse, on_fine = detector(coarse), detector(fine)
        detector.size = 0  # the fine grid as it is: other points
        as_it_is = detector(fine)
    torch.testing.assert_close(on_fine, on_coarse, atol=0.005, rtol=0)
    assert (as_it_is - on_coarse).abs().max() > 0.02


def test_keypoint_pooling_starts_as_the_identity_and_learns_from_the_first_step():
    """A checkpoint without an affine branch loads into it unchanged (what --init needs)."""
    torch.manual_seed(0)
    plain = LinDef(LinDefConfig(**NARROW, use_affine=False)).eval()
    config = LinDefConfig(**NARROW, affine_pooling="keypoints", affine_iterations=2)
    keypoints = LinDef(config).eval()
    missing = keypoints.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith(("affine.", "keypoints.")) for k in missing)
    moving, fixed = torch.rand(1, 1, 12, 10, 14), torch.rand(1, 1, 12, 10, 14)
    with torch.no_grad():
        a, b = plain(moving, fixed), keypoints(moving, fixed)
    torch.testing.assert_close(b.affine, torch.eye(3, 4)[None], atol=1e-6, rtol=0)
    # The points are spread (each its own gradient), the same in both images.
    points = keypoints.keypoints(fixed)[0]
    assert points.std(dim=0).min() > 0.2
    torch.testing.assert_close(keypoints.keypoints(moving)[0], points, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.displacement, a.displacement, atol=1e-5, rtol=0)
    keypoints.train()
    total, _ = keypoints.loss(keypoints(moving, fixed), moving, fixed)
    total.backward()
    grad = keypoints.keypoints.heatmaps.weight.grad.flatten(1)
    assert (grad.abs().max(dim=1).values > 0).all()  # every point's heatmap learns
    assert not torch.allclose(grad[0], grad[1])  # and not all alike
