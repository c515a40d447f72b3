"""Volumes, files and the bad-input errors: geometry must survive every format."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from napari_deepwarp.core import io
from napari_deepwarp.core.preprocess import (
    IntensityPreset,
    detect_modality,
    normalize_intensity,
    working_grid,
)
from napari_deepwarp.core.volume import Grid, Volume

OBLIQUE = np.array(sitk.VersorTransform((0.3, 0.2, 1.0), 0.4).GetMatrix()).reshape(3, 3)


def make_volume(shape=(10, 12, 14), dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return Volume(
        rng.random(shape).astype(dtype) * 100, (0.7, 1.3, 2.5), (10.0, -5.0, 33.0), OBLIQUE, "test"
    )


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_round_trip_keeps_array_and_geometry(tmp_path, suffix):
    vol = make_volume()
    path = io.write_volume(vol, tmp_path / f"v{suffix}")
    back = io.read_volume(path)
    assert np.allclose(back.array, vol.array)
    assert back.grid.same_as(vol.grid)


def test_nifti_gz_is_a_standard_gzip_stream_and_leaves_no_temporary_file(tmp_path):
    import gzip

    vol = make_volume()
    path = io.write_volume(vol, tmp_path / "v.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["v.nii.gz"]
    header = gzip.decompress(path.read_bytes())[:4]  # Python's own zlib reads it
    assert int.from_bytes(header, "little") == 348  # NIfTI-1 sizeof_hdr
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert np.array_equal(back, vol.array)


def test_dicom_series_folder(tmp_path):
    vol = make_volume(dtype=np.int16)
    vol = Volume(vol.array, (0.8, 0.8, 2.0), (-20.0, 10.0, 5.0), np.eye(3))
    img = vol.to_sitk()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        origin = img.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (
            ("0008|0060", "MR"),
            ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1"),
            ("0020|0037", "1\\0\\0\\0\\1\\0"),
            ("0020|0013", str(k)),
            ("0020|0032", "\\".join(map(str, origin))),
            ("0028|0030", "0.8\\0.8"),
            ("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.2.{k}"),
        ):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(s)
    back = io.read_volume(tmp_path)
    assert np.array_equal(back.array, vol.array.astype(np.float32))
    assert np.allclose(back.spacing, vol.spacing, atol=1e-4)
    assert np.allclose(back.origin, vol.origin, atol=1e-4)


def test_labels_are_read_as_integers(tmp_path):
    lab = Volume(np.arange(24, dtype=np.float32).reshape(2, 3, 4) % 5)
    io.write_volume(lab, tmp_path / "l.nii.gz")
    back = io.read_volume(tmp_path / "l.nii.gz", labels=True)
    assert np.issubdtype(back.array.dtype, np.integer)
    assert np.array_equal(back.array, lab.array.astype(int))


def write_array(tmp_path, array, name="x.nii.gz", vector=False):
    img = sitk.GetImageFromArray(array, isVector=vector)
    sitk.WriteImage(img, str(tmp_path / name))
    return tmp_path / name


@pytest.mark.parametrize(
    "array, labels, message",
    [
        (np.zeros((5, 6), np.float32), False, "2D"),
        (np.zeros((2, 5, 6, 7), np.float32), False, "4D with 2 volumes"),
        (np.full((4, 5, 6), 0.5, np.float32), True, "non-integer"),
    ],
)
def test_bad_files_are_refused_with_the_reason(tmp_path, array, labels, message):
    path = write_array(tmp_path, array)
    with pytest.raises(io.InputError, match=message) as err:
        io.read_volume(path, labels=labels)
    assert str(path) in str(err.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(io.InputError, match="no such file"):
        io.read_volume(tmp_path / "nope.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not an image", encoding="utf-8")
    with pytest.raises(io.InputError, match="cannot read"):
        io.read_volume(bad)


def test_nan_constant_mismatch_and_no_overlap_are_refused():
    vol = make_volume()
    nan = vol.with_array(vol.array.copy())
    nan.array[0, 0, 0] = np.nan
    with pytest.raises(io.InputError, match="1 NaN/Inf voxels"):
        io.check_image(nan, "moving")
    for bad in (np.inf, -np.inf):  # found from the extremes alone: each sign, anywhere
        inf = vol.with_array(vol.array.copy())
        inf.array[-1, 2, 1] = bad
        inf.array[0, 1, 0] = np.nan
        with pytest.raises(io.InputError, match="2 NaN/Inf voxels"):
            io.check_image(inf, "moving")
    with pytest.raises(io.InputError, match="constant"):
        io.check_image(vol.with_array(np.ones(vol.shape, np.float32)), "fixed")
    labels = Volume(np.zeros(vol.shape, np.int32), (1.0, 1.0, 1.0))
    with pytest.raises(io.InputError, match="does not match its image"):
        io.check_labels_match(labels, vol, "fixed")
    far = Volume(vol.array, vol.spacing, (5000.0, 0.0, 0.0), vol.direction)
    with pytest.raises(io.InputError, match="does not overlap"):
        io.check_overlap(vol, far)
    io.check_overlap(vol, vol)


def test_field_round_trip_and_composite_order(tmp_path):
    grid = make_volume().grid
    rng = np.random.default_rng(3)
    field = rng.normal(size=(*grid.shape, 3))
    io.write_field(field, grid, tmp_path / "f.nii.gz")
    back, back_grid = io.sitk_to_field(sitk.ReadImage(str(tmp_path / "f.nii.gz")))
    assert np.allclose(back, field, atol=1e-6) and back_grid.same_as(grid)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.1, 0, 0, 0, 0.9, 0, 0, 0, 1.0))
    constant = np.zeros((*grid.shape, 3))
    constant[..., 0] = 2.0
    composite = io.composite_transform(affine, io.field_to_sitk(constant, grid))
    p = grid.corners_world().mean(0)
    # the deformation first, then the affine: A(p + d)
    assert np.allclose(
        composite.TransformPoint(tuple(p)), affine.TransformPoint(tuple(p + [2, 0, 0]))
    )
    io.write_transform(composite, tmp_path / "t.h5")
    again = io.read_transform(tmp_path / "t.h5")
    assert np.allclose(again.TransformPoint(tuple(p)), composite.TransformPoint(tuple(p)))


def test_writes_are_atomic(tmp_path):
    with pytest.raises(RuntimeError):
        io.write_volume(make_volume(), tmp_path / "out.unknownformat")
    assert list(tmp_path.iterdir()) == []


def test_index_world_maps_and_napari_affine():
    grid = make_volume().grid
    m = grid.index_to_world_matrix()
    img = grid.reference_image()
    for idx in [(0, 0, 0), (3, 2, 1), (9, 11, 13)]:  # (z, y, x)
        world = m @ np.array([*idx, 1.0])
        assert np.allclose(world[:3], img.TransformIndexToPhysicalPoint(idx[::-1]))
        assert np.allclose(grid.world_to_index_matrix() @ world, [*idx, 1.0])
        napari_world = grid.napari_affine() @ np.array([*idx, 1.0])
        assert np.allclose(napari_world[:3], world[:3][::-1])


def test_intensity_presets():
    rng = np.random.default_rng(0)
    ct = rng.uniform(-1024, 1500, (8, 8, 8)).astype(np.float32)
    mr = rng.gamma(2.0, 100.0, (8, 8, 8)).astype(np.float32)
    assert detect_modality(ct) == "ct" and detect_modality(mr) == "mr"
    n = normalize_intensity(ct)
    assert n.min() == 0.0 and n.max() == 1.0
    assert np.isclose(
        normalize_intensity(np.array([[[0.0]]]) + ct.mean(), IntensityPreset("ct")).item(),
        (ct.mean() + 1000) / 2000,
        atol=1e-6,
    )
    m = normalize_intensity(mr)
    assert 0.0 <= m.min() and m.max() <= 1.0
    assert np.isclose(np.mean(m >= 1.0), 0.005, atol=0.01)


def test_working_grid_covers_the_foreground_and_pads():
    array = np.zeros((40, 50, 60), np.float32)
    array[10:30, 5:45, 20:50] = 1.0
    fixed = Volume(array, (1.5, 1.0, 2.0), (3.0, 4.0, 5.0), OBLIQUE)
    grid = working_grid(fixed, spacing=2.0, multiple=16)
    assert all(n % 16 == 0 for n in grid.shape) and grid.spacing == (2.0, 2.0, 2.0)
    assert np.allclose(grid.direction, fixed.direction)
    # every foreground voxel centre maps inside the working grid
    fg = np.argwhere(array > 0)
    world = (
        fg @ fixed.grid.index_to_world_matrix()[:3, :3].T
        + fixed.grid.index_to_world_matrix()[:3, 3]
    )
    idx = world @ grid.world_to_index_matrix()[:3, :3].T + grid.world_to_index_matrix()[:3, 3]
    assert (idx >= -1e-6).all() and (idx <= np.array(grid.shape) - 1 + 1e-6).all()
    auto = working_grid(fixed, max_size=32, multiple=8)
    assert max(auto.shape) <= 40 and isinstance(auto, Grid)


def test_landmarks_from_csv_with_and_without_header_and_from_slicer(tmp_path):
    from napari_deepwarp.core.io import InputError, read_landmarks

    plain = tmp_path / "plain.csv"
    plain.write_text("1.5,2,3\n-4,5,6.25\n", encoding="utf-8")
    named = tmp_path / "named.csv"
    named.write_text("label,z,y,x\na,3,2,1.5\nb,6.25,5,-4\n", encoding="utf-8")
    expected = np.array([[1.5, 2, 3], [-4, 5, 6.25]])
    assert np.array_equal(read_landmarks(plain), expected)
    assert np.array_equal(read_landmarks(named), expected)
    slicer = tmp_path / "points.fcsv"
    slicer.write_text(
        "# Markups fiducial file version = 4.11\n# CoordinateSystem = 0\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        "vtkMRMLMarkupsFiducialNode_0,-1.5,-2,3,0,0,0,1,1,1,0,F-1,,\n",
        encoding="utf-8",
    )
    assert np.array_equal(read_landmarks(slicer), [[1.5, 2.0, 3.0]])  # RAS -> LPS
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y,z\n1,two,3\n", encoding="utf-8")
    with pytest.raises(InputError, match="x,y,z"):
        read_landmarks(bad)


def test_a_4d_file_is_refused_with_a_command_that_extracts_a_volume(tmp_path):
    stack = np.arange(2 * 5 * 6 * 7, dtype=np.float32).reshape(2, 5, 6, 7)
    path = write_array(tmp_path, stack)
    with pytest.raises(io.InputError, match="4D with 2 volumes") as err:
        io.read_volume(path)
    command = str(err.value).split('python -c "', 1)[1].rstrip('"')
    subprocess.run([sys.executable, "-c", command], cwd=tmp_path, check=True)  # as printed
    first = io.read_volume(tmp_path / (path.name.split(".")[0] + "_0.nii.gz"))
    np.testing.assert_array_equal(first.array, stack[0])


def test_a_short_nifti_write_is_a_full_disk_and_leaves_nothing(tmp_path, monkeypatch):
    """ITK's NIfTI writer says nothing when the disk fills up; the length check does."""
    import errno

    real = sitk.WriteImage

    def short(img, path, *args, **kwargs):
        real(img, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(sitk, "WriteImage", short)
    for name in ("out.nii.gz", "out.nii"):
        with pytest.raises(OSError) as err:
            io.write_volume(make_volume(), tmp_path / name)
        assert err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_an_image_larger_than_the_memory_is_refused_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "x.nii.gz"
    io.write_volume(make_volume(), path)
    from napari_deepwarp.core import file_checks

    monkeypatch.setattr(file_checks, "available_memory", lambda: 1000)
    with pytest.raises(io.InputError, match=r"14x12x10 voxels \(6.7 KB\), more than the 1.0 KB"):
        io.read_volume(path)


def test_the_output_folder_check_leaves_no_folder_behind(tmp_path):
    target = tmp_path / "a" / "b"
    assert io.check_output_folder(target) == [target, tmp_path / "a"]
    assert not (tmp_path / "a").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(io.InputError, match="is an existing file"):
        io.check_output_folder(tmp_path / "f")
    with pytest.raises(io.InputError, match="cannot create or write"):
        io.check_output_folder(tmp_path / "f" / "sub")


def test_a_shared_output_folder_is_created_and_left(tmp_path):
    """Ranks of one torchrun check the same folder at once: none removes it from another."""
    target = tmp_path / "a" / "b"
    assert io.check_output_folder(target, shared=True) == []
    assert target.is_dir() and not list(target.iterdir())
    assert io.check_output_folder(target, shared=True) == []  # the next rank finds it
