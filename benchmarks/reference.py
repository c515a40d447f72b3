"""The warp stage as it was before issue 6 (einsums over materialised index grids), kept as the
reference that `benchmarks.run` times side by side with the current code in the same run.

Same conventions and results as :mod:`napari_deepwarp.core.pipeline` (to float rounding).
"""

from __future__ import annotations

import numpy as np
import torch

from napari_deepwarp.core.pipeline import _matrix
from napari_deepwarp.core.spatial import identity_grid, jacobian_determinant, sample


def _apply(matrix: np.ndarray, coords: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(matrix, dtype=coords.dtype, device=coords.device)
    return torch.einsum("ij,bjdhw->bidhw", m[:3, :3], coords) + m[:3, 3].view(1, 3, 1, 1, 1)


def physical_map(fixed, affine, working, working_field, device):
    """``(x, x + d, y)`` world points, each ``(1, 3, D, H, W)``, the pre-issue-6 way."""
    idx = identity_grid(fixed.shape, device)
    x = _apply(fixed.index_to_world_matrix(), idx)
    moved = x
    if working_field is not None:
        to_working = working.world_to_index_matrix() @ fixed.index_to_world_matrix()
        u = sample(working_field.float(), _apply(to_working, idx), "linear", "border")
        step = torch.as_tensor(working.index_to_world_matrix()[:3, :3], dtype=u.dtype)
        moved = x + torch.einsum("ij,bjdhw->bidhw", step.to(u.device), u)
    return x, moved, _apply(_matrix(affine), moved)


def warp_volume(vol, y: torch.Tensor, labels: bool = False) -> np.ndarray:
    idx = _apply(vol.grid.world_to_index_matrix(), y)
    if labels:
        src = torch.from_numpy(vol.array.astype(np.float32))[None, None].to(y.device)
        out = sample(src, idx, "nearest", "itk")
        return out[0, 0].cpu().numpy().astype(vol.array.dtype)
    src = torch.from_numpy(np.ascontiguousarray(vol.array, dtype=np.float32))[None, None]
    return sample(src.to(y.device), idx, "linear", "itk")[0, 0].cpu().numpy()


def warp_stage(fixed, affine, working, working_field, moving, moving_labels, device) -> dict:
    """The whole pre-issue-6 warp block of ``register()``: outputs as numpy arrays."""
    x, moved, y = physical_map(fixed, affine, working, working_field, device)
    warped = warp_volume(moving, y)
    labels = warp_volume(moving_labels, y, labels=True) if moving_labels is not None else None
    displacement = (y - x)[0].permute(1, 2, 3, 0).cpu().numpy()
    deformation = (moved - x)[0].permute(1, 2, 3, 0).cpu().numpy()
    to_index = torch.as_tensor(fixed.world_to_index_matrix(), dtype=y.dtype, device=y.device)
    u_vox = torch.einsum("ij,bjdhw->bidhw", to_index[:3, :3], y - x)
    jacobian = jacobian_determinant(u_vox)[0, 0].cpu().numpy()
    return {
        "warped": warped,
        "warped_labels": labels,
        "displacement": np.ascontiguousarray(displacement),
        "deformation": np.ascontiguousarray(deformation),
        "jacobian": jacobian,
    }
