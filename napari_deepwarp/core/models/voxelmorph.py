"""VoxelMorph: the U-Net baseline of unsupervised deformable registration.

Balakrishnan G., Zhao A., Sabuncu M. R., Guttag J., Dalca A. V. "VoxelMorph: A Learning Framework
for Deformable Medical Image Registration." IEEE Transactions on Medical Imaging 38(8):1788-1800,
2019 (diffeomorphic variant: Dalca et al., MICCAI 2018 / MedIA 2019).

What this implementation does, and where it chooses:

* Input: ``concat(moving, fixed)`` (2 channels) on the working grid; the network needs a
  multiple of 16 along each axis (four stride-2 downsamplings), and ``forward`` pads other sizes
  at the high end and crops the outputs back (see the registry).
* Network: the VoxelMorph-2 U-Net (:class:`~napari_deepwarp.core.models.blocks.UNet`), encoder
  ``(16, 32, 32, 32)`` with stride-2 3x3x3 convolutions, decoder ``(32, 32, 32, 32)`` with
  nearest-neighbour upsampling and skip concatenation (the last skip is the 2-channel input), then
  the remaining decoder channels ``(32, 16, 16)`` as extra full-resolution convolutions, as in
  the ``voxelmorph`` package's default. Every convolution is followed by LeakyReLU(0.2); there is
  no normalisation.
* Flow head: a 3x3x3 convolution to 3 channels, weights ``normal(0, 1e-5)``, zero bias, so the
  untrained model predicts the identity transform.
* ``diffeomorphic=False``: the head's output is the displacement (pull, voxels).
  ``diffeomorphic=True``: the head's output is a stationary velocity field ``v``
  (``output.velocity``); the displacement is ``exp(v)`` by ``int_steps`` (7) scaling-and-squaring
  steps, computed on a grid ``int_downsize`` times coarser (default 1: full resolution) and resized
  back with values rescaled.
* Warp: trilinear pull of the moving image, border padding (``extras['warped']``).
* Loss (the paper's unsupervised objective): ``similarity(warped, fixed) + reg_weight * diffusion``
  where similarity defaults to local NCC with a 9^3 window (the paper's choice; any name of
  :func:`losses.similarity_loss` works) and ``diffusion`` is the mean squared spatial gradient of
  the displacement, or of the velocity for the diffeomorphic variant (as in VoxelMorph).
  ``reg_weight`` is the paper's lambda: 1.0 suits NCC; the paper uses 0.01 for MSE on [0, 1]
  images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from napari_deepwarp.core import losses
from napari_deepwarp.core.models.blocks import (
    FlowHead,
    ResizeField,
    SpatialTransformer,
    UNet,
    VecInt,
)
from napari_deepwarp.core.models.registry import (
    RegistrationModel,
    RegistrationOutput,
    register_model,
)


@dataclass
class VoxelMorphConfig:
    """Configuration of :class:`VoxelMorph` (defaults: VoxelMorph-2 with local NCC).

    enc_channels: channels of the encoder levels; each level halves the grid, so the working grid
        must be a multiple of ``2 ** len(enc_channels)``.
    dec_channels: the first ``len(enc_channels)`` entries are the decoder levels (coarse to fine),
        the rest are extra convolutions at full resolution.
    diffeomorphic: predict a stationary velocity field and integrate it (scaling and squaring).
    int_steps: scaling-and-squaring steps (``2**int_steps`` compositions).
    int_downsize: integrate on a grid this many times coarser (1 = full resolution).
    similarity: name for :func:`napari_deepwarp.core.losses.similarity_loss`.
    similarity_window: window size (voxels) of local NCC (used for ``"lncc"`` only).
    reg_weight: weight of the diffusion regulariser (VoxelMorph's lambda).
    """

    enc_channels: tuple[int, ...] = (16, 32, 32, 32)
    dec_channels: tuple[int, ...] = (32, 32, 32, 32, 32, 16, 16)
    diffeomorphic: bool = False
    int_steps: int = 7
    int_downsize: int = 1
    similarity: str = "lncc"
    similarity_window: int = 9
    reg_weight: float = 1.0


@register_model("voxelmorph")
class VoxelMorph(RegistrationModel):
    """VoxelMorph U-Net (Balakrishnan et al. 2019); see the module docstring for the choices."""

    description = (
        "VoxelMorph U-Net baseline (Balakrishnan et al. 2019): dense displacement or, "
        "diffeomorphic, an integrated stationary velocity; local NCC + diffusion loss"
    )
    config_class = VoxelMorphConfig
    size_multiple = 16
    # 1.2-1.5x faster forward on a 2-core AVX512 CPU, float32 and bfloat16 (benchmarks.run)
    channels_last = True

    def __init__(self, config: VoxelMorphConfig | None = None):
        super().__init__(config)
        cfg = self.config
        if int(cfg.int_downsize) < 1:
            raise ValueError(f"int_downsize must be >= 1, got {cfg.int_downsize}")
        if int(cfg.int_steps) < 0:
            raise ValueError(f"int_steps must be >= 0, got {cfg.int_steps}")
        self.unet = UNet(
            2,
            cfg.enc_channels,
            cfg.dec_channels,
            activation="leaky_relu",
            negative_slope=0.2,
            downsample="conv",
            upsample="nearest",
        )
        self.flow = FlowHead(self.unet.out_channels, 3, init_std=1e-5)
        self.integrate = VecInt(cfg.int_steps) if cfg.diffeomorphic else None
        self.resize = ResizeField(1.0 / cfg.int_downsize)
        self.transformer = SpatialTransformer(mode="linear", padding="border")
        # One halving per encoder level (16 for the default four levels).
        self.size_multiple = self.unet.size_multiple
        self._similarity_cache: dict[str, Any] = {}  # plain dict: never part of the state dict

    def predict(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        field = self.flow(self.unet(torch.cat([moving, fixed], dim=1)))
        velocity = None
        if self.integrate is not None:
            velocity = field
            shape = field.shape[2:]
            disp = self.integrate(self.resize(velocity))
            disp = self.resize(disp, shape)
        else:
            disp = field
        warped = self.transformer(moving, disp)
        return RegistrationOutput(displacement=disp, velocity=velocity, extras={"warped": warped})

    def _similarity(self):
        cfg = self.config
        key = f"{cfg.similarity}:{cfg.similarity_window}"
        if key not in self._similarity_cache:
            kwargs = {"window": int(cfg.similarity_window)} if cfg.similarity == "lncc" else {}
            self._similarity_cache[key] = losses.similarity_loss(cfg.similarity, **kwargs)
        return self._similarity_cache[key]

    def loss(
        self, output: RegistrationOutput, moving: torch.Tensor, fixed: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``similarity(warped, fixed) + reg_weight * diffusion(u or v)``, with its terms."""
        warped = output.extras.get("warped")
        if warped is None:
            warped = self.transformer(moving, output.displacement)
        similarity = self._similarity()(warped, fixed)
        regularised = output.velocity if output.velocity is not None else output.displacement
        regularisation = losses.diffusion_loss(regularised)
        total = similarity + float(self.config.reg_weight) * regularisation
        return total, {
            "similarity": similarity.detach(),
            "regularisation": regularisation.detach(),
        }

    def loss_description(self) -> dict[str, Any]:
        """The loss as a plain dict, for a checkpoint's model card."""
        cfg = self.config
        similarity: dict[str, Any] = {"name": cfg.similarity}
        if cfg.similarity == "lncc":
            similarity["window"] = int(cfg.similarity_window)
        return {
            "similarity": similarity,
            "regulariser": {
                "name": "diffusion",
                "on": "velocity" if cfg.diffeomorphic else "displacement",
            },
            "weights": {"similarity": 1.0, "regularisation": float(cfg.reg_weight)},
        }


__all__ = ["VoxelMorph", "VoxelMorphConfig"]
