"""LinDef: coupled linear (affine) and deformable registration from spatial gradients.

Christodoulidis S., Sahasrabudhe M., Vakalopoulou M., Chassagnon G., Revel M.-P., Mougiakakou S.,
Paragios N. "Linear and Deformable Image Registration with 3D Convolutional Neural Networks."
Image Analysis for Moving Organ, Breast, and Thoracic Images (RAMBO, MICCAI workshop), LNCS 11040,
pp. 13-22, 2018 (arXiv:1809.06226). The deformable layer follows Shu et al., "Deforming
Autoencoders", ECCV 2018 (the paper's ref. [13]).

What this implementation does, and where it chooses (section numbers are the paper's):

* Input: ``concat(moving, fixed)`` (2 channels). The network never downsamples (below), so any
  size works as it is (``size_multiple = 1``).
* Encoder (Sec. 2.2, after the dilated FCN of the paper's ref. [1], Anthimopoulos et al. 2018):
  five 3x3x3 convolutions, each followed by instance normalisation and LeakyReLU, with dilation
  rates ``(1, 1, 2, 3, 5)``; the outputs of all five are concatenated with the input pair
  ("multi-resolution feature merging"). The paper gives the merged width (290 features) and the
  receptive field (25^3) but neither the per-layer widths nor the rates. A 25^3 field from five
  3^3 layers needs dilations summing to 12; ``(1, 1, 2, 3, 5)`` is the start of the Fibonacci
  rates used by ref. [1]. The 288 = 290 - 2 learned channels are split ``(32, 64, 64, 64, 64)``
  (our choice: ref. [1]'s 32 for the first layer, the rest as even as the total allows).
  The dropout (0.5) after the merge in the authors' public examples is not in the paper and is
  left out.
* LeakyReLU slope 0.3: the Keras default of the authors' public code (the paper gives none).
  Instance normalisation (affine, no running statistics) precedes every LeakyReLU ("before most
  of the activation functions", Sec. 2.2); the two output layers have neither ("LeakyReLU ...
  for all convolutional layers except the last two").
* Spatial-gradient decoder (Sec. 2.2): a squeeze-excitation block (Hu et al., the paper's [8];
  global average pool, linear ``C -> C // 16``, ReLU, linear ``C // 16 -> C``, sigmoid, channel
  scaling; the reduction 16 is Hu et al.'s default) on the 290 merged features, then non-dilated
  3x3x3 convolutions ``dec_channels`` (default ``(32, 32, 32)``, the three 32-channel decoder
  convolutions of the authors' public example; the paper gives no widths), then a 3x3x3
  convolution to 3 logits ``x`` with weights ``normal(0, 1e-5)`` and zero bias (the
  :class:`~napari_deepwarp.core.models.blocks.FlowHead` init: almost exactly the identity, yet
  gradients reach every layer from the first step; the authors' code uses exact zeros).
  The paper's decoder "up-sampling operations" have nothing to undo here -- the encoder as
  described never downsamples -- so the whole network runs at full resolution.
* Positive spatial gradients (Sec. 2.1-2.2): with ``c = max_gradient``,
  ``Phi = c / (1 + (c - 1) exp(-x)) = c * sigmoid(x - log(c - 1))``, the logistic growth of the
  authors' code; for the paper's ``c = 2`` it is ``2 * sigmoid(x)``: ``Phi`` lies in ``(0, 2)``
  and ``Phi(0) = 1``.
* Integration (Sec. 2.1, "a cumulative sum along each dimension"): the deformable sampling grid,
  in voxels, is ``G_d(p) = sum_{k=0}^{p_d} Phi_d(..., k, ...) - 1`` along each axis ``d`` of
  (z, y, x). ``Phi_d`` at index ``k`` is the distance between the sampling points of voxels
  ``k - 1`` and ``k`` (voxel ``-1`` sits at ``-1``), so ``Phi = 1`` everywhere gives ``G(p) = p``
  exactly, the identity ("when Phi = 1 there is no change in the distance between the pixels p
  and p + 1"). (The authors' public code omits the ``- 1`` and clips, a one-voxel shift.)
  What this guarantees: ``G_d(p + e_d) - G_d(p) = Phi_d(p + e_d) > 0`` -- every grid line is
  strictly monotone along its own axis and never folds back on itself (the paper's "no
  self-crossings"), and the spacing never exceeds ``max_gradient``. What it does **not**
  guarantee: a positive 3D Jacobian determinant. The off-diagonal derivatives
  ``dG_d/dp_c`` (``c != d``) are sums of differences of ``Phi_d`` down a whole column and are
  unbounded, so strongly varying gradients can still fold (see the tests); measure folding
  with :func:`napari_deepwarp.core.spatial.jacobian_determinant`. In float32 the strict
  monotonicity also needs ``Phi`` above the rounding of the running sum (logits above about
  ``-10``).
* Affine decoder (Sec. 2.2): global average pooling of the 290 merged features, one linear layer
  to 12 numbers, reshaped to ``A_n (B, 3, 4)``; zero weights and an identity bias, so the untrained
  model is exactly the identity (as in the authors' code). The paper does not fix the frame the
  matrix acts in; here ``A_n`` acts on *normalised* ``(z, y, x)`` coordinates ``n(p) = s * p - 1``
  with ``s = 2 / (size - 1)`` per axis (voxel 0 at -1, the last voxel at +1; the convention of
  the spatial transformer of Jaderberg et al., the paper's [10]). Our choice: the matrix then
  rotates and scales about the centre and its coefficients mean the same on any grid size (with
  raw voxel indices, as in the authors' code, a linear coefficient's effect grows with the size
  and couples to the translation).
* ``affine_pooling = "moments"`` (our extension; the default ``"mean"`` is the paper's): the
  affine head also reads the first moments of the merged features over the grid,
  ``mean_p f_c(p) n_a(p)`` for each channel ``c`` and normalised axis ``a``, through a second
  linear layer (``3 * 290 -> 12``, no bias, zero weights, so it starts as the identity and a
  ``"mean"`` checkpoint loads into it unchanged). Why: every feature but the input pair is
  instance-normalised before its activation, so its plain mean over the grid is a statistic of
  its histogram alone and says nothing about *where* a structure lies; a shift or rotation of
  the moving image barely changes it. The moments keep position: those of the input pair are
  its intensity centroids (their difference is the translation, what a moments initialiser
  uses), and those of a feature that responds to local misalignment are the sums a
  least-squares affine fit of the local displacements needs (``sum d(p) p^T``).
* ``affine_pooling = "moments2"`` adds the second moments, ``mean_p f_c(p) n_a(p) n_b(p)``
  for the six axis pairs, through a third zero-initialised linear layer (``6 * 290 -> 12``):
  those of the input pair are its inertia tensors, whose difference tells a rotation or a
  scaling apart, which first moments cannot (with first moments alone the head learns the
  centroid shift and little more: on native Mindboggle pairs it reaches what aligning the
  centroids reaches, 0.34 and 0.32 Dice).
* ``affine_pooling = "keypoints"`` (our extension, after KeyMorph: Evan M. Yu et al., "KeyMorph:
  Robust Multi-modal Affine Registration via Unsupervised Keypoint Detection", MIDL 2022): a
  small detector (``keypoint_channels`` dilated 3x3x3 convolutions with instance normalisation
  and LeakyReLU, then a 1x1x1 convolution to ``keypoints`` heatmaps, zero-initialised, plus a
  fixed prior around a centre of its own) reads each image *alone*; each heatmap's softmax
  over the grid gives one point, its centre of mass in normalised coordinates. The affine is
  the least-squares map of the fixed image's points onto the moving image's,
  ``A = argmin sum_k |A [q_k; 1] - p_k|^2 + r |A - [I | 0]|^2`` with a small ridge
  ``r = keypoint_ridge`` toward the identity (closed form, float32 with autocast off); the linear
  head on the mean of the merged features adds its deviation from the identity. Why: the
  pooled heads cannot read a rotation (a linear read-out of the true affine from the pooled
  features of 2,400 brain-shaped pairs leaves about 3 voxels of error held out), while points
  that move with the anatomy give any rotation, scaling and shear exactly, by construction.
  Untrained, each point is its prior's centre of mass in both images and the map is the
  identity, so a checkpoint without the detector loads into it unchanged.
* ``affine_symmetric = True`` (our extension; default False, the paper's one pass): the affine
  head also reads the swapped pair, ``B = head(fixed, moving)``, an estimate of the inverse map,
  and the prediction is ``(A + B^-1) / 2`` on 4x4 homogeneous matrices. A bias that the head
  adds for what both images share (a brain's own asymmetries, unlike anything in synthetic
  training, read as a few degrees of rotation) is nearly the same in both passes and cancels to
  first order: an aligned pair gives ``A = B = I + b`` and ``(A + B^-1) / 2 = I + O(b^2)``.
  It costs a second pass of the encoder.
* ``affine_iterations = k > 1`` (our extension; default 1, the paper's): the network is applied
  ``k`` times, each pass to the moving image resampled (once, from the original) through the
  affines of the passes before; the last pass gives the deformable part and the last affine,
  composed after the earlier ones: ``warped(p) = moving(A_1(...A_k(G(p))))``, the paper's
  deformable-then-linear order. The head regresses a large misalignment coarsely and a small
  one well, as recursive cascades use one network (Zhao et al., ICCV 2019). ``k`` encoder
  passes (twice that when symmetric). A branch trained on one pass may not survive more: a
  keypoint detector trained so drifted on real brains, each pass re-reading a moving image
  resampled partly outside the grid (Dice 0.30 after one pass, 0.01 after four; the training
  record's eighth session).
* ``deformable_after_affine = True`` (our extension; default False): the affine passes (all
  ``affine_iterations`` of them) come first and the deformable part reads the pair they
  aligned, with no affine read after it: ``warped(p) = moving(A_1(...A_k(G(p))))`` where ``G``
  is predicted from ``moving(A_1(...A_k(p)))`` and the fixed image. The paper reads both parts
  from the unaligned pair, so its deformable part learns to finish whatever affine the head
  gives; a deformable part trained on aligned pairs (``lindef_noaffine_brain``) cannot, and
  takes a keypoint affine of 0.33 Dice down to 0.24 (Mindboggle 2<-3, 32-voxel grid), where
  after the affine it brings it up to 0.35 (the training record's eleventh session).
* ``working_axes = "world"`` (our extension; default ``"image"``): the working grid lies along
  the world's axes (:data:`napari_deepwarp.core.preprocess.WORKING_AXES`), so a brain reaches the
  network upright however its file stores it, as the upright training pairs of a keypoint
  detector trained with ``--synth world_axes=true`` were. A detector trained on all 48 axis
  orientations must learn each of them apart: after 2,145 steps it read 0.13 of a synthetic
  pair's rotation; trained on upright pairs from there it read 0.5 within 100 steps and 0.78
  after 2,100, and its own branch went from 0.267 to 0.460 Dice on held-out native-space brains.
  Its deformable part, ``lindef_noaffine_brain``'s fine-tuned upright on pairs misaligned as the
  detector leaves them (6 degrees, 2 voxels, 5 % scale), took that to 0.465 (the shipped
  ``lindef_keypoints_brain``: keypoints, one pass, ``deformable_after_affine``,
  ``working_axes="world"``, ``keypoint_size=32`` at an 80-voxel working grid; the training
  record's eleventh and thirteenth sessions).
* Composition (Sec. 2.1, Eq. 3: the deformable part is applied first, then the linear part): as
  positions the sampling grid is ``p -> A(G(p))`` -- first the integrated deformable grid, then
  the affine -- exactly as the authors' code multiplies the integrated grid by the matrix. The
  moving image is resampled once (trilinear, border padding): ``warped(p) = moving(A(G(p)))``.
* Reported outputs (pull convention of :mod:`napari_deepwarp.core.spatial`):
  ``affine`` is the voxel-space map ``A_v = [M | t]`` (``p -> M p + t`` on voxel ``(z, y, x)``)
  equal to ``n^-1 o A_n o n``: ``M = S^-1 M_n S`` and ``t = S^-1 (M_n o + t_n - o)`` with
  ``S = diag(s)``, ``o = -1`` (an axis of size 1 uses ``s = 1, o = 0``). ``displacement`` is the
  total pull field ``u(p) = M G(p) + t - p`` in voxels, so ``warp(moving, u)`` reproduces
  ``extras['warped']``. Equivalently ``u = u_G + u_A(p + u_G)`` with ``u_G = G - p``
  (``extras['deformable']``) and ``u_A = affine_to_field(A_v)``, i.e.
  ``spatial.compose(u_G, affine_to_field(A_v))`` evaluated exactly (an affine field needs no
  interpolation). ``extras`` also holds ``'spatial_gradients'`` (``Phi``, ``(B, 3, D, H, W)``) and
  ``'affine_normalized'`` (``A_n``). ``multiscale`` is empty (the model has one scale).
  ``use_affine=False`` is the paper's "Proposed w/o Affine": ``affine`` is None and
  ``u = u_G``.
* Loss (Sec. 2.3, Eq. 4)::

      loss = mean((fixed - warped)^2)
             + alpha * sum |A_n - [I | 0]|          (12 entries)
             + beta  * sum |Phi - 1|               (3 x D x H x W entries)

  with ``alpha = beta = 1e-6`` (the paper's values). The L1 norms are *sums* per batch item
  (averaged over the batch), as the paper's ``||.||_1`` reads and as in the Keras regulariser of
  the authors' group (``alpha * K.sum(|x - value|)``, in Estienne et al.'s extension of the
  authors' code); the squared error is the mean (Keras ``'mse'``, the authors' example). The
  weight of the gradient term therefore grows with the grid: ``beta * 3 * D * H * W`` times the
  mean deviation (about 0.1 at 32^3, 7 at the paper's 64 x 192 x 192).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from napari_deepwarp.core import losses, spatial
from napari_deepwarp.core.models.blocks import (
    ConvBlock,
    FlowHead,
    SpatialTransformer,
    gaussian_smooth,
)
from napari_deepwarp.core.models.registry import (
    RegistrationModel,
    RegistrationOutput,
    register_model,
)
from napari_deepwarp.core.preprocess import WORKING_AXES

#: what LinDef's affine head may read (see the module docstring)
AFFINE_POOLINGS = ("mean", "moments", "moments2", "keypoints")


@dataclass
class LinDefConfig:
    """Configuration of :class:`LinDef` (defaults: the paper's network and loss weights).

    enc_channels: widths of the five dilated encoder convolutions (their sum + 2 = 290 merged
        features in the paper).
    enc_dilations: dilation rate of each encoder convolution (receptive field
        ``1 + 2 * sum(dilations)`` = 25).
    dec_channels: widths of the non-dilated convolutions of the spatial-gradient decoder.
    se_reduction: squeeze-excitation reduction ratio.
    negative_slope: LeakyReLU slope.
    max_gradient: upper bound of the spatial gradients ``Phi`` (``Phi(0) = 1``); must be > 1.
    use_affine: predict and apply the affine branch (False: the paper's "w/o Affine").
    affine_pooling: what the affine head reads: ``"mean"`` (the paper's global average of the
        merged features), ``"moments"`` (also their first moments over the normalised
        coordinates), ``"moments2"`` (also their second moments) or ``"keypoints"`` (an affine
        fitted to points detected in each image); see the module docstring.
    keypoints / keypoint_channels / keypoint_dilations / keypoint_ridge /
        keypoint_prior_width / keypoint_gain / keypoint_size: with
        ``affine_pooling="keypoints"``, the number of points, the detector's convolutions, the
        ridge toward the identity of the least-squares fit, the width of each point's prior,
        the gain of its learnt logits and the longest side of the grid it reads (0: the
        working grid as it is; see :class:`KeypointDetector`).
    affine_symmetric: average the affine head's estimate with the inverse of its estimate for
        the swapped pair (see the module docstring).
    affine_iterations: passes of the network (see the module docstring); 1 is the paper's.
    deformable_after_affine: read the deformable part from the pair the affine passes aligned,
        and no affine after it (see the module docstring); False is the paper's.
    working_axes: ``"image"`` (the fixed image's axes, the default) or ``"world"`` (upright;
        see the module docstring).
    alpha: weight of ``sum |A - I|`` (normalised-coordinate matrix).
    beta: weight of ``sum |Phi - 1|``.
    """

    enc_channels: tuple[int, ...] = (32, 64, 64, 64, 64)
    enc_dilations: tuple[int, ...] = (1, 1, 2, 3, 5)
    dec_channels: tuple[int, ...] = (32, 32, 32)
    se_reduction: int = 16
    negative_slope: float = 0.3
    max_gradient: float = 2.0
    use_affine: bool = True
    affine_pooling: str = "mean"
    affine_symmetric: bool = False
    affine_iterations: int = 1
    deformable_after_affine: bool = False
    working_axes: str = "image"
    keypoints: int = 32
    keypoint_channels: tuple[int, ...] = (16, 32, 32)
    keypoint_dilations: tuple[int, ...] = (1, 2, 4)
    keypoint_ridge: float = 0.1
    keypoint_prior_width: float = 0.5
    keypoint_gain: float = 30.0
    keypoint_size: int = 0
    alpha: float = 1e-6
    beta: float = 1e-6


class SqueezeExcitation(nn.Module):
    """Channel re-weighting of Hu et al. (CVPR 2018): ``x * sigmoid(W2 relu(W1 mean(x)))``."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // int(reduction))
        self.squeeze = nn.Linear(channels, hidden)
        self.excite = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3, 4))
        s = torch.sigmoid(self.excite(torch.relu(self.squeeze(s))))
        return x * s[:, :, None, None, None]


