"""Optional supervision for fine-tuning and refinement: label maps (Dice) and landmarks (TRE).

Everything lives on the network's working grid, in the pull convention of :mod:`spatial`: the
moving side is the moving image *after* the affine stage, resampled onto the working grid, so a
field ``u`` (voxels) sends working voxel ``q`` to ``q + u(q)`` in that image.

- Labels: the labels present in both maps (background 0 left out) become one-hot channels on the
  working grid, downsampled by the smallest whole factor that keeps them under
  :data:`LABEL_BUDGET` values (soft label fractions, in the corner-aligned geometry of
  :func:`spatial.resize_field`): a few structures stay at full resolution, a brain's ~100 labels
  go to half resolution instead of costing gigabytes. The term is ``1 - mean soft Dice`` between the
  warped moving fractions and the fixed fractions (:func:`losses.soft_dice_loss`).
- Landmarks: corresponding physical points ``(N, 3)`` (x, y, z) mm. The fixed points go to
  working-grid indices directly, the moving points through the inverse of the affine stage. The
  term is the mean Euclidean distance, in mm, between ``q_f + u(q_f)`` and ``q_m``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from napari_deepwarp.core import losses, spatial
from napari_deepwarp.core.io import InputError
from napari_deepwarp.core.models.blocks import downsample_image
from napari_deepwarp.core.preprocess import resample
from napari_deepwarp.core.volume import Grid, Volume

#: most label-fraction values (channels x voxels) kept per side: 32 M floats, 128 MB
LABEL_BUDGET = 1 << 25


@dataclass
class Supervision:
    """fixed_labels/moving_labels: ``(1, K, d, h, w)`` label fractions on the (downsampled) working grid
    (None without labels); fixed_points/moving_points: ``(N, 3)`` working-grid voxel positions
    (z, y, x) (None without landmarks); spacing_mm: the working grid's (isotropic) spacing."""

    fixed_labels: torch.Tensor | None = None
    moving_labels: torch.Tensor | None = None
    fixed_points: torch.Tensor | None = None
    moving_points: torch.Tensor | None = None
    spacing_mm: float = 1.0

    def labels_loss(self, field: torch.Tensor) -> torch.Tensor:
        """``1 - mean soft Dice`` of the labels warped by ``field (1, 3, D, H, W)`` voxels."""
        u = spatial.resize_field(field, self.fixed_labels.shape[2:])
        return losses.soft_dice_loss(spatial.warp(self.moving_labels, u), self.fixed_labels)

    def landmarks_loss(self, field: torch.Tensor) -> torch.Tensor:
        """Mean distance (mm) between warped fixed landmarks and their moving partners."""
        q = self.fixed_points.T.reshape(1, 3, -1, 1, 1).to(field.dtype)
        u = spatial.sample(field, q, mode="linear", padding="border").reshape(3, -1).T
        moved = self.fixed_points.to(field.dtype) + u
        return (moved - self.moving_points.to(field.dtype)).norm(dim=1).mean() * self.spacing_mm

    def loss(
        self, field: torch.Tensor, labels_weight: float, landmarks_weight: float
    ) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
        """The weighted sum of the terms that have data and a weight > 0, and their values
        (detached tensors: reading them would wait for the device)."""
        total: torch.Tensor | float = 0.0
        terms: dict[str, torch.Tensor] = {}
        if labels_weight > 0 and self.fixed_labels is not None:
            term = self.labels_loss(field)
            total, terms["labels"] = total + labels_weight * term, term.detach()
        if landmarks_weight > 0 and self.fixed_points is not None:
            term = self.landmarks_loss(field)
            total, terms["landmarks_mm"] = total + landmarks_weight * term, term.detach()
        return total, terms


def check_landmarks(fixed_points, moving_points) -> tuple[np.ndarray, np.ndarray]:
    """Both point sets as float64 ``(N, 3)`` arrays, or an :class:`InputError` saying why not."""
    fixed_points = np.asarray(fixed_points, dtype=np.float64)
    moving_points = np.asarray(moving_points, dtype=np.float64)
    for name, pts in (("fixed", fixed_points), ("moving", moving_points)):
        if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0:
            raise InputError(
                f"{name} landmarks: expected N rows of (x, y, z) mm, got shape {pts.shape}"
            )
        if not np.isfinite(pts).all():
            raise InputError(f"{name} landmarks: some coordinates are NaN or infinite")
    if fixed_points.shape != moving_points.shape:
        raise InputError(
            f"landmarks: {len(fixed_points)} fixed and {len(moving_points)} moving points; "
            "give the same number, row i of one corresponding to row i of the other"
        )
    return fixed_points, moving_points


def _world_to_index(grid: Grid, points_xyz: np.ndarray) -> np.ndarray:
    m = grid.world_to_index_matrix()
    return points_xyz @ m[:3, :3].T + m[:3, 3]


def _label_fractions(
    fixed: np.ndarray, moving: np.ndarray, device
) -> tuple[torch.Tensor, torch.Tensor]:
    shared = np.intersect1d(np.unique(fixed), np.unique(moving))
    shared = shared[shared != 0]
    if len(shared) == 0:
        raise InputError(
            "--labels-weight: the fixed and moving label maps share no label value; "
            "give label maps of the same structures or drop --labels-weight"
        )
    factor = 1
    while len(shared) * np.prod(np.array(fixed.shape) // factor) > LABEL_BUDGET:
        factor += 1
    shape = tuple(max(2, n // factor) for n in fixed.shape)

    def fractions(array: np.ndarray) -> torch.Tensor:
        channels = []
        for start in range(0, len(shared), 16):  # bounded memory for maps with many labels
            values = torch.as_tensor(shared[start : start + 16]).view(-1, 1, 1, 1)
            onehot = (torch.from_numpy(array)[None] == values).float()[None]
            channels.append(downsample_image(onehot, shape) if factor > 1 else onehot)
        return torch.cat(channels, dim=1).to(device)

    return fractions(fixed), fractions(moving)


def supervision_on_grid(
    working: Grid,
    affine: sitk.Transform | None,
    device,
    fixed_labels: Volume | None = None,
    moving_labels: Volume | None = None,
    fixed_points=None,
    moving_points=None,
) -> Supervision:
    """Bring whatever the user has onto ``working`` (see the module docstring)."""
    sup = Supervision(spacing_mm=float(working.spacing[0]))
    if fixed_labels is not None and moving_labels is not None:
        f = resample(fixed_labels, working, None, "nearest").array
        m = resample(moving_labels, working, affine, "nearest").array
        sup.fixed_labels, sup.moving_labels = _label_fractions(f, m, device)
    if fixed_points is not None and moving_points is not None:
        fixed_points, moving_points = check_landmarks(fixed_points, moving_points)
        if affine is not None:
            inverse = affine.GetInverse()
            moving_points = np.array([inverse.TransformPoint(tuple(p)) for p in moving_points])
        sup.fixed_points = torch.as_tensor(
            _world_to_index(working, fixed_points), dtype=torch.float32, device=device
        )
        sup.moving_points = torch.as_tensor(
            _world_to_index(working, moving_points), dtype=torch.float32, device=device
        )
    return sup
