"""Conv2Warp: linear + deformable convolutions, a Catmull-Rom DVF resampler, continuous warping.

Ali S., Rittscher J. "Conv2Warp: An unsupervised deformable image registration with continuous
convolution and warping." Machine Learning in Medical Imaging (MLMI), MICCAI workshop, LNCS
11861, pp. 489-497, 2019. Deformable convolutions: Dai J. et al. "Deformable convolutional
networks", ICCV 2017. Catmull-Rom / cubic convolution kernel: Keys R. "Cubic convolution
interpolation for digital image processing", IEEE TASSP 29(6), 1981.

The paper describes a 2D model in detail and its 3D variant in a few words; everything below is
3D, pure PyTorch (CPU, CUDA, MPS). Where the paper is vague, the choice made here and the
paper's section it fills in:

* **Pyramid** (Sec. 2, CWS: "l = 2 for our 3D case", "pyramids are constructed prior to feeding
  images into the LD-ConvNet"): ``levels`` (default 2) image pyramids of moving and fixed, level
  0 = the input grid, level ``l`` = ``2x2x2`` average pooling of level ``l - 1``. Grids are
  *cell-centred*: coarse voxel ``i`` is the mean of fine voxels ``2i, 2i+1`` and sits at fine
  position ``2i + 0.5``; a field goes up a level by Catmull-Rom resampling on those grids with its
  values multiplied by exactly 2. (This differs from :func:`spatial.resize_field`'s
  corner-aligned grids on purpose: it matches the average pooling, the factor stays exactly 2,
  and the coarse grid survives the registry's crop of padded inputs, which keeps
  ``ceil(n / 2**l)`` coarse voxels from the low corner.) The working grid must be a multiple of
  ``2**levels`` (``levels - 1`` pyramid halvings plus the LD-ConvNet's pooling): 4 by default.
* **LD-ConvNet** (Sec. 2): eight 3x3x3 stride-1 "same" convolutions with the paper's channels
  ``(2, 64), (64, 64), (64, 64), (64, 32), (32, 32), (32, 16), (16, 16), (16, 3)`` -- the
  paper's last layer ``(16, 2)`` is its 2D field, here a 3-channel 3D field. ``widths`` holds the
  seven hidden widths (the paper's by default) and ``width_multiplier`` scales them (for CPU use;
  1.0 is the paper). Each layer but the last has normalisation and ELU; the last layer is
  the field itself and has neither (ELU would bound every displacement below by -1 voxel, batch
  norm would fix the field's mean and scale) and is initialised ``normal(0, 1e-5)`` with zero bias
  like :class:`~napari_deepwarp.core.models.blocks.FlowHead`, so the untrained model predicts the
  identity. Average pooling (kernel 2, stride 2) follows the second layer's activation, so the
  LD-ConvNet's output lives on a grid half the level's size and is read as a displacement in
  voxels of that half grid.
* **Normalisation**: the paper's batch normalisation, computed as it is in training with one
  pair per batch -- from the pair's own statistics -- also at inference: ``norm="instance"``
  (affine, no running statistics). With ``BatchNorm3d`` the network was evaluated with running
  means over training pairs of every contrast and background size, which fit no one pair: on
  synthetic validation pairs a network at step 700 reached Dice 0.54 with its pair's own
  statistics and 0.38 (below the identity's 0.42) with the running ones, so its checkpoints
  looked untrainable. ``norm="batch"`` is the paper's layer as such.
* **Which layers are deformable** (Sec. 2 says "5 linear convolutions and 3 deformable"; the
  abstract "concatenated linear and non-linear convolution layers", the conclusion "sequential
  linear and deformable convolutions"): the linear layers come first and the *last three* layers
  (``(32, 16), (16, 16), (16, 3)``, indices 5, 6, 7) are deformable, all after the pooling.
  ``deformable_layers`` (0-based indices) changes this.
* **3D deformable convolution** (Dai et al. 2017, DCNv1, no modulation): a 3x3x3 convolution of
  the layer's input predicts ``3 * 27`` offsets, ``(dz, dy, dx)`` in voxels for each tap,
  initialised to zero (weights and bias). Tap ``k`` of output voxel ``p`` reads the input at
  ``p + r_k + offset_k(p)`` by trilinear interpolation with zero padding, so with zero offsets the
  layer is exactly the ordinary zero-padded convolution with the same weights. Implemented as one
  sampling of the 27 shifted positions (``(B, C * 27, D, H, W)``, done 9 taps at a time) and a
  matrix product with the ``(out, C * 27)`` weights; see :func:`deform_conv3d`.
* **NL-DVF-R** (Sec. 2 and the abstract's "learnable bicubic Catmull-Rom spline resampler"):
  the LD-ConvNet's half-resolution field is upsampled by 2 with the separable Catmull-Rom cubic
  convolution (Keys kernel, ``a = -0.5``, edge samples replicated, values scaled by 2), followed by
  a 3x3x3 ``Conv3d`` from 3 to 3 channels with bias, no normalisation or activation, initialised
  to the identity (Dirac kernel, zero bias) so that the untrained resampler *is* the spline. The
  spline passes through the data points and reproduces polynomials up to degree 2 exactly (not
  degree 3: its tangents are central differences); it is C1.
* **CWS** (Sec. 2): coarse to fine. At the coarsest level the LD-ConvNet sees the pooled moving
  and fixed images and the NL-DVF-R returns ``u_{L-1}^d``. At each finer level ``l`` the previous
  field is upsampled to ``u_l^up`` (the plain Catmull-Rom spline, values x2; the paper says only
  "upsampled"), the level's moving image is warped with it, ``I_l^s(x + u_l^up)``, and the
  LD-ConvNet + NL-DVF-R on ``(warped, I_l^t)`` give a residual ``r_l``. The level's field is the
  composition ``u_l^d = r_l + u_l^up(x + r_l)`` (:func:`spatial.compose`; warping the moving image
  with it equals warping the already warped image with ``r_l``) -- the paper's "warps the
  deformation field ... in a continuous fashion". With this reading ``u_0^d - u_0^up`` is the
  fine level's correction, which the regulariser keeps small. One LD-ConvNet and one NL-DVF-R
  are shared by all levels (the paper speaks of *the* LD-ConvNet); ``share_levels=False`` gives
  every level its own.
* **Warping**: trilinear pull, border padding (:class:`~.blocks.SpatialTransformer`).
* **Loss** (Sec. 2, "Loss function"), exactly, with ``D = losses.ncc_ssd_loss`` (``eps = 1e-3``;
  the absolute value in the paper's OCR'd SSD formula is dropped, see that function)::

      L = D(I_0^s(x + u_0^d), I_0^t)                                  final warp, full resolution
        + sum_{l = 0}^{levels - 2} D(I_l^s(x + u_l^up), I_l^t)        the CWS terms, sum_k D_k
        + lambda * clamp(mean((u_0^d - u_0^up)**2), 0, 0.25)          losses.clamped_l2_loss

  ``lambda = 0.001``; the mean runs over voxels and the three components, in voxels of the input
  grid; outside ``[0, 0.25]`` the term has no gradient (the paper's guard against over-smoothing).
  The CWS terms follow the paper's "losses between the warped image ``I_{l-1}^s(x + u_{l-1})`` and
  the target", i.e. each coarse prediction is scored on the next finer level's images (for 2
  levels: one term, ``D(I_0^s(x + u_0^up), I_0^t)``). With one level there is no CWS term and no
  regulariser. The paper trains with Adam, learning rate ``1e-3``.

Output: ``displacement`` = ``u_0^d`` (pull, input voxels); ``multiscale`` = ``[u_{L-1}^d, ...,
u_1^d]`` coarse to fine, each in voxels of its own level; ``extras``: ``warped`` (the moving image
through ``u_0^d``), ``warped_levels`` / ``fixed_levels`` (the CWS-warped moving images
``I_l^s(x + u_l^up)`` and their targets, coarse to fine), ``u_d`` (= ``u_0^d``) and ``u_up``
(``u_0^up``, or None with one level).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_deepwarp.core import losses, spatial
from napari_deepwarp.core.models.blocks import (
    ConvBlock,
    SpatialTransformer,
    make_activation,
    make_norm,
)
from napari_deepwarp.core.models.registry import (
    RegistrationModel,
    RegistrationOutput,
    register_model,
)

#: the paper's hidden widths of the LD-ConvNet (outputs of layers 1..7; layer 8 is the field)
PAPER_WIDTHS = (64, 64, 64, 32, 32, 16, 16)

# --------------------------------------------------------------------------------------------
# Catmull-Rom resampling
# --------------------------------------------------------------------------------------------


def catmull_rom_kernel(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel at distances ``t``; ``a = -0.5`` is the Catmull-Rom spline.

    ``w(t) = (a+2)|t|^3 - (a+3)|t|^2 + 1`` for ``|t| <= 1``, ``a|t|^3 - 5a|t|^2 + 8a|t| - 4a``
    for ``1 < |t| < 2``, else 0. ``w(0) = 1`` and ``w(+-1) = w(+-2) = 0``: it interpolates.
    """
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _source_positions(n_in: int, n_out: int, align_corners: bool) -> torch.Tensor:
    """Positions (input voxels, float64) of the ``n_out`` output voxels along one axis."""
    j = torch.arange(n_out, dtype=torch.float64)
    if align_corners:
        return j * ((n_in - 1) / (n_out - 1)) if n_out > 1 else torch.zeros(1, dtype=torch.float64)
    return (j + 0.5) * (n_in / n_out) - 0.5


