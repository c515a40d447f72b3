"""FCN-MS: Li & Fan's multi-resolution fully convolutional network with deep self-supervision.

Li H., Fan Y. "Non-rigid image registration using fully convolutional networks with deep
self-supervision." arXiv:1709.00799, 2017.

The paper's point (Abstract; Methods, "Image registration using FCNs for optimizing an image
similarity metric") is that the network *is* the optimiser of one registration: the same loss
trains it on many pairs or fits it to a single pair from a random initialisation. That makes it
the natural model for instance optimisation (:mod:`napari_deepwarp.core.finetune`) without a
checkpoint: its regression heads start near zero, so a fit starts from the identity transform.

The network (paper Fig. 1b and "Network training"), input ``concat(moving, fixed)``::

    Conv1 (32) - Pool1 - Conv2 (64) - Pool2 - Conv3 (128) ----------> Reg1: field at 1/4
                                                  |
                                              Conv4 (64) - Deconv1 (64) ----> Reg2: field at 1/2
                                                               |
                                                          Deconv2 (32) ------> Reg3: field at 1/1

* Conv layers: 3x3x3 convolution + normalisation + ReLU ("Conv, BN, ReLU layers").
* Pooling: max pooling, kernel 3, stride 2, padding 1 (exactly halves an even size).
* Deconv layers: 3x3x3 transposed convolution with stride 2 (padding 1, output padding 1, so it
  exactly doubles) + normalisation + ReLU.
* Regression layers: a 3x3x3 convolution to the 3 displacement channels ``(dz, dy, dx)`` in
  voxels of the head's own grid; weights ``normal(0, 1e-5)``, zero bias
  (:class:`~napari_deepwarp.core.models.blocks.FlowHead`), so a freshly initialised network
  predicts the identity transform at every resolution and a fit starts from there.
* The working grid must be a multiple of 4 (two poolings); ``forward`` pads and crops.
* 684.2K parameters at the defaults.

Loss (Eq. 1-2 with deep self-supervision, "Multi-resolution image registration with deep
self-supervision" and "Network training")::

    L = sum_{r in 1/4, 1/2, 1} w_r * ( (1 - NCC(M_r o u_r, F_r)) + lambda * TV(u_r) ),
    (w_1/4, w_1/2, w_1) = (0.3, 0.6, 1),  lambda = 0.05

where ``u_r`` is the field of the regression layer at resolution ``r``, ``M_r``, ``F_r`` are the
moving and fixed images downsampled to that grid
(:func:`~napari_deepwarp.core.models.blocks.downsample_image`: binomial blur + corner-aligned
trilinear resampling per halving; at full resolution the images themselves), ``NCC`` is the
global normalised cross-correlation of the paper (:func:`losses.ncc_loss`) and
``TV(u) = mean |forward differences of u|`` averaged over the three axes
(:func:`losses.total_variation_loss`, the anisotropic form of Eq. 2 divided by the voxel count),
computed on each field in voxels of its own grid.

Where the paper is vague, this implementation chooses (and the config can change):

* Strides ("Network training" gives "kernel size 3 and stride 2" for the Conv layers as for the
  pooling and Deconv layers): stride-2 convolutions *and* stride-2 pooling would shrink the grid
  16-fold, which two stride-2 Deconv layers cannot undo, and the text ("Multi-resolution ...")
  says that the first two pooling layers reduce the size to Reg1's resolution. The Conv layers
  therefore have stride 1.
* Conv4 (64 kernels) is not placed by the text, which has "the 3rd convolutional layer" predict
  the downsampled field: Reg1 reads Conv3; Conv4 sits at 1/4 resolution between Conv3 and Deconv1
  (narrowing 128 to Deconv1's 64 channels).
* No skip connections: the text describes none (Fig. 1b is not available). ``skip_connections=True``
  concatenates Conv2's features to Deconv1's output and Conv1's to Deconv2's (FCN [3] style); in
  single-pair fits on smooth synthetic deformations (32^3, 60 Adam steps, lr 1e-3) it did worse
  (mean label Dice 0.74 -> 0.89, end-point error 0.41 voxel) than without (-> 0.93, 0.22 voxel):
  the full-resolution features pass texture into the field.
* Which loss gets which weight ("a weighted sum of loss 1 to 3, with weights 1, 0.6, and 0.3"):
  the paper does not say which resolution loss 1 belongs to. Here the full-resolution field,
  the registration result, gets 1 and the companion losses of the coarser heads get less (0.6 at
  1/2, 0.3 at 1/4), as in deeply-supervised nets [15] that the paper cites for the scheme.
  Reading "loss 1" as the first head computed (1/4) gives ``level_weights=(1.0, 0.6, 0.3)``;
  in the fit above it reached Dice 0.91 / error 0.32 voxel against 0.93 / 0.22.
* How the coarse fields are used ("Different from conventional multi-resolution image
  registration algorithms ... jointly optimizes deformation fields at all resolutions"): each
  head predicts the *whole* displacement at its resolution, not a residual on an upsampled coarser
  field, and nothing is composed: the coarse fields are deep self-supervision only (each warps its
  downsampled moving image, which is compared with the downsampled fixed image) and are returned
  as ``multiscale``. The output ``displacement`` is Reg3's field alone.
* Normalisation: the paper uses batch normalisation with batches of 64 pairs. Here the default is
  instance normalisation (``norm="instance"``): for one pair it computes the statistics BN uses in
  training, and it keeps using them in evaluation, so a single-pair fit (the paper's other use)
  gives the same field in ``train()`` and ``eval()``. ``norm="batch"`` is the paper's layer.
* lambda (not given in the paper): 0.05. In the fits above 0.02 and 0.1 gave the same Dice
  within 0.01; 0.2 held the field back slightly.

Output: ``displacement`` = Reg3's field; ``multiscale`` = ``[Reg1 field (1/4), Reg2 field (1/2)]``;
``extras``: ``warped`` (moving through the full-resolution field), ``warped_levels`` and
``fixed_levels`` (the downsampled images of the two coarse levels, the moving ones warped by
their level's field), which the loss uses so that padded inputs are scored on exactly the grids
the network worked on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from napari_deepwarp.core import losses
from napari_deepwarp.core.models.blocks import (
    ConvBlock,
    FlowHead,
    SpatialTransformer,
    downsample_image,
    make_activation,
    make_norm,
)
from napari_deepwarp.core.models.registry import (
    RegistrationModel,
    RegistrationOutput,
    register_model,
)


class _Deconv(nn.Module):
    """Stride-2 3x3x3 transposed convolution (exact doubling) + normalisation + activation."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, activation: str):
        super().__init__()
        has_norm = norm is not None and str(norm).lower() != "none"
        self.conv = nn.ConvTranspose3d(
            in_channels,
            out_channels,
            kernel_size=3,
            stride=2,
            padding=1,
            output_padding=1,
            bias=not has_norm,
        )
        self.norm = make_norm(norm, out_channels)
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


