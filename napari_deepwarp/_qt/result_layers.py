"""A run's result as napari layer data ``(data, meta, layer_type)``, in physical space.

Every layer sits on the fixed image's grid (``affine`` = ``fixed.grid.napari_affine()``) except the
fixed labels taken into moving space, which sit on the moving grid. No Qt here: these are numpy
arrays and dicts that the widget hands to ``napari.layers.Layer.create``.
"""

from __future__ import annotations

import numpy as np
from napari.utils.colormaps import DirectLabelColormap

from napari_deepwarp.core.volume import Grid, Volume
from napari_deepwarp.layers import display_order, for_display

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


#: the deformation grid is a label layer (transparent between lines, legible over any image)
GRID_COLORS = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: "#ff9900"})


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


def grid_lines(
    displacement: np.ndarray, grid: Grid, spacing_mm: float = 8.0, axes: tuple[int, ...] = (1, 2)
) -> np.ndarray:
    """Image ``(z, y, x)`` in ``[0, 1]`` of grid lines drawn in moving space, seen on the fixed grid.

    ``displacement``: ``(z, y, x, 3)`` (x, y, z) mm, fixed -> moving. A fixed voxel ``x`` lights up
    where its moving point ``x + u(x)``, in the fixed index frame (mm along each array axis), lies
    within one voxel of a multiple of ``spacing_mm`` along one of ``axes`` (array axes, e.g. the
    two displayed ones): straight lines for the identity, bent ones where the map bends.
    """
    m = grid.index_to_world_matrix()
    idx = np.indices(grid.shape, dtype=np.float32).reshape(3, -1)
    world = m[:3, :3] @ idx + m[:3, 3:4] + displacement.reshape(-1, 3).T
    q = (np.linalg.inv(m)[:3, :3] @ (world - m[:3, 3:4])).astype(np.float32)
    steps = np.array(grid.spacing_zyx, np.float32)
    out = np.zeros(q.shape[1], np.float32)
    for axis in axes:
        mm = q[axis] * steps[axis]
        distance = np.abs(mm - np.round(mm / spacing_mm) * spacing_mm)
        np.maximum(out, np.clip(1.0 - distance / steps[axis], 0.0, 1.0), out=out)
    return out.reshape(grid.shape)


def grid_mask(result, spacing_mm: float, displayed_axes: tuple[int, ...]) -> np.ndarray:
    """The deformation grid on the fixed array (uint8, 1 on the lines), drawn for the displayed
    data axes of the layers (which :func:`layers.for_display` may have permuted)."""
    order = display_order(result.fixed.grid)
    axes = tuple(order[a] for a in displayed_axes)
    lines = grid_lines(result.displacement, result.fixed.grid, spacing_mm, axes)
    return (lines > 0.5).astype(np.uint8)


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
    grid_axes: tuple[int, ...] = (1, 2),
    inverse_labels: Volume | None = None,
) -> dict[str, tuple]:
    """``{kind: (data, meta, layer_type)}`` for a :class:`~core.pipeline.RegistrationResult`.

    Layer names are ``f"{prefix} · {kind}"``; each layer's ``metadata["deepwarp"]`` holds the run
    number and the kind. The overlay (warped) is shown; the other views start hidden except the
    folds and the deformation grid (orange lines, a Labels layer).
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
    add(
        "grid",
        grid_mask(result, grid_spacing_mm, grid_axes),
        "labels",
        colormap=GRID_COLORS,
        opacity=0.8,
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