def _resample_axis(
    x: torch.Tensor, dim: int, n_out: int, align_corners: bool, a: float
) -> torch.Tensor:
    """Cubic convolution along ``dim``: 4 taps per output sample, edge samples replicated."""
    n_in = x.shape[dim]
    if n_in == n_out:
        return x
    pos = _source_positions(n_in, n_out, align_corners)
    base = torch.floor(pos)
    taps = torch.arange(-1, 3, dtype=torch.float64)
    index = base[:, None] + taps  # (n_out, 4)
    weights = catmull_rom_kernel(pos[:, None] - index, a)
    index = index.clamp(0, n_in - 1).long().to(x.device)
    shape = [1] * (x.dim() + 1)
    shape[dim], shape[dim + 1] = n_out, 4
    # Cast on the CPU first: MPS has no float64.
    weights = weights.to(x.dtype).to(x.device).view(shape)
    gathered = x.index_select(dim, index.flatten()).unflatten(dim, (n_out, 4))
    return (gathered * weights).sum(dim + 1)


def catmull_rom_resize(
    x: torch.Tensor, size: Sequence[int], align_corners: bool = False, a: float = -0.5
) -> torch.Tensor:
    """Resample ``x (B, C, D, H, W)`` to ``size`` with the separable Catmull-Rom spline.

    ``align_corners=False``: cell-centred grids (output voxel ``j`` sits at input position
    ``(j + 0.5) * n_in / n_out - 0.5``, as for average pooling); ``True``: voxel 0 and voxel
    ``n - 1`` of both grids coincide (so ``n -> 2n - 1`` keeps every input sample). Positions
    whose taps leave the volume read the edge sample. Differentiable; values are not rescaled
    (see :func:`catmull_rom_resize_field`).
    """
    size = tuple(int(n) for n in size)
    if x.dim() != 5 or len(size) != 3:
        raise ValueError(f"expected (B, C, D, H, W) and a 3D size, got {tuple(x.shape)}, {size}")
    for axis, n in enumerate(size):
        x = _resample_axis(x, axis + 2, n, align_corners, a)
    return x


