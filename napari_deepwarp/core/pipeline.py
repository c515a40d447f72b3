"""Register a pair: preprocess -> affine -> predict -> fine-tune? -> compose -> warp -> metrics.

The network works on an isotropic working grid over the fixed image (see
:func:`preprocess.working_grid`); the moving image reaches that grid through the affine stage.
The result is one physical map from fixed points to moving points::

    y(x) = A(x + d(x))

``d`` the network's displacement (mm, upsampled once from the working grid), ``A`` the affine.
The moving image and labels are sampled once, at full resolution on the fixed grid, through
``y``, exactly as ``sitk.Resample(moving, fixed, DisplacementFieldTransform(y - x))`` does.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import SimpleITK as sitk
import torch

from napari_deepwarp.core import metrics as M
from napari_deepwarp.core import verdict as V
from napari_deepwarp.core.affine import AffineSettings, align_affine, label_driven
from napari_deepwarp.core.finetune import FinetuneSettings, finetune_network
from napari_deepwarp.core.io import InputError, check_image, check_labels_match, check_overlap
from napari_deepwarp.core.models.registry import RegistrationModel, create_model
from napari_deepwarp.core.precision import autocast, precision_name, resolve_precision
from napari_deepwarp.core.preprocess import (
    IntensityPreset,
    apply_window,
    detect_modality,
    intensity_window,
    network_input,
    resample,
    working_grid,
)
from napari_deepwarp.core.progress import Progress
from napari_deepwarp.core.refine import RefineSettings, for_model, refine_field
from napari_deepwarp.core.spatial import jacobian_determinant, sample, warp
from napari_deepwarp.core.supervision import check_landmarks, supervision_on_grid
from napari_deepwarp.core.volume import Grid, Volume

AFFINE_ONLY = "affine"
#: ``model`` that picks the shipped checkpoint for the pair's modality (see :func:`_auto_model`)
AUTO = "auto"
#: what to hand back when the deformable stage is worse than its baseline (the affine stage)
IF_WORSE = ("keep", "affine", "fail")


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then MPS, then CPU; a named device that is missing is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available here; use --device cpu or auto")
    if device == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise InputError("--device mps: Apple MPS is not available here; use --device cpu or auto")
    if device not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or mps")
    return torch.device(device)


@dataclass
class RegistrationSettings:
    """model: registry name, ``"affine"`` (the affine stage alone) or ``"auto"`` (the shipped
    checkpoint for the pair's modality, see :func:`_auto_model`); if_worse: what to hand back when
    the verdict is "worse than affine", ``"affine"`` (the affine stage's result), ``"keep"``
    (the deformable one) or ``"fail"`` (raise :class:`WorseThanBaseline`); affine: run the affine
    stage; working_spacing: mm (None: chosen from the image, see ``working_grid``); max_size:
    largest working-grid side when the spacing is chosen (None: the auto checkpoint's size, else
    96); finetune: instance optimisation (steps=0: off);
    refine: optimise the field itself after the network (steps=0: off); affine_from: what the
    affine stage aligns, ``"images"`` (mutual information) or ``"labels"`` (the two label maps,
    see :func:`affine.label_driven`; both must be given); precision: the network's compute
    precision, ``"auto"`` (bfloat16 where the device computes it natively, else float32),
    ``"float32"``, ``"bfloat16"`` or ``"float16"`` (see :mod:`precision`)."""

    model: str = "voxelmorph"
    if_worse: str = "affine"
    affine: bool = True
    affine_from: str = "images"
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    modality: str = "auto"
    working_spacing: float | None = None
    max_size: int | None = 96
    affine_settings: AffineSettings = field(default_factory=AffineSettings)
    finetune: FinetuneSettings = field(default_factory=lambda: FinetuneSettings(steps=0))
    refine: RefineSettings = field(default_factory=lambda: RefineSettings(steps=0))


@dataclass
class RegistrationResult:
    """Everything a run produces, on the fixed image's grid unless said otherwise.

    displacement: ``(z, y, x, 3)`` float32, (x, y, z) mm, fixed points -> moving points (total).
    deformation: the same without the affine part (``d`` above); None until
    :func:`deformation_of` computes it.
    jacobian: ``(z, y, x)`` determinant of the total map. working_field: ``(1, 3, D, H, W)`` voxels
    on ``working_grid`` (None for affine only).
    """

    fixed: Volume
    moving: Volume
    warped: Volume
    displacement: np.ndarray
    deformation: np.ndarray | None
    affine: sitk.AffineTransform | None
    jacobian: np.ndarray
    metrics: dict
    warped_labels: Volume | None = None
    working_grid: Grid | None = None
    working_field: torch.Tensor | None = None
    #: the inverse of ``working_field`` on ``working_grid`` (a diffeomorphic refinement's)
    inverse_field: torch.Tensor | None = None
    model: RegistrationModel | None = None
    verdict: V.Verdict | None = None
    #: the deformable ``(working grid, field)`` that the guard set aside (see :func:`alternative`)
    rejected: tuple | None = None
    context: _Run | None = field(default=None, repr=False)


def _matrix(transform: sitk.AffineTransform | None) -> np.ndarray:
    """4x4 world matrix of an ITK affine (identity for None)."""
    m = np.eye(4)
    if transform is not None:
        a = np.array(transform.GetMatrix()).reshape(3, 3)
        c, t = np.array(transform.GetCenter()), np.array(transform.GetTranslation())
        m[:3, :3], m[:3, 3] = a, c + t - a @ c
    return m


def _to_tensor(array: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)


def _apply_homogeneous(matrix: np.ndarray, coords: torch.Tensor) -> torch.Tensor:
    """Apply a 4x4 matrix to a ``(1, 3, D, H, W)`` point tensor (result in the same layout)."""
    from napari_deepwarp.core.spatial import transform_points

    out = transform_points(coords.permute(0, 2, 3, 4, 1), matrix)
    return out.permute(0, 4, 1, 2, 3)


def _working_field_on(fixed: Grid, working: Grid, working_field: torch.Tensor, device):
    """The working-grid field sampled (trilinear, clamped) at every fixed voxel:
    ``(1, 3, D, H, W)`` in working voxels (z, y, x), float32."""
    from napari_deepwarp.core.spatial import resample_affine

    to_working = working.world_to_index_matrix() @ fixed.index_to_world_matrix()
    field = working_field.detach().to(device=device, dtype=torch.float32)
    return resample_affine(field, to_working, fixed.shape, "linear", "border")


def physical_map(
    fixed: Grid,
    affine: sitk.AffineTransform | None,
    working: Grid | None,
    working_field: torch.Tensor | None,
    device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """World points of every fixed voxel ``x``, ``x + d(x)`` and their images ``y = A(x + d(x))``.

    Returns ``(x, x + d, y)``, each ``(1, 3, D, H, W)`` (x, y, z) mm on the fixed grid, stored
    channels-last (``torch.channels_last_3d``: ``t[0].permute(1, 2, 3, 0)`` is contiguous). ``d``
    is the working-grid field sampled (trilinear, clamped at the border) at each fixed voxel.
    The 4x4 matrices are composed on the host in float64; no index grid is materialised.
    :func:`warp_full_resolution` gives the warped volumes, fields and Jacobian in one pass.
    """
    from napari_deepwarp.core.spatial import affine_points, transform_points

    x = affine_points(fixed.index_to_world_matrix(), fixed.shape, device)
    moved = x
    if working_field is not None:
        u = _working_field_on(fixed, working, working_field, device)
        step = working.index_to_world_matrix()[:3, :3]
        moved = transform_points(x, None, u, step)
    y = moved if affine is None else transform_points(moved, _matrix(affine))
    return tuple(t.permute(0, 4, 1, 2, 3) for t in (x, moved, y))  # type: ignore[return-value]


def _label_source(vol: Volume, device) -> torch.Tensor:
    """Labels as floats that hold every value exactly: ``(1, 1, D, H, W)``."""
    a = vol.array
    big = a.size and max(abs(float(a.min())), abs(float(a.max()))) > 2**24
    return torch.from_numpy(a.astype(np.float64 if big else np.float32))[None, None].to(device)


def warp_volume(vol: Volume, y: torch.Tensor, fixed: Grid, labels: bool = False) -> Volume:
    """Sample ``vol`` at world points ``y (1, 3, D, H, W)`` (ITK boundary rules) onto ``fixed``.

    ``y`` may be stored channels-first or channels-last (as :func:`physical_map` returns it).
    """
    from napari_deepwarp.core.spatial import sample_at

    points = y.permute(0, 2, 3, 4, 1)
    to_index = vol.grid.world_to_index_matrix()
    if labels:
        src = _label_source(vol, y.device)
        out = sample_at(src, points, to_index, "nearest", "itk")
        array = out[0, 0].cpu().numpy().astype(vol.array.dtype)
    else:
        src = _to_tensor(vol.array, y.device)
        array = sample_at(src, points, to_index, "linear", "itk")[0, 0].cpu().numpy()
    return Volume.on_grid(array, fixed, vol.name)


@dataclass
class FullResolution:
    """What the warp stage produces on the fixed grid (see :func:`warp_full_resolution`)."""

    warped: Volume
    warped_labels: Volume | None
    displacement: np.ndarray
    deformation: np.ndarray | None
    jacobian: np.ndarray


def warp_full_resolution(
    fixed: Grid,
    affine: sitk.AffineTransform | None,
    working: Grid | None,
    working_field: torch.Tensor | None,
    moving: Volume,
    moving_labels: Volume | None,
    device,
    with_deformation: bool = True,
) -> FullResolution:
    """The warp stage in one pass: same results as :func:`physical_map` + :func:`warp_volume`
    (image, labels) + ``y - x``, ``x + d - x`` and ``jacobian_determinant`` of the total map in
    fixed voxels, to float rounding.

    Every output is an affine function of the fixed index ``p`` plus a 3x3 matrix times the
    upsampled working field ``u(p)``; the 4x4 matrices are composed on the host in float64, and
    per voxel only ``u``, the moving positions (shared by image and labels, with ITK's inside
    mask), the displacement and ``det(B + C grad u) = det(C) det(C^-1 B + grad u)`` are computed.
    displacement / deformation: ``(z, y, x, 3)`` float32 (x, y, z) mm; jacobian ``(z, y, x)``.
    ``with_deformation=False`` leaves the deformation out (None; see :func:`deformation_of`).
    """
    from napari_deepwarp.core.spatial import affine_points, sample_many_at

    shape = fixed.shape
    m_fixed = fixed.index_to_world_matrix()
    a = _matrix(affine)
    u, step = None, np.zeros((3, 3))
    if working_field is not None:
        u = _working_field_on(fixed, working, working_field, device)
        step = working.index_to_world_matrix()[:3, :3]
    # Moving voxel position of fixed voxel p: W_m A (M_f p + S u(p)).
    to_moving = moving.grid.world_to_index_matrix() @ a
    sources = [(_to_tensor(moving.array, device), "linear")]
    same = moving_labels is not None and moving_labels.grid.same_as(moving.grid, tol=1e-6)
    if same:
        sources.append((_label_source(moving_labels, device), "nearest"))
    extra = {} if u is None else {"extra": u, "extra_matrix": to_moving[:3, :3] @ step}
    if same and sources[1][0].dtype != sources[0][0].dtype:
        sources[0] = (sources[0][0].to(sources[1][0].dtype), "linear")
    outs = sample_many_at(sources, None, to_moving @ m_fixed, "itk", shape=shape, **extra)
    warped = Volume.on_grid(outs[0][0, 0].float().cpu().numpy(), fixed, moving.name)
    warped_labels = None
    if moving_labels is not None:
        if same:
            lab = outs[1][0, 0].cpu().numpy().astype(moving_labels.array.dtype)
            warped_labels = Volume.on_grid(lab, fixed, moving_labels.name)
        else:
            labels_map = moving_labels.grid.world_to_index_matrix() @ a
            extra_l = {} if u is None else {"extra": u, "extra_matrix": labels_map[:3, :3] @ step}
            src = _label_source(moving_labels, device)
            out = sample_many_at(
                [(src, "nearest")], None, labels_map @ m_fixed, "itk", shape=shape, **extra_l
            )[0]
            lab = out[0, 0].cpu().numpy().astype(moving_labels.array.dtype)
            warped_labels = Volume.on_grid(lab, fixed, moving_labels.name)
    del outs, sources
    # y - x = (A M_f - M_f) p + A S u(p): channels-last, so (z, y, x, 3) with no copy.
    disp = affine_points(a @ m_fixed - m_fixed, shape, device)
    if u is not None:
        linear = torch.as_tensor(a[:3, :3] @ step, dtype=torch.float32, device=disp.device)
        disp.view(-1, 3).addmm_(u.reshape(3, -1).T, linear.T)
    displacement = disp[0].cpu().numpy()
    del disp
    deformation = None
    if with_deformation:
        deformation = _deformation_mm(u, step, shape)
    # Total map in fixed voxels: I + grad u_vox = B + C grad u with B = W_f A M_f, C = W_f A S.
    w_fixed = fixed.world_to_index_matrix()[:3, :3]
    b = w_fixed @ a[:3, :3] @ m_fixed[:3, :3]
    if u is None:
        jacobian = np.full(shape, np.linalg.det(b), np.float32)
    else:
        c = w_fixed @ a[:3, :3] @ step
        det = jacobian_determinant(u, base=np.linalg.solve(c, b))
        jacobian = det.mul_(float(np.linalg.det(c)))[0, 0].cpu().numpy()
    return FullResolution(warped, warped_labels, displacement, deformation, jacobian)


def _deformation_mm(u: torch.Tensor | None, step: np.ndarray, shape) -> np.ndarray:
    """``S u`` at every fixed voxel: ``(z, y, x, 3)`` float32 (x, y, z) mm (zeros without u)."""
    if u is None:
        return np.zeros((*shape, 3), np.float32)
    s_t = torch.as_tensor(step, dtype=torch.float32, device=u.device)
    return torch.mm(u.reshape(3, -1).T, s_t.T).view(*shape, 3).cpu().numpy()


def deformation_of(result: RegistrationResult) -> np.ndarray:
    """The result's deformation ``d`` (the map without its affine part) on the fixed grid,
    ``(z, y, x, 3)`` float32 (x, y, z) mm: computed on first use and kept in
    ``result.deformation`` (a run does not make these 120 MB for a brain unless asked, e.g.
    for the fixed labels taken into moving space)."""
    if result.deformation is None:
        step, u = np.zeros((3, 3)), None
        if result.working_field is not None:
            grid, field_w = result.working_grid, result.working_field
            u = _working_field_on(result.fixed.grid, grid, field_w, field_w.device)
            step = grid.index_to_world_matrix()[:3, :3]
        result.deformation = _deformation_mm(u, step, result.fixed.shape)
    return result.deformation


def working_field_image(
    fixed: Grid, working: Grid, working_field: torch.Tensor, corners: np.ndarray | None = None
) -> sitk.Image:
    """The working-grid field as an ITK displacement image ((x, y, z) mm, float64) that an ITK
    ``DisplacementFieldTransform`` turns into exactly the deformation of
    :func:`warp_full_resolution` at every fixed voxel.

    The field is padded by edge replication until it covers every fixed voxel (ITK returns no
    displacement outside a field), so ITK's linear interpolation equals the clamped trilinear
    upsampling. On a 256x256x160 brain this is about 90x90x60 voxels (13 MB) instead of the
    full grid (250 MB of float64), which is what makes ``transform.h5`` small and fast to write.
    ``corners``: ``(N, 3)`` world points to cover instead of the fixed grid's corners.
    """
    from napari_deepwarp.core import io

    u = working_field.detach().to("cpu", torch.float64)[:1]
    corners = fixed.corners_world() if corners is None else corners
    index = corners @ working.world_to_index_matrix()[:3, :3].T
    index += working.world_to_index_matrix()[:3, 3]
    last = np.array(working.shape) - 1
    before = np.maximum(0, -np.floor(index.min(0) - 1e-6)).astype(int)  # (z, y, x)
    after = np.maximum(0, np.ceil(index.max(0) + 1e-6) - last).astype(int)
    pad = [int(v) for k in (2, 1, 0) for v in (before[k], after[k])]  # x first, as F.pad wants
    u = torch.nn.functional.pad(u, pad, mode="replicate")[0]
    step = torch.from_numpy(working.index_to_world_matrix()[:3, :3])
    physical = torch.einsum("ij,jzyx->zyxi", step, u).numpy()
    origin = working.index_to_world_matrix() @ np.array([*(-before), 1.0])
    grid = Grid(physical.shape[:3], working.spacing, tuple(origin[:3]), working.direction)
    return io.field_to_sitk(physical, grid)


def inverse_transform(result: RegistrationResult) -> sitk.Transform:
    """The ITK transform of the run's inverse map, moving points -> fixed points:
    ``y -> z + w(z)``, ``z = A^-1 y`` (``w``: ``result.inverse_field``, padded to cover every
    moving voxel's ``z``). Resampling fixed-space labels onto the moving grid with it takes them
    into moving space."""
    a_inv = np.linalg.inv(_matrix(result.affine))
    corners = result.moving.grid.corners_world() @ a_inv[:3, :3].T + a_inv[:3, 3]
    field = working_field_image(
        result.fixed.grid, result.working_grid, result.inverse_field, corners=corners
    )
    inverse_affine = sitk.AffineTransform(3)
    inverse_affine.SetMatrix(a_inv[:3, :3].ravel().tolist())
    inverse_affine.SetTranslation(a_inv[:3, 3].tolist())
    # ITK applies the last transform of a composite first: A^-1, then the field.
    return sitk.CompositeTransform(
        [sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)), inverse_affine]
    )


def _identity_warp(vol: Volume, fixed: Grid, labels: bool) -> Volume:
    return resample(vol, fixed, None, "nearest" if labels else "linear")


class WorseThanBaseline(RuntimeError):
    """``if_worse="fail"`` and the deformable stage made the pair worse (message: the verdict)."""


class NonFiniteField(RuntimeError):
    """The deformable stage gave a displacement with NaN or infinite values: there is no result
    to hand back, whatever ``if_worse`` says (message: what happened and what to try)."""


@dataclass
class _Run:
    """What the stages of one :func:`register` call share (inputs, choices, measurements)."""

    fixed: Volume
    moving: Volume
    settings: RegistrationSettings
    fixed_labels: Volume | None
    moving_labels: Volume | None
    fixed_landmarks: np.ndarray | None
    moving_landmarks: np.ndarray | None
    device: torch.device
    dtype: torch.dtype
    fixed_window: tuple[float, float]
    moving_window: tuple[float, float]
    seconds: dict
    t0: float
    affine: sitk.AffineTransform | None = None
    check: _QualityCheck | None = None
    auto: dict | None = None
    refine_used: RefineSettings | None = None
    #: ``(grid, field)``: the inverse of a diffeomorphic refinement's field, voxels of ``grid``
    inverse: tuple | None = None
    refine_steps_run: int = 0
    stage: str = "the network"


@dataclass
class _QualityCheck:
    """The verdict's strided grid (see :mod:`verdict`), the fixed foreground on it, and the
    similarity of the unregistered pair and after the affine stage, measured once per run."""

    stride: int
    grid: Grid
    fixed_n: np.ndarray
    moving_before: np.ndarray  # the unregistered moving image on the strided grid, windowed
    mask: np.ndarray
    modality: V.Modality
    before: float
    baseline: float


def register(
    fixed: Volume,
    moving: Volume,
    settings: RegistrationSettings | None = None,
    model: RegistrationModel | None = None,
    fixed_labels: Volume | None = None,
    moving_labels: Volume | None = None,
    fixed_landmarks=None,
    moving_landmarks=None,
) -> Generator[Progress, None, RegistrationResult]:
    """Register ``moving`` to ``fixed``; yields :class:`Progress`, returns a result.

    The stages: inputs checked; the affine stage; the pair's modality and the baseline
    similarity (:mod:`verdict`); with ``settings.model == "auto"`` the shipped checkpoint for
    that modality; the network, fine-tuning, refinement; one full-resolution warp; metrics and
    the verdict; where the verdict is "worse than affine" and ``settings.if_worse`` is
    ``"affine"``, the affine stage's result instead (``"fail"``: :class:`WorseThanBaseline`).

    ``model``: a loaded network (e.g. from a checkpoint); None builds ``settings.model`` untrained
    (or, for ``"auto"``, loads the shipped checkpoint chosen for the pair).
    ``fixed_landmarks`` / ``moving_landmarks``: corresponding points ``(N, 3)``, physical
    (x, y, z) mm; they give the TRE metrics and, with a weight, supervise fine-tuning/refinement
    (as label maps do with ``labels_weight``). While fine-tuning or refining, every few steps an
    event's ``preview`` holds ``"warped"``: the moving image (intensity-normalised) warped by the
    current field, a :class:`Volume` on the working grid.
    Closing the generator cancels at the next step; nothing is changed on the inputs.
    """
    # A copy: "auto" fills in the model it chose, and the caller may reuse its settings.
    run = _prepare(
        fixed, moving, replace(settings or RegistrationSettings()), fixed_labels, moving_labels,
        fixed_landmarks, moving_landmarks,
    )  # fmt: skip
    yield from _affine_stage(run)
    run.check = _quality_check(run)
    if run.settings.model == AUTO and model is None:
        model = _auto_model(run)
    grid, field_w, model = yield from _network_stage(run, model)
    if field_w is not None and not bool(torch.isfinite(field_w).all()):
        share = float((~torch.isfinite(field_w)).float().mean())
        raise NonFiniteField(
            f"the displacement field after {run.stage} is not finite ({100 * share:.1f} % of "
            "its values are NaN or infinite); nothing is handed back. Run again with "
            "--precision float32 (in the widget: precision float32), or without fine-tuning"
        )
    result = yield from _finish(run, grid, field_w, model)
    verdict = result.verdict
    if verdict is None or not verdict.worse or run.settings.if_worse == "keep":
        return result
    if run.settings.if_worse == "fail":
        raise WorseThanBaseline(verdict.line())
    # Hand back the simpler stage's result; the network's stays one call away (alternative()).
    fallback = yield from _finish(run, None, None, model, judged=verdict)
    fallback.rejected = (grid, field_w)
    return fallback


def alternative(result: RegistrationResult) -> Generator[Progress, None, RegistrationResult]:
    """The other result of the same run: the deformable one that the guard set aside
    (``result.rejected``), or the affine stage's where the deformable one was handed back.
    Same verdict, with ``returned`` saying which one this is."""
    run = result.context
    if run is None or result.verdict is None:
        raise ValueError("this result has no other stage to switch to")
    if result.rejected is not None:
        grid, field_w = result.rejected
        other = yield from _finish(run, grid, field_w, result.model)
        other.verdict.if_worse = "keep"  # the user's choice
    elif result.working_field is None:
        raise ValueError("this result is already the simpler stage's")
    else:
        other = yield from _finish(run, None, None, result.model, judged=result.verdict)
        other.rejected = (result.working_grid, result.working_field)
    other.metrics["verdict"] = other.verdict.as_dict()
    # Its own cost: one warp and the measurements, not the time since the run started.
    seconds = {k: run.seconds[k] for k in ("warp", "metrics")}
    other.metrics["seconds"] = {**seconds, "total": sum(seconds.values())}
    return other


def _prepare(
    fixed, moving, settings, fixed_labels, moving_labels, fixed_landmarks, moving_landmarks
) -> _Run:
    """Check the inputs (one clear error each) and fix the device, precision and windows."""
    t0 = time.perf_counter()
    check_image(fixed, "fixed")
    check_image(moving, "moving")
    if fixed_labels is not None:
        check_labels_match(fixed_labels, fixed, "fixed")
    if moving_labels is not None:
        check_labels_match(moving_labels, moving, "moving")
    check_overlap(fixed, moving)
    if fixed_landmarks is not None or moving_landmarks is not None:
        fixed_landmarks, moving_landmarks = check_landmarks(fixed_landmarks, moving_landmarks)
    if settings.if_worse not in IF_WORSE:
        raise InputError(f"if_worse must be one of {IF_WORSE}, not {settings.if_worse!r}")
    device = resolve_device(settings.device)
    dtype = resolve_precision(settings.precision, device)
    torch.manual_seed(settings.seed)
    preset = IntensityPreset(settings.modality)
    return _Run(
        fixed, moving, settings, fixed_labels, moving_labels, fixed_landmarks, moving_landmarks,
        device, dtype, intensity_window(fixed.array, preset), intensity_window(moving.array, preset),
        {"preprocess": time.perf_counter() - t0}, t0,
    )  # fmt: skip


def _affine_stage(run: _Run) -> Generator[Progress, None, None]:
    """Rigid then affine (images or label maps); sets ``run.affine`` (None when skipped)."""
    settings = run.settings
    if not settings.affine and settings.model != AFFINE_ONLY:
        return
    t = time.perf_counter()
    pair = (run.fixed, run.moving, settings.affine_settings)
    if settings.affine_from == "labels":
        if run.fixed_labels is None or run.moving_labels is None:
            raise InputError(
                "an affine stage from labels needs label maps on both sides; add "
                "--fixed-labels and --moving-labels, or align from the images"
            )
        pair = label_driven(run.fixed_labels, run.moving_labels, settings.affine_settings)
    elif settings.affine_from != "images":
        raise InputError(f"affine_from must be 'images' or 'labels', not {settings.affine_from!r}")
    try:
        affine_result = yield from align_affine(*pair)
    except RuntimeError as exc:
        reason = next((ln for ln in str(exc).splitlines() if "ITK ERROR" in ln), str(exc))
        reason = reason.split(": ", 2)[-1].strip()[:160]
        raise InputError(
            f"{run.moving.name or 'moving'}: the affine stage failed ({reason}); check that the "
            "images show the same anatomy and that their headers (origin, direction) are "
            "right, or skip the stage with --no-affine"
        ) from None
    run.affine = affine_result.transform
    run.seconds["affine"] = time.perf_counter() - t


def _quality_check(run: _Run) -> _QualityCheck:
    """The pair's modality and the baseline similarity, on the verdict's strided grid."""
    t = time.perf_counter()
    stride, grid = V.strided_grid(run.fixed.grid)
    s = slice(None, None, stride)
    fixed_n = apply_window(run.fixed.array[s, s, s], run.fixed_window)
    mask = V.foreground(fixed_n)
    moving_before = apply_window(resample(run.moving, grid).array, run.moving_window)
    moving_affine = moving_before
    if run.affine is not None:
        moving_affine = apply_window(
            resample(run.moving, grid, run.affine).array, run.moving_window
        )
    modality = V.decide_modality(
        fixed_n, moving_affine, mask, detect_modality(run.fixed.array),
        detect_modality(run.moving.array),
    )  # fmt: skip
    name = modality.similarity
    before = V.similarity(name, fixed_n, moving_before, mask, grid.spacing)
    baseline = before
    if run.affine is not None:
        baseline = V.similarity(name, fixed_n, moving_affine, mask, grid.spacing)
    run.seconds["verdict"] = time.perf_counter() - t
    return _QualityCheck(stride, grid, fixed_n, moving_before, mask, modality, before, baseline)


def _auto_model(run: _Run) -> RegistrationModel | None:
    """``--model auto``: the shipped checkpoint for the pair's modality (the default one for one
    modality, a multi-modal model's for two); its working size and spacing unless set. None
    (the affine stage alone) when no shipped checkpoint fits."""
    from napari_deepwarp.core.checkpoint import default_checkpoint, working_size

    modality = run.check.modality
    kind = "two modalities" if modality.multimodal else "one modality"
    path = default_checkpoint(multimodal=modality.multimodal)
    settings = run.settings
    if path is None:
        settings.model = AFFINE_ONLY
        run.auto = {"checkpoint": None, "line": f"{kind}, as {modality.reason}; no shipped "
                    "checkpoint fits, so the affine stage alone"}  # fmt: skip
        return None
    model, card = _load_shipped(path)
    settings.model = card["architecture"]
    if settings.max_size is None:
        settings.max_size = working_size(card, refining=settings.refine.steps > 0)
    if settings.working_spacing is None:
        settings.working_spacing = card.get("working_spacing_mm")
    similarity = "mutual information" if modality.multimodal else "local NCC"
    refining = f", refinement with {similarity}" if settings.refine.steps > 0 else ""
    run.auto = {
        "modality": "multi" if modality.multimodal else "mono",
        "checkpoint": path.name,
        "path": str(path),
        "line": f"{kind}, as {modality.reason}; using {path.name}{refining}",
    }
    return model


@functools.lru_cache(maxsize=2)
def _load_shipped(path) -> tuple[RegistrationModel, dict]:
    """A shipped checkpoint, loaded once per process (``register-batch`` and the widget register
    many pairs; fine-tuning works on a copy, so the cached network never changes)."""
    from napari_deepwarp.core.checkpoint import load_checkpoint

    return load_checkpoint(path, device="cpu")


def _network_stage(run: _Run, model: RegistrationModel | None) -> Generator:
    """Predict, fine-tune, refine; returns ``(grid, field, model)`` (None, None, None for the
    affine stage alone). The field: ``(1, 3, D, H, W)`` voxels of ``grid`` (the working grid, or
    the refinement grid of ``refine.spacing_mm``), float32. With ``model == "affine"`` and
    refinement on, the field is refined from zero (no network)."""
    settings = run.settings
    if settings.model == AFFINE_ONLY:
        if settings.refine.steps <= 0:
            return None, None, None
        return (yield from _refine_stage(run, None, None, None, None, None, model=None))
    if model is None:
        model = create_model(settings.model)
    fixed, moving, device = run.fixed, run.moving, run.device
    t = time.perf_counter()
    yield Progress(0, 1, "predicting the deformation", stage="predict")
    max_size = settings.max_size or 96
    grid = working_grid(
        fixed,
        settings.working_spacing,
        max_size,
        model.size_multiple,
        model=settings.model,
        axes=model.working_axes,
    )
    fixed_w = network_input(fixed, grid, run.fixed_window)
    moving_w = network_input(moving, grid, run.moving_window, run.affine)
    layout = torch.channels_last_3d if model.channels_last else torch.contiguous_format
    fix_t, mov_t = (
        _to_tensor(a, device).contiguous(memory_format=layout) for a in (fixed_w, moving_w)
    )
    model = model.to(device, memory_format=layout).eval()
    with torch.no_grad(), autocast(device, run.dtype):
        field_w = model(mov_t, fix_t).displacement
    field_w = field_w.float()
    run.seconds["predict"] = time.perf_counter() - t
    yield Progress(1, 1, "predicted the deformation", stage="predict")
    supervision = None
    if _supervised(settings):
        supervision = supervision_on_grid(
            grid, run.affine, device, run.fixed_labels, run.moving_labels,
            run.fixed_landmarks, run.moving_landmarks,
        )  # fmt: skip
    if settings.finetune.steps > 0:
        t = time.perf_counter()
        tuned = yield from _with_preview(
            finetune_network(model, mov_t, fix_t, settings.finetune, supervision, run.dtype),
            mov_t,
            grid,
        )
        field_w, model = tuned.displacement, tuned.model
        run.seconds["finetune"] = time.perf_counter() - t
        run.stage = "fine-tuning"
    if settings.refine.steps > 0:
        return (yield from _refine_stage(run, grid, field_w, mov_t, fix_t, supervision, model))
    return grid, field_w, model


#: the refinement grid's spacing for ``--model affine --refine fast`` (no network grid to use):
#: a little finer than the 96-voxel working grid of a brain (about 2.7 mm)
FAST_REFINEMENT_SPACING_MM = 2.0


def refinement_grid(
    fixed: Volume, working: Grid | None, spacing_mm: float, max_voxels: int
) -> Grid:
    """The grid that refinement with ``spacing_mm`` works on: isotropic over the fixed image's
    foreground, at ``spacing_mm`` or the fixed image's finest spacing (the coarser), coarsened
    until it holds at most ``max_voxels``; never coarser than the network's ``working`` grid."""
    spacing = max(float(spacing_mm), min(fixed.spacing))
    if working is not None:
        spacing = min(spacing, working.spacing[0])
    while True:
        grid = working_grid(fixed, spacing, multiple=8, model="refinement")
        if int(np.prod(grid.shape)) <= max_voxels:
            return grid
        spacing *= (np.prod(grid.shape) / max_voxels) ** (1 / 3) * 1.01


def field_on_grid(field_w: torch.Tensor, working: Grid, target: Grid, device) -> torch.Tensor:
    """A ``(1, 3, D, H, W)`` field in voxels of ``working`` resampled onto ``target`` (trilinear,
    clamped) and expressed in voxels of ``target``."""
    u = _working_field_on(target, working, field_w, device)
    to_target = target.world_to_index_matrix()[:3, :3] @ working.index_to_world_matrix()[:3, :3]
    m = torch.as_tensor(to_target, dtype=u.dtype, device=u.device)
    return torch.einsum("ij,bjdhw->bidhw", m, u)


def _refine_stage(run: _Run, grid, field_w, mov_t, fix_t, supervision, model) -> Generator:
    """Field refinement from ``field_w`` on ``grid`` (None: from zero); on a grid of its own
    when ``refine.spacing_mm`` is set (see :func:`refinement_grid`). Returns
    ``(grid, field, model)``; keeps the inverse field on ``run`` when there is one."""
    settings, device = run.settings, run.device
    t = time.perf_counter()
    refine = settings.refine
    if refine.spacing_mm is not None or grid is None:
        # without a network (--model affine) fast refinement gets a grid like the network's
        spacing = refine.spacing_mm or FAST_REFINEMENT_SPACING_MM
        target = refinement_grid(run.fixed, grid, spacing, refine.max_voxels)
        if grid is not None:
            field_w = field_on_grid(field_w, grid, target, device)
        fix_t = _to_tensor(network_input(run.fixed, target, run.fixed_window), device)
        mov_t = _to_tensor(network_input(run.moving, target, run.moving_window, run.affine), device)
        if _supervised(settings):
            supervision = supervision_on_grid(
                target, run.affine, device, run.fixed_labels, run.moving_labels,
                run.fixed_landmarks, run.moving_landmarks,
            )  # fmt: skip
        grid = target
    # "auto" follows the pair: mutual information for two modalities or a multi-modal model
    multimodal = (model is not None and model.multimodal) or run.check.modality.multimodal
    run.refine_used = for_model(refine, multimodal)
    refined = yield from _with_preview(
        refine_field(mov_t, fix_t, field_w, run.refine_used, supervision), mov_t, grid
    )
    run.inverse = None if refined.inverse is None else (grid, refined.inverse)
    run.refine_steps_run = refined.steps_run
    run.seconds["refine"] = time.perf_counter() - t
    run.stage = "refinement"
    return grid, refined.displacement, model


def _finish(
    run: _Run,
    grid: Grid | None,
    field_w: torch.Tensor | None,
    model: RegistrationModel | None,
    judged: V.Verdict | None = None,
) -> Generator[Progress, None, RegistrationResult]:
    """The warp stage, the metrics and the verdict of the map ``y = A(x + d(x))`` with the
    working-grid ``field_w`` (None: the affine stage alone, or nothing without one).

    ``judged``: the verdict of the deformable result this one replaces (the guard's fallback):
    it is kept, with ``returned`` naming the stage handed back."""
    fixed, moving, device = run.fixed, run.moving, run.device
    t = time.perf_counter()
    yield Progress(0, 1, "warping at full resolution", stage="warp")
    full = warp_full_resolution(
        fixed.grid, run.affine, grid, field_w, moving, run.moving_labels, device, False
    )
    run.seconds["warp"] = time.perf_counter() - t

    t = time.perf_counter()
    yield Progress(0, 1, "measuring", stage="metrics")
    deformable = field_w is not None
    metrics = _metrics(run, full, grid, field_w, deformable)
    if judged is None:
        verdict = _verdict(run, full, metrics, deformable)
    else:  # a copy: the judged result keeps its own
        verdict = replace(judged, returned=judged.baseline, if_worse=run.settings.if_worse)
    metrics["verdict"] = verdict.as_dict()
    if run.auto is not None:
        metrics["auto"] = run.auto
    run.seconds["metrics"] = time.perf_counter() - t
    run.seconds["total"] = time.perf_counter() - run.t0
    metrics["seconds"] = dict(run.seconds)
    yield Progress(1, 1, "done", stage="done")
    return RegistrationResult(
        fixed=fixed,
        moving=moving,
        warped=full.warped,
        displacement=full.displacement,
        deformation=full.deformation,
        affine=run.affine,
        jacobian=full.jacobian,
        metrics=metrics,
        warped_labels=full.warped_labels,
        working_grid=grid,
        working_field=field_w,
        inverse_field=_inverse_of(run, grid, field_w),
        model=model,
        verdict=verdict,
        context=run,
    )


def _inverse_of(run: _Run, grid: Grid | None, field_w: torch.Tensor | None):
    """The inverse of ``field_w`` that a diffeomorphic refinement gave, else None."""
    if run.inverse is None or field_w is None or run.inverse[0] is not grid:
        return None
    return run.inverse[1]


def _metrics(run: _Run, full: FullResolution, grid, field_w, deformable: bool) -> dict:
    """``metrics.json``'s measurements of the result in ``full`` (see :class:`_Run`)."""
    settings, fixed, affine, check = run.settings, run.fixed, run.affine, run.check
    # Global NCC and MI on the verdict's strided grid (every s-th fixed voxel: the same points
    # at full resolution, a 1/s^3 sample), not a full-resolution pass per image.
    s = slice(None, None, check.stride)
    warped_n = apply_window(full.warped.array[s, s, s], run.moving_window)
    sim_before, sim_after = M.intensity_similarity(check.fixed_n, [check.moving_before, warped_n])
    # What the run did; the verdict says which stage's result these measurements describe.
    refine_used = run.refine_used
    network = settings.model != AFFINE_ONLY
    metrics: dict = {
        "model": settings.model,
        "device": str(run.device),
        "precision": precision_name(run.dtype) if network else None,
        "affine_stage": affine is not None,
        "affine_from": settings.affine_from if affine is not None else None,
        "finetune_steps": settings.finetune.steps if network else 0,
        "refine_steps": settings.refine.steps if refine_used else 0,
        "refine_preset": refine_used.preset if refine_used else None,
        "refine_steps_run": run.refine_steps_run if refine_used else 0,
        "refine_diffeomorphic": bool(refine_used and refine_used.diffeomorphic),
        "refine_similarity": refine_used.similarity if refine_used else None,
        "refine_reg_weight": refine_used.reg_weight if refine_used else None,
        "fixed_shape_zyx": list(fixed.shape),
        "working_grid": None
        if grid is None
        else {"shape_zyx": list(grid.shape), "spacing_mm": grid.spacing[0]},
        "folding_percent": M.folding_percent(full.jacobian),
        "sdlogj": M.sdlogj(full.jacobian),
        "ncc_before": sim_before["ncc"],
        "ncc_after": sim_after["ncc"],
        "mi_before": sim_before["mi"],
        "mi_after": sim_after["mi"],
        "similarity_stride": check.stride,
    }
    fixed_labels, moving_labels = run.fixed_labels, run.moving_labels
    if fixed_labels is not None and moving_labels is not None:
        stages = {"before": _identity_warp(moving_labels, fixed.grid, labels=True)}
        if affine is not None and deformable:
            stages["affine"] = resample(moving_labels, fixed.grid, affine, "nearest")
        stages["after"] = full.warped_labels
        overlaps = M.overlap_per_label_many(fixed_labels.array, [v.array for v in stages.values()])
        for name, per_label in zip(stages, overlaps):
            metrics[f"mean_dice_{name}"] = _mean(per_label, "dice")
            metrics[f"mean_jaccard_{name}"] = _mean(per_label, "jaccard")
            metrics[f"labels_{name}"] = {str(k): v for k, v in per_label.items()}
    if run.fixed_landmarks is not None:
        stages = {"before": None, "after": (affine, grid, field_w)}
        if affine is not None and deformable:
            stages["affine"] = (affine, None, None)
        for name, mapping in stages.items():
            points = run.fixed_landmarks
            mapped = points if mapping is None else map_points(points, *mapping)
            tre = M.tre_mm(mapped, run.moving_landmarks)
            metrics[f"tre_{name}_mm"] = tre["mean"]
            metrics[f"tre_{name}"] = tre
    return metrics


def _verdict(run: _Run, full: FullResolution, metrics: dict, deformable: bool) -> V.Verdict:
    """Judge the result in ``full`` against the stage before it (see :mod:`verdict`)."""
    check = run.check
    s = slice(None, None, check.stride)
    warped_n = apply_window(full.warped.array[s, s, s], run.moving_window)
    name = check.modality.similarity
    result = V.similarity(name, check.fixed_n, warped_n, check.mask, check.grid.spacing)
    # The affine stage alone is judged against the unregistered pair, the rest against it.
    has_affine = run.affine is not None and deformable
    baseline_name = "affine" if has_affine else "unregistered"
    baseline = check.baseline if has_affine else check.before
    stage = run.stage if deformable else "the affine stage"
    dice_base = metrics.get("mean_dice_affine" if has_affine else "mean_dice_before")
    dice_result = metrics.get("mean_dice_after")
    folding = metrics["folding_percent"]
    word, reason = V.judge(
        name, check.before, baseline, result, baseline_name, stage, dice_base, dice_result, folding
    )
    p1, p99 = M.jacobian_percentiles(full.jacobian[s, s, s], check.mask)
    modality = asdict(check.modality)
    return V.Verdict(
        word=word,
        reason=reason,
        baseline=baseline_name,
        similarity=name,
        similarity_before=check.before,
        similarity_baseline=baseline,
        similarity_result=result,
        modality=modality,
        folding_percent=metrics["folding_percent"],
        sdlogj=metrics["sdlogj"],
        jacobian_p1=p1,
        jacobian_p99=p99,
        dice_baseline=dice_base,
        dice_result=dice_result,
        if_worse=run.settings.if_worse,
        stride=check.stride,
        foreground_voxels=int(check.mask.sum()),
    )


def _supervised(settings: RegistrationSettings) -> bool:
    tune, refine = settings.finetune, settings.refine
    return (tune.steps > 0 and (tune.labels_weight > 0 or tune.landmarks_weight > 0)) or (
        refine.steps > 0 and (refine.labels_weight > 0 or refine.landmarks_weight > 0)
    )


def _with_preview(steps: Generator, moving_w: torch.Tensor, grid: Grid) -> Generator:
    """Pass ``steps``' events on, adding ``preview["warped"]`` where they carry a field, and
    pass what is sent in (e.g. :data:`progress.STOP`) on to ``steps``."""
    command = None
    try:
        while True:
            try:
                event = steps.send(command)
            except StopIteration as stop:
                return stop.value
            if event.preview and "displacement" in event.preview:
                with torch.no_grad():
                    warped = warp(moving_w, event.preview["displacement"].to(moving_w.dtype))
                event.preview["warped"] = Volume.on_grid(
                    warped[0, 0].cpu().numpy(), grid, "preview"
                )
            command = yield event
    finally:
        steps.close()


def map_points(
    points_xyz: np.ndarray,
    affine: sitk.AffineTransform | None,
    working: Grid | None,
    working_field: torch.Tensor | None,
) -> np.ndarray:
    """The registration's map ``y = A(x + d(x))`` at fixed points ``(N, 3)`` (x, y, z) mm.

    ``d`` is sampled from the working-grid field as :func:`physical_map` does (trilinear,
    clamped at the border), so a point gets the same image as the voxel it sits on.
    """
    points = np.asarray(points_xyz, dtype=np.float64)
    moved = points
    if working_field is not None:
        m = working.world_to_index_matrix()
        q = torch.as_tensor(points @ m[:3, :3].T + m[:3, 3], dtype=torch.float32)
        q = q.to(working_field.device).T.reshape(1, 3, -1, 1, 1)
        u = sample(working_field.float(), q, mode="linear", padding="border")
        u = u.reshape(3, -1).T.double().cpu().numpy()
        moved = points + u @ working.index_to_world_matrix()[:3, :3].T
    a = _matrix(affine)
    return moved @ a[:3, :3].T + a[:3, 3]


def _mean(per_label: dict, key: str) -> float | None:
    values = [v[key] for v in per_label.values()]
    return float(np.mean(values)) if values else None


#: what ``write_result`` can write: output name -> file name
OUTPUTS = {
    "warped": "warped.nii.gz",
    "labels": "warped_labels.nii.gz",
    "displacement": "displacement.nii.gz",
    "transform": "transform.h5",
    "inverse": "inverse_transform.h5",
    "metrics": "metrics.json",
}
OUTPUT_FILES = tuple(OUTPUTS.values())


def write_result(result: RegistrationResult, outdir, outputs=None) -> list:
    """Write a run's files into ``outdir`` atomically: all of them appear, or none.

    warped.nii.gz, warped_labels.nii.gz (with moving labels), displacement.nii.gz (the total
    physical field on the fixed grid), transform.h5 (the affine + the deformation as an ITK
    composite; its field is on the working grid, see :func:`working_field_image`; an
    affine-only run has no field), inverse_transform.h5 (moving points -> fixed points, where the
    run has an inverse: a diffeomorphic refinement's, see :func:`inverse_transform`),
    metrics.json. ``outputs``: the names of :data:`OUTPUTS` to
    write (None: all); the rest is not written (nor compressed: the displacement field's gzip is
    most of the writing time).
    """
    import json
    import shutil
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from napari_deepwarp.core import io

    wanted = set(OUTPUTS if outputs is None else outputs)
    unknown = wanted - set(OUTPUTS)
    if unknown:
        raise InputError(
            f"unknown output(s) {', '.join(sorted(unknown))}; choose from {', '.join(OUTPUTS)}"
        )
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=outdir))
    grid = result.fixed.grid

    def transform_file():
        field = None
        if result.working_field is not None:
            field = working_field_image(grid, result.working_grid, result.working_field)
        io.write_transform(io.composite_transform(result.affine, field), staging / "transform.h5")

    def images():
        if "warped" in wanted:
            io.write_volume(result.warped, staging / OUTPUTS["warped"])
        if "labels" in wanted and result.warped_labels is not None:
            io.write_volume(result.warped_labels, staging / OUTPUTS["labels"])
        if "transform" in wanted:
            transform_file()
        if "inverse" in wanted and result.inverse_field is not None:
            io.write_transform(inverse_transform(result), staging / OUTPUTS["inverse"])

    try:
        # The gzip of the (incompressible) displacement field takes most of the time; SimpleITK
        # lets go of the GIL while it writes, so the other files are written meanwhile.
        with ThreadPoolExecutor(1) as pool:
            field_written = None
            if "displacement" in wanted:
                field_written = pool.submit(
                    io.write_field, result.displacement, grid, staging / OUTPUTS["displacement"]
                )
            images()
            if field_written is not None:
                field_written.result()
        if "metrics" in wanted:
            (staging / OUTPUTS["metrics"]).write_text(
                json.dumps(result.metrics, indent=2), encoding="utf-8"
            )
        written = []
        for f in sorted(staging.iterdir()):
            target = outdir / f.name
            f.replace(target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
