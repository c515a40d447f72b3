"""VoxelMorph and the shared blocks: shapes, input checks, gradients, diffeomorphism, fitting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_deepwarp.core import spatial
from napari_deepwarp.core.models import available_models, create_model
from napari_deepwarp.core.models.blocks import (
    ConvBlock,
    FlowHead,
    ResizeField,
    SpatialTransformer,
    UNet,
    VecInt,
)
from napari_deepwarp.core.models.voxelmorph import VoxelMorph, VoxelMorphConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared CPU OpenMP waits cost a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A narrow VoxelMorph for the optimisation tests: same layout, fewer channels, so that tens of
# Adam steps on 32^3 stay within a few seconds on a busy 2-core CPU.
NARROW = {"enc_channels": (8, 16, 16, 16), "dec_channels": (16, 16, 16, 16)}


def smooth_field(shape, amplitude, seed, coarse=4):
    """A smooth random field (B=1): coarse Gaussian noise upsampled, max |u| = amplitude."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(1, 3, coarse, coarse, coarse, generator=g)
    u = F.interpolate(u, size=tuple(shape), mode="trilinear", align_corners=True)
    return u * (amplitude / u.abs().max())


def phantom_pair(shape=(32, 32, 32), seed=0, amplitude=4.0):
    """Blob label phantom, its image, and a smoothly deformed copy (the fixed image/labels)."""
    g = torch.Generator().manual_seed(seed)
    grid = spatial.identity_grid(shape)[0]
    labels = torch.zeros(shape)
    for k in range(1, 6):
        centre = torch.tensor(
            [float(torch.randint(n // 4, n - n // 4, (1,), generator=g)) for n in shape]
        )
        radii = 3 + 4 * torch.rand(3, generator=g)
        inside = (((grid - centre.view(3, 1, 1, 1)) / radii.view(3, 1, 1, 1)) ** 2).sum(0) <= 1
        labels[inside] = k
    intensities = torch.tensor([0.0, 0.3, 0.5, 0.7, 0.9, 1.0])
    image = intensities[labels.long()][None, None]
    image = F.avg_pool3d(image, 3, stride=1, padding=1, count_include_pad=False)
    labels = labels[None, None]
    u = smooth_field(shape, amplitude, seed + 1)
    fixed = spatial.warp(image, u)
    fixed_labels = spatial.warp(labels, u, mode="nearest")
    return image, fixed, labels, fixed_labels


def mean_dice(a, b, labels=range(1, 6)):
    scores = []
    for k in labels:
        x, y = a == k, b == k
        total = x.sum() + y.sum()
        if total > 0:
            scores.append(float(2 * (x & y).sum() / total))
    return sum(scores) / len(scores)


class FixedField(nn.Module):
    """Stands in for the flow head: always returns the given field (batch-expanded)."""

    def __init__(self, field):
        super().__init__()
        self.register_buffer("field", field)

    def forward(self, x):
        return self.field.expand(x.shape[0], -1, -1, -1, -1)


# ---------------------------------------------------------------------------------------------


def test_registered_and_created_through_the_registry():
    assert available_models()["voxelmorph"] is VoxelMorph
    model = create_model("voxelmorph", diffeomorphic=True, enc_channels=[8, 8, 8, 8])
    assert isinstance(model, VoxelMorph)
    assert model.config.enc_channels == (8, 8, 8, 8)
    assert VoxelMorph.size_multiple == 16 and model.size_multiple == 16


@pytest.mark.parametrize("diffeomorphic", [False, True])
def test_output_shapes_non_cubic(diffeomorphic):
    torch.manual_seed(0)
    model = VoxelMorph(VoxelMorphConfig(diffeomorphic=diffeomorphic)).eval()
    moving, fixed = torch.rand(2, 1, 16, 32, 48), torch.rand(2, 1, 16, 32, 48)
    with torch.no_grad():
        out = model(moving, fixed)
    assert out.displacement.shape == (2, 3, 16, 32, 48)
    assert out.extras["warped"].shape == (2, 1, 16, 32, 48)
    assert out.affine is None
    if diffeomorphic:
        assert out.velocity is not None and out.velocity.shape == (2, 3, 16, 32, 48)
    else:
        assert out.velocity is None
    # Untrained: the flow head's tiny init gives (almost) the identity transform.
    assert out.displacement.abs().max() < 1e-2


def test_batch_items_are_independent():
    torch.manual_seed(0)
    model = VoxelMorph(VoxelMorphConfig(**NARROW))
    with torch.no_grad():
        model.flow.conv.weight.normal_(0, 1e-2)
    model.eval()
    moving, fixed = torch.rand(2, 1, 16, 16, 32), torch.rand(2, 1, 16, 16, 32)
    with torch.no_grad():
        both = model(moving, fixed).displacement
        second = model(moving[1:], fixed[1:]).displacement
    torch.testing.assert_close(both[1:], second, atol=1e-6, rtol=1e-5)


def test_int_downsize_shapes():
    model = VoxelMorph(VoxelMorphConfig(diffeomorphic=True, int_downsize=2, **NARROW)).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 16, 32, 32), torch.rand(1, 1, 16, 32, 32))
    assert out.displacement.shape == out.velocity.shape == (1, 3, 16, 32, 32)


@pytest.mark.parametrize("shape", [(37, 45, 29), (20, 32, 32), (8, 16, 16)])
def test_any_size_is_padded_and_cropped_back(shape):
    """Odd sizes work: the same field as on the explicitly padded grid, cropped."""
    torch.manual_seed(0)
    model = VoxelMorph(VoxelMorphConfig(**NARROW)).eval()
    torch.nn.init.normal_(model.flow.conv.weight, std=0.01)  # a field that is not ~0
    x, y = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    with torch.no_grad():
        out = model(x, y)
    assert out.displacement.shape == (1, 3, *shape)
    assert out.extras["warped"].shape == (1, 1, *shape)
    padded = [-(-n // 16) * 16 for n in shape]
    pad = [0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]]
    pf = torch.nn.functional.pad
    with torch.no_grad():
        full = model.predict(pf(x, pad, mode="replicate"), pf(y, pad, mode="replicate"))
    crop = full.displacement[:, :, : shape[0], : shape[1], : shape[2]]
    assert torch.equal(out.displacement, crop)


def test_mismatched_or_bad_inputs_are_refused():
    model = VoxelMorph(VoxelMorphConfig(**NARROW))
    with pytest.raises(ValueError, match="one shape"):
        model(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 32))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        model(torch.rand(1, 16, 16, 16), torch.rand(1, 16, 16, 16))


@pytest.mark.parametrize("diffeomorphic", [False, True])
def test_gradients_reach_every_parameter(diffeomorphic):
    torch.manual_seed(0)
    model = VoxelMorph(VoxelMorphConfig(diffeomorphic=diffeomorphic))
    moving, fixed = torch.rand(2, 1, 16, 32, 48), torch.rand(2, 1, 16, 32, 48)
    out = model(moving, fixed)
    total, terms = model.loss(out, moving, fixed)
    assert set(terms) == {"similarity", "regularisation"}
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in terms.values())
    total.backward()
    params = dict(model.named_parameters())
    assert len(params) == 2 * (4 + 4 + 3 + 1)  # conv weight + bias: enc, dec, extra, head
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_diffeomorphic_field_has_positive_jacobian():
    shape = (32, 32, 32)
    velocity = smooth_field(shape, amplitude=8.0, seed=2)
    # As a plain displacement the same field folds; integrated, it must not.
    assert spatial.jacobian_determinant(velocity).min() < 0
    model = VoxelMorph(VoxelMorphConfig(diffeomorphic=True, **NARROW)).eval()
    model.flow = FixedField(velocity)
    x = torch.rand(1, 1, *shape)
    with torch.no_grad():
        out = model(x, x)
    torch.testing.assert_close(out.velocity, velocity)
    det = spatial.jacobian_determinant(out.displacement)
    assert det.min() > 0
    assert out.displacement.abs().max() > 3  # a real deformation, not a tiny one