def catmull_rom_resize_field(
    field: torch.Tensor, size: Sequence[int], align_corners: bool = False
) -> torch.Tensor:
    """:func:`catmull_rom_resize` of a displacement, values rescaled to the new voxels.

    One old voxel is ``n_out / n_in`` new voxels on cell-centred grids, ``(n_out - 1) / (n_in - 1)``
    with ``align_corners``.
    """
    old = field.shape[2:]
    out = catmull_rom_resize(field, size, align_corners)
    if align_corners:
        factors = [(n - 1) / (o - 1) if o > 1 and n > 1 else 1.0 for n, o in zip(size, old)]
    else:
        factors = [n / o for n, o in zip(size, old)]
    scale = torch.tensor(factors, device=field.device, dtype=field.dtype).view(1, 3, 1, 1, 1)
    return out * scale


class NLDVFResampler(nn.Module):
    """NL-DVF-R: Catmull-Rom upsampling of a field, then a learned 3x3x3 convolution.

    The convolution (3 -> 3 channels, bias) starts as the identity (Dirac kernel, zero bias), so
    the untrained block returns exactly the spline-resampled field.
    """

    def __init__(self, channels: int = 3, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2)
        nn.init.dirac_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, field: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.conv(catmull_rom_resize_field(field, size, align_corners=False))


