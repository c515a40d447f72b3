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
from napari_deepwarp.core.affine import AffineSettings, align_affine, label_driven
from napari_deepwarp.core.finetune import FinetuneSettings, finetune_network
from napari_deepwarp.core.io import InputError, check_image, check_labels_match, check_overlap
from napari_deepwarp.core.models.registry import RegistrationModel, create_model
from napari_deepwarp.core.precision import autocast, precision_name, resolve_precision
from napari_deepwarp.core.preprocess import (
    IntensityPreset,
    apply_window,
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
    refine: optimise the field itself after the network (steps=0: off); affine_from: what the
    affine stage aligns, ``"images"`` (mutual information) or ``"labels"`` (the two label maps,
    see :func:`affine.label_driven`; both must be given); precision: the network's compute
    precision, ``"auto"`` (bfloat16 where the device computes it natively, else float32),
    ``"float32"``, ``"bfloat16"`` or ``"float16"`` (see :mod:`precision`)."""

    model: str = "voxelmorph"
    affine: bool = True
    affine_from: str = "images"
    device: str = "auto"
    precision: str = "auto"
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
    deformation: np.ndarray
    jacobian: np.ndarray


def warp_full_resolution(
    fixed: Grid,
    affine: sitk.AffineTransform | None,
    working: Grid | None,
    working_field: torch.Tensor | None,
    moving: Volume,
    moving_labels: Volume | None,
    device,
) -> FullResolution:
    """The warp stage in one pass: same results as :func:`physical_map` + :func:`warp_volume`
    (image, labels) + ``y - x``, ``x + d - x`` and ``jacobian_determinant`` of the total map in
    fixed voxels, to float rounding.

    Every output is an affine function of the fixed index ``p`` plus a 3x3 matrix times the
    upsampled working field ``u(p)``; the 4x4 matrices are composed on the host in float64, and
    per voxel only ``u``, the moving positions (shared by image and labels, with ITK's inside
    mask), the displacement and ``det(B + C grad u) = det(C) det(C^-1 B + grad u)`` are computed.
    displacement / deformation: ``(z, y, x, 3)`` float32 (x, y, z) mm; jacobian ``(z, y, x)``.
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
    if u is None:
        deformation = np.zeros((*shape, 3), np.float32)
    else:
        s_t = torch.as_tensor(step, dtype=torch.float32, device=u.device)
        deformation = torch.mm(u.reshape(3, -1).T, s_t.T).view(*shape, 3).cpu().numpy()
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


def working_field_image(fixed: Grid, working: Grid, working_field: torch.Tensor) -> sitk.Image:
    """The working-grid field as an ITK displacement image ((x, y, z) mm, float64) that an ITK
    ``DisplacementFieldTransform`` turns into exactly the deformation of
    :func:`warp_full_resolution` at every fixed voxel.

    The field is padded by edge replication until it covers every fixed voxel (ITK returns no
    displacement outside a field), so ITK's linear interpolation equals the clamped trilinear
    upsampling. On a 256x256x160 brain this is about 90x90x60 voxels (13 MB) instead of the
    full grid (250 MB of float64), which is what makes ``transform.h5`` small and fast to write.
    """
    from napari_deepwarp.core import io

    u = working_field.detach().to("cpu", torch.float64)[:1]
    index = fixed.corners_world() @ working.world_to_index_matrix()[:3, :3].T
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
    dtype = resolve_precision(settings.precision, device)
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
        pair = (fixed, moving, settings.affine_settings)
        if settings.affine_from == "labels":
            if fixed_labels is None or moving_labels is None:
                raise InputError(
                    "an affine stage from labels needs label maps on both sides; add "
                    "--fixed-labels and --moving-labels, or align from the images"
                )
            pair = label_driven(fixed_labels, moving_labels, settings.affine_settings)
        elif settings.affine_from != "images":
            raise InputError(
                f"affine_from must be 'images' or 'labels', not {settings.affine_from!r}"
            )
        try:
            affine_result = yield from align_affine(*pair)
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
    refine_used: RefineSettings | None = None  # the refinement settings actually used
    if deformable:
        t = time.perf_counter()
        yield Progress(0, 1, "predicting the deformation", stage="predict")
        grid = working_grid(fixed, settings.working_spacing, settings.max_size, model.size_multiple)
        fixed_w = network_input(fixed, grid, fixed_window)
        moving_w = network_input(moving, grid, moving_window, affine)
        layout = torch.channels_last_3d if model.channels_last else torch.contiguous_format
        fix_t, mov_t = (
            _to_tensor(a, device).contiguous(memory_format=layout) for a in (fixed_w, moving_w)
        )
        model = model.to(device, memory_format=layout).eval()
        with torch.no_grad(), autocast(device, dtype):
            field_w = model(mov_t, fix_t).displacement
        field_w = field_w.float()
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
                finetune_network(model, mov_t, fix_t, settings.finetune, supervision, dtype),
                mov_t,
                grid,
            )
            field_w, model = tuned.displacement, tuned.model
            seconds["finetune"] = time.perf_counter() - t
        if settings.refine.steps > 0:
            t = time.perf_counter()
            refine_used = for_model(settings.refine, model.multimodal)
            refined = yield from _with_preview(
                refine_field(mov_t, fix_t, field_w, refine_used, supervision), mov_t, grid
            )
            field_w = refined.displacement
            seconds["refine"] = time.perf_counter() - t

    t = time.perf_counter()
    yield Progress(0, 1, "warping at full resolution", stage="warp")
    full = warp_full_resolution(fixed.grid, affine, grid, field_w, moving, moving_labels, device)
    warped, warped_labels = full.warped, full.warped_labels
    displacement, deformation, jacobian = full.displacement, full.deformation, full.jacobian
    del full
    seconds["warp"] = time.perf_counter() - t

    t = time.perf_counter()
    yield Progress(0, 1, "measuring", stage="metrics")
    before = _identity_warp(moving, fixed.grid, labels=False)
    fixed_n = apply_window(fixed.array, fixed_window)
    # One window per image and the fixed image's statistics once (same values as M.ncc / M.mi).
    sim_before, sim_after = M.intensity_similarity(
        fixed_n, [apply_window(v.array, moving_window) for v in (before, warped)]
    )
    metrics: dict = {
        "model": settings.model,
        "device": str(device),
        "precision": precision_name(dtype) if deformable else None,
        "affine_stage": affine is not None,
        "affine_from": settings.affine_from if affine is not None else None,
        "finetune_steps": settings.finetune.steps,
        "refine_steps": settings.refine.steps,
        "refine_similarity": refine_used.similarity if refine_used else None,
        "refine_reg_weight": refine_used.reg_weight if refine_used else None,
        "fixed_shape_zyx": list(fixed.shape),
        "working_grid": None
        if grid is None
        else {"shape_zyx": list(grid.shape), "spacing_mm": grid.spacing[0]},
        "folding_percent": M.folding_percent(jacobian),
        "sdlogj": M.sdlogj(jacobian),
        "ncc_before": sim_before["ncc"],
        "ncc_after": sim_after["ncc"],
        "mi_before": sim_before["mi"],
        "mi_after": sim_after["mi"],
    }
    if fixed_labels is not None and moving_labels is not None:
        stages = {"before": _identity_warp(moving_labels, fixed.grid, labels=True)}
        if affine is not None and deformable:
            stages["affine"] = resample(moving_labels, fixed.grid, affine, "nearest")
        stages["after"] = warped_labels
        overlaps = M.overlap_per_label_many(fixed_labels.array, [v.array for v in stages.values()])
        for name, per_label in zip(stages, overlaps):
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
    physical field on the fixed grid), transform.h5 (the affine + the deformation as an ITK
    composite; its field is on the working grid, see :func:`working_field_image`; an
    affine-only run has no field), metrics.json.
    """
    import json
    import shutil
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from napari_deepwarp.core import io

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
        io.write_volume(result.warped, staging / "warped.nii.gz")
        if result.warped_labels is not None:
            io.write_volume(result.warped_labels, staging / "warped_labels.nii.gz")
        transform_file()

    try:
        # The gzip of the (incompressible) displacement field takes most of the time; SimpleITK
        # lets go of the GIL while it writes, so the other files are written meanwhile.
        with ThreadPoolExecutor(1) as pool:
            field_written = pool.submit(
                io.write_field, result.displacement, grid, staging / "displacement.nii.gz"
            )
            images()
            field_written.result()
        (staging / "metrics.json").write_text(
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
