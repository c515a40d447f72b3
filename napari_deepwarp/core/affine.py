"""Affine pre-alignment with SimpleITK's registration framework.

The result is an ``sitk.AffineTransform`` that maps *fixed* physical points (LPS, mm) to *moving*
physical points, the ITK resampling convention: ``sitk.Resample(moving, fixed, result.transform)``
puts the moving image on the fixed grid, aligned.

Method: a centre-of-mass initialisation (image moments of a crude Otsu foreground), then a rigid
(``Euler3DTransform``) and an affine stage, each optimised with regular-step gradient descent on
Mattes mutual information (or correlation) over a small multi-resolution pyramid. Where the
scanners' own alignment (the identity in physical space) scores a better metric than the
centre-of-mass start, registration starts from it instead: two scans of one session with
different fields of view are already aligned, yet the centres of their foregrounds can lie
centimetres apart. The metric is sampled at random with a fixed seed, so a run is repeatable.
The images are first block-averaged to a coarse working spacing (3 mm by default; finer for a
small field of view) and the metric is sampled on
the fixed foreground plus a margin: on Mindboggle T1 pairs (two cores) that takes about 1 s for a
mean label Dice of 0.43, as good as full-resolution runs that take minutes
(``python -m benchmarks.affine_mindboggle``).
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk

from .progress import Progress
from .volume import Volume

STAGES = ("rigid", "affine")
_VALID_STAGES = ((), ("rigid",), ("affine",), STAGES)


@dataclass
class AffineSettings:
    """Settings of :func:`align_affine`; the defaults were tuned on Mindboggle T1 pairs.

    ``stages``: ``"rigid"`` and/or ``"affine"``, in order; ``()`` applies the initialiser only and
    ``("none",)`` returns the identity. Registration runs on images block-averaged to about
    ``working_spacing`` mm (finer for a small field of view: the largest side keeps at least
    ``min_working_voxels`` voxels), then over a pyramid of ``shrink_factors`` (relative to the working
    grid) with Gaussian ``smoothing_sigmas`` (mm), ``iterations`` per level. Without a fixed mask
    the metric is sampled on the fixed Otsu foreground grown by ``foreground_margin_mm`` (``None``:
    everywhere); ``sampling_percentage`` is the fraction of working voxels drawn at random (with
    ``seed``; 0 would be SimpleITK's wall clock, a different result every run), of which those
    outside the mask are dropped; ``1`` samples every voxel. ``also_from_header``: start from the
    identity (the headers' alignment) instead of the initialiser where its metric is better.
    """

    stages: Sequence[str] = STAGES
    # "mattes" (mutual information, any modality) or "correlation" (same contrast only; on
    # synthetic phantoms it is exact where Mattes is off by ~0.1-0.3 voxel: test_affine.py)
    metric: str = "mattes"
    bins: int = 32
    sampling_percentage: float = 0.5
    foreground_margin_mm: float | None = 9.0
    working_spacing: float | None = 3.0
    min_working_voxels: int = 48
    shrink_factors: Sequence[int] = (2, 1)
    smoothing_sigmas: Sequence[float] = (2.0, 1.0)
    iterations: int = 100
    learning_rate: float = 1.0  # largest step, mm of physical shift (regular-step descent)
    min_step: float = 1e-2
    relaxation: float = 0.7  # step shrink factor when the gradient turns back
    initializer: str = "moments"  # "moments" (centre of the Otsu foreground), "geometry", "none"
    seed: int = 1
    also_from_header: bool = True
    threads: int | None = None  # None: SimpleITK's global default


@dataclass
class AffineResult:
    """``transform`` maps fixed physical points to moving ones (see module docstring)."""

    transform: sitk.AffineTransform
    metric_value: float
    seconds: float
    stages: tuple[str, ...]
    history: list[float] = field(default_factory=list)  # metric value per iteration

    def matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix of :attr:`transform`, acting on world ``(x, y, z, 1)``."""
        return transform_matrix(self.transform)


def transform_matrix(tx: sitk.Transform) -> np.ndarray:
    """4x4 homogeneous matrix of a centred matrix-offset transform (Euler3D, Affine, ...)."""
    a = np.array(tx.GetMatrix()).reshape(3, 3)
    c = np.array(tx.GetCenter())
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = np.array(tx.GetTranslation()) + c - a @ c
    return m


def _as_image(x, like: Volume | None = None, pixel=sitk.sitkFloat32) -> sitk.Image:
    """A Volume, ``sitk.Image`` or array (on ``like``'s grid) as a 3D SimpleITK image."""
    if not isinstance(x, sitk.Image):
        if not isinstance(x, Volume):
            if like is None:
                raise TypeError("an array mask needs a reference volume")
            x = like.with_array(np.asarray(x))
        if x.array.dtype == bool:  # SimpleITK has no boolean pixel type
            x = x.with_array(x.array.astype(np.uint8))
        x = x.to_sitk()
    return sitk.Cast(x, pixel)


def _working(img: sitk.Image, spacing: float | None, min_voxels: int = 0) -> sitk.Image:
    """Block-average ``img`` by integer factors towards ``spacing`` mm (anti-aliased, fast), but
    never so far that its largest physical side spans fewer than ``min_voxels`` voxels."""
    if not spacing:
        return img
    extent = max(n * sp for n, sp in zip(img.GetSize(), img.GetSpacing()))
    if min_voxels:
        spacing = min(spacing, extent / min_voxels)
    factors = [max(1, round(spacing / s)) for s in img.GetSpacing()]
    return sitk.BinShrink(img, factors) if max(factors) > 1 else img


def _mask_on(mask: sitk.Image, ref: sitk.Image) -> sitk.Image:
    return sitk.Resample(
        mask > 0.5, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )


def _grown_foreground(img: sitk.Image, margin_mm: float) -> sitk.Image:
    """Otsu foreground of ``img`` dilated by ``margin_mm`` (a metric mask keeping the edges)."""
    radius = [max(1, round(margin_mm / sp)) for sp in img.GetSpacing()]
    return sitk.BinaryDilate(sitk.OtsuThreshold(img, 0, 1), radius)


def _foreground(img: sitk.Image, mask: sitk.Image | None) -> sitk.Image:
    """Crude foreground (Otsu threshold, restricted to ``mask``) as a float 0/1 image."""
    fg = sitk.OtsuThreshold(img, 0, 1)
    if mask is not None:
        fg = fg * sitk.Cast(mask, fg.GetPixelID())
    return sitk.Cast(fg, sitk.sitkFloat32)


def _initial(fixed, moving, fixed_mask, moving_mask, how: str) -> sitk.Euler3DTransform:
    tx = sitk.Euler3DTransform()
    if how == "none":
        return tx
    if how == "moments":
        f, m = _foreground(fixed, fixed_mask), _foreground(moving, moving_mask)
        mode = sitk.CenteredTransformInitializerFilter.MOMENTS
    elif how == "geometry":
        f, m = fixed, moving
        mode = sitk.CenteredTransformInitializerFilter.GEOMETRY
    else:
        raise ValueError(f"initializer must be 'moments', 'geometry' or 'none', not {how!r}")
    return sitk.Euler3DTransform(sitk.CenteredTransformInitializer(f, m, tx, mode))


def _to_affine(tx: sitk.Transform) -> sitk.AffineTransform:
    out = sitk.AffineTransform(3)
    out.SetCenter(tx.GetCenter())
    out.SetMatrix(tx.GetMatrix())
    out.SetTranslation(tx.GetTranslation())
    return out


def _method(s: AffineSettings, history: list[float]) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    if s.metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=s.bins)
    elif s.metric == "correlation":
        reg.SetMetricAsCorrelation()
    else:
        raise ValueError(f"metric must be 'mattes' or 'correlation', not {s.metric!r}")
    if s.sampling_percentage < 1:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(s.sampling_percentage, s.seed)
    else:
        reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetMetricUseMovingImageGradientFilter(False)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=s.learning_rate,
        minStep=s.min_step,
        numberOfIterations=s.iterations,
        relaxationFactor=s.relaxation,
        gradientMagnitudeTolerance=1e-8,
        maximumStepSizeInPhysicalUnits=s.learning_rate,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(s.shrink_factors))
    reg.SetSmoothingSigmasPerLevel(list(s.smoothing_sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    if s.threads:
        reg.SetNumberOfThreads(int(s.threads))
    reg.AddCommand(sitk.sitkIterationEvent, lambda: history.append(reg.GetMetricValue()))
    return reg


def align_affine(
    fixed: Volume,
    moving: Volume,
    settings: AffineSettings | None = None,
    fixed_mask=None,
    moving_mask=None,
) -> Generator[Progress, None, AffineResult]:
    """Affinely align ``moving`` to ``fixed``; yields :class:`Progress`, returns :class:`AffineResult`.

    Masks (``Volume``, ``sitk.Image`` or an array on the image's grid; nonzero = inside) restrict
    where the metric is sampled. ``SimpleITK`` blocks while a stage runs, so progress is reported
    between stages; per-iteration metric values are in ``AffineResult.history``.
    """
    s = settings or AffineSettings()
    stages = (s.stages,) if isinstance(s.stages, str) else tuple(s.stages)
    t0 = time.perf_counter()
    if stages == ("none",):
        yield Progress(1, 1, "no affine pre-alignment", stage="none")
        return AffineResult(sitk.AffineTransform(3), float("nan"), 0.0, ())
    if stages not in _VALID_STAGES:
        raise ValueError(f"stages must be one of {_VALID_STAGES} or ('none',), not {stages}")

    total = len(stages) + 1
    yield Progress(0, total, "affine: preparing images", stage="init")
    f = _working(_as_image(fixed), s.working_spacing, s.min_working_voxels)
    m = _working(_as_image(moving), s.working_spacing, s.min_working_voxels)
    fm = _mask_on(_as_image(fixed_mask, fixed), f) if fixed_mask is not None else None
    mm = _mask_on(_as_image(moving_mask, moving), m) if moving_mask is not None else None
    tx: sitk.Transform = _initial(f, m, fm, mm, s.initializer)
    if fm is None and s.foreground_margin_mm is not None:
        fm = _grown_foreground(f, s.foreground_margin_mm)
    yield Progress(1, total, f"affine: initialised ({s.initializer})", stage="init")

    def method(history: list[float]) -> sitk.ImageRegistrationMethod:
        reg = _method(s, history)
        if fm is not None:
            reg.SetMetricFixedMask(fm)
        if mm is not None:
            reg.SetMetricMovingMask(mm)
        return reg

    start_note = ""
    if s.also_from_header and s.initializer != "none" and stages:
        probe = method([])
        probe.SetInitialTransform(sitk.Euler3DTransform(), inPlace=False)
        header_value = probe.MetricEvaluate(f, m)
        probe.SetInitialTransform(tx, inPlace=False)
        if header_value < probe.MetricEvaluate(f, m):
            tx, start_note = sitk.Euler3DTransform(), ", started from the headers' alignment"

    history: list[float] = []
    value = float("nan")
    for i, stage in enumerate(stages):
        if stage == "affine":
            tx = _to_affine(tx)
        reg = method(history)
        reg.SetInitialTransform(tx, inPlace=True)
        n0 = len(history)
        reg.Execute(f, m)
        value = reg.GetMetricValue()
        note = start_note if i == 0 else ""
        yield Progress(
            i + 2,
            total,
            f"affine: {stage} done{note}, {len(history) - n0} iterations, metric {value:.4f}",
            stage=stage,
            loss=value,
        )
    seconds = time.perf_counter() - t0
    return AffineResult(_to_affine(tx), value, seconds, stages, history)


def label_driven(
    fixed_labels: Volume, moving_labels: Volume, settings: AffineSettings | None = None
) -> tuple[Volume, Volume, AffineSettings]:
    """What :func:`align_affine` needs to align two scans by their label maps instead of their
    intensities: each map's foreground (label > 0) smoothed by ``sigma`` = 1 mm, and settings that
    compare them by correlation over every voxel, starting from the centres of mass.

    For pairs whose intensities mutual information cannot relate (MR to ultrasound): on the
    shared prostate pair the gland Dice is 0.00 after the image-driven stage and 0.88 after this
    one. The labels then also judge the result, so Dice after it is not an independent measure.
    """

    def smoothed(labels: Volume) -> Volume:
        inside = sitk.Cast(_as_image(labels) > 0, sitk.sitkFloat32)
        return Volume.from_sitk(sitk.SmoothingRecursiveGaussian(inside, 1.0), labels.name)

    s = settings or AffineSettings()
    label_settings = replace(
        s,
        metric="correlation",
        initializer="moments",
        also_from_header=False,
        foreground_margin_mm=None,
        sampling_percentage=1.0,
    )
    return smoothed(fixed_labels), smoothed(moving_labels), label_settings


def run_affine(
    fixed: Volume, moving: Volume, settings: AffineSettings | None = None, **kw
) -> AffineResult:
    """:func:`align_affine` run to completion (progress discarded)."""
    gen = align_affine(fixed, moving, settings, **kw)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
