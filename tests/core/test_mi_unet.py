"""MI-UNet (Wang et al. 2021): shapes, gradients, the exact loss, mono- and multi-modal fits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_deepwarp.core import losses, spatial
from napari_deepwarp.core.models import available_models, create_model
from napari_deepwarp.core.models.mi_unet import MIUNet, MIUNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# Same layout as the default, fewer channels: tens of Adam steps on 32^3 in seconds on a CPU.
NARROW = {"enc_channels": (8, 16, 16, 16), "dec_channels": (16, 16, 16, 16)}


def blur(x: torch.Tensor) -> torch.Tensor:
    """3^3 box blur: the partial-volume edges every real scan has."""
    return F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)


def test_registered_with_its_config():
    assert available_models()["mi_unet"] is MIUNet
    model = create_model("mi_unet", bins=16, enc_channels=[8, 8, 8, 8])
    assert isinstance(model, MIUNet)
    assert model.config.bins == 16 and model.config.enc_channels == (8, 8, 8, 8)
    assert model.size_multiple == 16
    with pytest.raises(ValueError, match="bins"):
        MIUNet(MIUNetConfig(bins=1))


@pytest.mark.parametrize("shape", [(37, 45, 29), (32, 48, 32)])
def test_output_shapes_odd_and_padded_grid(shape):
    torch.manual_seed(0)
    model = MIUNet().eval()
    moving, fixed = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    with torch.no_grad():
        out = model(moving, fixed)
    assert out.displacement.shape == (1, 3, *shape)
    assert out.extras["warped"].shape == (1, 1, *shape)
    assert out.affine is None and out.velocity is None and out.multiscale == []
    # Untrained: the flow head's tiny init is (almost) the identity transform.
    assert out.displacement.abs().max() < 1e-2


def test_odd_size_equals_the_padded_prediction_cropped():
    torch.manual_seed(0)
    model = MIUNet(MIUNetConfig(**NARROW)).eval()
    torch.nn.init.normal_(model.flow.conv.weight, std=0.01)  # a field that is not ~0
    shape = (37, 45, 29)
    x, y = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    pad = [0, 3, 0, 3, 0, 11]  # to (48, 48, 32)
    with torch.no_grad():
        out = model(x, y)
        full = model.predict(F.pad(x, pad, mode="replicate"), F.pad(y, pad, mode="replicate"))
    assert torch.equal(out.displacement, full.displacement[:, :, :37, :45, :29])


def test_loss_is_negative_mi_plus_weighted_diffusion():
    torch.manual_seed(0)
    model = MIUNet(MIUNetConfig(reg_weight=0.5, **NARROW))
    torch.nn.init.normal_(model.flow.conv.weight, std=0.01)
    moving, fixed = torch.rand(1, 1, 16, 16, 32), torch.rand(1, 1, 16, 16, 32)
    out = model(moving, fixed)
    total, terms = model.loss(out, moving, fixed)
    mi = losses.mutual_information_loss(out.extras["warped"], fixed, bins=32, sigma_ratio=0.5)
    reg = losses.diffusion_loss(out.displacement)
    torch.testing.assert_close(total, mi + 0.5 * reg)
    assert set(terms) == {"similarity", "regularisation"}
    assert float(terms["similarity"]) == pytest.approx(float(mi.detach()), rel=1e-6)
    assert model.loss_description()["similarity"] == {
        "name": "mi",
        "bins": 32,
        "sigma_ratio": 0.5,
        "max_samples": None,
    }


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = MIUNet()
    moving, fixed = torch.rand(2, 1, 16, 16, 32), torch.rand(2, 1, 16, 16, 32)
    total, _ = model.loss(model(moving, fixed), moving, fixed)
    total.backward()
    params = dict(model.named_parameters())
    assert len(params) == 2 * (4 + 4 + 3 + 1)  # conv weight + bias: enc, dec, extra, head
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_identical_inputs_keep_the_field_near_zero(registration_pair):
    torch.manual_seed(0)
    image = registration_pair(size=(16, 32, 32), seed=3)[1]
    model = MIUNet(MIUNetConfig(**NARROW))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(20):
        total, _ = model.loss(model(image, image), image, image)
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
    with torch.no_grad():
        u = model(image, image).displacement
    assert u.abs().max() < 0.5


def test_short_fit_reduces_loss_and_raises_dice(registration_pair, fit_model):
    torch.manual_seed(0)
    model = MIUNet(MIUNetConfig(**NARROW))
    result = fit_model(model, registration_pair(), steps=30, lr=1e-3)
    assert result["loss_last"] < result["loss_first"] - 0.1, result
    assert result["dice_after"] > result["dice_before"] + 0.01, result


def test_multimodal_fit_with_a_non_monotone_contrast(registration_pair, fit_model):
    """The fixed image shows the same anatomy with a different, non-monotone contrast.

    Both images are box-blurred first: with perfectly piecewise-constant images every voxel sits
    on a histogram peak and the Parzen MI has (almost) no gradient at the identity.
    """
    moving, _, moving_labels, fixed_labels, field = registration_pair()
    n_labels = int(moving_labels.max()) + 1
    t1 = torch.stack([moving[moving_labels == k].mean() for k in range(n_labels)])
    t2 = torch.tensor([0.9, 0.2, 0.6, 0.1, 0.8, 0.35, 0.05, 0.5])[:n_labels]
    remapped = t2[t1.argsort()]  # new intensity of each label, in order of its old one
    steps = remapped.diff()
    assert (steps > 0).any() and (steps < 0).any()  # not monotone: no intensity map fits
    fixed = spatial.warp(blur(t2[moving_labels].float()), field)
    pair = (blur(moving), fixed, moving_labels, fixed_labels, field)
    torch.manual_seed(0)
    model = MIUNet(MIUNetConfig(**NARROW))
    result = fit_model(model, pair, steps=30, lr=1e-3)
    assert result["loss_last"] < result["loss_first"] - 0.03, result
    assert result["dice_after"] > result["dice_before"] + 0.02, result
