"""Inverse of a registration's map, for taking fixed-space data (labels) into moving space.

A run's total map is ``y(x) = A(x + d(x))``: ``d`` the deformation ((x, y, z) mm on the fixed
grid, ``RegistrationResult.deformation``), ``A`` the affine (4x4 world matrix, or None). Its inverse
is ``x(y) = z + w(z)`` with ``z = A^-1 y``: the affine is inverted exactly, the deformation by
**fixed-point iteration** ``w <- -d(z + w)`` (start ``w = 0``; trilinear sampling of ``d``, clamped at
the border). The iteration converges where ``d`` is a contraction (``|grad d| < 1``, i.e. the
field is smooth and does not fold); where it folds no inverse exists and the last iterate is kept.

Pure torch/numpy; arrays are ``(z, y, x, 3)`` of (x, y, z) mm on a :class:`Grid` (the convention
of :mod:`napari_deepwarp.core.io`).
"""

from __future__ import annotations

import numpy as np
import torch

from napari_deepwarp.core.spatial import identity_grid, sample
from napari_deepwarp.core.volume import Grid, Volume


def affine_matrix(transform) -> np.ndarray:
    """4x4 world (x, y, z) matrix of a SimpleITK affine transform, an array, or None (identity)."""
    if transform is None:
        return np.eye(4)
    if isinstance(transform, np.ndarray):
        return np.asarray(transform, float).reshape(4, 4)
    a = np.array(transform.GetMatrix(), float).reshape(3, 3)
    c, t = np.array(transform.GetCenter(), float), np.array(transform.GetTranslation(), float)
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = a, c + t - a @ c
    return m


def _apply(matrix: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    """Apply a 4x4 matrix to a ``(1, 3, D, H, W)`` point tensor."""
    m = torch.as_tensor(matrix, dtype=points.dtype, device=points.device)
    return torch.einsum("ij,bjdhw->bidhw", m[:3, :3], points) + m[:3, 3].view(1, 3, 1, 1, 1)


def _field_tensor(field_xyz: np.ndarray, device) -> torch.Tensor:
    """``(z, y, x, 3)`` array -> ``(1, 3, D, H, W)`` float32 tensor (channels x, y, z mm)."""
    t = torch.from_numpy(np.ascontiguousarray(field_xyz, dtype=np.float32))
    return t.permute(3, 0, 1, 2)[None].to(device)


def _world_points(grid: Grid, device) -> torch.Tensor:
    idx = identity_grid(grid.shape, device)
    return _apply(grid.index_to_world_matrix(), idx)


def _sample_field(field: torch.Tensor, points: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Field ``(1, 3, D, H, W)`` on ``grid`` sampled at world ``points`` (trilinear, clamped)."""
    return sample(field, _apply(grid.world_to_index_matrix(), points), "linear", "border")


def invert_deformation(
    deformation: np.ndarray,
    grid: Grid,
    iterations: int = 50,
    tolerance_mm: float = 1e-3,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Inverse ``w`` of ``x -> x + d(x)`` on the same grid, by fixed-point iteration.

    ``deformation``: ``(z, y, x, 3)`` (x, y, z) mm on ``grid``. Returns ``w`` of the same shape with
    ``z + w(z) + d(z + w(z)) = z``; stops after ``iterations`` or when no voxel's update exceeds
    ``tolerance_mm``.
    """
    d = _field_tensor(deformation, device)
    z = _world_points(grid, device)
    w = torch.zeros_like(d)
    for _ in range(iterations):
        new = -_sample_field(d, z + w, grid)
        change = float((new - w).abs().max())
        w = new
        if change < tolerance_mm:
            break
    return w[0].permute(1, 2, 3, 0).cpu().numpy()


def inverse_residual(deformation: np.ndarray, inverse: np.ndarray, grid: Grid) -> np.ndarray:
    """``|w(z) + d(z + w(z))|`` mm per voxel ``(z, y, x)``: 0 where ``w`` inverts ``d`` exactly."""
    d, w = _field_tensor(deformation, "cpu"), _field_tensor(inverse, "cpu")
    z = _world_points(grid, "cpu")
    r = w + _sample_field(d, z + w, grid)
    return r.norm(dim=1)[0].numpy()


def warp_to_moving(
    volume: Volume,
    target: Grid,
    inverse: np.ndarray,
    grid: Grid,
    affine=None,
    labels: bool = False,
) -> Volume:
    """Sample a fixed-space ``volume`` onto the moving ``target`` grid through the inverse map.

    ``inverse``: ``w`` from :func:`invert_deformation` on ``grid`` (the fixed grid); ``affine``: the
    run's affine (SimpleITK transform, 4x4 array or None). Each target point ``p`` takes the value
    of ``volume`` at ``z + w(z)``, ``z = A^-1 p``: nearest neighbour for ``labels``, else trilinear;
    0 outside ``volume`` (ITK boundary rules).
    """
    p = _world_points(target, "cpu")
    z = _apply(np.linalg.inv(affine_matrix(affine)), p)
    x = z + _sample_field(_field_tensor(inverse, "cpu"), z, grid)
    idx = _apply(volume.grid.world_to_index_matrix(), x)
    if labels:
        big = volume.array.size and int(np.abs(volume.array).max()) > 2**24
        src = torch.from_numpy(volume.array.astype(np.float64 if big else np.float32))
        out = sample(src[None, None], idx.to(src.dtype), "nearest", "itk")[0, 0].numpy()
        array = out.astype(volume.array.dtype)
    else:
        src = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))
        array = sample(src[None, None], idx, "linear", "itk")[0, 0].numpy()
    return Volume.on_grid(array, target, volume.name)
