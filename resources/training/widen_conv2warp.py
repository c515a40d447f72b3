"""Widen a Conv2Warp checkpoint twofold without changing what it predicts (Net2WiderNet).

    python resources/training/widen_conv2warp.py IN.pt OUT.pt

The shipped Conv2Warp runs at half the paper's widths (``width_multiplier=0.5``). This writes a
checkpoint at twice the width (the paper's, from the shipped one) that predicts the same fields,
so that ``deepwarp train --init OUT.pt`` trains the paper's full-width network from what the
half-width one learnt instead of from scratch (Chen, Goodfellow, Shlens, "Net2Net", ICLR 2016).

Every hidden channel is copied once (its convolution weights, its instance-norm scale and
shift): both copies compute the same activations. A layer reading them splits each input
weight between the two copies as ``w * r`` and ``w * (1 - r)``, ``r`` uniform in [0.25, 0.75]
per weight: the sum is ``w``, so the prediction is unchanged, while the copies get different
gradients and can learn apart (an even split would keep them equal for ever). The field layer's
outputs, the first layer's inputs (the two images), the offset predictors' outputs and the
Catmull-Rom resampler keep their sizes.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from napari_deepwarp.core.checkpoint import load_checkpoint, save_checkpoint
from napari_deepwarp.core.models.conv2warp import Conv2Warp, DeformConv3d


def _split(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``(out, in, ...)`` -> ``(out, 2 in, ...)``: each input weight split over its two copies."""
    r = 0.25 + 0.5 * torch.rand(weight.shape, generator=generator, dtype=weight.dtype)
    return torch.cat([weight * r, weight * (1 - r)], dim=1)


def _double_rows(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else torch.cat([tensor, tensor], dim=0)


def _widen_conv(conv, widen_in: bool, widen_out: bool, generator) -> None:
    weight = conv.weight.data
    if widen_in:
        weight = _split(weight, generator)
    if widen_out:
        weight = _double_rows(weight)
        if conv.bias is not None:
            conv.bias = torch.nn.Parameter(_double_rows(conv.bias.data))
    conv.weight = torch.nn.Parameter(weight.contiguous())
    conv.in_channels, conv.out_channels = weight.shape[1], weight.shape[0]


def widen(model: Conv2Warp, seed: int = 0) -> Conv2Warp:
    """A copy of ``model`` with ``width_multiplier`` doubled and the same predictions."""
    generator = torch.Generator().manual_seed(seed)
    wide = copy.deepcopy(model)
    for net in wide.ld_convnet:
        last = len(net.layers) - 1
        for i, layer in enumerate(net.layers):
            widen_in, widen_out = i > 0, i < last
            conv = layer.conv
            if isinstance(conv, DeformConv3d):
                _widen_conv(conv.offset, widen_in, False, generator)
                conv = conv.conv
            _widen_conv(conv, widen_in, widen_out, generator)
            norm = layer.norm
            if widen_out and isinstance(norm, torch.nn.InstanceNorm3d):
                norm.weight = torch.nn.Parameter(_double_rows(norm.weight.data))
                norm.bias = torch.nn.Parameter(_double_rows(norm.bias.data))
                norm.num_features *= 2
    wide.config.width_multiplier = model.config.width_multiplier * 2
    return wide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, card = load_checkpoint(args.input)
    if not isinstance(model, Conv2Warp):
        raise SystemExit(f"{args.input} holds a {card['architecture']!r} network, not conv2warp")
    wide = widen(model.eval(), args.seed)
    fresh = Conv2Warp(wide.config)  # the layout a checkpoint at the new width loads into
    fresh.load_state_dict(wide.state_dict(), strict=True)
    config = {**card["config"], "width_multiplier": wide.config.width_multiplier}
    save_checkpoint(args.output, fresh, {**card, "config": config})
    print(f"{args.output}: width_multiplier {config['width_multiplier']}")


if __name__ == "__main__":
    main()
