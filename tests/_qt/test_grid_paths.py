"""The deformation grid's vector paths: where the lines fall for known displacements."""

import numpy as np
import pytest

from napari_deepwarp._qt.grid_paths import DeformationGrid, as_segments
from napari_deepwarp.core.volume import Grid

SHAPE = (20, 30, 40)  # z, y, x


def constant(vector_xyz_mm) -> np.ndarray:
    return np.broadcast_to(np.asarray(vector_xyz_mm, np.float32), (*SHAPE, 3))


def straight_lines(paths, axis: int) -> list[float]:
    """The constant coordinate along ``axis`` of each path that is straight across it."""
    values = []
    for p in paths:
        if np.ptp(p[:, axis]) < 1e-4 and len(p) > 2:
            values.append(float(p[0, axis]))
    return sorted(values)


def test_a_shift_moves_the_lines_the_other_way_in_voxels_and_mm():
    grid = Grid(SHAPE, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0))
    # fixed x sees moving x + 3 mm: moving lines at multiples of 8 mm sit at fixed x = 5, 13, ...
    deformation = DeformationGrid(constant((3.0, 1.0, 0.5)), grid)
    paths = deformation.paths(8.0, (1, 2), index=4)
    assert paths and all(np.all(p[:, 0] == 4) for p in paths)  # on the slice asked for
    assert straight_lines(paths, 2) == pytest.approx([5, 13, 21, 29, 37], abs=1e-4)
    assert straight_lines(paths, 1) == pytest.approx([7, 15, 23], abs=1e-4)
    # along z the voxels are 2 mm: z * 2 + 0.5 = 8 m
    coronal = deformation.paths(8.0, (0, 2), index=10)
    assert straight_lines(coronal, 0) == pytest.approx([3.75, 7.75, 11.75, 15.75], abs=1e-4)
    assert all(np.all(p[:, 1] == 10) for p in coronal)


def test_a_flipped_axis_keeps_the_lines_in_place_in_physical_space():
    # x runs towards -x in the world: the layers show the array flipped, and so must the grid
    grid = Grid(
        SHAPE, spacing=(1.0, 1.0, 1.0), origin=(100.0, 0.0, 0.0), direction=np.diag([-1, 1, 1])
    )
    deformation = DeformationGrid(constant((3.0, 0.0, 0.0)), grid)
    columns = straight_lines(deformation.paths(8.0, (1, 2), index=4), 2)
    world_x = [deformation.affine[2] @ [4, 0, c, 1] for c in columns]
    # a display column c is world x = 61 + c; its moving point x + 3 is on a line of the view's
    # own mm frame (from x = 61): c + 3 = 8 m
    assert world_x[0] == pytest.approx(61 + 5, abs=1e-4)
    assert columns == pytest.approx([5, 13, 21, 29, 37], abs=1e-4)


def test_lines_never_come_closer_than_two_voxels():
    grid = Grid(SHAPE, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    paths = DeformationGrid(constant((0.5, 0.5, 0.5)), grid).paths(1.0, (1, 2), index=0)
    assert np.diff(straight_lines(paths, 2)) == pytest.approx(2.0, abs=1e-4)


def test_the_slice_of_a_world_point():
    grid = Grid(SHAPE, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, -10.0))
    deformation = DeformationGrid(constant((0.0, 0.0, 0.0)), grid)
    assert deformation.slice_index([0.0, 5.0, 5.0], axis=0) == 5  # z = -10 + 2 * 5
    assert deformation.slice_index([1e6, 5.0, 5.0], axis=0) == SHAPE[0] - 1


def test_segments_join_each_path_s_vertices_in_order():
    path = np.array([[4, 0, 0], [4, 1, 2], [4, 3, 3]], np.float32)
    segments = as_segments([path, path[:1]])  # a lone vertex draws nothing
    assert segments.shape == (2, 2, 3)
    assert np.array_equal(segments[:, 0] + segments[:, 1], path[1:])
    assert as_segments([]).shape == (0, 2, 3)
