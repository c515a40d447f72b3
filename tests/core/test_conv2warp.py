"""Conv2Warp: deformable convolution, Catmull-Rom resampler, shapes, gradients, short fits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_deepwarp.core import spatial
from napari_deepwarp.core.models import registry
from napari_deepwarp.core.models.conv2warp import (
    PAPER_WIDTHS,
    Conv2Warp,
    Conv2WarpConfig,
    DeformConv3d,
    NLDVFResampler,
    catmull_rom_resize,
    catmull_rom_resize_field,
    deform_conv3d,
)

# The paper's layout with 4 channels per hidden layer: tens of Adam steps on 32^3 stay within
# seconds on a busy 2-core CPU.
NARROW = {"widths": (4,) * 7}


def narrow_model(**kwargs) -> Conv2Warp:
    torch.manual_seed(0)
    return Conv2Warp(Conv2WarpConfig(**{**NARROW, **kwargs}))


# --- registry and config --------------------------------------------------------------------


def test_registered_with_the_paper_defaults():
    assert registry.available_models()["conv2warp"] is Conv2Warp
    cfg = Conv2WarpConfig()
    assert cfg.widths == PAPER_WIDTHS == (64, 64, 64, 32, 32, 16, 16)
    assert cfg.deformable_layers == (5, 6, 7) and cfg.levels == 2
    assert (cfg.reg_weight, cfg.reg_low, cfg.reg_high, cfg.ncc_eps) == (1e-3, 0.0, 0.25, 1e-3)
    model = registry.create_model("conv2warp", widths=[4] * 7, width_multiplier=2.0)
    assert isinstance(model, Conv2Warp) and model.size_multiple == 4
    layers = model.ld_convnet[0].layers
    kinds = ["deform" if isinstance(layer.conv, DeformConv3d) else "linear" for layer in layers]
    assert kinds == ["linear"] * 5 + ["deform"] * 3
    convs = [
        layer.conv.conv if kind == "deform" else layer.conv for layer, kind in zip(layers, kinds)
    ]
    assert [c.out_channels for c in convs] == [8] * 7 + [3]
    assert [c.in_channels for c in convs] == [2] + [8] * 7
    with pytest.raises(ValueError, match="deformable_layers"):
        Conv2Warp(Conv2WarpConfig(deformable_layers=(8,)))


# --- 3D deformable convolution ----------------------------------------------------------------


def test_deform_conv_with_zero_offsets_is_conv3d():
    torch.manual_seed(0)
    layer = DeformConv3d(3, 5)
    x = torch.randn(2, 3, 5, 6, 7)
    expected = F.conv3d(x, layer.conv.weight, layer.conv.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    assert torch.all(layer.offset.weight == 0) and torch.all(layer.offset.bias == 0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_deform_conv_offsets_shift_along_their_axis(axis):
    """Offset channels are (dz, dy, dx) voxels: +1 reads the next voxel, +0.5 blends two."""
    torch.manual_seed(1)
    x = torch.randn(1, 2, 6, 7, 8)
    weight, bias = torch.randn(3, 2, 3, 3, 3), torch.randn(3)
    dim = axis + 2
    n = x.shape[dim]
    shifted = torch.cat([x.narrow(dim, 1, n - 1), torch.zeros_like(x.narrow(dim, 0, 1))], dim)
    offset = torch.zeros(1, 27, 3, *x.shape[2:])
    offset[:, :, axis] = 1.0
    out = deform_conv3d(x, offset.view(1, 81, *x.shape[2:]), weight, bias)
    ref = F.conv3d(shifted, weight, bias, padding=1)
    inner = slice(1, None)  # voxel 0's tap at -1 reads x[0] here, padding in the reference
    index = [slice(None)] * 5
    index[dim] = inner
    index = tuple(index)
    torch.testing.assert_close(out[index], ref[index], atol=1e-5, rtol=1e-5)
    out_half = deform_conv3d(x, 0.5 * offset.view(1, 81, *x.shape[2:]), weight, bias)
    ref_half = 0.5 * (F.conv3d(x, weight, bias, padding=1) + ref)
    torch.testing.assert_close(out_half[index], ref_half[index], atol=1e-5, rtol=1e-5)


# --- Catmull-Rom resampler -------------------------------------------------------------------


def test_catmull_rom_passes_through_the_samples():
    torch.manual_seed(2)
    x = torch.randn(1, 2, 5, 6, 7)
    up = catmull_rom_resize(x, (9, 11, 13), align_corners=True)  # n -> 2n - 1
    torch.testing.assert_close(up[:, :, ::2, ::2, ::2], x, atol=1e-6, rtol=0)
    assert torch.equal(catmull_rom_resize(x, x.shape[2:]), x)


def _quadratic(z, y, x):
    return 0.3 * z * z - 0.2 * y * x + 0.05 * x * x + 0.1 * z * y * x * x / 10 + z - 2 * y + 0.5


def test_catmull_rom_reproduces_quadratics_in_the_interior():
    """Keys' a = -1/2 kernel reproduces every polynomial of degree <= 2 per axis exactly."""
    shape, size = (8, 9, 10), (16, 18, 20)
    grid = spatial.identity_grid(shape, dtype=torch.float64)[0]
    values = _quadratic(*grid)[None, None]
    up = catmull_rom_resize(values, size)  # cell-centred: j -> (j + 0.5) / 2 - 0.5
    axes = [(torch.arange(n, dtype=torch.float64) + 0.5) / 2 - 0.5 for n in size]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    exact = _quadratic(z, y, x)
    # Interior: all four taps of every axis inside the input, i.e. 1 <= position <= n - 2.
    keep = [(a >= 1) & (a <= n - 2) for a, n in zip(axes, shape)]
    got, want = (
        up[0, 0][keep[0]][:, keep[1]][:, :, keep[2]],
        exact[keep[0]][:, keep[1]][:, :, keep[2]],
    )
    assert got.numel() > 100
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # A cubic is *not* reproduced (central-difference tangents): the spline is 3rd-order accurate.
    cubic = (grid[2] ** 3)[None, None]
    err = (catmull_rom_resize(cubic, size)[0, 0] - x**3)[keep[0]][:, keep[1]][:, :, keep[2]]
    assert err.abs().max() > 1e-2


