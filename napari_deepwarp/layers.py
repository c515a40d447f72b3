"""Volumes as napari layer data, in physical space (no Qt imports).

A layer gets ``affine`` = the volume's index -> world map in (z, y, x) millimetres, so that
volumes on different grids (spacing, origin, oblique direction) overlay where they are in space.
The way back, :func:`volume_from_layer`, reads the layer's full data -> world map (``affine`` times
``scale``/``translate``/``rotate``/``shear``) into spacing, origin and direction; the npe2 writers
use it to write Image and Labels layers with their geometry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_deepwarp.core.io import read_image, read_volume
from napari_deepwarp.core.volume import Volume

LABEL_WORDS = ("label", "seg", "mask", "aseg", "parc")


def layer_data(vol: Volume, layer_type: str = "image", **kwargs) -> tuple:
    """``(data, metadata, layer_type)`` for napari, with the volume's physical placement."""
    meta = {"name": vol.name, "affine": vol.grid.napari_affine(), **kwargs}
    return vol.array, meta, layer_type


def data_to_world(
    affine=None, scale=None, translate=None, rotate=None, shear=None, ndim: int = 3
) -> np.ndarray:
    """napari's data -> world map as a ``(ndim+1)^2`` matrix: ``affine @ (rotate shear scale +
    translate)``, from a layer's attributes or a layer-data ``meta`` dict's values."""
    from napari.utils.transforms import Affine, CompositeAffine

    inner = CompositeAffine(
        scale=np.ones(ndim) if scale is None else scale,
        translate=np.zeros(ndim) if translate is None else translate,
        rotate=rotate,
        shear=shear,
        ndim=ndim,
    ).affine_matrix
    if affine is None:
        outer = np.eye(ndim + 1)
    elif isinstance(affine, Affine):
        outer = affine.affine_matrix
    else:
        outer = np.asarray(affine, float)
    return outer @ inner


def volume_from_matrix(array: np.ndarray, matrix: np.ndarray, name: str = "") -> Volume:
    """A :class:`Volume` from an array ``(z, y, x)`` and its napari 4x4 data -> world ``(z, y, x)``
    mm matrix (the inverse of ``Grid.napari_affine``). The array is copied."""
    array = np.asarray(array)
    if array.ndim != 3 or matrix.shape != (4, 4):
        raise ValueError(
            f"{name or 'layer'}: expected a 3D (z, y, x) layer, got data of shape {array.shape}"
        )
    # world (x, y, z) from index (z, y, x): reverse the rows; columns then reverse to (x, y, z).
    columns = matrix[:3, :3][::-1][:, ::-1]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"{name or 'layer'}: its transform has a zero scale")
    direction = columns / spacing
    origin = matrix[:3, 3][::-1]
    return Volume(np.array(array, copy=True), spacing, origin, direction, name)


def volume_from_layer(layer) -> Volume:
    """A napari Image/Labels layer as a :class:`Volume` (a copy; the layer is not changed)."""
    matrix = data_to_world(
        layer.affine, layer.scale, layer.translate, layer.rotate, layer.shear, layer.ndim
    )
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    return volume_from_matrix(np.asarray(data), matrix, layer.name)


def volume_from_layer_data(data, meta: dict) -> Volume:
    """A :class:`Volume` from npe2 writer arguments ``(data, meta)``."""
    ndim = np.ndim(data)
    matrix = data_to_world(
        meta.get("affine"),
        meta.get("scale"),
        meta.get("translate"),
        meta.get("rotate"),
        meta.get("shear"),
        ndim,
    )
    return volume_from_matrix(np.asarray(data), matrix, meta.get("name", ""))


def looks_like_labels(path: Path, array: np.ndarray) -> bool:
    """Integer files whose name says label/seg/mask, or with few distinct values, are labels."""
    if not np.issubdtype(array.dtype, np.integer):
        return False
    named = any(word in path.name.lower() for word in LABEL_WORDS)
    return named or len(np.unique(array[:: max(1, array.size // 200_000)])) <= 64


def read_layers(path: str | Path) -> list[tuple]:
    """Read a volume file or DICOM folder as an Image or Labels layer."""
    path = Path(path)
    raw = read_image(path)
    import SimpleITK as sitk

    labels = looks_like_labels(path, sitk.GetArrayViewFromImage(raw))
    vol = read_volume(path, labels=labels)
    vol.name = path.name.split(".")[0] if path.is_file() else path.name
    return [layer_data(vol, "labels" if labels else "image")]


def get_reader(path):
    """npe2 reader: a reader function for one volume path (or None if it is not ours)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.is_dir() or p.name.lower().endswith(
        (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
    ):
        return _reader
    return None


def _reader(path):
    return read_layers(path[0] if isinstance(path, list) else path)


def sample_pair() -> list[tuple]:
    """The built-in pair: fixed (green) and moving (magenta) images and their label maps."""
    from napari_deepwarp.resources import sample_pair_paths

    paths = sample_pair_paths()
    out = []
    for key, colormap in (("fixed", "green"), ("moving", "magenta")):
        vol = read_volume(paths[key])
        vol.name = f"sample {key}"
        out.append(layer_data(vol, "image", colormap=colormap, blending="additive"))
    for key in ("fixed_labels", "moving_labels"):
        vol = read_volume(paths[key], labels=True)
        vol.name = f"sample {key.replace('_', ' ')}"
        out.append(layer_data(vol, "labels", visible=False))
    return out


WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def _write(path: str, data, meta: dict, labels: bool) -> list[str]:
    from napari_deepwarp.core.io import InputError, write_volume

    if not str(path).lower().endswith(WRITE_SUFFIXES):
        path = f"{path}.nii.gz"
    try:
        vol = volume_from_layer_data(data, meta)
    except ValueError as exc:
        raise InputError(f"{path}: cannot write this layer: {exc}") from None
    if labels:
        vol.array = vol.array.astype(np.int32 if vol.array.dtype.itemsize > 2 else vol.array.dtype)
    elif vol.array.dtype == np.float64 or vol.array.dtype == bool:
        vol.array = vol.array.astype(np.float32)
    write_volume(vol, path)
    return [str(path)]


def write_image(path: str, data, meta: dict) -> list[str]:
    """npe2 writer: a 3D Image layer to NIfTI/NRRD/MHA with its physical geometry."""
    return _write(path, data, meta, labels=False)


def write_labels(path: str, data, meta: dict) -> list[str]:
    """npe2 writer: a 3D Labels layer to NIfTI/NRRD/MHA (integer voxels) with its geometry."""
    return _write(path, data, meta, labels=True)
