"""Intensity presets, the network's working grid, and resampling between grids.

Network inputs are anti-aliased: before an image is resampled onto a coarser working grid, it
is blurred by ``sigma = 0.5 * sqrt(target^2 - source^2)`` mm per axis (none along axes already
as coarse as the grid), made as a block mean then a smaller Gaussian (0.1 s, not 0.6 s, for a
1 mm brain). Plain linear resampling from 1 mm to ~6 mm skips most voxels and gives a noisy,
aliased image unlike the smooth training pairs: on a Mindboggle pair it cost every checkpoint
0.003-0.013 Dice.

Intensities: MR is scaled by robust percentiles to [0, 1]; CT is clipped to a Hounsfield window
and scaled to [0, 1]. The working grid is an isotropic grid covering the fixed image's
foreground, its shape padded to a multiple the model needs, along the fixed image's axes or, for
a network trained upright, the world's (:data:`WORKING_AXES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from napari_deepwarp.core.volume import Grid, Volume

MODALITIES = ("auto", "mr", "ct")


def detect_modality(array: np.ndarray) -> str:
    """``"ct"`` when intensities look like Hounsfield units (air near -1000), else ``"mr"``."""
    lo = float(np.percentile(array, 1))
    return "ct" if lo <= -700 and float(array.min()) >= -3100 else "mr"


@dataclass(frozen=True)
class IntensityPreset:
    """How raw intensities become network inputs in [0, 1].

    modality: ``"mr"`` (percentile scaling), ``"ct"`` (HU window) or ``"auto"`` (detected).
    percentiles: MR low/high percentiles over all voxels. ct_window: HU (low, high).
    """

    modality: str = "auto"
    percentiles: tuple[float, float] = (0.5, 99.5)
    ct_window: tuple[float, float] = (-1000.0, 1000.0)

    def resolve(self, array: np.ndarray) -> str:
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; use one of {MODALITIES}")
        return detect_modality(array) if self.modality == "auto" else self.modality


def intensity_window(
    array: np.ndarray, preset: IntensityPreset | None = None
) -> tuple[float, float]:
    """The ``(low, high)`` raw intensities that the preset maps to 0 and 1 for this image."""
    preset = preset or IntensityPreset()
    if preset.resolve(array) == "ct":
        lo, hi = preset.ct_window
    else:
        lo, hi = (float(v) for v in np.percentile(array, preset.percentiles))
    if hi <= lo:
        lo, hi = float(array.min()), float(array.max())
    return float(lo), float(hi)


def apply_window(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Scale ``array`` so that ``window`` maps to [0, 1], clipped; float32."""
    lo, hi = window
    scale = np.float32(1.0 / (hi - lo)) if hi > lo else np.float32(1.0)
    out = (array.astype(np.float32) - np.float32(lo)) * scale
    return np.clip(out, 0.0, 1.0, out=out)


def normalize_intensity(array: np.ndarray, preset: IntensityPreset | None = None) -> np.ndarray:
    """Map an intensity array to float32 in [0, 1] with the preset (resolved per image)."""
    return apply_window(array, intensity_window(array, preset))


