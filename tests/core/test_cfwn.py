"""CFWN: correlation layer, image pyramid, shapes, the exact loss, gradients and short fits."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from napari_deepwarp.core import losses, spatial
from napari_deepwarp.core.models import cfwn, registry
from napari_deepwarp.core.models.blocks import downsample_image
from napari_deepwarp.core.models.cfwn import CFWN, CFWNConfig, correlation

pytestmark = pytest.mark.usefixtures("one_thread")

# Same layout as the paper's model (four levels, d = 1), a few channels only: the optimisation
# tests then take seconds per dozen Adam steps on a busy CPU.
TINY = {"enc_channels": (4, 8, 8, 8), "estimator_channels": (8,)}


def naive_correlation(f, m, d):
    """Per voxel and offset: mean over channels of f(x) * m(x + o), zero outside."""
    batch, channels, depth, height, width = f.shape
    offsets = list(itertools.product(range(-d, d + 1), repeat=3))
    out = torch.zeros(batch, len(offsets), depth, height, width, dtype=f.dtype)
    for k, (oz, oy, ox) in enumerate(offsets):
        for z, y, x in itertools.product(range(depth), range(height), range(width)):
            zz, yy, xx = z + oz, y + oy, x + ox
            if 0 <= zz < depth and 0 <= yy < height and 0 <= xx < width:
                out[:, k, z, y, x] = (f[:, :, z, y, x] * m[:, :, zz, yy, xx]).sum(1) / channels
    return out


@pytest.mark.parametrize("d", [0, 1, 2])
def test_correlation_equals_naive_loop(d):
    g = torch.Generator().manual_seed(d)
    f = torch.randn(2, 3, 3, 4, 5, generator=g, dtype=torch.float64)
    m = torch.randn(2, 3, 3, 4, 5, generator=g, dtype=torch.float64)
    out = correlation(f, m, d)
    assert out.shape == (2, (2 * d + 1) ** 3, 3, 4, 5)
    torch.testing.assert_close(out, naive_correlation(f, m, d))


def test_correlation_finds_a_shift_and_refuses_bad_input():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1, 8, 6, 6, 6, generator=g)
    m = torch.roll(f, shifts=(1, -1, 0), dims=(2, 3, 4))  # f(x) = m(x + (1, -1, 0))
    cost = correlation(f, m, 1)[..., 1:-1, 1:-1, 1:-1]
    best = cost.mean(dim=(2, 3, 4)).argmax().item()
    assert best == (1 + 1) * 9 + (-1 + 1) * 3 + (0 + 1)
    with pytest.raises(ValueError, match="one shape"):
        correlation(f, m[..., :5], 1)
    with pytest.raises(ValueError, match="search range"):
        correlation(f, m, -1)


def test_downsample_image_keeps_constants_and_corner_aligned_ramps():
    small = downsample_image(torch.full((1, 1, 16, 12, 8), 0.7), (4, 3, 2))
    assert small.shape == (1, 1, 4, 3, 2)
    torch.testing.assert_close(small, torch.full_like(small, 0.7))
    # A ramp along z: corner-aligned grids put coarse voxel j at fine position j * 15 / 3.
    ramp = torch.arange(16.0).view(1, 1, 16, 1, 1).expand(1, 1, 16, 4, 4)
    small = downsample_image(ramp, (4, 4, 4))[0, 0, :, 0, 0]
    torch.testing.assert_close(small[1:-1], torch.tensor([5.0, 10.0]), atol=1e-5, rtol=0)


def test_registered_and_created_through_the_registry():
    assert registry.available_models()["cfwn"] is CFWN
    model = registry.create_model("cfwn", search_range=2, enc_channels=[4, 8])
    assert isinstance(model, CFWN) and model.config.enc_channels == (4, 8)
    assert model.size_multiple == 2 and CFWN().size_multiple == 8
    with pytest.raises(ValueError, match="one window per level"):
        CFWN(CFWNConfig(enc_channels=(4, 8, 8, 8, 8)))


def test_parameter_count_near_the_paper():
    count = sum(p.numel() for p in CFWN().parameters())
    assert count == 653_372
    assert abs(count - 667_400) / 667_400 < 0.03  # Table 1: 667.4K


@pytest.mark.parametrize("shape", [(37, 45, 29), (32, 48, 32)])
def test_output_shapes_padding_and_identity_start(shape):
    torch.manual_seed(0)
    model = CFWN().eval()
    moving, fixed = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    with torch.no_grad():
        out = model(moving, fixed)
    assert out.displacement.shape == (1, 3, *shape)
    assert out.extras["warped"].shape == (1, 1, *shape)
    coarse = [tuple(-(-n // k) for n in shape) for k in (8, 4, 2)]  # coarse to fine
    assert [tuple(u.shape[2:]) for u in out.multiscale] == coarse
    for key in ("warped_levels", "fixed_levels"):
        assert [tuple(t.shape) for t in out.extras[key]] == [(1, 1, *c) for c in coarse]
    assert out.affine is None and out.velocity is None
    # The tiny flow initialisation: the untrained network is (almost) the identity.
    assert out.displacement.abs().max() < 1e-2
    padded = tuple(-(-n // 8) * 8 for n in shape)
    if padded != shape:
        pad = [0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]]
        with torch.no_grad():
            full = model.predict(
                F.pad(moving, pad, mode="replicate"), F.pad(fixed, pad, mode="replicate")
            )
        crop = full.displacement[:, :, : shape[0], : shape[1], : shape[2]]
        assert torch.equal(out.displacement, crop)


def test_loss_is_the_papers_multiscale_sum():
    torch.manual_seed(0)
    model = CFWN(CFWNConfig(**TINY))
    for head in model.flows:  # a field that is not ~0, so every term is exercised
        torch.nn.init.normal_(head.conv.weight, std=0.02)
    moving, fixed = torch.rand(1, 1, 16, 24, 16), torch.rand(1, 1, 16, 24, 16)
    out = model(moving, fixed)
    total, terms = model.loss(out, moving, fixed)
    fields = [*out.multiscale, out.displacement]  # levels 4, 3, 2, 1
    expected = 0.0
    for level, u in zip((4, 3, 2, 1), fields):
        m, f = downsample_image(moving, u.shape[2:]), downsample_image(fixed, u.shape[2:])
        window = {1: 9, 2: 7, 3: 5, 4: 3}[level]
        sim = losses.local_ncc_loss(spatial.warp(m, u), f, window=window)
        reg = losses.diffusion_loss(u)
        expected = expected + 2.0 ** -(level - 1) * (sim + 1.0 * reg)
        assert float(terms[f"similarity_level{level}"]) == pytest.approx(sim.item(), abs=1e-6)
    torch.testing.assert_close(total, expected)
    assert set(terms) >= {"similarity", "regularisation"}
    # detached 0-d tensors: reading them is left to whoever logs them (no device sync per step)
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in terms.values())


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = CFWN()
    moving, fixed = torch.rand(2, 1, 16, 16, 24), torch.rand(2, 1, 16, 16, 24)
    total, _ = model.loss(model(moving, fixed), moving, fixed)
    total.backward()
    params = dict(model.named_parameters())
    assert len(params) == 2 * (4 * 2 + 4 * 4 + 4)  # weight + bias: encoder, estimators, heads
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_the_input_reaches_the_bottom_level_at_initialisation():
    """He initialisation: the part of the deepest features that depends on the image is a
    sizeable share of their spread (about 1 % with PyTorch's default initialisation)."""
    torch.manual_seed(0)
    model = CFWN()
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(2, 1, 6, 6, 6, generator=g)
    images = F.interpolate(coarse, size=(32, 32, 32), mode="trilinear", align_corners=True)
    with torch.no_grad():
        bottom = model.features(images)[-1]
    assert (bottom[0] - bottom[1]).std() > 0.2 * bottom.std()


def test_identical_inputs_keep_the_field_near_zero(registration_pair):
    image = registration_pair(size=(16, 16, 16), seed=3)[1]
    torch.manual_seed(0)
    model = CFWN(CFWNConfig(**TINY))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(20):
        optimiser.zero_grad()
        total, _ = model.loss(model(image, image), image, image)
        total.backward()
        optimiser.step()
    with torch.no_grad():
        u = model(image, image).displacement
    assert u.abs().max() < 0.5


def test_short_fit_reduces_loss_and_raises_dice(registration_pair, fit_model):
    torch.manual_seed(0)
    result = fit_model(CFWN(CFWNConfig(**TINY)), registration_pair(), steps=40, lr=3e-3)
    assert result["loss_last"] < 0.7 * result["loss_first"], result
    assert result["dice_after"] > result["dice_before"] + 0.03, result


def test_module_exports():
    assert set(cfwn.__all__) == {"CFWN", "CFWNConfig", "correlation"}
