"""A run's result as napari layer data ``(data, meta, layer_type)``, in physical space, one view
at a time.

:func:`warped_layer` is what a run shows (with the fixed image: green and magenta, additive);
:func:`view_layers` builds one inspection view (checkerboard, difference, |u|, Jacobian with folds,
propagated labels as contours, the fixed labels in moving space); each is computed when first
asked for, off the main thread, and the widget swaps them in and out. Every layer sits on the
fixed image's grid (``affine`` = the display map of ``fixed.grid``) except the fixed labels taken
into moving space, which sit on the moving grid. Names are short and say what the layer is first:
``"warped · run 2"``. No Qt here: numpy arrays and dicts for ``napari.layers.Layer.create``.
"""

from __future__ import annotations

import numpy as np
from napari.utils.colormaps import DirectLabelColormap, label_colormap

from napari_deepwarp.core.label_names import LabelNames
from napari_deepwarp.core.volume import Volume
from napari_deepwarp.layers import for_display

from .grid_paths import GRID_COLOR, GRID_WIDTH_VOXELS, DeformationGrid, as_segments

#: inspection views of the Result tab, in button order; "overlay" is the plain result
VIEWS = (
    "overlay",
    "checkerboard",
    "difference",
    "|u|",
    "Jacobian",
    "grid",
    "labels",
    "labels → moving",
)
#: whether each view shows the user's fixed image under its own layers
VIEW_SHOWS_FIXED = {
    "overlay": True,
    "checkerboard": False,
    "difference": False,
    "|u|": True,
    "Jacobian": False,
    "grid": True,
    "labels": True,
    "labels → moving": False,
}
#: views that show the warped image under them
VIEW_SHOWS_WARPED = {"overlay", "grid", "labels"}
#: short layer-name stems per kind
NAMES = {
    "warped": "warped",
    "checkerboard": "checkerboard",
    "difference": "difference",
    "magnitude": "|u| mm",
    "jacobian": "Jacobian",
    "folds": "folds",
    "grid": "grid",
    "labels": "labels",
    "labels → moving": "labels → moving",
}


def layer_name(kind: str, run: int) -> str:
    """``"warped · run 2"``: what it is first, then the run."""
    return f"{NAMES.get(kind, kind)} · run {run}"


def normalise(array: np.ndarray) -> np.ndarray:
    """Intensities scaled to ``[0, 1]`` between the 1st and 99th percentiles, float32."""
    lo, hi = _percentiles(array, (1, 99))
    return np.clip((array - lo) / max(hi - lo, 1e-12), 0, 1).astype(np.float32)