def foreground_bbox(vol: Volume, margin_mm: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """Index-space box ``(lo, hi)`` (z, y, x), inclusive, of the Otsu foreground plus a margin.

    Falls back to the whole image when the foreground is empty or fills most of it.
    """
    shape = np.array(vol.shape)
    whole = (np.zeros(3), shape - 1.0)
    img = sitk.GetImageFromArray(vol.array.astype(np.float32))
    mask = sitk.GetArrayFromImage(sitk.OtsuThreshold(img, 0, 1))
    if mask.sum() < 0.001 * mask.size:
        return whole
    nz = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    pad = margin_mm / np.array(vol.spacing[::-1])
    lo = np.maximum(np.array([n[0] for n in nz]) - pad, 0)
    hi = np.minimum(np.array([n[-1] for n in nz]) + pad, shape - 1)
    return lo, hi


#: how a network's working grid is oriented: ``"image"`` keeps the fixed image's axes (networks
#: trained on pairs in all 48 axis orientations); ``"world"`` lays the grid along the world's
#: x, y, z (ITK's LPS), so that every scan stored in any axis order reaches the network upright,
#: as the upright pairs of a network that reads orientation were (LinDef's keypoint affine)
WORKING_AXES = ("image", "world")


def framed_box(
    fixed: Volume, lo: np.ndarray, hi: np.ndarray, axes: str = "image"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The box over the index box ``(lo, hi)`` (z, y, x) of ``fixed``, along ``axes``
    (:data:`WORKING_AXES`): ``(centre (x, y, z) mm in world, extent (z, y, x) mm along the
    box's axes, direction (3, 3))``. Along world axes, the box holds every voxel of the index box,
    each counted with its own width."""
    if axes not in WORKING_AXES:
        raise ValueError(f"working axes must be one of {WORKING_AXES}, not {axes!r}")
    m = fixed.grid.index_to_world_matrix()
    if axes == "image":
        extent = (hi - lo + 1) * np.array(fixed.spacing[::-1])
        return m[:3, :3] @ ((lo + hi) / 2.0) + m[:3, 3], extent, fixed.direction.copy()
    corners = np.array(
        [[z, y, x, 1.0] for z in (lo[0], hi[0]) for y in (lo[1], hi[1]) for x in (lo[2], hi[2])]
    )
    world = (corners @ m.T)[:, :3]
    voxel = np.abs(fixed.direction) @ np.array(fixed.spacing)  # a voxel's width along x, y, z
    extent = world.max(0) - world.min(0) + voxel
    return (world.max(0) + world.min(0)) / 2.0, extent[::-1], np.eye(3)


def training_grid(fixed: Volume, shape: tuple[int, int, int], axes: str = "image") -> Grid:
    """An isotropic grid of exactly ``shape`` (z, y, x) over the fixed image's foreground box,
    centred on it, along ``axes`` (:data:`WORKING_AXES`); the spacing makes the box fit."""
    lo, hi = foreground_bbox(fixed)
    centre, extent_mm, direction = framed_box(fixed, lo, hi, axes)
    spacing = float(max(extent_mm / np.array(shape)))
    half = (np.array(shape) - 1) / 2.0 * spacing
    origin = centre - direction @ half[::-1]
    return Grid(tuple(int(n) for n in shape), (spacing,) * 3, tuple(origin), direction)


MIN_WORKING_SIZE = 16  # voxels: the smallest working-grid side worth running a network on


def smallest_working_size(multiple: int) -> int:
    """The smallest working-grid side (voxels) for a network whose sides are ``multiple``s."""
    return max(MIN_WORKING_SIZE, int(multiple))


def working_grid(
    fixed: Volume,
    spacing: float | None = None,
    max_size: int = 96,
    multiple: int = 16,
    crop_to_foreground: bool = True,
    model: str | None = None,
    axes: str = "image",
) -> Grid:
    """Isotropic grid for the network over the fixed image (or its foreground box).

    spacing: mm; default: the coarser of the finest fixed spacing and ``extent / max_size``.
    The shape is padded up to a multiple of ``multiple``, centred on the region, along ``axes``
    (:data:`WORKING_AXES`: the fixed image's by default). Raises ``InputError`` (naming
    ``model``, the network) when ``max_size``, or the grid that ``spacing`` gives, is below
    :func:`smallest_working_size`.
    """
    from napari_deepwarp.core.io import InputError

    smallest, who = smallest_working_size(multiple), model or "the network"
    if spacing is None and max_size < smallest:
        raise InputError(
            f"working grid size {max_size} (--max-size) is below the smallest {who} supports, "
            f"{smallest} voxels (its sides are multiples of {multiple}); give {smallest} or more"
        )
    lo, hi = (
        foreground_bbox(fixed) if crop_to_foreground else (np.zeros(3), np.array(fixed.shape) - 1.0)
    )
    centre_world, extent_mm, direction = framed_box(fixed, lo, hi, axes)
    if spacing is None:
        spacing = max(min(fixed.spacing), float(extent_mm.max()) / max_size)
    n = np.maximum(np.ceil(extent_mm / spacing - 1e-6), 1)
    own = np.ceil(extent_mm / min(fixed.spacing) - 1e-6).max()  # sides at the finest spacing
    if n.max() < min(smallest, own):
        finest = float(extent_mm.max()) / min(smallest, own)
        raise InputError(
            f"working spacing {spacing:g} mm (--working-spacing) gives a grid of {int(n.max())} "
            f"voxels, below the smallest {who} supports ({smallest}); give at most {finest:.3g} mm"
        )
    n = np.array([max(multiple, int(math.ceil(k / multiple) * multiple)) for k in n])
    half = (n - 1) / 2.0 * spacing  # (z, y, x) mm from centre to first voxel
    origin = centre_world - direction @ half[::-1]
    return Grid(tuple(int(k) for k in n), (spacing,) * 3, tuple(origin), direction)


_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}


def resample(
    vol: Volume,
    grid: Grid,
    transform: sitk.Transform | None = None,
    interpolator: str = "linear",
    default: float = 0.0,
) -> Volume:
    """Resample ``vol`` onto ``grid`` through physical space.

    ``transform`` maps points of ``grid`` to points of ``vol`` (ITK convention); identity if None.
    """
    transform = transform or sitk.Transform(3, sitk.sitkIdentity)
    img = vol.to_sitk()
    out = sitk.Resample(
        img,
        grid.reference_image(img.GetPixelID()),
        transform,
        _INTERPOLATORS[interpolator],
        default,
        img.GetPixelID(),
    )
    return Volume.on_grid(sitk.GetArrayFromImage(out), grid, vol.name)


def antialias_sigmas(source_spacing, target_spacing: float) -> list[float]:
    """Gaussian sigmas (mm, per axis of ``source_spacing``) before resampling to a grid of
    ``target_spacing`` mm: ``0.5 * sqrt(target^2 - source^2)``, 0 where the source is coarser."""
    return [0.5 * math.sqrt(max(0.0, target_spacing**2 - s**2)) for s in source_spacing]


def _crop(img: sitk.Image, region, sigmas, spacing) -> sitk.Image:
    """``img`` cut to the voxel box ``region`` ``(lo, hi)`` (z, y, x) grown by four ``sigmas``
    (mm, per x, y, z axis) and two voxels, geometry kept (``sitk.RegionOfInterest``)."""
    lo, hi = (np.asarray(v, dtype=np.float64)[::-1] for v in region)  # (x, y, z)
    margin = np.ceil(4 * np.asarray(sigmas) / np.asarray(spacing)) + 2
    size = np.array(img.GetSize())
    start = np.clip(np.floor(lo - margin), 0, size - 1).astype(int)
    stop = np.clip(np.ceil(hi + margin), 0, size - 1).astype(int)
    if np.all(start == 0) and np.all(stop == size - 1):
        return img
    return sitk.RegionOfInterest(img, [int(v) for v in stop - start + 1], [int(v) for v in start])


def _antialiased(vol: Volume, target_spacing: float, region=None) -> sitk.Image:
    """``vol`` (float32) with the blur of :func:`antialias_sigmas`, made cheaply: a block mean
    over ``floor(target / 2 source)`` voxels per axis first (``sitk.BinShrink``, which keeps the
    physical geometry), then a Gaussian for the variance the block mean has not given.
    ``region``: ``(lo, hi)`` voxel indices (z, y, x) of the part that is needed: only it, and
    four sigmas around it, is blurred (a brain's foreground box rather than its whole volume).

    A larger block (``floor(target / source)``, 5x faster for a 2.7 mm grid) kept the network's
    Dice but moved ``--refine 150`` by up to -0.005 on Mindboggle 3<-4: not used."""
    img = sitk.Cast(vol.to_sitk(), sitk.sitkFloat32)
    if region is not None:
        img = _crop(img, region, antialias_sigmas(vol.spacing, target_spacing), vol.spacing)
    sigmas = antialias_sigmas(vol.spacing, target_spacing)
    factors = [
        max(1, min(int(target_spacing / (2 * s)), n))
        for s, n in zip(vol.spacing, img.GetSize(), strict=True)
    ]
    if max(factors) > 1:
        img = sitk.BinShrink(img, factors)
    # a block mean of f voxels of spacing s has variance (f^2 - 1) s^2 / 12
    rest = [
        math.sqrt(max(0.0, g * g - (f * f - 1) * s * s / 12.0))
        for g, f, s in zip(sigmas, factors, vol.spacing, strict=True)
    ]
    if max(rest) < 1e-3:
        return img
    if min(img.GetSize()) >= 4 and min(rest) > 0:  # the recursive filter needs both
        return sitk.SmoothingRecursiveGaussian(img, rest)
    return sitk.DiscreteGaussian(img, [r * r for r in rest], 32, 0.01, True)


def network_input(
    vol: Volume,
    grid: Grid,
    window: tuple[float, float],
    transform: sitk.Transform | None = None,
) -> np.ndarray:
    """``vol`` as the network sees it on ``grid`` (isotropic): anti-aliased (see the module
    doc), resampled through ``transform`` (grid points -> ``vol`` points), scaled by ``window``
    to [0, 1]. Returns float32 ``(z, y, x)`` of ``grid.shape``."""
    if max(antialias_sigmas(vol.spacing, grid.spacing[0])) > 0:
        region = _region_of(vol.grid, grid, transform)
        vol = Volume.from_sitk(_antialiased(vol, grid.spacing[0], region), vol.name)
    return apply_window(resample(vol, grid, transform).array, window)


def _region_of(vol_grid: Grid, grid: Grid, transform: sitk.Transform | None):
    """``(lo, hi)`` voxel indices (z, y, x) of ``vol_grid`` that ``grid``'s points reach through
    ``transform`` (an affine: the box of the mapped corners bounds them all)."""
    corners = grid.corners_world()
    if transform is not None:
        corners = np.array([transform.TransformPoint(tuple(map(float, c))) for c in corners])
    m = vol_grid.world_to_index_matrix()
    index = corners @ m[:3, :3].T + m[:3, 3]
    return index.min(0), index.max(0)