# --------------------------------------------------------------------------------------------
# 3D deformable convolution
# --------------------------------------------------------------------------------------------


def _kernel_taps(kernel: Sequence[int], device, dtype) -> torch.Tensor:
    """Offsets ``(K, 3)`` (z, y, x) of the taps of a centred odd kernel, in ``conv3d`` order."""
    axes = [torch.arange(k, device=device, dtype=dtype) - (k - 1) / 2 for k in kernel]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def deform_conv3d(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk: int = 9,
) -> torch.Tensor:
    """3D deformable convolution, stride 1, "same" zero padding, odd kernel.

    ``x (B, C, D, H, W)``; ``offset (B, 3 * K, D, H, W)`` holds, for each of the ``K`` taps in
    ``conv3d`` order, the ``(dz, dy, dx)`` shift in voxels; ``weight (O, C, kd, kh, kw)``.
    ``out[o](p) = bias[o] + sum_{c, k} weight[o, c, k] * x[c](p + r_k + offset_k(p))`` with
    trilinear interpolation and zeros outside, so zero offsets give ``F.conv3d(x, weight, bias,
    padding=k // 2)``. The taps are sampled ``chunk`` at a time (``(B, C * chunk, D, H, W)``) and
    contracted with the weights by a matrix product.
    """
    batch, channels, *shape = x.shape
    out_channels, in_channels, *kernel = weight.shape
    if in_channels != channels or any(k % 2 == 0 for k in kernel):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit input {tuple(x.shape)}")
    taps = _kernel_taps(kernel, x.device, x.dtype)
    n_taps = taps.shape[0]
    if offset.shape != (batch, 3 * n_taps, *shape):
        raise ValueError(f"offset must be {(batch, 3 * n_taps, *shape)}, got {tuple(offset.shape)}")
    voxels = math.prod(shape)
    grid = spatial.identity_grid(shape, x.device, x.dtype)[:, None]  # (1, 1, 3, D, H, W)
    offset = offset.view(batch, n_taps, 3, *shape)
    w = weight.reshape(out_channels, channels, n_taps)
    out = None
    for start in range(0, n_taps, chunk):
        stop = min(start + chunk, n_taps)
        k = stop - start
        coords = grid + taps[start:stop].view(1, k, 3, 1, 1, 1) + offset[:, start:stop]
        # (B, k, 3, D, H, W) -> (B, 3, k * D, H, W): the k taps stacked along depth.
        coords = coords.transpose(1, 2).reshape(batch, 3, k * shape[0], *shape[1:])
        sampled = spatial.sample(x, coords, mode="linear", padding="zeros")
        sampled = sampled.reshape(batch, channels * k, voxels)  # row c * k + tap
        part = torch.matmul(w[:, :, start:stop].reshape(out_channels, channels * k), sampled)
        out = part if out is None else out + part
    out = out.view(batch, out_channels, *shape)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1, 1)
    return out


class DeformConv3d(nn.Module):
    """3D deformable convolution (Dai et al. 2017) with a zero-initialised offset predictor.

    ``conv`` holds the kernel (an ``nn.Conv3d`` for its initialisation and state-dict layout; its
    own forward is not used); ``offset`` is a ``Conv3d`` of the same kernel size predicting
    ``3 * K`` offsets from the input, zero at start, so the untrained layer equals ``conv``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias=True):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        pad = kernel_size // 2
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=pad, bias=bias)
        self.offset = nn.Conv3d(in_channels, 3 * kernel_size**3, kernel_size, padding=pad)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return deform_conv3d(x, self.offset(x), self.conv.weight, self.conv.bias)


class DeformBlock(nn.Module):
    """:class:`DeformConv3d` -> optional normalisation -> optional activation (cf. ConvBlock)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, norm=None, activation=None):
        super().__init__()
        has_norm = norm is not None and str(norm).lower() != "none"
        self.conv = DeformConv3d(in_channels, out_channels, kernel_size, bias=not has_norm)
        self.norm = make_norm(norm, out_channels)
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


# --------------------------------------------------------------------------------------------
# LD-ConvNet and the model
# --------------------------------------------------------------------------------------------