def _percentiles(array: np.ndarray, q) -> tuple[float, float]:
    """Percentiles of ``array`` from a strided sample of at most ~1M voxels (fast on big
    volumes; display limits need no more)."""
    flat = np.asarray(array).reshape(-1)
    sample = flat[:: max(1, flat.size // 1_000_000)]
    lo, hi = (float(v) for v in np.percentile(sample, q))
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
        hi = hi if hi > lo else lo + 1.0
    return lo, hi


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """3D checkerboard of two same-shape ``(z, y, x)`` images: ``tiles`` squares along each axis."""
    idx = np.indices(a.shape, sparse=True)
    parity = sum((i * tiles // n) for i, n in zip(idx, a.shape, strict=True)) % 2
    return np.where(parity == 0, a, b).astype(np.float32)


def _meta(kind: str, run: int, affine: np.ndarray, **kwargs) -> dict:
    return {
        "name": layer_name(kind, run),
        "affine": affine,
        "metadata": {"deepwarp": {"run": run, "kind": kind}},
        **kwargs,
    }


def _image(kind: str, run: int, array: np.ndarray, grid, layer_type="image", **kwargs) -> tuple:
    view, affine = for_display(array, grid)
    return view, _meta(kind, run, affine, **kwargs), layer_type


def warped_layer(result, run: int) -> tuple:
    """The warped moving image, magenta and additive over the fixed image (green)."""
    return _image(
        "warped",
        run,
        result.warped.array,
        result.fixed.grid,
        colormap="magenta",
        blending="additive",
        contrast_limits=_percentiles(result.warped.array, (0.5, 99.5)),
    )


def labels_colormap(values: np.ndarray, names: LabelNames | None):
    """A ``DirectLabelColormap`` with the table's colours (napari's default colours without one,
    ``None``)."""
    if names is None or not names.colours:
        return None
    colours = names.colour_dict(values)
    return DirectLabelColormap(color_dict=colours)


def labels_meta(names: LabelNames | None) -> dict:
    """``features`` (index, name) for a Labels layer, so that hovering shows the structure."""
    if names is None:
        return {}
    return {"features": names.features(list(names.names))}


def view_layers(
    result,
    view: str,
    run: int,
    names: LabelNames | None = None,
    inverse_labels: Volume | None = None,
) -> list[tuple]:
    """The layers of one inspection ``view`` (see :data:`VIEWS`; "overlay" and "grid" add none:
    the grid is drawn per slice by the widget). Heavy numpy work: run it off the main thread."""
    fixed = result.fixed.grid
    if view == "checkerboard":
        board = checkerboard(normalise(result.fixed.array), normalise(result.warped.array))
        return [_image("checkerboard", run, board, fixed, contrast_limits=(0, 1))]
    if view == "difference":
        diff = normalise(result.warped.array) - normalise(result.fixed.array)
        return [
            _image("difference", run, diff, fixed, colormap="PiYG", contrast_limits=(-0.5, 0.5))
        ]
    if view == "|u|":
        # inside the fixed image's foreground only, with limits from there: the affine part
        # moves every voxel, so the range inside the body is what tells where the warp worked
        magnitude = np.linalg.norm(result.displacement, axis=-1).astype(np.float32)
        inside = normalise(result.fixed.array) > 0.1
        if inside.any():
            lo, hi = _percentiles(magnitude[inside], (2, 99.5))
        else:
            lo, hi = 0.0, max(float(magnitude.max()), 1e-3)
        magnitude[~inside] = 0.0
        return [
            _image(
                "magnitude",
                run,
                magnitude,
                fixed,
                colormap="inferno",
                contrast_limits=(lo, hi),
                opacity=0.7,
                blending="translucent",
                rendering="mip",
            )
        ]
    if view == "Jacobian":
        jac = result.jacobian.astype(np.float32)
        folds = (jac <= 0).astype(np.uint8)
        red = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: "red"})
        return [
            _image("jacobian", run, jac, fixed, colormap="PiYG", contrast_limits=(0.0, 2.0)),
            _image("folds", run, folds, fixed, "labels", colormap=red, opacity=0.9),
        ]
    if view == "labels" and result.warped_labels is not None:
        return [_labels("labels", run, result.warped_labels, names)]
    if view == "labels → moving" and inverse_labels is not None:
        return [_labels("labels → moving", run, inverse_labels, names)]
    return []


def _labels(kind: str, run: int, vol: Volume, names: LabelNames | None) -> tuple:
    array = vol.array
    if not np.issubdtype(array.dtype, np.integer):
        array = np.rint(array).astype(np.int32)
    colormap = labels_colormap(np.asarray(list(names.names)) if names else array, names)
    colormap = label_colormap() if colormap is None else colormap
    data = _image(
        kind, run, array, vol.grid, "labels", opacity=0.8, colormap=colormap, **labels_meta(names)
    )
    data[1]["metadata"]["deepwarp"]["contour"] = 1  # not a constructor argument: set once made
    return data


def grid_layer(deformation: DeformationGrid, run: int, data: np.ndarray) -> tuple:
    """The deformation grid as a Vectors layer (line segments, see :func:`grid_segments`)."""
    meta = _meta(
        "grid",
        run,
        deformation.affine,
        ndim=3,
        vector_style="line",
        edge_color=GRID_COLOR,
        edge_width=GRID_WIDTH_VOXELS,
        opacity=0.9,
    )
    return data, meta, "vectors"


def grid_segments(
    deformation: DeformationGrid,
    spacing_mm: float,
    displayed: tuple[int, int],
    point: np.ndarray | None = None,
) -> np.ndarray:
    """The grid's lines on the slice through ``point`` (world z, y, x mm; None: the middle), as
    Vectors data ``(N, 2, 3)``."""
    axis = 3 - sum(displayed)
    if point is None:
        index = deformation.shape[axis] // 2
    else:
        index = deformation.slice_index(point, axis)
    return as_segments(deformation.paths(spacing_mm, displayed, index))
