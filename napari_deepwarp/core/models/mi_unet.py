"""MI-UNet: an unsupervised U-Net for mono- and multi-modal deformable registration.

Wang X., Ning G., Yang N., Zhang X., Zhang H., Liao H. "An Unsupervised Convolution Neural Network
for Deformable Registration of Mono/Multi-Modality Medical Images." 43rd Annual International
Conference of the IEEE Engineering in Medicine & Biology Society (EMBC), 2021.

One network and one loss for both kinds of pair (T1 <-> T1 follow-up, T1 <-> T2, MR <->
ultrasound): the similarity is a differentiable Parzen-window mutual information, which assumes
no functional relation between the two images' intensities. Like the paper (Sec. II.A), the pair
is assumed affinely pre-aligned (see :mod:`napari_deepwarp.core.affine`); the network predicts
the remaining non-rigid part.

What this implementation does, and where it chooses (section numbers are the paper's):

* Input: ``concat(moving, fixed)`` (2 channels). Intensities should lie in ``[0, 1]`` (an
  intensity preset of :mod:`napari_deepwarp.core.preprocess`); the MI loss clamps to that range.
  The network needs a multiple of 16 along each axis (four stride-2 convolutions); ``forward``
  pads other sizes at the high end and crops the outputs back (see the registry).
* Network (Sec. II.B, Fig. 1): an encoder that downsamples by strided convolutions, a decoder of
  upsampling and convolutions, skip connections between them, 3x3x3 kernels, LeakyReLU after
  every convolution and a last convolution that outputs the flow. The text gives neither depth
  nor widths. Our choice is the VoxelMorph-2 layout of
  :class:`~napari_deepwarp.core.models.blocks.UNet`: encoder ``(16, 32, 32, 32)`` (stride 2),
  decoder ``(32, 32, 32, 32)`` with nearest-neighbour upsampling and skip concatenation (the last
  skip is the input pair), extra full-resolution convolutions ``(32, 16, 16)``. Reason: the paper
  describes exactly that structure and reports run times within about 1 % of VoxelMorph's on
  CPU (11.03 s vs 11.16 s) and 4 % on GPU (0.353 s vs 0.368 s) (Table 1), i.e. a network of the
  same size. LeakyReLU slope 0.2 (VoxelMorph's; the paper gives none); no normalisation (none is
  mentioned).
* Flow head: a 3x3x3 convolution to 3 channels, weights ``normal(0, 1e-5)``, zero bias, so the
  untrained model predicts the identity (the paper does not say how it initialises). The output is
  the displacement (pull, voxels) directly: the paper has no integration step.
* Warp: trilinear pull of the moving image with border padding (the paper's STN, Sec. II.C),
  returned as ``extras['warped']``. ``affine`` is None, ``multiscale`` empty, ``velocity`` None.
* Similarity (Sec. II.C, Eqs. 3-7): ``-MI(warped, fixed)`` in nats with Gaussian Parzen windows
  (:func:`napari_deepwarp.core.losses.mutual_information_loss`). The paper gives neither the
  number of grey levels nor ``sigma``; we use 32 bins on ``[0, 1]`` and ``sigma`` = half a bin
  width (``sigma_ratio = 0.5``, the setting of VoxelMorph's soft MI by Guo 2019, the usual
  choice for this estimator). Every voxel is used unless ``mi_max_samples`` asks for a random
  subset (for large volumes).
* Regulariser (Eq. 8): ``sum_p ||grad u(p)||^2``, taken as
  :func:`napari_deepwarp.core.losses.diffusion_loss` of the displacement (mean squared forward
  differences, averaged over the three axes: the sum up to a constant that ``lambda`` absorbs;
  the gradient of the deformation ``p + u`` and of ``u`` differ by the constant identity).
* Loss (Eq. 2): ``-MI(warped, fixed) + reg_weight * diffusion(u)``. The paper does not give
  ``lambda``; ``reg_weight = 1.0`` is VoxelMorph's setting for local NCC, a similarity whose
  change during registration has the same order as the change of MI in nats (the paper's
  Table 2: 0.66 -> 1.02).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from napari_deepwarp.core import losses
from napari_deepwarp.core.models.blocks import FlowHead, SpatialTransformer, UNet
from napari_deepwarp.core.models.registry import (
    RegistrationModel,
    RegistrationOutput,
    register_model,
)


@dataclass
class MIUNetConfig:
    """Configuration of :class:`MIUNet` (defaults: VoxelMorph-2 sized U-Net, 32-bin MI).

    enc_channels: channels of the encoder levels; each halves the grid, so the working grid
        must be a multiple of ``2 ** len(enc_channels)``.
    dec_channels: the first ``len(enc_channels)`` entries are the decoder levels (coarse to fine),
        the rest extra convolutions at full resolution.
    negative_slope: LeakyReLU slope.
    bins: Parzen-window grey levels of the mutual information on ``[0, 1]``.
    sigma_ratio: Gaussian kernel ``sigma`` as a fraction of one bin's width.
    mi_max_samples: estimate MI from this many random voxels (None: all of them).
    reg_weight: weight ``lambda`` of the diffusion regulariser.
    """

    enc_channels: tuple[int, ...] = (16, 32, 32, 32)
    dec_channels: tuple[int, ...] = (32, 32, 32, 32, 32, 16, 16)
    negative_slope: float = 0.2
    bins: int = 32
    sigma_ratio: float = 0.5
    mi_max_samples: int | None = None
    reg_weight: float = 1.0


@register_model("mi_unet")
class MIUNet(RegistrationModel):
    """MI-driven U-Net for mono/multi-modal pairs (Wang et al. 2021); see the module docstring."""

    description = (
        "U-Net trained with differentiable Parzen-window mutual information (Wang et al. 2021): "
        "one model for mono- and multi-modal pairs (T1/T2, MR/US); -MI + diffusion loss"
    )
    config_class = MIUNetConfig
    multimodal = True
    size_multiple = 16
    # 1.2-1.5x faster forward on a 2-core AVX512 CPU, float32 and bfloat16 (benchmarks.run)
    channels_last = True

    def __init__(self, config: MIUNetConfig | None = None):
        super().__init__(config)
        cfg = self.config
        if int(cfg.bins) < 2:
            raise ValueError(f"bins must be >= 2, got {cfg.bins}")
        if float(cfg.sigma_ratio) <= 0:
            raise ValueError(f"sigma_ratio must be > 0, got {cfg.sigma_ratio}")
        self.unet = UNet(
            2,
            cfg.enc_channels,
            cfg.dec_channels,
            activation="leaky_relu",
            negative_slope=float(cfg.negative_slope),
            downsample="conv",
            upsample="nearest",
        )
        self.flow = FlowHead(self.unet.out_channels, 3, init_std=1e-5)
        self.transformer = SpatialTransformer(mode="linear", padding="border")
        self.size_multiple = self.unet.size_multiple

    def predict(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        disp = self.flow(self.unet(torch.cat([moving, fixed], dim=1)))
        warped = self.transformer(moving, disp)
        return RegistrationOutput(displacement=disp, extras={"warped": warped})

    def loss(
        self, output: RegistrationOutput, moving: torch.Tensor, fixed: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``-MI(warped, fixed) + reg_weight * diffusion(u)`` (Eqs. 2, 7, 8), with its terms."""
        cfg = self.config
        warped = output.extras.get("warped")
        if warped is None:
            warped = self.transformer(moving, output.displacement)
        similarity = losses.mutual_information_loss(
            warped,
            fixed,
            bins=int(cfg.bins),
            sigma_ratio=float(cfg.sigma_ratio),
            max_samples=cfg.mi_max_samples,
        )
        regularisation = losses.diffusion_loss(output.displacement)
        total = similarity + float(cfg.reg_weight) * regularisation
        return total, {
            "similarity": similarity.detach(),
            "regularisation": regularisation.detach(),
        }

    def loss_description(self) -> dict[str, Any]:
        """The loss as a plain dict, for a checkpoint's model card."""
        cfg = self.config
        return {
            "similarity": {
                "name": "mi",
                "bins": int(cfg.bins),
                "sigma_ratio": float(cfg.sigma_ratio),
                "max_samples": cfg.mi_max_samples,
            },
            "regulariser": {"name": "diffusion", "on": "displacement"},
            "weights": {"similarity": 1.0, "regularisation": float(cfg.reg_weight)},
        }


__all__ = ["MIUNet", "MIUNetConfig"]
