"""Layers <-> volumes: volume_from_layer round trip, the npe2 writers, and a Qt-free core."""

import subprocess
import sys

import numpy as np
from napari.layers import Image, Layer

from napari_deepwarp.core.io import read_volume
from napari_deepwarp.core.volume import Volume
from napari_deepwarp.layers import layer_data, volume_from_layer, write_image, write_labels


def _oblique_volume(dtype=np.float32) -> Volume:
    c, s = np.cos(0.4), np.sin(0.4)
    direction = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]) @ np.diag([1, -1, 1])
    rng = np.random.default_rng(0)
    array = (rng.random((6, 7, 8)) * 50).astype(dtype)
    return Volume(array, (0.8, 1.3, 2.1), (-12.5, 40.0, 7.25), direction, "oblique")


def test_volume_from_layer_round_trips_the_grid():
    vol = _oblique_volume()
    layer = Layer.create(*layer_data(vol))
    back = volume_from_layer(layer)
    assert back.grid.same_as(vol.grid, tol=1e-6)
    assert np.array_equal(back.array, vol.array) and back.array is not layer.data
    # scale/translate instead of an affine (napari's usual way) give the same volume
    plain = Volume(vol.array, (0.8, 1.3, 2.1), (3.0, -2.0, 1.0))
    layer = Image(plain.array, scale=plain.spacing[::-1], translate=plain.origin[::-1])
    assert volume_from_layer(layer).grid.same_as(plain.grid, tol=1e-6)


def test_writers_round_trip_geometry_and_values(tmp_path):
    vol = _oblique_volume()
    data, meta, _ = Layer.create(*layer_data(vol)).as_layer_data_tuple()
    (path,) = write_image(str(tmp_path / "image.nrrd"), data, meta)
    back = read_volume(path)
    assert back.grid.same_as(vol.grid, tol=1e-5) and np.allclose(back.array, vol.array)
    labels = _oblique_volume(np.int64)
    data, meta, _ = Layer.create(*layer_data(labels, "labels")).as_layer_data_tuple()
    (path,) = write_labels(str(tmp_path / "labels"), data, meta)
    assert path.endswith(".nii.gz")
    back = read_volume(path, labels=True)
    assert back.grid.same_as(labels.grid, tol=1e-5) and np.array_equal(back.array, labels.array)


def test_writers_are_found_through_the_manifest(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    vol = _oblique_volume()
    viewer.add_layer(Layer.create(*layer_data(vol)))
    written = viewer.layers.save(str(tmp_path / "saved.nii.gz"), plugin="napari-deepwarp")
    assert written and read_volume(written[0]).grid.same_as(vol.grid, tol=1e-5)


def test_core_and_inverse_import_without_qt():
    code = (
        "import sys, napari_deepwarp.core, napari_deepwarp.core.inverse; "
        "bad = [m for m in ('qtpy', 'napari', 'magicgui') if m in sys.modules]; "
        "print(*bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
