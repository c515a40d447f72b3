"""Reading and writing volumes, displacement fields and transforms through SimpleITK.

Every format SimpleITK reads (NIfTI, NRRD, MHA/MHD, ...) and DICOM series (a folder) come in as a
:class:`Volume`. Reads check the header before the data (an image larger than the memory is
refused) and the data's integrity (a cut-off or corrupt file is refused, never zero-filled);
multi-channel label maps are read one label per channel, with an :class:`InputNote`. Writes are
atomic: a file appears complete or not at all, and a full disk is an ``OSError(ENOSPC)``.

A physical displacement field is an ITK vector image on the fixed grid: ``(x, y, z)`` millimetre
displacements in LPS world coordinates mapping fixed points to moving points, the convention of
``sitk.DisplacementFieldTransform`` (see :mod:`napari_deepwarp.core.spatial`).
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from napari_deepwarp.core.errors import InputError, InputNote
from napari_deepwarp.core.file_checks import (
    GZIP_MAGIC,
    TRUNCATION_SIGNS,
    check_complete,
    check_gzip,
    check_memory,
    check_nifti_length,
    cut_off,
    starts_with,
    suffix,
)
from napari_deepwarp.core.volume import Grid, Volume

# re-exported: callers import these from here
__all__ = ["InputError", "InputNote"]


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder}: folder holds no DICOM series; give a DICOM folder or a file")
    # The series with the most slices is the volume a user means when pointing at a folder.
    files = max((reader.GetGDCMSeriesFileNames(str(folder), s) for s in series), key=len)
    reader.SetFileNames(files)
    return reader.Execute()


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a file or a DICOM folder as a SimpleITK image, with a clear error when it cannot.

    A file's header is read first: an image larger than the memory available is refused before
    anything is allocated, and a file whose data is cut off or corrupt (a gzip stream that ends
    early or fails its CRC, a NIfTI/MHA/NRRD file shorter than its header says) is refused
    rather than read with zeros in place of the missing voxels, as SimpleITK would.
    """
    path = Path(path)
    reader = read_header(path)
    if reader is None:
        try:
            return _read_dicom_series(path)
        except RuntimeError as exc:
            raise _unreadable(path, exc) from None
    check_complete(path, reader)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise _unreadable(path, exc) from None