def test_identical_inputs_keep_the_field_near_zero():
    torch.manual_seed(0)
    image, _, _, _ = phantom_pair(shape=(16, 32, 32), seed=3)
    model = VoxelMorph(VoxelMorphConfig(**NARROW))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):
        out = model(image, image)
        total, _ = model.loss(out, image, image)
        opt.zero_grad()
        total.backward()
        opt.step()
    with torch.no_grad():
        u = model(image, image).displacement
    assert u.abs().max() < 0.5


def test_short_fit_reduces_loss_and_raises_dice():
    torch.manual_seed(0)
    moving, fixed, moving_labels, fixed_labels = phantom_pair(seed=0)
    model = VoxelMorph(VoxelMorphConfig(**NARROW))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    dice_before = mean_dice(moving_labels, fixed_labels)
    first_loss = None
    for _ in range(40):
        out = model(moving, fixed)
        total, _ = model.loss(out, moving, fixed)
        if first_loss is None:
            first_loss = float(total.detach())
        opt.zero_grad()
        total.backward()
        opt.step()
    with torch.no_grad():
        out = model(moving, fixed)
        last_loss = float(model.loss(out, moving, fixed)[0])
        warped_labels = spatial.warp(moving_labels, out.displacement, mode="nearest")
    dice_after = mean_dice(warped_labels, fixed_labels)
    assert last_loss < first_loss - 0.02, (first_loss, last_loss)
    assert dice_after > dice_before + 0.04, (dice_before, dice_after)


# --- shared blocks ----------------------------------------------------------------------------


def test_conv_block_and_flow_head():
    block = ConvBlock(2, 4, stride=2, norm="instance", activation="leaky_relu")
    assert block.conv.bias is None  # the norm's shift replaces the bias
    assert block(torch.rand(1, 2, 8, 8, 8)).shape == (1, 4, 4, 4, 4)
    torch.manual_seed(0)
    head = FlowHead(16)
    assert head.conv.out_channels == 3
    assert torch.all(head.conv.bias == 0)
    assert 0 < head.conv.weight.std() < 3e-5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"downsample": "maxpool", "upsample": "trilinear", "norm": "batch"},
        {"downsample": "avgpool", "upsample": "transpose", "skip_input": False},
        {"stop_at_half": True},
    ],
)
def test_unet_variants(kwargs):
    net = UNet(2, (4, (8, 8)), (8, 8, 4), **kwargs)
    assert net.size_multiple == 4
    final, levels = net.forward_features(torch.rand(2, 2, 8, 16, 12))
    size = (4, 8, 6) if kwargs.get("stop_at_half") else (8, 16, 12)
    assert final.shape == (2, net.out_channels, *size)
    assert [lv.shape[2:] for lv in levels] == [(2, 4, 3), (4, 8, 6)]


def test_transformer_vecint_resize_wrap_spatial():
    image = torch.rand(1, 1, 8, 8, 8)
    u = smooth_field((8, 8, 8), 1.5, seed=5)
    torch.testing.assert_close(SpatialTransformer()(image, u), spatial.warp(image, u))
    torch.testing.assert_close(VecInt(0)(u), u)
    torch.testing.assert_close(VecInt(4)(u), spatial.integrate_velocity(u, 4))
    half = ResizeField(0.5)(u)
    assert half.shape == (1, 3, 4, 4, 4)
    torch.testing.assert_close(ResizeField(1.0)(u), u)
