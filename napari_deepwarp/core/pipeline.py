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

import time
from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch

from napari_deepwarp.core import metrics as M
from napari_deepwarp.core.affine import AffineSettings, align_affine
from napari_deepwarp.core.finetune import FinetuneSettings, finetune_network
from napari_deepwarp.core.io import InputError, check_image, check_labels_match, check_overlap
from napari_deepwarp.core.models.registry import RegistrationModel, create_model
from napari_deepwarp.core.preprocess import (
    IntensityPreset,
    apply_window,
    intensity_window,
    resample,
    working_grid,
)
from napari_deepwarp.core.progress import Progress
from napari_deepwarp.core.refine import RefineSettings, refine_field
from napari_deepwarp.core.spatial import identity_grid, jacobian_determinant, sample, warp
from napari_deepwarp.core.supervision import check_landmarks, supervision_on_grid
from napari_deepwarp.core.volume import Grid, Volume

AFFINE_ONLY = "affine"


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
    """model: registry name or ``"affine"`` (the affine stage alone); affine: run the affine stage;
    working_spacing: mm (None: chosen from the image, see ``working_grid``); max_size: largest
    working-grid side when the spacing is chosen; finetune: instance optimisation (steps=0: off);
    refine: optimise the field itself after the network (steps=0: off)."""

    model: str = "voxelmorph"
    affine: bool = True
    device: str = "auto"
    seed: int = 0
    modality: str = "auto"
    working_spacing: float | None = None
    max_size: int = 96
    affine_settings: AffineSettings = field(default_factory=AffineSettings)
    finetune: FinetuneSettings = field(default_factory=lambda: FinetuneSettings(steps=0))
    refine: RefineSettings = field(default_factory=lambda: RefineSettings(steps=0))


@dataclass
class RegistrationResult:
    """Everything a run produces, on the fixed image's grid unless said otherwise.

    displacement: ``(z, y, x, 3)`` float32, (x, y, z) mm, fixed points -> moving points (total).
    deformation: the same without the affine part (``d`` above), for the composite transform.
    jacobian: ``(z, y, x)`` determinant of the total map. working_field: ``(1, 3, D, H, W)`` voxels
    on ``working_grid`` (None for affine only).
    """

    fixed: Volume
    moving: Volume
    warped: Volume
    displacement: np.ndarray
    deformation: np.ndarray
    affine: sitk.AffineTransform | None
    jacobian: np.ndarray
    metrics: dict
    warped_labels: Volume | None = None
    working_grid: Grid | None = None
    working_field: torch.Tensor | None = None
    model: RegistrationModel | None = None


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
    """Apply a 4x4 matrix to a ``(1, 3, D, H, W)`` point tensor."""
    m = torch.as_tensor(matrix, dtype=coords.dtype, device=coords.device)
    return torch.einsum("ij,bjdhw->bidhw", m[:3, :3], coords) + m[:3, 3].view(1, 3, 1, 1, 1)