class LDConvNet(nn.Module):
    """Linear and deformable ConvNet: ``len(widths) + 1`` 3x3x3 layers, avg-pool after layer 2.

    Hidden layers: convolution (deformable for the indices in ``deformable``) + ``norm`` +
    ``activation``; the last layer predicts ``out_channels`` (the field) without either and is
    initialised ``normal(0, head_init_std)``, zero bias. The output is half the input's size.
    """

    def __init__(
        self,
        in_channels: int = 2,
        widths: Sequence[int] = PAPER_WIDTHS,
        out_channels: int = 3,
        deformable: Sequence[int] = (5, 6, 7),
        norm: str | None = "instance",
        activation: str | None = "elu",
        head_init_std: float = 1e-5,
    ):
        super().__init__()
        chans = [in_channels, *widths, out_channels]
        last = len(chans) - 2
        self.layers = nn.ModuleList()
        for i, (cin, cout) in enumerate(itertools.pairwise(chans)):
            n, act = (None, None) if i == last else (norm, activation)
            if i in deformable:
                layer = DeformBlock(cin, cout, 3, norm=n, activation=act)
            else:
                layer = ConvBlock(cin, cout, 3, norm=n, activation=act)
            self.layers.append(layer)
        head = self.layers[last].conv
        head = head.conv if isinstance(head, DeformConv3d) else head
        nn.init.normal_(head.weight, mean=0.0, std=head_init_std)
        nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 1:
                x = F.avg_pool3d(x, 2)
        return x


@dataclass
class Conv2WarpConfig:
    """Configuration of :class:`Conv2Warp` (defaults: the paper's 3D model and loss).

    widths: output channels of the LD-ConvNet's hidden layers 1..7 (the 8th outputs the field);
        the paper's ``(64, 64, 64, 32, 32, 16, 16)``.
    width_multiplier: scales ``widths`` (rounded, at least 1) -- for cheap CPU runs; 1.0 = paper.
    deformable_layers: 0-based indices of the deformable layers among the ``len(widths) + 1``.
    levels: pyramid levels of the continuous warping stage (the paper's 3D model: 2).
    share_levels: one LD-ConvNet and NL-DVF-R for all levels (True) or one per level.
    norm, activation: of the hidden layers (the paper: batch norm, ELU; ``"instance"`` is batch
        norm's training-time statistics for one pair, kept at inference: see the module doc).
    head_init_std: std of the field layer's initial weights (near-identity start).
    reg_weight: the paper's lambda (0.001) on the clamped L2 term.
    reg_low, reg_high: the clamp interval of that term (the paper: [0, 0.25]).
    ncc_eps: epsilon of the NCC-derived SSD (the paper: 1e-3).
    """

    widths: tuple[int, ...] = PAPER_WIDTHS
    width_multiplier: float = 1.0
    deformable_layers: tuple[int, ...] = (5, 6, 7)
    levels: int = 2
    share_levels: bool = True
    norm: str = "instance"
    activation: str = "elu"
    head_init_std: float = 1e-5
    reg_weight: float = 1e-3
    reg_low: float = 0.0
    reg_high: float = 0.25
    ncc_eps: float = 1e-3