def read_header(path: str | os.PathLike) -> sitk.ImageFileReader | None:
    """The reader of an image file with its header read (None for a folder, a DICOM series):
    refuses a missing or unreadable file and an image larger than the memory available, in
    milliseconds, before its data is read (and, in the CLI, before torch is imported)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return None
    if not path.is_file():
        raise InputError(f"{path}: not a regular file; give an image file or a DICOM folder")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        if starts_with(path, GZIP_MAGIC):
            check_gzip(path)  # a corrupt stream says so rather than "cannot read"
        raise _unreadable(path, exc) from None
    check_memory(path, reader)
    return reader


def _unreadable(path: Path, exc: RuntimeError) -> InputError:
    import re

    lines = str(exc).strip().splitlines()
    detail = next((ln for ln in lines if "ERROR" in ln), "")
    detail = re.sub(r"^.*ERROR: (\w+\(0x[0-9a-f]+\): )?", "", detail)  # the reason alone
    sign = next((ln for ln in lines if any(k in ln for k in TRUNCATION_SIGNS)), None)
    if sign is not None:
        return cut_off(path, sign.strip()[:120])
    return InputError(
        f"{path}: cannot read this file as an image (NIfTI, NRRD, MHA/MHD or a DICOM folder)"
        + (f" [{detail.strip()[:120]}]" if detail else "")
    )


def read_volume(path: str | os.PathLike, labels: bool = False) -> Volume:
    """Read a 3D image (or label map with ``labels=True``) into a :class:`Volume`.

    Refuses 2D and 4D images, vector images, and (for labels) non-integer values.
    Images come back as float32, label maps as an integer type.

    A label map with C channels (a 4D image of C volumes or a vector image of C components, as
    DeepReg and MONAI write them) is read as one label per channel, with an :class:`InputNote`
    warning: one-hot with a background channel (channels summing to 1 everywhere) as
    ``label = argmax`` (channel 0 background), else binary masks as labels 1..C, later
    channels winning where masks overlap.
    """
    path = Path(path)
    img = read_image(path)
    kind = "label map" if labels else "image"
    size = img.GetSize()
    if labels and _channels(img) > 1:
        return _channel_labels(img, path)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path}: {kind} has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
            "give a scalar 3D volume (extract one channel first)"
        )
    if img.GetDimension() == 4 and size[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        extra, how = "", ""
        if img.GetDimension() == 4:
            extra = f" with {size[3]} volumes"
            first = path.name.split(".")[0] + "_0.nii.gz"
            how = (
                ': save the volume you want as its own file, e.g. the first: python -c "import '
                f'SimpleITK as s; s.WriteImage(s.ReadImage({str(path)!r})[:, :, :, 0], {first!r})"'
            )
        raise InputError(
            f"{path}: {kind} is {img.GetDimension()}D{extra} (size {size}); deepwarp needs a 3D "
            f"volume{how}"
        )
    if min(size) < 2:
        raise InputError(f"{path}: {kind} of size {size} is a single slice; give a 3D volume")
    vol = Volume.from_sitk(img, name=path.name)
    if labels:
        vol.array = _as_label_array(vol.array, path)
    else:
        vol.array = vol.array.astype(np.float32, copy=False)
    return vol


def _channels(img: sitk.Image) -> int:
    """Channels of a 3D vector image or of a 4D image (its 4th axis); 1 otherwise."""
    if img.GetDimension() == 3:
        return img.GetNumberOfComponentsPerPixel()
    if img.GetDimension() == 4 and img.GetNumberOfComponentsPerPixel() == 1:
        return img.GetSize()[3]
    return 1


def _channel_labels(img: sitk.Image, path: Path) -> Volume:
    """A C-channel label map as one integer label map (see :func:`read_volume`)."""
    import warnings

    c = _channels(img)
    if img.GetDimension() == 4:
        geometry = img[:, :, :, 0]
        array = np.moveaxis(sitk.GetArrayViewFromImage(img), 0, -1)  # (z, y, x, C)
    else:
        geometry = sitk.VectorIndexSelectionCast(img, 0)
        array = sitk.GetArrayViewFromImage(img)  # (z, y, x, C)
    if min(geometry.GetSize()) < 2:
        raise InputError(f"{path}: label map of size {geometry.GetSize()} is a single slice")
    vol = Volume.from_sitk(geometry, name=path.name)
    total = array.sum(axis=-1, dtype=np.float64)
    binary = np.isin(array, (0, 1)).all()
    if np.all(np.abs(total - 1.0) < 1e-3):
        vol.array = np.argmax(array, axis=-1).astype(np.int32)
        how = f"labels 0-{c - 1} (one-hot: label = channel index, channel 0 the background)"
    elif binary:
        out = np.zeros(array.shape[:3], np.int32)
        for k in range(c):  # later channels win where masks overlap
            out[array[..., k] != 0] = k + 1
        vol.array = out
        overlap = int((total > 1).sum())
        how = f"labels 1-{c} (one binary mask per channel" + (
            f"; {overlap} voxels in several masks took the last)" if overlap else ")"
        )
    else:
        raise InputError(
            f"{path}: label map has {c} channels that are neither binary masks nor one-hot; "
            "give one integer label map, or one 0/1 mask per channel"
        )
    warnings.warn(f"{path}: {c}-channel label map read as {how}", InputNote, stacklevel=3)
    return vol


def _as_label_array(array: np.ndarray, path: Path) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer):
        return array
    if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
        raise InputError(
            f"{path}: label map holds non-integer values; give an integer label map "
            "(one integer per structure, 0 for background)"
        )
    return array.astype(np.int32)


def check_image(vol: Volume, what: str) -> None:
    """Refuse an intensity volume that cannot be registered: NaN/Inf voxels or a constant image."""
    name = vol.name or what
    # two passes and no mask: NaN propagates into the minimum and Inf shows in the extremes
    # (the widget runs this on the main thread, on volumes of millions of voxels)
    lo, hi = float(vol.array.min()), float(vol.array.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(
            f"{name}: {what} image has {int((~np.isfinite(vol.array)).sum())} NaN/Inf voxels; "
            "replace them (e.g. with 0) before registering"
        )
    if hi == lo:
        raise InputError(
            f"{name}: {what} image is constant ({vol.array.flat[0]}); nothing to align"
        )


def check_labels_match(labels: Volume, image: Volume, what: str) -> None:
    """Refuse a label map whose grid differs from its image's grid."""
    if not labels.grid.same_as(image.grid):
        raise InputError(
            f"{labels.name or what}: {what} label map grid (size {labels.shape[::-1]}, spacing "
            f"{_fmt(labels.spacing)}, origin {_fmt(labels.origin)}) does not match its image "
            f"({image.shape[::-1]}, {_fmt(image.spacing)}, {_fmt(image.origin)}); give the label "
            "map drawn on that image"
        )