def positive_gradients(logits: torch.Tensor, max_gradient: float = 2.0) -> torch.Tensor:
    """Logistic growth ``c / (1 + (c - 1) exp(-x))``: values in ``(0, c)``, ``0 -> 1``."""
    c = float(max_gradient)
    if c <= 1.0:
        raise ValueError(f"max_gradient must be > 1 (Phi(0) = 1), got {max_gradient}")
    return c * torch.sigmoid(logits - math.log(c - 1.0))


def integrate_gradients(phi: torch.Tensor) -> torch.Tensor:
    """Sampling grid ``(B, 3, D, H, W)`` (voxel positions, z, y, x) from spatial gradients.

    ``G_d(p) = cumsum_d(Phi_d)(p) - 1``: ``Phi = 1`` everywhere is the identity grid, and
    ``G_d(p + e_d) - G_d(p) = Phi_d(p + e_d)``.
    """
    if phi.dim() != 5 or phi.shape[1] != 3:
        raise ValueError(f"expected spatial gradients (B, 3, D, H, W), got {tuple(phi.shape)}")
    return torch.stack([phi[:, a].cumsum(dim=a + 1) for a in range(3)], dim=1) - 1.0


def _frame(shape, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis scale ``s`` and offset ``o`` of ``n(p) = s * p + o`` (align_corners=True)."""
    s = torch.tensor([2.0 / (n - 1) if n > 1 else 1.0 for n in shape], device=device, dtype=dtype)
    o = torch.tensor([-1.0 if n > 1 else 0.0 for n in shape], device=device, dtype=dtype)
    return s, o


def normalized_to_voxel_affine(matrix: torch.Tensor, shape) -> torch.Tensor:
    """``(B, 3, 4)`` map of normalised (z, y, x) coordinates -> the same map on voxel positions."""
    s, o = _frame(shape, matrix.device, matrix.dtype)
    lin, shift = matrix[:, :, :3], matrix[:, :, 3]
    lin_v = lin * s[None, None, :] / s[None, :, None]  # S^-1 M S
    shift_v = (lin @ o + shift - o) / s  # S^-1 (M o + t - o)
    return torch.cat([lin_v, shift_v[:, :, None]], dim=2)


def voxel_to_normalized_affine(matrix: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`normalized_to_voxel_affine`."""
    s, o = _frame(shape, matrix.device, matrix.dtype)
    lin, shift = matrix[:, :, :3], matrix[:, :, 3]
    lin_n = lin * s[None, :, None] / s[None, None, :]  # S M S^-1
    shift_n = s * shift + o - lin_n @ o  # S t + o - M_n o
    return torch.cat([lin_n, shift_n[:, :, None]], dim=2)


def apply_affine(matrix: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``M q + t`` at each position ``q`` of ``positions (B, 3, D, H, W)``; ``matrix (B, 3, 4)``."""
    moved = torch.einsum("bij,bjdhw->bidhw", matrix[:, :, :3], positions)
    return moved + matrix[:, :, 3, None, None, None]


def _normalised_axes(features: torch.Tensor) -> list[torch.Tensor]:
    """The normalised (z, y, x) coordinate of each index, -1 to +1 (0 on an axis of size 1)."""
    axes = []
    for n in features.shape[2:]:
        coord = torch.linspace(-1.0, 1.0, n, device=features.device, dtype=features.dtype)
        axes.append(torch.zeros_like(coord) if n == 1 else coord)
    return axes


def first_moments(features: torch.Tensor) -> torch.Tensor:
    """``(B, 3 * C)``: ``mean_p f_c(p) n_a(p)`` for the normalised axes ``a`` = z, y, x (each
    from -1 at voxel 0 to +1 at the last; 0 on an axis of size 1), grouped by axis."""
    axes = _normalised_axes(features)
    out = []
    for a in range(3):
        others = tuple(d for d in (2, 3, 4) if d != 2 + a)
        out.append((features.mean(dim=others) * axes[a]).mean(dim=-1))
    return torch.cat(out, dim=1)


def second_moments(features: torch.Tensor) -> torch.Tensor:
    """``(B, 6 * C)``: ``mean_p f_c(p) n_a(p) n_b(p)`` for the axis pairs zz, yy, xx, zy, zx, yx
    (normalised coordinates as in :func:`first_moments`), grouped by pair."""
    axes = _normalised_axes(features)
    out = []
    for a in range(3):
        others = tuple(d for d in (2, 3, 4) if d != 2 + a)
        out.append((features.mean(dim=others) * axes[a] ** 2).mean(dim=-1))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        plane = features.mean(dim=2 + (3 - a - b))  # (B, C, n_a, n_b)
        out.append((plane * axes[a][:, None] * axes[b][None, :]).mean(dim=(-2, -1)))
    return torch.cat(out, dim=1)


class KeypointDetector(nn.Module):
    """Points of one image ``(B, 1, D, H, W)`` -> ``(B, K, 3)``: the centre of mass of each of
    ``K`` heatmaps (softmax over the grid) in normalised (z, y, x) coordinates (-1 to +1).

    Each heatmap's logits are the learnt ones plus a fixed prior ``-|n(p) - c_k|^2 / (2 w^2)``
    around its own centre ``c_k`` (a scrambled Sobol sequence in ``[-0.6, 0.6]^3``, seed 0;
    ``w = prior_width``). Untrained, point ``k`` is the prior's centre of mass in both images
    (the fit is then the identity), and the points are spread, so each gets its own gradient:
    with zero-initialised heatmaps and no prior, every point is the same point for good.
    ``gain`` multiplies the learnt logits: Adam moves every weight by about its learning rate a
    step, and the logits must reach the prior's range before a point can follow the anatomy
    (the detector alone, supervised by the true affine: 300 steps read none of a 15-degree
    rotation at gain 1; 1,200 steps read about 10 % of it at gain 10 and 20 % at 30).
    ``size`` > 0: the image is first resampled so that its longest side has ``size`` voxels
    (:func:`resize_longest_side`), the grid the detector was trained on, whatever grid the
    rest of the network works on; the points, normalised, need no conversion."""

    def __init__(
        self,
        count: int,
        channels,
        dilations,
        negative_slope: float,
        prior_width: float = 0.5,
        gain: float = 30.0,
        size: int = 0,
    ):
        super().__init__()
        self.size = int(size)
        if len(channels) != len(dilations) or not channels:
            raise ValueError("one dilation per keypoint convolution, and at least one of each")
        layers, prev = [], 1
        for c, d in zip(channels, dilations, strict=True):
            layers.append(
                ConvBlock(
                    prev,
                    int(c),
                    3,
                    dilation=int(d),
                    norm="instance",
                    activation="leaky_relu",
                    negative_slope=negative_slope,
                )
            )
            prev = int(c)
        self.body = nn.Sequential(*layers)
        self.heatmaps = nn.Conv3d(prev, int(count), 1)
        nn.init.zeros_(self.heatmaps.weight)
        nn.init.zeros_(self.heatmaps.bias)
        sobol = torch.quasirandom.SobolEngine(3, scramble=True, seed=0).draw(int(count))
        self.register_buffer("centres", 1.2 * sobol - 0.6)
        self.prior_width = float(prior_width)
        self.gain = float(gain)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.size > 0:
            image = resize_longest_side(image, self.size)
        logits = self.gain * self.heatmaps(self.body(image)).flatten(2).float()  # (B, K, N)
        axes = _normalised_axes(image[:, :1].float())
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
        prior = -torch.cdist(self.centres.float(), coords).square() / (2 * self.prior_width**2)
        return torch.softmax(logits + prior, dim=-1) @ coords


def resize_longest_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """``image (B, C, D, H, W)`` resampled so that its longest side has ``size`` voxels and
    the voxels stay cubes: side ``n`` becomes ``1 + round((n - 1) (size - 1) / (N - 1))``
    (``N`` the longest), corner voxel centres kept (``align_corners``), so normalised
    coordinates mean the same place before and after. Gaussian anti-aliasing first when
    shrinking, ``sigma = 0.5 sqrt(f^2 - 1)`` voxels for a factor ``f`` (as the pipeline's network
    inputs). Unchanged when the longest side already has ``size`` voxels."""
    shape = tuple(image.shape[2:])
    longest = max(shape)
    if longest == size or longest <= 1:
        return image
    factor = (longest - 1) / (size - 1)
    target = tuple(max(1, 1 + round((n - 1) / factor)) for n in shape)
    if factor > 1:
        image = gaussian_smooth(image, 0.5 * math.sqrt(factor**2 - 1))
    return F.interpolate(image, size=target, mode="trilinear", align_corners=True)


def affine_from_keypoints(
    fixed_points: torch.Tensor, moving_points: torch.Tensor, ridge: float
) -> torch.Tensor:
    """``(B, 3, 4)`` map ``A`` with ``A [q_k; 1] ~ p_k`` for the fixed points ``q`` and the
    moving points ``p`` (``(B, K, 3)`` each): least squares, plus ``ridge * |A - [I | 0]|^2``;
    in float32 (autocast off: a bfloat16 Gram matrix would lose the small rotations)."""
    with torch.autocast(fixed_points.device.type, enabled=False):
        q, p = fixed_points.float(), moving_points.float()
        x = torch.cat([q, torch.ones_like(q[..., :1])], dim=-1)  # (B, K, 4)
        eye = torch.eye(4, device=q.device)
        gram = x.transpose(1, 2) @ x + ridge * eye
        rhs = p.transpose(1, 2) @ x + ridge * eye[:3]  # (B, 3, 4)
        return torch.linalg.solve(gram, rhs.transpose(1, 2)).transpose(1, 2)  # rhs @ gram^-1


def _homogeneous(matrix: torch.Tensor) -> torch.Tensor:
    """``(B, 4, 4)`` float32 of ``(B, 3, 4)`` maps, bottom row ``(0, 0, 0, 1)``."""
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], device=matrix.device).expand(len(matrix), 1, 4)
    return torch.cat([matrix.float(), bottom], dim=1)


def symmetric_affine(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """``(A + B^-1) / 2`` of two ``(B, 3, 4)`` maps (4x4 homogeneous), in float32: ``forward``
    estimates a map, ``backward`` its inverse."""
    with torch.autocast(forward.device.type, enabled=False):
        return (0.5 * (_homogeneous(forward) + torch.linalg.inv(_homogeneous(backward))))[:, :3]


def compose_affines(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """The ``(B, 3, 4)`` sampling map ``p -> first(then(p))``, in float32: ``then`` registers
    what ``first`` left, as a pull map on the image that ``first`` resampled (autocast off: a
    bfloat16 product keeps three digits)."""
    with torch.autocast(first.device.type, enabled=False):
        return (_homogeneous(first) @ _homogeneous(then))[:, :3]


@register_model("lindef")
class LinDef(RegistrationModel):
    """Linear + deformable registration (Christodoulidis et al. 2018); see the module docstring."""

    description = (
        "Coupled affine + deformable registration (Christodoulidis et al. 2018): dilated "
        "encoder, affine branch and integrated positive spatial gradients; MSE + L1 to identity"
    )
    config_class = LinDefConfig
    size_multiple = 1

    def __init__(self, config: LinDefConfig | None = None):
        super().__init__(config)
        cfg = self.config
        if len(cfg.enc_channels) != len(cfg.enc_dilations):
            raise ValueError(
                f"one dilation per encoder convolution: enc_channels {tuple(cfg.enc_channels)} "
                f"vs enc_dilations {tuple(cfg.enc_dilations)}"
            )
        if not cfg.enc_channels:
            raise ValueError("the encoder needs at least one convolution")
        positive_gradients(torch.zeros(()), cfg.max_gradient)  # validates max_gradient
        if int(cfg.affine_iterations) < 1:
            raise ValueError(f"affine_iterations must be 1 or more, not {cfg.affine_iterations}")
        if int(cfg.keypoint_size) < 0 or int(cfg.keypoint_size) == 1:
            raise ValueError(f"keypoint_size must be 0 (off) or 2 or more, not {cfg.keypoint_size}")
        if cfg.working_axes not in WORKING_AXES:
            raise ValueError(
                f"working_axes must be one of {WORKING_AXES}, not {cfg.working_axes!r}"
            )
        if cfg.affine_pooling not in AFFINE_POOLINGS:
            raise ValueError(
                f"affine_pooling must be one of {AFFINE_POOLINGS}, not {cfg.affine_pooling!r}"
            )
        slope = float(cfg.negative_slope)

        def block(cin, cout, dilation=1):
            return ConvBlock(
                cin,
                cout,
                3,
                dilation=int(dilation),
                norm="instance",
                activation="leaky_relu",
                negative_slope=slope,
            )

        self.enc = nn.ModuleList()
        prev = 2
        for c, d in zip(cfg.enc_channels, cfg.enc_dilations, strict=True):
            self.enc.append(block(prev, int(c), d))
            prev = int(c)
        merged = 2 + sum(int(c) for c in cfg.enc_channels)
        self.merged_channels = merged

        self.se = SqueezeExcitation(merged, cfg.se_reduction)
        convs = []
        prev = merged
        for c in cfg.dec_channels:
            convs.append(block(prev, int(c)))
            prev = int(c)
        self.dec = nn.Sequential(*convs)
        self.gradients = FlowHead(prev, 3, init_std=1e-5)

        if cfg.use_affine:
            self.affine = nn.Linear(merged, 12)
            nn.init.zeros_(self.affine.weight)
            with torch.no_grad():
                self.affine.bias.copy_(torch.eye(3, 4).flatten())
        else:
            self.affine = None
        self.affine_moments = None
        self.affine_moments2 = None
        self.keypoints = None
        if cfg.use_affine and cfg.affine_pooling == "keypoints":
            self.keypoints = KeypointDetector(
                cfg.keypoints,
                cfg.keypoint_channels,
                cfg.keypoint_dilations,
                slope,
                cfg.keypoint_prior_width,
                cfg.keypoint_gain,
                cfg.keypoint_size,
            )
        if cfg.use_affine and cfg.affine_pooling in ("moments", "moments2"):
            self.affine_moments = nn.Linear(3 * merged, 12, bias=False)
            nn.init.zeros_(self.affine_moments.weight)
        if cfg.use_affine and cfg.affine_pooling == "moments2":
            self.affine_moments2 = nn.Linear(6 * merged, 12, bias=False)
            nn.init.zeros_(self.affine_moments2.weight)
        self.transformer = SpatialTransformer(mode="linear", padding="border")

    def features(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The merged encoder features ``(B, 2 + sum(enc_channels), D, H, W)``."""
        x = torch.cat([moving, fixed], dim=1)
        outputs = [x]
        for layer in self.enc:
            x = layer(x)
            outputs.append(x)
        return torch.cat(outputs, dim=1)

    def _affine_head(self, merged: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 4)`` normalised-coordinate matrix from the merged features."""
        affine_n = self.affine(merged.mean(dim=(2, 3, 4)))
        if self.affine_moments is not None:
            affine_n = affine_n + self.affine_moments(first_moments(merged))
        if self.affine_moments2 is not None:
            affine_n = affine_n + self.affine_moments2(second_moments(merged))
        return affine_n.view(-1, 3, 4)

    def _affine_estimate(self, moving, fixed, merged) -> torch.Tensor:
        """The affine head's ``(B, 3, 4)`` normalised matrix for a pair, symmetric if asked."""
        affine_n = self._affine_head(merged)
        if self.keypoints is not None:
            q, p = self.keypoints(fixed), self.keypoints(moving)
            ridge = float(self.config.keypoint_ridge)
            fitted = affine_from_keypoints(q, p, ridge)
            if self.config.affine_symmetric:  # the fit the other way estimates the inverse
                fitted = symmetric_affine(fitted, affine_from_keypoints(p, q, ridge))
            return fitted + (affine_n - torch.eye(3, 4, device=affine_n.device))
        if self.config.affine_symmetric:
            backward = self._affine_head(self.features(fixed, moving))
            affine_n = symmetric_affine(affine_n, backward)
        return affine_n

    def predict(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        shape = tuple(moving.shape[2:])
        source, prior = moving, None  # the moving image as the earlier affine passes left it
        passes = int(self.config.affine_iterations)
        after = self.affine is not None and bool(self.config.deformable_after_affine)
        if self.affine is not None:
            for _ in range(passes if after else passes - 1):
                step = self._affine_estimate(source, fixed, self.features(source, fixed))
                prior = step if prior is None else compose_affines(prior, step)
                to_prior = spatial.affine_to_field(normalized_to_voxel_affine(prior, shape), shape)
                source = self.transformer(moving, to_prior)
        merged = self.features(source, fixed)
        logits = self.gradients(self.dec(self.se(merged)))
        phi = positive_gradients(logits, self.config.max_gradient)
        grid = integrate_gradients(phi)
        identity = spatial.identity_grid(shape, grid.device, grid.dtype)
        deformable = grid - identity
        extras: dict[str, Any] = {"spatial_gradients": phi, "deformable": deformable}
        affine_v = None
        if self.affine is not None:
            if after:
                affine_n = prior
            else:
                affine_n = self._affine_estimate(source, fixed, merged)
                if prior is not None:
                    affine_n = compose_affines(prior, affine_n)
            affine_v = normalized_to_voxel_affine(affine_n, shape)
            disp = apply_affine(affine_v, grid) - identity
            extras["affine_normalized"] = affine_n
        else:
            disp = deformable
        extras["warped"] = self.transformer(moving, disp)
        return RegistrationOutput(displacement=disp, affine=affine_v, extras=extras)

    def loss(
        self, output: RegistrationOutput, moving: torch.Tensor, fixed: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``MSE + alpha * sum|A - I| + beta * sum|Phi - 1|`` (Eq. 4), with its terms."""
        cfg = self.config
        warped = output.extras.get("warped")
        if warped is None:
            warped = self.transformer(moving, output.displacement)
        similarity = losses.mse_loss(warped, fixed)
        phi = output.extras["spatial_gradients"]
        # l1_to_identity_loss is a mean over every entry; times the entries per item = sum.
        deformable_reg = losses.l1_to_identity_loss(phi - 1.0) * phi[0].numel()
        total = similarity + float(cfg.beta) * deformable_reg
        terms = {"similarity": similarity.detach()}
        affine_n = output.extras.get("affine_normalized")
        if affine_n is not None:
            affine_reg = losses.affine_l1_to_identity_loss(affine_n) * 12
            total = total + float(cfg.alpha) * affine_reg
            terms["affine_regularisation"] = affine_reg.detach()
        terms["deformable_regularisation"] = deformable_reg.detach()
        return total, terms

    def loss_description(self) -> dict[str, Any]:
        """The loss as a plain dict, for a checkpoint's model card."""
        cfg = self.config
        weights = {"similarity": 1.0, "deformable_regularisation": float(cfg.beta)}
        if cfg.use_affine:
            weights["affine_regularisation"] = float(cfg.alpha)
        return {
            "similarity": {"name": "mse"},
            "regulariser": {
                "deformable": "sum |Phi - 1| over voxels and axes (spatial gradients)",
                "affine": "sum |A - I| (normalised-coordinate matrix)" if cfg.use_affine else None,
            },
            "weights": weights,
        }


__all__ = [
    "KeypointDetector",
    "LinDef",
    "LinDefConfig",
    "SqueezeExcitation",
    "affine_from_keypoints",
    "apply_affine",
    "compose_affines",
    "first_moments",
    "integrate_gradients",
    "normalized_to_voxel_affine",
    "positive_gradients",
    "second_moments",
    "symmetric_affine",
    "voxel_to_normalized_affine",
]
