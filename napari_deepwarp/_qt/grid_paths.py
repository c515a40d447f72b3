"""The deformation grid as vector lines on the displayed slice, for a napari Vectors layer.

What is drawn: a regular grid in *moving* space (a line every ``spacing_mm``), shown where it
lands on the fixed image, so it bends exactly as the warped moving image does. On the displayed
slice, fixed point ``x`` is on a line where its moving point ``q = x + u(x)`` has a coordinate,
along one of the two displayed axes, that is a multiple of ``spacing_mm``. The lines are the zero
contours, found by marching squares (scikit-image), of a triangle wave of ``q_a / spacing`` that
is zero at the integers: piecewise linear, so the linear interpolation of marching squares puts
them exactly where a linear displacement does. They are sub-voxel polylines that stay thin and
smooth at any zoom, not voxels of a label image.

Coordinates: the paths are in the *data* frame of the layers that :func:`layers.for_display`
makes (view voxel indices, ``(d0, d1, d2)``), to be shown with the same ``affine``; every vertex
sits on the slice (its third coordinate is the slice index), so napari draws it there. They go to
napari as line segments (:func:`as_segments`, a Vectors layer): a Shapes layer of the same paths
took 160 ms to update for a 256 x 256 slice, the segments take 15 ms, so scrolling stays fluid.
"""

from __future__ import annotations

import numpy as np
from skimage.measure import find_contours

from napari_deepwarp.core.volume import Grid
from napari_deepwarp.layers import for_display

#: colour and width (in voxels of the slice) of the grid lines
GRID_COLOR = "#ff9900"
GRID_WIDTH_VOXELS = 0.35


class DeformationGrid:
    """A run's displacement, ready to draw its grid on any slice.

    ``displacement``: ``(z, y, x, 3)`` array of (x, y, z) mm vectors on ``grid`` (fixed ->
    moving, the pipeline's convention). ``affine`` is the 4x4 data -> world (z, y, x) mm map of
    the displayed layers.
    """

    def __init__(self, displacement: np.ndarray, grid: Grid):
        view, self.affine = for_display(displacement, grid)
        linear = self.affine[:3, :3]
        # world (z, y, x) mm -> view voxels: d = L^-1 u
        self._to_voxels = np.linalg.inv(linear).astype(np.float32)
        self._view = view  # (d0, d1, d2, 3), components (x, y, z) mm; no copy
        self.shape = view.shape[:3]
        self.voxel_mm = np.linalg.norm(linear, axis=0)  # size of a view voxel along each axis

    def slice_index(self, point_world_zyx, axis: int) -> int:
        """The view index along ``axis`` nearest to a world point (napari's ``dims.point``)."""
        data = np.linalg.solve(self.affine, np.append(np.asarray(point_world_zyx, float), 1.0))
        return int(np.clip(np.round(data[axis]), 0, self.shape[axis] - 1))

    def paths(self, spacing_mm: float, displayed: tuple[int, int], index: int) -> list:
        """Polylines ``(N, 3)`` (view data coordinates) of the grid on slice ``index`` across
        the axis that is not ``displayed``. Lines closer than 2 voxels are spread to 2 voxels
        (marching squares needs two samples per period)."""
        rows, cols = sorted(int(a) for a in displayed)
        axis = 3 - rows - cols
        plane = np.take(self._view, index, axis=axis)[..., ::-1]  # (n_rows, n_cols, z y x mm)
        moved = plane @ self._to_voxels.T  # displacement in view voxels
        out = []
        for a in (rows, cols):
            step = max(float(spacing_mm), 2.0 * float(self.voxel_mm[a]))
            position = np.indices(plane.shape[:2], dtype=np.float32)[0 if a == rows else 1]
            q_mm = (position + moved[..., a]) * self.voxel_mm[a]
            for line in find_contours(_triangle_wave(q_mm / step), 0.0):
                vertices = np.empty((len(line), 3), np.float32)
                vertices[:, axis] = index
                vertices[:, rows], vertices[:, cols] = line[:, 0], line[:, 1]
                out.append(vertices)
        return out


def _triangle_wave(t: np.ndarray) -> np.ndarray:
    """Continuous, piecewise linear, zero exactly at the integers, +-0.5 half-way between."""
    return np.abs(np.mod(t + 0.5, 2.0) - 1.0) - 0.5


def as_segments(paths: list[np.ndarray]) -> np.ndarray:
    """Polylines as napari Vectors data ``(N, 2, 3)``: each segment's start and its extent."""
    parts = [np.stack([p[:-1], p[1:] - p[:-1]], axis=1) for p in paths if len(p) > 1]
    return np.concatenate(parts) if parts else np.zeros((0, 2, 3), np.float32)
