"""Layers shared by the registration architectures.

Everything here is 3D, works on tensors ``(B, C, D, H, W)`` and follows the conventions of
:mod:`napari_deepwarp.core.spatial` (fields are ``(B, 3, D, H, W)`` pull displacements in voxels,
channels ``(dz, dy, dx)``). Nothing here knows about a particular paper; the architecture modules
compose these pieces:

* :func:`make_activation`, :func:`make_norm` -- layers by name, so configs stay plain strings.
* :class:`ConvBlock` -- ``Conv3d`` + optional normalisation + optional activation, "same" padding.
* :class:`UNet` -- a configurable encoder/decoder with skip connections (VoxelMorph's U-Net is
  one setting of it) that can also hand back its decoder features scale by scale for deep
  supervision or coarse-to-fine heads.
* :class:`FlowHead` -- the final convolution that predicts a field, initialised so that the
  untrained model predicts (almost exactly) the identity transform.
* :class:`SpatialTransformer` -- :func:`spatial.warp` as a module.
* :class:`VecInt` -- scaling and squaring (:func:`spatial.integrate_velocity`) as a module.
* :class:`ResizeField` -- :func:`spatial.resize_field` by a scale factor, as a module.

Parameter names are part of the checkpoint format (a state dict is keyed by them), so the
attribute names of these modules (``conv``, ``norm``, ``act``, ``enc``, ``dec``, ``extra``) must
not change once checkpoints exist.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from napari_deepwarp.core import spatial

#: names accepted by :func:`make_activation`
ACTIVATIONS = ("leaky_relu", "relu", "elu", "prelu", "tanh", "sigmoid", "none")
#: names accepted by :func:`make_norm`
NORMS = ("batch", "instance", "group", "none")


def make_activation(name: str | None, negative_slope: float = 0.2) -> nn.Module:
    """An activation layer by name (see :data:`ACTIVATIONS`); ``None``/``"none"`` is identity.

    ``negative_slope`` is used by ``"leaky_relu"`` (VoxelMorph: 0.2; some papers use 0.1) and as
    the initial slope of ``"prelu"``.
    """
    name = "none" if name is None else str(name).lower()
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    if name == "relu":
        return nn.ReLU()
    if name == "elu":
        return nn.ELU()
    if name == "prelu":
        return nn.PReLU(init=negative_slope)
    if name == "tanh":
        return nn.Tanh()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")


def make_norm(name: str | None, channels: int, groups: int = 8) -> nn.Module:
    """A normalisation layer by name (see :data:`NORMS`); ``None``/``"none"`` is identity.

    ``"instance"`` is affine (learned scale and shift) and keeps no running statistics, so it
    behaves the same in training and evaluation -- the usual choice for batch size 1.
    ``"group"`` uses ``min(groups, channels)`` groups (reduced until it divides ``channels``).
    """
    name = "none" if name is None else str(name).lower()
    if name == "batch":
        return nn.BatchNorm3d(channels)
    if name == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if name == "group":
        g = min(groups, channels)
        while channels % g:
            g -= 1
        return nn.GroupNorm(g, channels)
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {name!r}; choose one of {', '.join(NORMS)}")


class ConvBlock(nn.Module):
    """``Conv3d`` -> optional normalisation -> optional activation.

    Padding keeps the size ("same" padding, ``dilation * (kernel_size - 1) // 2``), so with
    ``stride=2`` an even-sized input is exactly halved. The convolution has a bias only when there
    is no normalisation after it (a norm's shift makes the bias redundant), unless ``bias`` says
    otherwise.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        norm: str | None = None,
        activation: str | None = "leaky_relu",
        negative_slope: float = 0.2,
        bias: bool | None = None,
    ):
        super().__init__()
        has_norm = norm is not None and str(norm).lower() != "none"
        self.conv = nn.Conv3d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size - 1) // 2,
            dilation=dilation,
            bias=(not has_norm) if bias is None else bias,
        )
        self.norm = make_norm(norm, out_channels)
        self.act = make_activation(activation, negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] == 2 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            return self.act(self.norm(conv_in_float32(self.conv, x)))
        return self.act(self.norm(self.conv(x)))


