"""CFWN: the cascaded feature warping network (coarse-to-fine feature warping + cost volumes).

Zhang L., Zhou L., Li R., Wang X., Han B., Liao H. "Cascaded Feature Warping Network for
Unsupervised Medical Image Registration." IEEE International Symposium on Biomedical
Imaging (ISBI), 2021.

The network (paper Fig. 1), for ``N = len(enc_channels)`` pyramid levels, level 1 at full
resolution and level ``i`` at ``1 / 2**(i-1)``:

* Feature pyramid (Sec. 2.1): one encoder with shared weights runs on the moving and on the fixed
  image. Each level is two 3x3x3 convolution blocks (convolution + LeakyReLU with slope 0.1);
  the first block of every level except the top one has stride 2. The working grid must
  therefore be a multiple of ``2**(N-1)`` (``forward`` pads other sizes and crops back).
* Feature warping registration (Sec. 2.2), from the bottom level ``N`` up to level 1: the coarser
  field ``phi^(i+1)`` is upsampled to level ``i`` (``up2``; values rescaled to the finer voxels),
  the moving features are warped by it (Eq. 1), a correlation layer builds the cost volume of the
  fixed features against the warped moving features over the search range ``d`` (Eq. 2), and an
  estimator (Sec. 2.2.3: convolution blocks, here with the encoder's LeakyReLU(0.1), and a
  flow convolution) on ``[cost volume, fixed features, warped features, up2(phi^(i+1))]``
  predicts the residual, ``phi^i = estimator(...) + up2(phi^(i+1))`` (Eq. 3). ``phi^1`` is the
  output field. The encoder runs once on the moving and fixed images stacked along the batch.
* Loss (Sec. 2.3, Eq. 4)::

      L = sum_{i=1..N} 2**-(i-1) * ( NLCC_{w_i}(I_m^i o phi^i, I_f^i) + lambda * ||grad phi^i||^2 )

  with ``NLCC_w = 1 - mean local squared NCC over w^3 windows`` (:func:`losses.local_ncc_loss`:
  VoxelMorph's [5] squared local CC, which the paper follows for lambda; the constant 1 does not
  change the gradient),
  ``||grad phi||^2`` = :func:`losses.diffusion_loss` (mean squared forward differences averaged
  over the three axes, VoxelMorph's regulariser) of ``phi^i`` in voxels of level ``i``, and
  ``lambda = 1`` (Sec. 3, "according to [5]"). ``I_m^i``, ``I_f^i`` are the images downsampled to
  level ``i`` (:func:`downsample_image`).

Where the paper is vague, this implementation chooses (and the config can change):

* Number of levels and widths (not given; Table 1 gives 667.4K parameters): ``N = 4`` levels with
  encoder widths ``(16, 32, 32, 32)`` (top to bottom) and an estimator of four convolution blocks
  ``(32, 32, 16, 16)`` + a 3x3x3 flow convolution per level: 653.4K parameters at ``d = 1``,
  within 2.1% of the paper's count. Each level has its own estimator (their input widths
  differ); the encoder is the one shared module.
* Search range (Sec. 3): ``d = 1``, the paper's value, i.e. 27 cost-volume channels. The cost
  volume is the mean over channels of ``F_f(x) * F_w(x + o)`` for every integer offset
  ``o in [-d, d]^3`` (channel order z-major: ``o_z`` slowest, ``o_x`` fastest; see
  :func:`correlation`); features outside the volume are zero (FlowNet's correlation [10]).
* Bottom level: there is no coarser field, so the moving features are used unwarped and the
  estimator input has no field channels (zero channels would leave their weights untrainable).
* Upsampling ``up2``: :func:`spatial.resize_field` to the next level's grid (trilinear,
  corner-aligned grids as everywhere in this package, so one coarse voxel is
  ``(2n - 1) / (n - 1)`` fine voxels rather than exactly 2). Image pyramids follow the same
  geometry: a [1, 2, 1]/4 binomial blur and corner-aligned trilinear resampling per halving.
* Warping (Eq. 1 says bilinear): trilinear interpolation with border padding for the features and
  the images (the package's :class:`SpatialTransformer`).
* The flow convolutions start at ``normal(0, 1e-5)`` weights and zero bias, so the untrained
  network predicts the identity transform (as VoxelMorph's head); there are no normalisation
  layers (the paper mentions none).
* Initialisation (not given): every other convolution is He-initialised for its LeakyReLU
  (``kaiming_normal_``, zero bias), the usual choice for a deep plain stack (no skips, no
  normalisation) such as FlowNet [10], whose correlation layer CFWN takes. With
  PyTorch's default initialisation the signal that depends on the input shrinks about four-fold
  per layer: at the bottom level, after eight encoder convolutions, it is 1 % of the features'
  spread, the estimators see a constant, and training settled on a constant sub-voxel shift.
* NLCC windows (Sec. 2.3: "linearly decreases from the top level to the bottom level"; sizes not
  given): ``9, 7, 5, 3`` from level 1 (full resolution, VoxelMorph's 9 of [5]) to level 4.

Output: ``displacement`` = ``phi^1``; ``multiscale`` = ``[phi^N, ..., phi^2]`` (coarse to fine,
each in voxels of its own level); ``extras``: ``warped`` (the moving image through ``phi^1``),
``warped_levels`` and ``fixed_levels`` (the downsampled images of levels ``N..2``, the moving ones
warped by their level's field), which the loss uses so that padded inputs are scored on exactly
the grids the network worked on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_deepwarp.core import losses, spatial
from napari_deepwarp.core.models.blocks import (
    ConvBlock,
    FlowHead,
    SpatialTransformer,
    downsample_image,
)
from napari_deepwarp.core.models.registry import (
    RegistrationModel,
    RegistrationOutput,
    register_model,
)


def correlation(fixed: torch.Tensor, moving: torch.Tensor, search_range: int = 1) -> torch.Tensor:
    """Cost volume of two feature maps ``(B, C, D, H, W)`` over the offsets ``[-d, d]^3``.

    ``out[:, k, z, y, x] = mean_c fixed[:, c, z, y, x] * moving[:, c, z + oz, y + oy, x + ox]``
    for the ``k``-th offset ``(oz, oy, ox)`` in z-major order (``k = ((oz + d) * n + oy + d) * n
    + ox + d`` with ``n = 2d + 1``); ``moving`` is zero outside the volume. Returns
    ``(B, (2d + 1)**3, D, H, W)``. Pure PyTorch: the moving map is padded once and each offset is
    one shifted view, so memory stays at one product at a time plus the output.
    """
    if fixed.shape != moving.shape or fixed.dim() != 5:
        raise ValueError(
            f"correlation needs two (B, C, D, H, W) maps of one shape; got "
            f"{tuple(fixed.shape)} and {tuple(moving.shape)}"
        )
    d = int(search_range)
    if d < 0:
        raise ValueError(f"search range must be >= 0, got {search_range}")
    depth, height, width = fixed.shape[2:]
    padded = F.pad(moving, [d] * 6)
    n = 2 * d + 1
    out = []
    for oz in range(n):
        for oy in range(n):
            for ox in range(n):
                shifted = padded[:, :, oz : oz + depth, oy : oy + height, ox : ox + width]
                out.append((fixed * shifted).mean(dim=1))
    return torch.stack(out, dim=1)


@dataclass
class CFWNConfig:
    """Configuration of :class:`CFWN` (defaults: the paper's settings where given, see module).

    enc_channels: encoder widths, top level (full resolution) first; one level each, so
        ``N = len(enc_channels)`` and the working grid must be a multiple of ``2 ** (N - 1)``.
    estimator_channels: widths of the estimator's convolution blocks (the same at every level).
    search_range: the correlation layer's ``d`` ((2d + 1)^3 cost-volume channels).
    negative_slope: LeakyReLU slope of every convolution block (0.1 in the paper).
    ncc_windows: local NCC window per level, top (full resolution) first; odd ints, at least one
        per level (the first ``len(enc_channels)`` are used).
    reg_weight: lambda, the weight of the diffusion regulariser at every level.
    flow_init_std: standard deviation of the flow convolutions' initial weights.
    """

    enc_channels: tuple[int, ...] = (16, 32, 32, 32)
    estimator_channels: tuple[int, ...] = (32, 32, 16, 16)
    search_range: int = 1
    negative_slope: float = 0.1
    ncc_windows: tuple[int, ...] = (9, 7, 5, 3)
    reg_weight: float = 1.0
    flow_init_std: float = 1e-5


@register_model("cfwn")
class CFWN(RegistrationModel):
    """Cascaded feature warping network (Zhang et al. 2021); see the module docstring."""

    description = (
        "Cascaded feature warping network (Zhang et al. 2021): shared feature pyramid, "
        "feature warping + correlation + residual field per level, coarse to fine; "
        "multi-scale local NCC + diffusion loss"
    )
    config_class = CFWNConfig
    size_multiple = 8

    def __init__(self, config: CFWNConfig | None = None):
        super().__init__(config)
        cfg = self.config
        levels = len(cfg.enc_channels)
        if levels < 1:
            raise ValueError("enc_channels needs at least one level")
        if len(cfg.ncc_windows) < levels:
            raise ValueError(
                f"ncc_windows {tuple(cfg.ncc_windows)} needs one window per level ({levels})"
            )
        if int(cfg.search_range) < 0:
            raise ValueError(f"search_range must be >= 0, got {cfg.search_range}")
        slope = float(cfg.negative_slope)

        def block(cin, cout, stride=1):
            return ConvBlock(
                cin, cout, 3, stride=stride, activation="leaky_relu", negative_slope=slope
            )

        # Shared-weights encoder: level 0 (full resolution) first.
        self.encoder = nn.ModuleList()
        prev = 1
        for i, c in enumerate(cfg.enc_channels):
            self.encoder.append(nn.Sequential(block(prev, c, 1 if i == 0 else 2), block(c, c)))
            prev = c
        # One estimator (convolution blocks + flow convolution) per level, level 0 first.
        cost = (2 * int(cfg.search_range) + 1) ** 3
        self.estimators = nn.ModuleList()
        self.flows = nn.ModuleList()
        for i, c in enumerate(cfg.enc_channels):
            prev = cost + 2 * c + (3 if i < levels - 1 else 0)
            convs = []
            for width in cfg.estimator_channels:
                convs.append(block(prev, width))
                prev = width
            self.estimators.append(nn.Sequential(*convs))
            self.flows.append(FlowHead(prev, 3, init_std=float(cfg.flow_init_std)))
        for module in [*self.encoder, *self.estimators]:
            for conv in module.modules():
                if isinstance(conv, nn.Conv3d):
                    nn.init.kaiming_normal_(conv.weight, a=slope, nonlinearity="leaky_relu")
                    nn.init.zeros_(conv.bias)
        self.transformer = SpatialTransformer(mode="linear", padding="border")
        self.levels = levels
        self.size_multiple = 2 ** (levels - 1)

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The feature pyramid of one image, top level (full resolution) first."""
        out = []
        x = image
        for level in self.encoder:
            x = level(x)
            out.append(x)
        return out

    def predict(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        batch = moving.shape[0]
        # Shared weights: one pass over the stacked pair.
        pyramid = self.features(torch.cat([moving, fixed], dim=0))
        d = int(self.config.search_range)
        fields: list[torch.Tensor] = []  # coarse to fine
        phi = None
        for i in reversed(range(self.levels)):
            f_moving, f_fixed = pyramid[i][:batch], pyramid[i][batch:]
            if phi is None:
                warped, inputs = f_moving, []
            else:
                phi = spatial.resize_field(phi, f_fixed.shape[2:])
                warped = self.transformer(f_moving, phi)
                inputs = [phi]
            cost = correlation(f_fixed, warped, d)
            residual = self.flows[i](
                self.estimators[i](torch.cat([cost, f_fixed, warped, *inputs], 1))
            )
            phi = residual if phi is None else residual + phi
            fields.append(phi)
        multiscale = fields[:-1]
        warped_levels, fixed_levels = [], []
        for field in multiscale:
            shape = field.shape[2:]
            warped_levels.append(self.transformer(downsample_image(moving, shape), field))
            fixed_levels.append(downsample_image(fixed, shape))
        return RegistrationOutput(
            displacement=phi,
            multiscale=multiscale,
            extras={
                "warped": self.transformer(moving, phi),
                "warped_levels": warped_levels,
                "fixed_levels": fixed_levels,
            },
        )

    def loss(
        self, output: RegistrationOutput, moving: torch.Tensor, fixed: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 4: ``sum_i 2**-(i-1) (NLCC_{w_i} + lambda * diffusion(phi^i))``, with its terms.

        Terms: ``similarity`` and ``regularisation`` (the weighted sums over levels) and
        ``similarity_level{i}`` / ``regularisation_level{i}`` (unweighted, ``i = 1`` is full
        resolution).
        """
        cfg = self.config
        fields = [*output.multiscale, output.displacement]  # coarse to fine: level N .. 1
        levels = len(fields)
        windows = tuple(cfg.ncc_windows)[:levels][::-1]
        warped_levels = output.extras.get("warped_levels")
        fixed_levels = output.extras.get("fixed_levels")
        if warped_levels is None or fixed_levels is None or len(warped_levels) != levels - 1:
            warped_levels = [
                self.transformer(downsample_image(moving, u.shape[2:]), u) for u in fields[:-1]
            ]
            fixed_levels = [downsample_image(fixed, u.shape[2:]) for u in fields[:-1]]
        warped = output.extras.get("warped")
        if warped is None:
            warped = self.transformer(moving, output.displacement)
        warped_levels = [*warped_levels, warped]
        fixed_levels = [*fixed_levels, fixed]
        similarity = regularisation = None
        terms: dict[str, float] = {}
        for k, (u, w_img, f_img, window) in enumerate(
            zip(fields, warped_levels, fixed_levels, windows)
        ):
            level = levels - k  # paper's index i: 1 = full resolution
            weight = 2.0 ** -(level - 1)
            sim = losses.local_ncc_loss(w_img, f_img, window=int(window))
            reg = losses.diffusion_loss(u)
            similarity = weight * sim if similarity is None else similarity + weight * sim
            regularisation = (
                weight * reg if regularisation is None else regularisation + weight * reg
            )
            terms[f"similarity_level{level}"] = sim.detach()
            terms[f"regularisation_level{level}"] = reg.detach()
        total = similarity + float(cfg.reg_weight) * regularisation
        terms["similarity"] = similarity.detach()
        terms["regularisation"] = regularisation.detach()
        return total, terms

    def loss_description(self) -> dict[str, Any]:
        """The loss as a plain dict, for a checkpoint's model card."""
        cfg = self.config
        return {
            "similarity": {"name": "lncc", "windows_top_to_bottom": list(cfg.ncc_windows)},
            "regulariser": {"name": "diffusion", "on": "displacement, every level"},
            "weights": {
                "levels_top_to_bottom": [2.0**-i for i in range(len(cfg.enc_channels))],
                "regularisation": float(cfg.reg_weight),
            },
        }


__all__ = ["CFWN", "CFWNConfig", "correlation"]
