"""Network inputs: anti-aliased onto coarse working grids, untouched onto fine ones."""

import numpy as np
import pytest
import SimpleITK as sitk

from napari_deepwarp.core.preprocess import (
    antialias_sigmas,
    apply_window,
    network_input,
    resample,
)
from napari_deepwarp.core.volume import Grid, Volume


def _checkerboard(shape=(48, 48, 48), spacing=1.0) -> Volume:
    z, y, x = np.indices(shape)
    return Volume(((z + y + x) % 2).astype(np.float32), (spacing,) * 3, (3.0, -2.0, 5.0))


def test_sigmas_follow_the_spacing_gap():
    assert antialias_sigmas((1.0, 1.0, 2.0), 4.0) == pytest.approx(
        [0.5 * 15**0.5, 0.5 * 15**0.5, 0.5 * 12**0.5]
    )
    assert antialias_sigmas((1.0, 5.0, 1.0), 4.0)[1] == 0.0  # already coarser: no smoothing


def test_coarse_grid_sees_the_local_mean_not_aliasing():
    vol = _checkerboard()
    coarse = Grid((10, 10, 10), (4.0,) * 3, (7.0, 2.0, 9.0), np.eye(3))
    plain = resample(vol, coarse).array
    smooth = network_input(vol, coarse, (0.0, 1.0))
    # 4 mm samples of a 1 mm checkerboard land on whole voxels of one parity: plain resampling
    # aliases it to a constant 0 or 1, the anti-aliased input is its local mean 0.5.
    assert np.isin(plain, (0.0, 1.0)).all()
    inner = smooth[2:-2, 2:-2, 2:-2]
    assert np.abs(inner - 0.5).max() < 0.02


def test_fine_grid_is_plain_resampling_and_the_input_is_unchanged():
    vol = _checkerboard(spacing=2.0)
    before = vol.array.copy()
    fine = Grid((20, 20, 20), (2.0,) * 3, (4.0, -1.0, 6.0), np.eye(3))
    tx = sitk.TranslationTransform(3, (0.5, 0.0, -0.25))
    expected = apply_window(resample(vol, fine, tx).array, (0.0, 2.0))
    np.testing.assert_array_equal(network_input(vol, fine, (0.0, 2.0), tx), expected)
    np.testing.assert_array_equal(vol.array, before)


def test_an_axis_already_as_coarse_as_the_grid_is_not_smoothed():
    z, y, x = np.indices((40, 40, 12))
    vol = Volume(((z + y) % 2 + (x % 2) * 4).astype(np.float32), (4.0, 1.0, 1.0))  # x: 4 mm
    coarse = Grid((10, 10, 12), (4.0,) * 3, (0.0, 0.0, 0.0), np.eye(3))
    out = network_input(vol, coarse, (0.0, 5.0))
    # z/y pattern averaged to 0.5; the 4 mm x alternation (0 or 4) kept: 0.1 or 0.9.
    inner = out[2:-2, 2:-2, 1:-1]
    assert np.abs(np.abs(inner - 0.5) - 0.4).max() < 0.02


def test_network_input_blurs_only_the_region_it_needs_with_the_same_values():
    """The anti-aliasing Gaussian runs on the working grid's region plus four sigmas: inside
    the region the blurred image is the whole image's, to float rounding."""
    import SimpleITK as sitk

    from napari_deepwarp.core import preprocess as P
    from napari_deepwarp.core.volume import Volume

    rng = np.random.default_rng(0)
    vol = Volume(rng.random((60, 70, 80), dtype=np.float32), (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3))
    vol.array[:10] = 0.0  # a background slab, as around a brain
    grid = P.working_grid(vol, 3.0, 32, 8)
    region = ((20, 15, 25), (45, 50, 60))
    whole = sitk.GetArrayFromImage(P._antialiased(vol, grid.spacing[0]))
    cut = P._antialiased(vol, grid.spacing[0], region)
    start = cut.GetOrigin()[::-1]  # identity direction and 1 mm: the origin is the first index
    z0, y0, x0 = (round(v) for v in start)
    inner = sitk.GetArrayFromImage(cut)[20 - z0 : 46 - z0, 15 - y0 : 51 - y0, 25 - x0 : 61 - x0]
    np.testing.assert_allclose(inner, whole[20:46, 15:51, 25:61], atol=1e-4)
    assert cut.GetNumberOfPixels() < 0.8 * whole.size