def test_field_resampling_scales_values_and_resampler_starts_as_the_spline():
    field = torch.ones(1, 3, 4, 5, 6)
    torch.testing.assert_close(
        catmull_rom_resize_field(field, (8, 10, 12)), 2 * torch.ones(1, 3, 8, 10, 12)
    )
    torch.testing.assert_close(
        catmull_rom_resize_field(field, (7, 9, 11), align_corners=True),
        2 * torch.ones(1, 3, 7, 9, 11),
    )
    torch.manual_seed(3)
    coarse = torch.randn(2, 3, 4, 5, 6)
    resampler = NLDVFResampler()
    torch.testing.assert_close(
        resampler(coarse, (8, 10, 12)),
        catmull_rom_resize_field(coarse, (8, 10, 12)),
        atol=1e-6,
        rtol=0,
    )


# --- the model -------------------------------------------------------------------------------


def test_output_shapes_on_odd_sizes(one_thread):
    shape = (37, 45, 29)
    model = narrow_model(head_init_std=1e-2).eval()  # a field that is not ~0
    torch.manual_seed(4)
    x, y = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    with torch.no_grad():
        out = model(x, y)
        padded = [40, 48, 32]
        pad = [0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]]
        full = model.predict(F.pad(x, pad, mode="replicate"), F.pad(y, pad, mode="replicate"))
    assert out.displacement.shape == (1, 3, *shape)
    assert [f.shape for f in out.multiscale] == [(1, 3, 19, 23, 15)]
    assert out.extras["warped"].shape == (1, 1, *shape)
    assert [w.shape for w in out.extras["warped_levels"]] == [(1, 1, *shape)]
    assert out.extras["u_up"].shape == out.extras["u_d"].shape == (1, 3, *shape)
    assert out.affine is None and out.velocity is None
    crop = full.displacement[:, :, : shape[0], : shape[1], : shape[2]]
    assert torch.equal(out.displacement, crop)
    assert out.displacement.abs().max() > 1e-3
    total, terms = model.loss(out, x, y)
    assert torch.isfinite(total) and set(terms) == {
        "similarity",
        "similarity_levels",
        "regularisation",
    }