def world_bounds(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box ``(lo, hi)`` (x, y, z) mm of a grid's voxel extent."""
    m = grid.index_to_world_matrix()
    corners = [
        m[:3, :3] @ np.array([z, y, x]) + m[:3, 3]
        for z in (-0.5, grid.shape[0] - 0.5)
        for y in (-0.5, grid.shape[1] - 0.5)
        for x in (-0.5, grid.shape[2] - 0.5)
    ]
    corners = np.array(corners)
    return corners.min(0), corners.max(0)


def check_overlap(fixed: Volume, moving: Volume) -> None:
    """Refuse two volumes whose physical extents do not overlap at all."""
    flo, fhi = world_bounds(fixed.grid)
    mlo, mhi = world_bounds(moving.grid)
    if np.any(fhi < mlo) or np.any(mhi < flo):
        gap = np.maximum(mlo - fhi, flo - mhi).max()
        raise InputError(
            f"{moving.name or 'moving'}: its physical extent does not overlap "
            f"{fixed.name or 'the fixed image'} at all (gap {gap:.1f} mm); check the origins "
            "and directions in the headers, or pre-align the images"
        )


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"


# --- output folders and atomic writes ---------------------------------------------------------
def check_output_folder(
    folder: str | os.PathLike, option: str = "-o", shared: bool = False
) -> list[Path]:
    """Refuse an output folder that is a file, cannot be created, or cannot be written, before
    any work: the folder (and missing parents) is created, a test file written and removed, and
    the folders created here removed again. Returns the folders that did not exist (so that a
    caller can remove them, if left empty, after a failed run). ``option`` names the flag.
    ``shared``: other processes write into the folder at the same time (the ranks of one
    torchrun), so it is created and left, and nothing is returned to remove: a rank that removed
    a folder it had created could pull it from under another."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(
            f"{folder}: the output folder ({option}) is an existing file; give a folder path"
        )
    missing = []
    for parent in (folder, *folder.parents):
        if parent.exists():
            break
        missing.append(parent)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".partial-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(
            f"{folder}: cannot create or write the output folder ({option}): "
            f"{exc.strerror or exc}; give a folder you can write to"
        ) from None
    finally:
        if not shared:
            remove_empty_folders(missing)
    return [] if shared else missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first, as :func:`check_output_folder` lists them)
    that exists and is empty; leave the others."""
    for created in folders:
        try:
            created.rmdir()
        except OSError:
            pass


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=suffix(path), dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except RuntimeError as exc:  # ITK's writers: a full disk is an OSError like Python's own
        Path(tmp).unlink(missing_ok=True)
        if "No space left on device" in str(exc) or "errno = 28" in str(exc):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path.parent)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_image(img: sitk.Image, path: str | os.PathLike) -> Path:
    """Write a SimpleITK image atomically (compressed where the format allows)."""
    if suffix(Path(path)) == ".nii.gz":
        return _atomic(path, lambda tmp: _write_nifti_gz(img, tmp))
    if suffix(Path(path)) == ".nii":
        return _atomic(path, lambda tmp: _write_nifti(img, tmp))
    return _atomic(path, lambda tmp: sitk.WriteImage(img, tmp, useCompression=True))


def _write_nifti(img: sitk.Image, path: str) -> None:
    """Plain ``.nii``, its length checked: ITK's NIfTI writer says nothing when the disk fills."""
    sitk.WriteImage(img, path, useCompression=False)
    with open(path, "rb") as f:
        head = f.read(544)
    try:
        check_nifti_length(Path(path), head, os.path.getsize(path))
    except InputError:
        raise OSError(errno.ENOSPC, "file written incompletely (disk full?)", path) from None


