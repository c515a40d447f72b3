"""resources/training/widen_conv2warp.py: twice the widths, the same prediction, copies that can
learn apart."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import load_script

from napari_deepwarp.core.checkpoint import load_checkpoint, save_checkpoint
from napari_deepwarp.core.models.conv2warp import Conv2Warp, Conv2WarpConfig


@pytest.fixture(scope="module")
def widen_script():
    return load_script("training/widen_conv2warp.py")


def trained_looking(share_levels: bool) -> Conv2Warp:
    """A narrow Conv2Warp whose field layer and offset predictors are far from their zero start,
    so that every weight the widening touches shapes the prediction."""
    torch.manual_seed(0)
    model = Conv2Warp(
        Conv2WarpConfig(widths=(4,) * 7, width_multiplier=1.0, share_levels=share_levels)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "offset" in name or name.endswith("layers.7.conv.conv.weight"):
                p.normal_(0.0, 0.05)
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def pair() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    moving = torch.rand(1, 1, 16, 20, 24)
    return moving, torch.roll(moving, 2, dims=3)


@pytest.mark.parametrize("share_levels", [True, False])
def test_wider_network_predicts_the_same_field(widen_script, share_levels, one_thread):
    model = trained_looking(share_levels)
    wide = widen_script.widen(model, seed=3)
    moving, fixed = pair()
    with torch.no_grad():
        before = model(moving, fixed).displacement
        after = wide(moving, fixed).displacement
    assert before.abs().max() > 0.05  # the comparison means something
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    assert wide.config.width_multiplier == 2.0
    hidden = [layer.conv for layer in wide.ld_convnet[0].layers[:-1]]
    assert all(getattr(c, "conv", c).out_channels == 8 for c in hidden)
    assert all(getattr(c, "conv", c).in_channels == 8 for c in hidden[1:])


def test_copies_of_a_channel_get_different_gradients(widen_script, one_thread):
    wide = widen_script.widen(trained_looking(True), seed=3).train()
    moving, fixed = pair()
    output = wide(moving, fixed)
    loss, _ = wide.loss(output, moving, fixed)
    loss.backward()
    grad = wide.ld_convnet[0].layers[2].conv.weight.grad  # (8, 8, 3, 3, 3): 4 channels, copied
    assert not torch.allclose(grad[:4], grad[4:])


def test_command_writes_a_checkpoint_at_the_new_width(widen_script, tmp_path, monkeypatch):
    source, target = tmp_path / "half.pt", tmp_path / "full.pt"
    save_checkpoint(source, trained_looking(True))
    monkeypatch.setattr(sys, "argv", ["widen", str(source), str(target)])
    widen_script.main()
    model, card = load_checkpoint(target)
    assert card["config"]["width_multiplier"] == 2.0
    assert isinstance(model, Conv2Warp)
    moving, fixed = pair()
    with torch.no_grad():
        expected = trained_looking(True)(moving, fixed).displacement
        torch.testing.assert_close(
            model.eval()(moving, fixed).displacement, expected, atol=1e-5, rtol=1e-4
        )
