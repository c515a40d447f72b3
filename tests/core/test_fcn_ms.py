"""FCN-MS (Li & Fan): shapes, the exact deep self-supervision loss, gradients and fits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_deepwarp.core import losses, spatial
from napari_deepwarp.core.models import fcn_ms, registry
from napari_deepwarp.core.models.blocks import downsample_image
from napari_deepwarp.core.models.fcn_ms import FCNMS, FCNMSConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# The paper's layout with a quarter of the channels: fits stay within seconds on a busy CPU.
NARROW = {"conv_channels": (8, 16, 32, 16), "deconv_channels": (16, 8)}


def test_registered_and_created_through_the_registry():
    assert registry.available_models()["fcn_ms"] is FCNMS
    model = registry.create_model("fcn_ms", conv_channels=[8, 16, 32, 16], norm="batch")
    assert isinstance(model, FCNMS) and model.config.conv_channels == (8, 16, 32, 16)
    assert isinstance(model.conv1.norm, torch.nn.BatchNorm3d)
    assert FCNMS.size_multiple == 4
    with pytest.raises(ValueError, match="conv_channels needs 4"):
        FCNMS(FCNMSConfig(conv_channels=(8, 16, 32)))


def test_parameter_count_at_the_papers_widths():
    assert sum(p.numel() for p in FCNMS().parameters()) == 684_201
    skips = FCNMS(FCNMSConfig(skip_connections=True))
    assert sum(p.numel() for p in skips.parameters()) > 684_201


@pytest.mark.parametrize("shape", [(37, 45, 29), (32, 48, 32)])
@pytest.mark.parametrize("skip_connections", [False, True])
def test_output_shapes_padding_and_identity_start(shape, skip_connections):
    torch.manual_seed(0)
    model = FCNMS(FCNMSConfig(skip_connections=skip_connections)).eval()
    moving, fixed = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    with torch.no_grad():
        out = model(moving, fixed)
    assert out.displacement.shape == (1, 3, *shape)
    assert out.extras["warped"].shape == (1, 1, *shape)
    coarse = [tuple(-(-n // k) for n in shape) for k in (4, 2)]  # Reg1 (1/4), Reg2 (1/2)
    assert [tuple(u.shape[2:]) for u in out.multiscale] == coarse
    for key in ("warped_levels", "fixed_levels"):
        assert [tuple(t.shape) for t in out.extras[key]] == [(1, 1, *c) for c in coarse]
    assert out.affine is None and out.velocity is None
    # Small heads: a freshly initialised network is (almost) the identity at every level.
    for u in (*out.multiscale, out.displacement):
        assert u.abs().max() < 1e-2
    padded = tuple(-(-n // 4) * 4 for n in shape)
    if padded != shape:
        pad = [0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]]
        with torch.no_grad():
            full = model.predict(
                F.pad(moving, pad, mode="replicate"), F.pad(fixed, pad, mode="replicate")
            )
        crop = full.displacement[:, :, : shape[0], : shape[1], : shape[2]]
        assert torch.equal(out.displacement, crop)


def test_loss_is_the_weighted_deep_self_supervision_sum():
    torch.manual_seed(0)
    model = FCNMS(FCNMSConfig(**NARROW))
    for head in (model.reg1, model.reg2, model.reg3):  # fields that are not ~0
        torch.nn.init.normal_(head.conv.weight, std=0.05)
    moving, fixed = torch.rand(1, 1, 16, 24, 16), torch.rand(1, 1, 16, 24, 16)
    out = model(moving, fixed)
    total, terms = model.loss(out, moving, fixed)
    expected = 0.0
    fields = [*out.multiscale, out.displacement]
    for k, (u, weight) in enumerate(zip(fields, (0.3, 0.6, 1.0)), start=1):
        m, f = downsample_image(moving, u.shape[2:]), downsample_image(fixed, u.shape[2:])
        sim = losses.ncc_loss(spatial.warp(m, u), f)
        reg = losses.total_variation_loss(u)
        expected = expected + weight * (sim + 0.05 * reg)
        assert float(terms[f"similarity_level{k}"]) == pytest.approx(sim.item(), abs=1e-6)
        assert float(terms[f"regularisation_level{k}"]) == pytest.approx(reg.item(), abs=1e-6)
    torch.testing.assert_close(total, expected)
    assert fields[-1].shape[2:] == moving.shape[2:]
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in terms.values())


@pytest.mark.parametrize("skip_connections", [False, True])
def test_gradients_reach_every_parameter(skip_connections):
    torch.manual_seed(0)
    model = FCNMS(FCNMSConfig(skip_connections=skip_connections))
    moving, fixed = torch.rand(2, 1, 16, 16, 24), torch.rand(2, 1, 16, 16, 24)
    total, _ = model.loss(model(moving, fixed), moving, fixed)
    total.backward()
    params = dict(model.named_parameters())
    # conv weight + norm scale + shift for 4 Conv and 2 Deconv layers, weight + bias for 3 heads
    assert len(params) == 3 * 6 + 2 * 3
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_identical_inputs_keep_the_field_near_zero(registration_pair):
    image = registration_pair(size=(16, 16, 16), seed=3)[1]
    torch.manual_seed(0)
    model = FCNMS(FCNMSConfig(**NARROW))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(20):
        optimiser.zero_grad()
        total, _ = model.loss(model(image, image), image, image)
        total.backward()
        optimiser.step()
    with torch.no_grad():
        out = model(image, image)
    for u in (*out.multiscale, out.displacement):
        assert u.abs().max() < 0.5


def test_fit_from_scratch_reduces_loss_and_raises_dice(registration_pair, fit_model):
    """The paper's single-pair use: optimise a fresh network on one pair."""
    torch.manual_seed(0)
    model = FCNMS(FCNMSConfig(**NARROW))
    pair = registration_pair()
    result = fit_model(model, pair, steps=40, lr=3e-3)
    assert result["loss_last"] < 0.4 * result["loss_first"], result
    assert result["dice_after"] > result["dice_before"] + 0.1, result
    true_field = pair[4]
    error = (result["field"] - true_field).norm(dim=1).mean()
    assert error < 0.6 * true_field.norm(dim=1).mean()
    # Instance normalisation: the fitted network gives the same field in train and eval mode.
    with torch.no_grad():
        train_field = model.train()(pair[0], pair[1]).displacement
    torch.testing.assert_close(train_field, result["field"])


def test_module_exports():
    assert set(fcn_ms.__all__) == {"FCNMS", "FCNMSConfig"}
