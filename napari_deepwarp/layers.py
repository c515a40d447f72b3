"""Volumes as napari layer data, in physical space (no Qt imports).

A layer gets ``affine`` = the volume's index -> world map in (z, y, x) millimetres, so that
volumes on different grids (spacing, origin, oblique direction) overlay where they are in space.
The way back, :func:`volume_from_layer`, reads the layer's full data -> world map (``affine`` times
``scale``/``translate``/``rotate``/``shear``) into spacing, origin and direction; the npe2 writers
use it to write Image and Labels layers with their geometry.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from napari_deepwarp.core.io import read_image, read_volume
from napari_deepwarp.core.volume import Grid, Volume

LABEL_WORDS = ("label", "seg", "mask", "aseg", "parc")


def display_order(grid: Grid) -> tuple[int, int, int]:
    """``order[r]``: the array axis that :func:`for_display` puts at data axis ``r`` (the one
    running closest to world axis ``r``, z y x)."""
    weight = np.abs(grid.napari_affine()[:3, :3])
    return max(
        itertools.permutations(range(3)), key=lambda o: sum(weight[r, o[r]] for r in range(3))
    )


def for_display(array: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """``array`` on ``grid`` as napari should get it: ``(view, affine)``.

    napari slices along data axes and draws the two displayed ones with the matching 2x2 block of
    the layer's affine, so a scan whose axes are permuted against the world (a sagittal brain:
    index z runs along world x) would have a singular block and fail to draw. The view is the
    array with its first three axes permuted and flipped so that each runs along the world axis
    closest to it, positively (as nibabel's ``as_closest_canonical``); ``affine`` is the 4x4 data
    ``(z, y, x)`` -> world ``(z, y, x)`` mm map of the view, so every voxel stays where it is in
    space and any residual obliquity is kept. No copy is made.
    """
    a = grid.napari_affine()
    order = display_order(grid)
    view = np.transpose(array, (*order, *range(3, array.ndim)))
    to_old = np.zeros((4, 4))
    to_old[3, 3] = 1.0
    flips = []
    for r, axis in enumerate(order):
        sign = 1.0 if a[r, axis] >= 0 else -1.0
        to_old[axis, r] = sign
        if sign < 0:
            to_old[axis, 3] = grid.shape[axis] - 1
            flips.append(r)
    if flips:
        view = np.flip(view, axis=tuple(flips))
    return view, a @ to_old


def layer_data(vol: Volume, layer_type: str = "image", **kwargs) -> tuple:
    """``(data, metadata, layer_type)`` for napari, with the volume's physical placement
    (see :func:`for_display`). ``metadata["deepwarp_display"]`` records the reorientation, so
    that :func:`volume_from_layer` gives back the volume on its own grid, voxel for voxel."""
    data, affine = for_display(vol.array, vol.grid)
    metadata = {**kwargs.pop("metadata", {}), DISPLAY_KEY: display_record(vol.grid)}
    meta = {"name": vol.name, "affine": affine, "metadata": metadata, **kwargs}
    return data, meta, layer_type


DISPLAY_KEY = "deepwarp_display"


def display_record(grid: Grid) -> dict:
    """How :func:`for_display` reorients arrays on ``grid``: the axis order and the flips."""
    a = grid.napari_affine()
    order = display_order(grid)
    return {"order": list(order), "flips": [r for r, ax in enumerate(order) if a[r, ax] < 0]}


def undo_display(view: np.ndarray, matrix: np.ndarray, record: dict):
    """The array and its 4x4 data -> world matrix before :func:`for_display` (exact inverse)."""
    order, flips = record["order"], record["flips"]
    array = np.flip(view, axis=tuple(flips)) if flips else view
    inverse = np.argsort(order)
    array = np.transpose(array, (*inverse, *range(3, array.ndim)))
    to_old = np.zeros((4, 4))
    to_old[3, 3] = 1.0
    for r, axis in enumerate(order):
        to_old[axis, r] = -1.0 if r in flips else 1.0
        if r in flips:
            to_old[axis, 3] = array.shape[axis] - 1
    return array, matrix @ np.linalg.inv(to_old)


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
    data = np.asarray(data)
    record = (getattr(layer, "metadata", None) or {}).get(DISPLAY_KEY)
    if record is not None and data.ndim == 3:
        data, matrix = undo_display(data, matrix, record)
    return volume_from_matrix(data, matrix, layer.name)


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
    data = np.asarray(data)
    record = (meta.get("metadata") or {}).get(DISPLAY_KEY)
    if record is not None and data.ndim == 3:
        data, matrix = undo_display(data, matrix, record)
    return volume_from_matrix(data, matrix, meta.get("name", ""))


def looks_like_labels(path: Path, array: np.ndarray) -> bool:
    """Label maps: integer files whose name says label/seg/mask/aseg/parc or with few distinct
    values, and float files so named whose values are all whole numbers (some tools, e.g.
    Mindboggle's, store label maps as float32)."""
    sample = np.asarray(array).ravel()[:: max(1, array.size // 200_000)]
    named = any(word in path.name.lower() for word in LABEL_WORDS)
    if np.issubdtype(array.dtype, np.integer):
        return named or len(np.unique(sample)) <= 64
    if named and np.issubdtype(array.dtype, np.floating):
        return bool(np.all(np.isfinite(array)) and np.all(np.mod(array, 1) == 0))
    return False


def read_layers(path: str | Path) -> list[tuple]:
    """Read a volume file or DICOM folder as an Image or Labels layer."""
    path = Path(path)
    raw = read_image(path)
    import SimpleITK as sitk

    labels = looks_like_labels(path, sitk.GetArrayViewFromImage(raw))
    vol = read_volume(path, labels=labels)
    vol.name = path.name.split(".")[0] if path.is_file() else path.name
    return [layer_data(vol, "labels" if labels else "image")]


_OPENED_NAMES: list = []
_NAMES_LISTENERS: list = []


def opened_label_names() -> list:
    """The colour tables opened through the reader so far (``LabelNames``, oldest first)."""
    return list(_OPENED_NAMES)


def on_label_names(callback) -> None:
    """Call ``callback(table)`` for every colour table the reader opens from now on (a bound
    method is held weakly: a closed widget is dropped)."""
    import weakref

    ref = weakref.WeakMethod(callback) if hasattr(callback, "__self__") else (lambda: callback)
    _NAMES_LISTENERS.append(ref)


def read_label_names_file(path) -> list[tuple]:
    """Reader for colour tables: remember the names for the dock widget (which offers and
    chooses them under "label names"); no layer is added (npe2's ``[(None,)]``)."""
    from napari_deepwarp.core.label_names import read_label_names

    table = read_label_names(path)
    _OPENED_NAMES.append(table)
    for ref in list(_NAMES_LISTENERS):
        callback = ref()
        try:
            if callback is not None:
                callback(table)
                continue
        except RuntimeError:  # a closed widget whose Qt object is gone
            pass
        _NAMES_LISTENERS.remove(ref)
    return [(None,)]


def get_reader(path):
    """npe2 reader: a reader function for one volume path or colour table (else None)."""
    from napari_deepwarp.core.label_names import looks_like_label_names

    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if looks_like_label_names(p):
        return lambda paths: read_label_names_file(paths[0] if isinstance(paths, list) else paths)
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
