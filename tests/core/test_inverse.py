"""The inverse map (fixed-point iteration) composes with the forward map to ~identity."""

import numpy as np
import torch

from napari_deepwarp.core.inverse import (
    affine_matrix,
    inverse_residual,
    invert_deformation,
    warp_to_moving,
)
from napari_deepwarp.core.pipeline import warp_volume
from napari_deepwarp.core.volume import Grid, Volume


def _grid():
    c, s = np.cos(0.3), np.sin(0.3)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    return Grid((20, 24, 28), (1.5, 1.2, 2.0), (-10.0, 5.0, 3.0), direction)


def _smooth_field(grid: Grid, amplitude=2.5) -> np.ndarray:
    z, y, x = np.meshgrid(*[np.linspace(0, np.pi, n) for n in grid.shape], indexing="ij")
    return amplitude * np.stack(
        [np.sin(z) * np.cos(y), np.sin(x + 0.5) * np.sin(z), np.cos(x) * np.sin(y)], -1
    ).astype(np.float32)


def test_inverse_of_a_smooth_field_composes_to_identity():
    grid = _grid()
    d = _smooth_field(grid)
    w = invert_deformation(d, grid, iterations=60, tolerance_mm=1e-5)
    residual = inverse_residual(d, w, grid)
    inner = residual[3:-3, 3:-3, 3:-3]
    assert np.abs(d).max() > 2.0
    assert inner.max() < 0.02 and residual.mean() < 0.05
    assert inverse_residual(d, np.zeros_like(d), grid).mean() > 0.5  # the test can fail


def test_labels_go_to_moving_space_and_back():
    grid = _grid()
    d = _smooth_field(grid, amplitude=2.0)
    affine = np.eye(4)
    affine[:3, 3] = (1.0, -0.5, 0.7)
    labels = np.zeros(grid.shape, np.int16)
    labels[5:15, 6:18, 7:21] = 1
    labels[8:12, 9:14, 10:16] = 2
    fixed_labels = Volume.on_grid(labels, grid, "fixed labels")
    w = invert_deformation(d, grid)
    in_moving = warp_to_moving(fixed_labels, grid, w, grid, affine, labels=True)
    assert in_moving.array.dtype == np.int16 and in_moving.grid.same_as(grid)
    # Forward map y = A(x + d(x)) pulls the moved labels back onto the fixed grid.
    idx = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid.shape], indexing="ij"))
    m = torch.as_tensor(grid.index_to_world_matrix(), dtype=torch.float32)
    x = torch.einsum("ij,jdhw->idhw", m[:3, :3], idx.float()) + m[:3, 3].view(3, 1, 1, 1)
    moved = x + torch.from_numpy(d).permute(3, 0, 1, 2)
    a = torch.as_tensor(affine_matrix(affine), dtype=torch.float32)
    y = torch.einsum("ij,jdhw->idhw", a[:3, :3], moved) + a[:3, 3].view(3, 1, 1, 1)
    back = warp_volume(in_moving, y[None], grid, labels=True).array
    for label in (1, 2):
        overlap = 2 * np.sum((back == label) & (labels == label))
        dice = overlap / (np.sum(back == label) + np.sum(labels == label))
        assert dice > 0.9, (label, dice)
    assert not np.array_equal(in_moving.array, labels)