@register_model("conv2warp")
class Conv2Warp(RegistrationModel):
    """Conv2Warp (Ali & Rittscher 2019); see the module docstring for every choice."""

    description = (
        "Conv2Warp (Ali & Rittscher 2019): linear + deformable ConvNet, Catmull-Rom DVF "
        "resampler, 2-level continuous warping; NCC-SSD + clamped L2 loss"
    )
    config_class = Conv2WarpConfig
    size_multiple = 4

    def __init__(self, config: Conv2WarpConfig | None = None):
        super().__init__(config)
        cfg = self.config
        if int(cfg.levels) < 1:
            raise ValueError(f"levels must be >= 1, got {cfg.levels}")
        if len(cfg.widths) < 2:
            raise ValueError(
                f"widths needs at least 2 entries (pooling after layer 2): {cfg.widths}"
            )
        if cfg.width_multiplier <= 0:
            raise ValueError(f"width_multiplier must be > 0, got {cfg.width_multiplier}")
        n_layers = len(cfg.widths) + 1
        bad = [i for i in cfg.deformable_layers if not 0 <= int(i) < n_layers]
        if bad:
            raise ValueError(f"deformable_layers {bad} outside 0..{n_layers - 1}")
        widths = tuple(max(1, round(w * cfg.width_multiplier)) for w in cfg.widths)
        nets = 1 if cfg.share_levels else int(cfg.levels)
        self.ld_convnet = nn.ModuleList(
            LDConvNet(
                2,
                widths,
                3,
                tuple(int(i) for i in cfg.deformable_layers),
                norm=cfg.norm,
                activation=cfg.activation,
                head_init_std=cfg.head_init_std,
            )
            for _ in range(nets)
        )
        self.resampler = nn.ModuleList(NLDVFResampler(3, 3) for _ in range(nets))
        self.transformer = SpatialTransformer(mode="linear", padding="border")
        self.size_multiple = 2 ** int(cfg.levels)

    def _nets(self, level: int) -> tuple[nn.Module, nn.Module]:
        i = 0 if self.config.share_levels else level
        return self.ld_convnet[i], self.resampler[i]

    def predict(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        levels = int(self.config.levels)
        movings, fixeds = [moving], [fixed]
        for _ in range(levels - 1):
            movings.append(F.avg_pool3d(movings[-1], 2))
            fixeds.append(F.avg_pool3d(fixeds[-1], 2))
        fields: list[torch.Tensor] = []
        warped_levels: list[torch.Tensor] = []
        fixed_levels: list[torch.Tensor] = []
        u = up = None
        for level in reversed(range(levels)):
            source, target = movings[level], fixeds[level]
            shape = target.shape[2:]
            if u is not None:
                up = catmull_rom_resize_field(u, shape)  # u_l^up, values x2
                source = self.transformer(source, up)  # I_l^s(x + u_l^up)
                warped_levels.append(source)
                fixed_levels.append(target)
            net, resampler = self._nets(level)
            residual = resampler(net(torch.cat([source, target], dim=1)), shape)
            u = residual if up is None else spatial.compose(residual, up)
            fields.append(u)
        disp = fields.pop()
        return RegistrationOutput(
            displacement=disp,
            multiscale=fields,
            extras={
                "warped": self.transformer(moving, disp),
                "warped_levels": warped_levels,
                "fixed_levels": fixed_levels,
                "u_d": disp,
                "u_up": up,
            },
        )

    def loss(
        self, output: RegistrationOutput, moving: torch.Tensor, fixed: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``D(warped, fixed) + sum D(CWS levels) + lambda * clamped L2``, with its terms."""
        cfg = self.config
        extras = output.extras
        if "warped_levels" not in extras or "fixed_levels" not in extras:
            raise ValueError("Conv2Warp's loss needs the extras of Conv2Warp.forward's output")
        warped = extras.get("warped")
        if warped is None:
            warped = self.transformer(moving, output.displacement)
        eps = float(cfg.ncc_eps)
        similarity = losses.ncc_ssd_loss(warped, fixed, eps=eps)
        levels = similarity.new_zeros(())
        for w, t in zip(extras["warped_levels"], extras["fixed_levels"]):
            levels = levels + losses.ncc_ssd_loss(w, t, eps=eps)
        u_up = extras.get("u_up")
        if u_up is None:
            regularisation = similarity.new_zeros(())
        else:
            regularisation = losses.clamped_l2_loss(
                output.displacement, u_up, low=float(cfg.reg_low), high=float(cfg.reg_high)
            )
        total = similarity + levels + float(cfg.reg_weight) * regularisation
        return total, {
            "similarity": similarity.detach(),
            "similarity_levels": levels.detach(),
            "regularisation": regularisation.detach(),
        }

    def loss_description(self) -> dict[str, Any]:
        """The loss as a plain dict, for a checkpoint's model card."""
        cfg = self.config
        return {
            "similarity": {"name": "ncc_ssd", "eps": float(cfg.ncc_eps)},
            "levels": {"name": "ncc_ssd", "on": "CWS-warped moving image of each finer level"},
            "regulariser": {
                "name": "clamped_l2",
                "on": "u_0^d - u_0^up",
                "interval": [float(cfg.reg_low), float(cfg.reg_high)],
            },
            "weights": {"similarity": 1.0, "levels": 1.0, "regularisation": float(cfg.reg_weight)},
        }


__all__ = [
    "Conv2Warp",
    "Conv2WarpConfig",
    "DeformConv3d",
    "LDConvNet",
    "NLDVFResampler",
    "catmull_rom_kernel",
    "catmull_rom_resize",
    "catmull_rom_resize_field",
    "deform_conv3d",
]