@dataclass
class FCNMSConfig:
    """Configuration of :class:`FCNMS` (defaults: the paper's widths and loss weights).

    conv_channels: kernels of Conv layers 1-4.
    deconv_channels: kernels of Deconv layers 1-2.
    skip_connections: concatenate Conv2 / Conv1 features after Deconv1 / Deconv2.
    norm: normalisation after every Conv and Deconv layer (``"instance"``, ``"batch"`` (the
        paper's), ``"group"`` or ``"none"``).
    activation: activation after every Conv and Deconv layer (the paper's ReLU).
    level_weights: loss weights of regression layers 1-3 (1/4, 1/2, full resolution).
    reg_weight: lambda, the weight of total variation at every level.
    head_init_std: standard deviation of the regression layers' initial weights.
    """

    conv_channels: tuple[int, int, int, int] = (32, 64, 128, 64)
    deconv_channels: tuple[int, int] = (64, 32)
    skip_connections: bool = False
    norm: str = "instance"
    activation: str = "relu"
    level_weights: tuple[float, float, float] = (0.3, 0.6, 1.0)
    reg_weight: float = 0.05
    head_init_std: float = 1e-5


@register_model("fcn_ms")
class FCNMS(RegistrationModel):
    """Li & Fan's multi-resolution FCN with deep self-supervision; see the module docstring."""

    description = (
        "Multi-resolution FCN with deep self-supervision (Li & Fan 2017): three regression "
        "heads at 1/4, 1/2 and full resolution; weighted NCC + total variation at each; "
        "suits fitting one pair from scratch"
    )
    config_class = FCNMSConfig
    size_multiple = 4

    def __init__(self, config: FCNMSConfig | None = None):
        super().__init__(config)
        cfg = self.config
        if len(cfg.conv_channels) != 4 or len(cfg.deconv_channels) != 2:
            raise ValueError(
                f"conv_channels needs 4 entries and deconv_channels 2; got "
                f"{tuple(cfg.conv_channels)} and {tuple(cfg.deconv_channels)}"
            )
        if len(cfg.level_weights) != 3:
            raise ValueError(f"level_weights needs 3 entries, got {tuple(cfg.level_weights)}")
        c1, c2, c3, c4 = (int(c) for c in cfg.conv_channels)
        d1, d2 = (int(c) for c in cfg.deconv_channels)

        def conv(cin, cout):
            return ConvBlock(cin, cout, 3, norm=cfg.norm, activation=cfg.activation)

        self.conv1 = conv(2, c1)
        self.conv2 = conv(c1, c2)
        self.conv3 = conv(c2, c3)
        self.conv4 = conv(c3, c4)
        self.pool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.deconv1 = _Deconv(c4, d1, cfg.norm, cfg.activation)
        h2 = d1 + (c2 if cfg.skip_connections else 0)
        self.deconv2 = _Deconv(h2, d2, cfg.norm, cfg.activation)
        h1 = d2 + (c1 if cfg.skip_connections else 0)
        std = float(cfg.head_init_std)
        self.reg1 = FlowHead(c3, 3, init_std=std)
        self.reg2 = FlowHead(h2, 3, init_std=std)
        self.reg3 = FlowHead(h1, 3, init_std=std)
        self.transformer = SpatialTransformer(mode="linear", padding="border")

    def predict(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        skip = bool(self.config.skip_connections)
        f1 = self.conv1(torch.cat([moving, fixed], dim=1))
        f2 = self.conv2(self.pool(f1))
        f3 = self.conv3(self.pool(f2))
        u1 = self.reg1(f3)
        h2 = self.deconv1(self.conv4(f3))
        if skip:
            h2 = torch.cat([h2, f2], dim=1)
        u2 = self.reg2(h2)
        h1 = self.deconv2(h2)
        if skip:
            h1 = torch.cat([h1, f1], dim=1)
        u3 = self.reg3(h1)
        multiscale = [u1, u2]
        warped_levels, fixed_levels = [], []
        for field in multiscale:
            shape = field.shape[2:]
            warped_levels.append(self.transformer(downsample_image(moving, shape), field))
            fixed_levels.append(downsample_image(fixed, shape))
        return RegistrationOutput(
            displacement=u3,
            multiscale=multiscale,
            extras={
                "warped": self.transformer(moving, u3),
                "warped_levels": warped_levels,
                "fixed_levels": fixed_levels,
            },
        )

    def loss(
        self, output: RegistrationOutput, moving: torch.Tensor, fixed: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``sum_k w_k (1 - NCC(M_k o u_k, F_k) + lambda * TV(u_k))`` over the three heads.

        Terms: ``similarity`` and ``regularisation`` (weighted sums) and ``similarity_level{k}``
        / ``regularisation_level{k}`` (unweighted; ``k = 1`` is the coarsest head, 3 the finest).
        """
        cfg = self.config
        fields = [*output.multiscale, output.displacement]
        if len(fields) != 3:
            raise ValueError(f"fcn_ms expects 2 coarse fields in multiscale, got {len(fields) - 1}")
        warped_levels = output.extras.get("warped_levels")
        fixed_levels = output.extras.get("fixed_levels")
        if warped_levels is None or fixed_levels is None or len(warped_levels) != 2:
            warped_levels = [
                self.transformer(downsample_image(moving, u.shape[2:]), u) for u in fields[:2]
            ]
            fixed_levels = [downsample_image(fixed, u.shape[2:]) for u in fields[:2]]
        warped = output.extras.get("warped")
        if warped is None:
            warped = self.transformer(moving, output.displacement)
        warped_levels = [*warped_levels, warped]
        fixed_levels = [*fixed_levels, fixed]
        similarity = regularisation = None
        terms: dict[str, float] = {}
        for k, (u, w_img, f_img, weight) in enumerate(
            zip(fields, warped_levels, fixed_levels, cfg.level_weights), start=1
        ):
            sim = losses.ncc_loss(w_img, f_img)
            reg = losses.total_variation_loss(u)
            weight = float(weight)
            similarity = weight * sim if similarity is None else similarity + weight * sim
            regularisation = (
                weight * reg if regularisation is None else regularisation + weight * reg
            )
            terms[f"similarity_level{k}"] = sim.detach()
            terms[f"regularisation_level{k}"] = reg.detach()
        total = similarity + float(cfg.reg_weight) * regularisation
        terms["similarity"] = similarity.detach()
        terms["regularisation"] = regularisation.detach()
        return total, terms

    def loss_description(self) -> dict[str, Any]:
        """The loss as a plain dict, for a checkpoint's model card."""
        cfg = self.config
        return {
            "similarity": {"name": "ncc"},
            "regulariser": {"name": "tv", "on": "displacement, every level"},
            "weights": {
                "levels_coarse_to_fine": [float(w) for w in cfg.level_weights],
                "regularisation": float(cfg.reg_weight),
            },
        }


__all__ = ["FCNMS", "FCNMSConfig"]