def physical_map(
    fixed: Grid,
    affine: sitk.AffineTransform | None,
    working: Grid | None,
    working_field: torch.Tensor | None,
    device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """World points of every fixed voxel ``x``, ``x + d(x)`` and their images ``y = A(x + d(x))``.

    Returns ``(x, x + d, y)``, each ``(1, 3, D, H, W)`` (x, y, z) mm on the fixed grid. ``d`` is the
    working-grid field sampled (trilinear, clamped at the border) at each fixed voxel.
    """
    idx = identity_grid(fixed.shape, device)
    x = _apply_homogeneous(fixed.index_to_world_matrix(), idx)
    moved = x
    if working_field is not None:
        to_working = working.world_to_index_matrix() @ fixed.index_to_world_matrix()
        q = _apply_homogeneous(to_working, idx)
        u = sample(working_field.float(), q, mode="linear", padding="border")
        step = torch.as_tensor(
            working.index_to_world_matrix()[:3, :3], dtype=u.dtype, device=u.device
        )
        moved = x + torch.einsum("ij,bjdhw->bidhw", step, u)
    y = _apply_homogeneous(_matrix(affine), moved)
    return x, moved, y


def warp_volume(vol: Volume, y: torch.Tensor, fixed: Grid, labels: bool = False) -> Volume:
    """Sample ``vol`` at world points ``y (1, 3, D, H, W)`` (ITK boundary rules) onto ``fixed``."""
    idx = _apply_homogeneous(vol.grid.world_to_index_matrix(), y)
    if labels:
        src = torch.from_numpy(
            vol.array.astype(np.float64 if vol.array.max() > 2**24 else np.float32)
        )
        out = sample(src[None, None].to(y.device), idx.to(src.dtype), "nearest", "itk")
        array = out[0, 0].cpu().numpy().astype(vol.array.dtype)
    else:
        src = _to_tensor(vol.array, y.device)
        array = sample(src, idx, "linear", "itk")[0, 0].cpu().numpy()
    return Volume.on_grid(array, fixed, vol.name)


def _identity_warp(vol: Volume, fixed: Grid, labels: bool) -> Volume:
    return resample(vol, fixed, None, "nearest" if labels else "linear")


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

    ``model``: a loaded network (e.g. from a checkpoint); None builds ``settings.model`` untrained.
    ``fixed_landmarks`` / ``moving_landmarks``: corresponding points ``(N, 3)``, physical
    (x, y, z) mm; they give the TRE metrics and, with a weight, supervise fine-tuning/refinement
    (as label maps do with ``labels_weight``). While fine-tuning or refining, every few steps an
    event's ``preview`` holds ``"warped"``: the moving image (intensity-normalised) warped by the
    current field, a :class:`Volume` on the working grid.
    Closing the generator cancels at the next step; nothing is changed on the inputs.
    """
    settings = settings or RegistrationSettings()
    seconds: dict[str, float] = {}
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
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    deformable = settings.model != AFFINE_ONLY
    if deformable and model is None:
        model = create_model(settings.model)
    preset = IntensityPreset(settings.modality)
    fixed_window = intensity_window(fixed.array, preset)
    moving_window = intensity_window(moving.array, preset)
    seconds["preprocess"] = time.perf_counter() - t0

    affine = None
    if settings.affine or not deformable:
        t = time.perf_counter()
        try:
            affine_result = yield from align_affine(fixed, moving, settings.affine_settings)
        except RuntimeError as exc:
            reason = next((ln for ln in str(exc).splitlines() if "ITK ERROR" in ln), str(exc))
            reason = reason.split(": ", 2)[-1].strip()[:160]
            raise InputError(
                f"{moving.name or 'moving'}: the affine stage failed ({reason}); check that the "
                "images show the same anatomy and that their headers (origin, direction) are "
                "right, or skip the stage with --no-affine"
            ) from None
        affine = affine_result.transform
        seconds["affine"] = time.perf_counter() - t

    grid, field_w = None, None
    if deformable:
        t = time.perf_counter()
        yield Progress(0, 1, "predicting the deformation", stage="predict")
        grid = working_grid(fixed, settings.working_spacing, settings.max_size, model.size_multiple)
        fixed_w = apply_window(resample(fixed, grid).array, fixed_window)
        moving_w = apply_window(resample(moving, grid, affine).array, moving_window)
        fix_t, mov_t = _to_tensor(fixed_w, device), _to_tensor(moving_w, device)
        model = model.to(device).eval()
        with torch.no_grad():
            field_w = model(mov_t, fix_t).displacement
        seconds["predict"] = time.perf_counter() - t
        yield Progress(1, 1, "predicted the deformation", stage="predict")
        supervision = None
        if _supervised(settings):
            supervision = supervision_on_grid(
                grid, affine, device, fixed_labels, moving_labels, fixed_landmarks, moving_landmarks
            )
        if settings.finetune.steps > 0:
            t = time.perf_counter()
            tuned = yield from _with_preview(
                finetune_network(model, mov_t, fix_t, settings.finetune, supervision), mov_t, grid
            )
            field_w, model = tuned.displacement, tuned.model
            seconds["finetune"] = time.perf_counter() - t
        if settings.refine.steps > 0:
            t = time.perf_counter()
            refined = yield from _with_preview(
                refine_field(mov_t, fix_t, field_w, settings.refine, supervision), mov_t, grid
            )
            field_w = refined.displacement
            seconds["refine"] = time.perf_counter() - t

    t = time.perf_counter()
    yield Progress(0, 1, "warping at full resolution", stage="warp")
    x, moved, y = physical_map(fixed.grid, affine, grid, field_w, device)
    warped = warp_volume(moving, y, fixed.grid)
    warped_labels = (
        warp_volume(moving_labels, y, fixed.grid, labels=True)
        if moving_labels is not None
        else None
    )
    displacement = (y - x)[0].permute(1, 2, 3, 0).cpu().numpy()
    deformation = (moved - x)[0].permute(1, 2, 3, 0).cpu().numpy()
    # Total map in fixed voxels (z, y, x): its Jacobian determinant equals the physical one.
    to_index = torch.as_tensor(fixed.grid.world_to_index_matrix(), dtype=y.dtype, device=y.device)
    u_vox = torch.einsum("ij,bjdhw->bidhw", to_index[:3, :3], y - x)
    jacobian = jacobian_determinant(u_vox)[0, 0].cpu().numpy()
    del x, moved, y, u_vox
    seconds["warp"] = time.perf_counter() - t

    t = time.perf_counter()
    yield Progress(0, 1, "measuring", stage="metrics")
    before = _identity_warp(moving, fixed.grid, labels=False)
    fixed_n = apply_window(fixed.array, fixed_window)
    metrics: dict = {
        "model": settings.model,
        "device": str(device),
        "affine_stage": affine is not None,
        "finetune_steps": settings.finetune.steps,
        "refine_steps": settings.refine.steps,
        "fixed_shape_zyx": list(fixed.shape),
        "working_grid": None
        if grid is None
        else {"shape_zyx": list(grid.shape), "spacing_mm": grid.spacing[0]},
        "folding_percent": M.folding_percent(jacobian),
        "sdlogj": M.sdlogj(jacobian),
        "ncc_before": M.ncc(fixed_n, apply_window(before.array, moving_window)),
        "ncc_after": M.ncc(fixed_n, apply_window(warped.array, moving_window)),
        "mi_before": M.mutual_information(fixed_n, apply_window(before.array, moving_window)),
        "mi_after": M.mutual_information(fixed_n, apply_window(warped.array, moving_window)),
    }
    if fixed_labels is not None and moving_labels is not None:
        stages = {"before": _identity_warp(moving_labels, fixed.grid, labels=True)}
        if affine is not None and deformable:
            stages["affine"] = resample(moving_labels, fixed.grid, affine, "nearest")
        stages["after"] = warped_labels
        for name, lab in stages.items():
            per_label = M.overlap_per_label(fixed_labels.array, lab.array)
            metrics[f"mean_dice_{name}"] = _mean(per_label, "dice")
            metrics[f"mean_jaccard_{name}"] = _mean(per_label, "jaccard")
            metrics[f"labels_{name}"] = {str(k): v for k, v in per_label.items()}
    if fixed_landmarks is not None:
        stages = {"before": None, "after": (affine, grid, field_w)}
        if affine is not None and deformable:
            stages["affine"] = (affine, None, None)
        for name, mapping in stages.items():
            mapped = fixed_landmarks if mapping is None else map_points(fixed_landmarks, *mapping)
            tre = M.tre_mm(mapped, moving_landmarks)
            metrics[f"tre_{name}_mm"] = tre["mean"]
            metrics[f"tre_{name}"] = tre
    seconds["metrics"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    metrics["seconds"] = seconds
    yield Progress(1, 1, "done", stage="done")
    return RegistrationResult(
        fixed=fixed,
        moving=moving,
        warped=warped,
        displacement=displacement,
        deformation=deformation,
        affine=affine,
        jacobian=jacobian,
        metrics=metrics,
        warped_labels=warped_labels,
        working_grid=grid,
        working_field=field_w,
        model=model,
    )


def _supervised(settings: RegistrationSettings) -> bool:
    tune, refine = settings.finetune, settings.refine
    return (tune.steps > 0 and (tune.labels_weight > 0 or tune.landmarks_weight > 0)) or (
        refine.steps > 0 and (refine.labels_weight > 0 or refine.landmarks_weight > 0)
    )


def _with_preview(steps: Generator, moving_w: torch.Tensor, grid: Grid) -> Generator:
    """Pass ``steps``' events on, adding ``preview["warped"]`` where they carry a field."""
    try:
        while True:
            try:
                event = next(steps)
            except StopIteration as stop:
                return stop.value
            if event.preview and "displacement" in event.preview:
                with torch.no_grad():
                    warped = warp(moving_w, event.preview["displacement"].to(moving_w.dtype))
                event.preview["warped"] = Volume.on_grid(
                    warped[0, 0].cpu().numpy(), grid, "preview"
                )
            yield event
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


OUTPUT_FILES = (
    "warped.nii.gz",
    "warped_labels.nii.gz",
    "displacement.nii.gz",
    "transform.h5",
    "metrics.json",
)


def write_result(result: RegistrationResult, outdir) -> list:
    """Write a run's files into ``outdir`` atomically: all of them appear, or none.

    warped.nii.gz, warped_labels.nii.gz (with moving labels), displacement.nii.gz (the total
    physical field), transform.h5 (affine + deformation as an ITK composite), metrics.json.
    """
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from napari_deepwarp.core import io

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=outdir))
    try:
        grid = result.fixed.grid
        io.write_volume(result.warped, staging / "warped.nii.gz")
        if result.warped_labels is not None:
            io.write_volume(result.warped_labels, staging / "warped_labels.nii.gz")
        io.write_field(result.displacement, grid, staging / "displacement.nii.gz")
        field = io.field_to_sitk(result.deformation, grid)
        io.write_transform(io.composite_transform(result.affine, field), staging / "transform.h5")
        (staging / "metrics.json").write_text(json.dumps(result.metrics, indent=2))
        written = []
        for f in sorted(staging.iterdir()):
            target = outdir / f.name
            f.replace(target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
