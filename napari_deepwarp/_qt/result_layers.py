"""A run's result as napari layer data ``(data, meta, layer_type)``, in physical space.

Every layer sits on the fixed image's grid (``affine`` = ``fixed.grid.napari_affine()``) except the
fixed labels taken into moving space, which sit on the moving grid. No Qt here: these are numpy
arrays and dicts that the widget hands to ``napari.layers.Layer.create``.
"""

from __future__ import annotations

import numpy as np
from napari.utils.colormaps import DirectLabelColormap

from napari_deepwarp.core.volume import Volume
from napari_deepwarp.layers import for_display

from .grid_paths import GRID_COLOR, GRID_WIDTH_VOXELS, DeformationGrid, as_segments

#: the result layers of a run, in the order they are added (the last one is drawn on top)
KINDS = (
    "warped",
    "checkerboard",
    "difference",
    "magnitude (mm)",
    "jacobian",
    "folds (det<=0)",
    "grid",
    "labels moving→fixed",
    "labels fixed→moving",
)


def normalise(array: np.ndarray) -> np.ndarray:
    """Intensities scaled to ``[0, 1]`` between the 1st and 99th percentiles, float32."""
    lo, hi = np.percentile(array, (1, 99))
    if hi <= lo:
        lo, hi = float(array.min()), float(array.max()) or 1.0
    return np.clip((array - lo) / max(hi - lo, 1e-12), 0, 1).astype(np.float32)


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """3D checkerboard of two same-shape ``(z, y, x)`` images: ``tiles`` squares along each axis."""
    idx = np.indices(a.shape, sparse=True)
    parity = sum((i * tiles // n) for i, n in zip(idx, a.shape, strict=True)) % 2
    return np.where(parity == 0, a, b).astype(np.float32)


def _meta(name: str, affine: np.ndarray, run: int, kind: str, **kwargs) -> dict:
    return {
        "name": name,
        "affine": affine,
        "metadata": {"deepwarp": {"run": run, "kind": kind}},
        **kwargs,
    }


def run_layers(
    result,
    prefix: str,
    run: int,
    grid_spacing_mm: float = 8.0,
    grid_axes: tuple[int, int] = (1, 2),
    grid_point: np.ndarray | None = None,
    inverse_labels: Volume | None = None,
) -> dict[str, tuple]:
    """``{kind: (data, meta, layer_type)}`` for a :class:`~core.pipeline.RegistrationResult`.

    Layer names are ``f"{prefix} · {kind}"``; each layer's ``metadata["deepwarp"]`` holds the run
    number and the kind. The overlay (warped) is shown; the other views start hidden except the
    folds and the deformation grid (orange paths on the slice through ``grid_point``, world
    (z, y, x) mm, across the displayed ``grid_axes``; the middle slice where None; see
    :func:`grid_segments`).
    """
    fixed = result.fixed.grid
    fixed_n = normalise(result.fixed.array)
    warped_n = normalise(result.warped.array)
    magnitude = np.linalg.norm(result.displacement, axis=-1).astype(np.float32)
    folds = (result.jacobian <= 0).astype(np.uint8)
    out: dict[str, tuple] = {}

    def add(kind, data, layer_type="image", grid=fixed, **kwargs):
        view, affine = for_display(data, grid)
        out[kind] = (view, _meta(f"{prefix} · {kind}", affine, run, kind, **kwargs), layer_type)

    lo, hi = np.percentile(result.warped.array, (0.5, 99.5))
    add(
        "warped",
        result.warped.array,
        colormap="magenta",
        blending="additive",
        contrast_limits=(float(lo), float(hi) if hi > lo else float(lo) + 1),
    )
    add("checkerboard", checkerboard(fixed_n, warped_n), visible=False, contrast_limits=(0, 1))
    add(
        "difference",
        warped_n - fixed_n,
        visible=False,
        colormap="PiYG",
        contrast_limits=(-0.5, 0.5),
    )
    add(
        "magnitude (mm)",
        magnitude,
        visible=False,
        colormap="inferno",
        contrast_limits=(0.0, max(float(magnitude.max()), 1e-3)),
    )
    add(
        "jacobian",
        result.jacobian.astype(np.float32),
        visible=False,
        colormap="PiYG",
        contrast_limits=(0.0, 2.0),
    )
    add(
        "folds (det<=0)",
        folds,
        "labels",
        colormap=DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: "red"}),
        opacity=0.9,
    )
    deformation = DeformationGrid(result.displacement, fixed)
    out["grid"] = (
        grid_segments(deformation, grid_spacing_mm, grid_axes, grid_point),
        _meta(
            f"{prefix} · grid",
            deformation.affine,
            run,
            "grid",
            ndim=3,
            vector_style="line",
            edge_color=GRID_COLOR,
            edge_width=GRID_WIDTH_VOXELS,
            opacity=0.9,
        ),
        "vectors",
    )
    if result.warped_labels is not None:
        add("labels moving→fixed", result.warped_labels.array, "labels", visible=False)
    if inverse_labels is not None:
        add(
            "labels fixed→moving",
            inverse_labels.array,
            "labels",
            grid=inverse_labels.grid,
            visible=False,
            opacity=0.6,
        )
    return out


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