def test_working_grid_outputs_follow_the_continuous_warping_stage(one_thread):
    shape = (32, 48, 32)
    model = narrow_model(head_init_std=1e-2).eval()
    torch.manual_seed(5)
    x, y = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    with torch.no_grad():
        out = model(x, y)
    assert out.displacement.shape == (2, 3, *shape)
    (coarse,) = out.multiscale
    assert coarse.shape == (2, 3, 16, 24, 16)
    u_up = out.extras["u_up"]
    torch.testing.assert_close(u_up, catmull_rom_resize_field(coarse, shape))
    torch.testing.assert_close(out.extras["warped_levels"][0], spatial.warp(x, u_up))
    torch.testing.assert_close(out.extras["fixed_levels"][0], y)
    torch.testing.assert_close(out.extras["warped"], spatial.warp(x, out.displacement))
    assert out.extras["u_d"] is out.displacement
    # The field is the composition of the fine residual with the upsampled coarse field.
    assert not torch.allclose(out.displacement, u_up)


def test_untrained_model_is_near_identity(one_thread):
    model = narrow_model().eval()
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        out = model(x, torch.rand_like(x))
    assert out.displacement.abs().max() < 1e-2


@pytest.mark.parametrize("share_levels", [True, False])
def test_gradients_reach_every_parameter(share_levels, one_thread):
    model = narrow_model(share_levels=share_levels)
    torch.manual_seed(6)
    moving, fixed = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    total, terms = model.loss(model(moving, fixed), moving, fixed)
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in terms.values())
    total.backward()
    params = dict(model.named_parameters())
    assert len(model.ld_convnet) == (1 if share_levels else 2)
    offsets = [name for name in params if ".offset." in name]
    assert len(offsets) == 2 * 3 * len(model.ld_convnet)  # weight + bias of 3 deformable layers
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_loss_is_the_papers(one_thread):
    """Similarity + CWS level terms + 0.001 * clamp(mean((u_d - u_up)**2), 0, 0.25)."""
    model = narrow_model()
    torch.manual_seed(7)
    moving, fixed = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    out = model(moving, fixed)
    out.displacement = out.extras["u_up"] + 2.0  # mean squared difference 4 -> clamped at 0.25
    out.extras["warped"] = spatial.warp(moving, out.displacement)
    total, terms = model.loss(out, moving, fixed)
    assert float(terms["regularisation"]) == pytest.approx(0.25)
    expected = float(terms["similarity"] + terms["similarity_levels"]) + 1e-3 * 0.25
    assert float(total.detach()) == pytest.approx(expected, abs=1e-6)
    out.displacement = out.extras["u_up"] + 0.1  # inside the interval: 0.01, with gradient
    assert float(model.loss(out, moving, fixed)[1]["regularisation"]) == pytest.approx(
        0.01, rel=1e-4
    )


def test_identical_inputs_keep_the_field_near_zero(registration_pair, fit_model, one_thread):
    image = registration_pair(size=(16, 16, 16), seed=1)[0]
    labels = registration_pair(size=(16, 16, 16), seed=1)[2]
    pair = (image, image, labels, labels, None)
    result = fit_model(narrow_model(), pair, steps=20, lr=1e-3)
    assert result["field"].abs().max() < 0.5


def test_short_fit_reduces_loss_and_raises_dice(registration_pair, fit_model, one_thread):
    result = fit_model(narrow_model(), registration_pair(), steps=24, lr=1e-3)
    assert result["loss_last"] < result["loss_first"] - 0.1, result
    assert result["dice_after"] > result["dice_before"] + 0.05, result