def conv_in_float32(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` in float32 with autocast off.

    On the CPU, a bfloat16 ``Conv3d`` whose input is 2 voxels deep (a U-Net's bottleneck on a
    working grid 32 voxels deep) gets a weight gradient of garbage (values up to 1e31) in every
    backward pass (oneDNN in torch 2.13; stride 1, kernel 3, most channel counts); the forward
    pass and the input's gradient are right. Such layers are a few voxels, so float32 costs
    nothing (checked in ``tests/core/test_precision.py``)."""
    with torch.autocast("cpu", enabled=False):
        return conv(x.float())


def _as_level(entry: int | Sequence[int]) -> tuple[int, ...]:
    """One U-Net level's channels: an int is one convolution, a sequence is several."""
    if isinstance(entry, int):
        return (entry,)
    level = tuple(int(c) for c in entry)
    if not level:
        raise ValueError("a U-Net level needs at least one convolution")
    return level


class UNet(nn.Module):
    """Encoder/decoder with skip connections (Ronneberger et al. 2015), VoxelMorph flavoured.

    Layout, for ``L = len(enc_channels)`` levels (the input must be a multiple of ``2**L``)::

        x (full res) --------------------------------------------- skip 0 -----+
          enc level 1: downsample x2, convs   (1/2)   ------------- skip 1 --+  |
          ...                                                                |  |
          enc level L: downsample x2, convs   (1/2**L)                       |  |
          dec level 1: convs at 1/2**L, upsample x2, concat skip L-1 ...     |  |
          ...                                                                |  |
          dec level L-1: convs at 1/4, upsample x2, concat skip 1  <---------+  |
          dec level L:   convs at 1/2, upsample x2, concat skip 0  <------------+
          extra convs at full resolution (the remaining ``dec_channels`` entries)

    ``enc_channels`` / ``dec_channels`` entries are an int (one convolution) or a tuple of ints
    (several convolutions at that level). The first ``L`` decoder entries are the decoder levels;
    any further entries are the "extra" full-resolution convolutions. With
    ``enc_channels=(16, 32, 32, 32)``, ``dec_channels=(32, 32, 32, 32, 32, 16, 16)`` and the
    defaults this is the VoxelMorph-2 U-Net (Balakrishnan et al. 2019).

    ``downsample``: ``"conv"`` (the level's first convolution has stride 2, as in VoxelMorph),
    ``"maxpool"`` or ``"avgpool"`` (pool by 2, then stride-1 convolutions).
    ``upsample``: ``"nearest"``, ``"trilinear"`` (interpolate to the skip's size) or
    ``"transpose"`` (a learned stride-2 ``ConvTranspose3d`` keeping the channel count).
    ``skip_input``: concatenate the raw input at full resolution (VoxelMorph does); if False the
    last decoder level still upsamples but concatenates nothing.
    ``stop_at_half``: end the decoder at half resolution (no last upsampling, no full-res skip);
    the extra convolutions then run at half resolution.

    ``out_channels`` is the channel count of the final features. :meth:`forward` returns them;
    :meth:`forward_features` also returns each decoder level's features (coarse to fine, after the
    level's convolutions and before its upsampling) for multi-scale heads.
    """

    def __init__(
        self,
        in_channels: int,
        enc_channels: Sequence[int | Sequence[int]] = (16, 32, 32, 32),
        dec_channels: Sequence[int | Sequence[int]] = (32, 32, 32, 32, 32, 16, 16),
        *,
        kernel_size: int = 3,
        norm: str | None = None,
        activation: str | None = "leaky_relu",
        negative_slope: float = 0.2,
        downsample: str = "conv",
        upsample: str = "nearest",
        skip_input: bool = True,
        stop_at_half: bool = False,
    ):
        super().__init__()
        enc = [_as_level(e) for e in enc_channels]
        dec = [_as_level(d) for d in dec_channels]
        if not enc:
            raise ValueError("the U-Net needs at least one encoder level")
        if len(dec) < len(enc):
            raise ValueError(
                f"dec_channels needs at least one entry per encoder level ({len(enc)}), "
                f"got {len(dec)}"
            )
        if downsample not in ("conv", "maxpool", "avgpool"):
            raise ValueError(f"unknown downsample {downsample!r}; use conv, maxpool or avgpool")
        if upsample not in ("nearest", "trilinear", "transpose"):
            raise ValueError(f"unknown upsample {upsample!r}; use nearest, trilinear or transpose")
        self.levels = len(enc)
        self.downsample = downsample
        self.upsample_mode = upsample
        self.skip_input = skip_input
        self.stop_at_half = stop_at_half

        def block(cin, cout, stride=1):
            return ConvBlock(
                cin,
                cout,
                kernel_size,
                stride=stride,
                norm=norm,
                activation=activation,
                negative_slope=negative_slope,
            )

        # Encoder.
        self.enc = nn.ModuleList()
        skip_channels = [in_channels if skip_input else 0]
        prev = in_channels
        for level in enc:
            convs = []
            for i, c in enumerate(level):
                stride = 2 if (i == 0 and downsample == "conv") else 1
                convs.append(block(prev, c, stride))
                prev = c
            self.enc.append(nn.Sequential(*convs))
            skip_channels.append(prev)
        skip_channels.pop()  # the deepest level feeds the decoder directly, it is not a skip

        # Decoder levels: convs, upsample, concatenate the skip of the next finer scale.
        self.dec = nn.ModuleList()
        self.up = nn.ModuleList()
        self.level_channels: list[int] = []
        for i, level in enumerate(dec[: self.levels]):
            convs = []
            for c in level:
                convs.append(block(prev, c))
                prev = c
            self.dec.append(nn.Sequential(*convs))
            self.level_channels.append(prev)
            last = i == self.levels - 1
            if last and stop_at_half:
                self.up.append(nn.Identity())
                continue
            if upsample == "transpose":
                self.up.append(nn.ConvTranspose3d(prev, prev, kernel_size=2, stride=2))
            else:
                self.up.append(nn.Identity())
            prev += skip_channels[self.levels - 1 - i]

        # Extra convolutions at the finest scale.
        convs = []
        for level in dec[self.levels :]:
            for c in level:
                convs.append(block(prev, c))
                prev = c
        self.extra = nn.Sequential(*convs)
        self.out_channels = prev

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be multiples of this (one halving per encoder level)."""
        return 2**self.levels

    def _upsample(self, i: int, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.upsample_mode == "transpose":
            x = self.up[i](x)
            if tuple(x.shape[2:]) != tuple(size):
                x = F.interpolate(x, size=tuple(size), mode="nearest")
            return x
        if self.upsample_mode == "trilinear":
            return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)
        return F.interpolate(x, size=tuple(size), mode="nearest")

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(final features, [decoder level features, coarse to fine])``."""
        skips = [x]
        for level in self.enc:
            if self.downsample == "maxpool":
                x = F.max_pool3d(x, 2)
            elif self.downsample == "avgpool":
                x = F.avg_pool3d(x, 2)
            x = level(x)
            skips.append(x)
        skips.pop()
        per_level = []
        for i, level in enumerate(self.dec):
            x = level(x)
            per_level.append(x)
            skip = skips[self.levels - 1 - i]
            if i == self.levels - 1 and self.stop_at_half:
                break
            x = self._upsample(i, x, skip.shape[2:])
            if i < self.levels - 1 or self.skip_input:
                x = torch.cat([x, skip], dim=1)
        return self.extra(x), per_level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


class FlowHead(nn.Module):
    """The convolution that turns features into a field (``out_channels`` = 3 for 3D).

    Weights are drawn from ``normal(0, init_std)`` (default ``1e-5``) and the bias is zero, as in
    VoxelMorph: the untrained model predicts a near-zero field (the identity transform), which
    keeps early training stable, while the weights are not exactly zero so gradients reach every
    layer from the first step.
    """

    def __init__(
        self, in_channels: int, out_channels: int = 3, kernel_size: int = 3, init_std: float = 1e-5
    ):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.normal_(self.conv.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SpatialTransformer(nn.Module):
    """Pull an image through a displacement: ``out(p) = image(p + u(p))`` (:func:`spatial.warp`).

    ``mode``: ``"linear"`` or ``"nearest"`` (labels); ``padding``: ``"border"``, ``"zeros"`` or
    ``"itk"``. Differentiable with respect to both the image and the field (linear mode).
    """

    def __init__(self, mode: str = "linear", padding: str = "border"):
        super().__init__()
        self.mode = mode
        self.padding = padding

    def forward(self, image: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
        return spatial.warp(image, disp, mode=self.mode, padding=self.padding)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, padding={self.padding!r}"


class VecInt(nn.Module):
    """Integrate a stationary velocity field by scaling and squaring.

    ``exp(v)`` is approximated by ``2**steps`` self-compositions of ``v / 2**steps``
    (:func:`spatial.integrate_velocity`); the result is a displacement in the velocity's voxels.
    ``steps=0`` returns the velocity itself (a plain displacement model).
    """

    def __init__(self, steps: int = 7):
        super().__init__()
        if steps < 0:
            raise ValueError(f"integration steps must be >= 0, got {steps}")
        self.steps = int(steps)

    def forward(self, velocity: torch.Tensor) -> torch.Tensor:
        if self.steps == 0:
            return velocity
        return spatial.integrate_velocity(velocity, self.steps)

    def extra_repr(self) -> str:
        return f"steps={self.steps}"


class ResizeField(nn.Module):
    """Resize a field by ``factor`` (e.g. ``0.5`` halves it), values rescaled to the new voxels.

    The new size along each axis is ``round(n * factor)`` (at least 1); values follow
    :func:`spatial.resize_field` (corner-aligned grids). ``factor=1`` is a no-op.
    """

    def __init__(self, factor: float):
        super().__init__()
        if factor <= 0:
            raise ValueError(f"resize factor must be > 0, got {factor}")
        self.factor = float(factor)

    def forward(self, field: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Resize ``field``; an explicit ``shape`` overrides the factor (e.g. back to full size)."""
        if shape is None:
            if self.factor == 1.0:
                return field
            shape = [max(1, round(n * self.factor)) for n in field.shape[2:]]
        return spatial.resize_field(field, shape)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


# --- image pyramids ---------------------------------------------------------------------------
def _binomial_blur(image: torch.Tensor) -> torch.Tensor:
    """Separable [1, 2, 1] / 4 blur of ``(B, C, D, H, W)`` (edge values repeated)."""
    out = image
    for dim in (2, 3, 4):
        n = out.shape[dim]
        if n == 1:
            continue
        padded = torch.cat([out.narrow(dim, 0, 1), out, out.narrow(dim, n - 1, 1)], dim=dim)
        out = 0.5 * out + 0.25 * (padded.narrow(dim, 0, n) + padded.narrow(dim, 2, n))
    return out


def downsample_image(image: torch.Tensor, shape) -> torch.Tensor:
    """``image (B, C, D, H, W)`` on a coarser grid ``shape`` over the same extent.

    Halving by halving: a [1, 2, 1]/4 binomial blur, then trilinear resampling with corner-aligned
    grids (the geometry of :func:`spatial.resize_field`, so that a field on ``shape`` and the image
    pyramid agree). The last step goes to ``shape`` exactly.
    """
    shape = tuple(int(n) for n in shape)
    out = image
    while tuple(out.shape[2:]) != shape:
        step = tuple(max(t, -(-n // 2)) for n, t in zip(out.shape[2:], shape))
        if step == tuple(out.shape[2:]):
            step = shape  # not a downsampling (or less than halving left): resample directly
        out = F.interpolate(_binomial_blur(out), size=step, mode="trilinear", align_corners=True)
    return out


def gaussian_smooth(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, D, H, W)`` with ``sigma`` voxels (replicate padding)."""
    if sigma <= 0:
        return image
    radius = max(1, round(3 * sigma))
    x = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[1]
    out = image
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        k = kernel.view(shape).repeat(channels, 1, 1, 1, 1)
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k, groups=channels)
    return out