def _write_nifti_gz(img: sitk.Image, path: str) -> None:
    """``.nii.gz`` as SimpleITK's plain ``.nii`` gzipped by ISA-L at level 1: a standard gzip
    stream that every reader opens, written about 6x faster than SimpleITK's own zlib (3.3 s
    -> 0.6 s for a 256x256x160 displacement field) for a file about 2 % larger."""
    import shutil

    from isal import igzip

    plain = path[: -len(".gz")]
    try:
        _write_nifti(img, plain)
        with open(plain, "rb") as src, igzip.open(path, "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    finally:
        Path(plain).unlink(missing_ok=True)


def write_volume(vol: Volume, path: str | os.PathLike) -> Path:
    """Write a :class:`Volume` atomically, with its geometry."""
    return write_image(vol.to_sitk(), path)


# --- displacement fields and transforms ---------------------------------------------------------
def field_to_sitk(field_xyz: np.ndarray, grid: Grid, dtype=np.float64) -> sitk.Image:
    """Physical field ``(z, y, x, 3)`` of (x, y, z) mm on ``grid`` -> ITK vector image of
    ``dtype`` (float64, as ITK's field transforms want; float32 for a file)."""
    if field_xyz.shape != (*grid.shape, 3):
        raise ValueError(f"field shape {field_xyz.shape} != grid shape {(*grid.shape, 3)}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(field_xyz, dtype=dtype), isVector=True)
    return grid.apply_to(img)


def sitk_to_field(img: sitk.Image) -> tuple[np.ndarray, Grid]:
    """ITK displacement field image -> (``(z, y, x, 3)`` array of (x, y, z) mm, its grid)."""
    if img.GetNumberOfComponentsPerPixel() != 3 or img.GetDimension() != 3:
        raise InputError("displacement field must be a 3D image of 3-vectors (x, y, z) in mm")
    return sitk.GetArrayFromImage(img).astype(np.float64), Grid.from_sitk(img)


def write_field(field_xyz: np.ndarray, grid: Grid, path: str | os.PathLike) -> Path:
    """Write a physical displacement field as a float32 ITK vector image, atomically (made in
    float32 directly: no float64 copy of a 120 MB brain field on the way)."""
    return write_image(field_to_sitk(field_xyz, grid, np.float32), path)


def composite_transform(affine: sitk.Transform | None, field: sitk.Image | None) -> sitk.Transform:
    """ITK transform ``x -> affine(x + d(x))`` (the deformation first, then the affine)."""
    parts: list[sitk.Transform] = []
    if affine is not None:
        parts.append(affine)
    if field is not None:
        parts.append(sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)))
    # ITK applies the last transform of a composite first.
    return sitk.CompositeTransform(parts) if parts else sitk.Transform(3, sitk.sitkIdentity)


def write_transform(transform: sitk.Transform, path: str | os.PathLike) -> Path:
    """Write an ITK transform (``.h5`` for composites with fields, ``.tfm`` for affines)."""
    return _atomic(path, lambda tmp: sitk.WriteTransform(transform, tmp))


def read_transform(path: str | os.PathLike) -> sitk.Transform:
    """Read an ITK transform file, or a displacement-field image as a field transform."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such transform file")
    if suffix(path) in (".h5", ".hdf5", ".tfm", ".txt", ".mat"):
        try:
            return sitk.ReadTransform(str(path))
        except RuntimeError:
            raise InputError(f"{path}: cannot read this file as an ITK transform") from None
    img = read_image(path)
    sitk_to_field(img)  # validates that it is a vector field
    return sitk.DisplacementFieldTransform(sitk.Cast(img, sitk.sitkVectorFloat64))


def read_landmarks(path: str | os.PathLike) -> np.ndarray:
    """Points ``(N, 3)`` in physical (x, y, z) mm, LPS, from a CSV file or a 3D Slicer ``.fcsv``.

    CSV: one point per row; with a header, the columns named ``x``, ``y``, ``z`` are used (LPS,
    as ANTs and ITK write point sets), else the first three columns. ``.fcsv`` (Slicer markups):
    columns 2-4 of the non-comment rows, converted from RAS to LPS unless the header says
    ``CoordinateSystem = LPS``.
    """
    import csv

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such landmark file")
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    slicer = path.suffix.lower() == ".fcsv"
    ras = slicer and not any("CoordinateSystem" in ln and "LPS" in ln for ln in text)
    rows = [r for r in csv.reader(ln for ln in text if ln.strip() and not ln.startswith("#"))]
    columns = slice(1, 4) if slicer else slice(0, 3)
    if rows and not slicer and not _numeric(rows[0][:3]):
        header = [c.strip().lower() for c in rows[0]]
        if all(k in header for k in "xyz"):
            columns = [header.index(k) for k in "xyz"]
        rows = rows[1:]
    try:
        if isinstance(columns, slice):
            points = np.array([[float(v) for v in r[columns]] for r in rows], dtype=np.float64)
        else:
            points = np.array([[float(r[i]) for i in columns] for r in rows], dtype=np.float64)
    except (ValueError, IndexError):
        raise InputError(
            f"{path}: cannot read the landmarks; give one point per row as x,y,z in mm "
            "(a CSV, optionally with an x,y,z header) or a 3D Slicer .fcsv file"
        ) from None
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise InputError(f"{path}: no landmarks found; give one x,y,z point per row")
    if not np.isfinite(points).all():
        row = int(np.flatnonzero(~np.isfinite(points).all(axis=1))[0]) + 1
        raise InputError(f"{path}: landmark {row} has a NaN or infinite coordinate; fix or drop it")
    if ras:
        points[:, :2] *= -1.0
    return points


def _numeric(values) -> bool:
    try:
        [float(v) for v in values]
    except ValueError:
        return False
    return len(values) == 3
