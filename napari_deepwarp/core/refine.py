"""Field refinement: optimise the displacement itself, starting from the network's prediction.

The fast complement to network fine-tuning: no network in the loop, so a step costs one warp,
one similarity and one regulariser. Coarse to fine: at level ``f`` the field lives on the
refinement grid downsampled ``f`` times (values rescaled with :func:`spatial.resize_field`) and
is compared with the images downsampled the same way (:func:`blocks.downsample_image`); the
step budget is split evenly across levels unless ``level_steps`` says otherwise.

Two parameterisations: the displacement itself (``fast``), or, with ``diffeomorphic``, a
stationary velocity field ``v`` whose exponential (scaling and squaring,
:func:`spatial.integrate_velocity`) is the displacement: every map it gives is invertible, and
its inverse is ``exp(-v)``, returned beside it. The network's displacement ``u`` starts it as
``v = u`` (the first-order logarithm; the first steps correct the rest).

Presets (:data:`PRESETS`): ``fast`` refines on the network's working grid (about 2.7 mm on a
brain); ``accurate`` on a finer grid of its own (``spacing_mm``, 1.25 mm), diffeomorphic, with
a weaker regulariser and an early stop at every level.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field, replace

import torch

from napari_deepwarp.core import losses, spatial
from napari_deepwarp.core.models.blocks import downsample_image
from napari_deepwarp.core.progress import Plateau, Progress, stop_reason
from napari_deepwarp.core.supervision import Supervision


@dataclass
class RefineSettings:
    """steps: Adam steps in all; learning_rate: Adam's, in voxels of the level's grid;
    similarity: a name of :data:`losses.SIMILARITY_LOSSES` with ``similarity_kwargs``, or
    ``"auto"``: mutual information for a multi-modal model (see :func:`for_model`), else local
    NCC over ``lncc_window``^3 voxels of each level;
    reg_weight: weight of ``regulariser``; levels: downsampling factors, coarse to fine;
    labels_weight / landmarks_weight: weights of the supervision terms (0: off);
    level_steps: steps per level (None: ``steps`` split evenly); early_stop: "last" (watch the
    loss at the last level only) or "each" (every level); diffeomorphic: optimise a stationary
    velocity field (see the module docstring) with ``integration_steps`` squarings;
    spacing_mm: the refinement grid's spacing, over the fixed image's foreground (None: the
    network's working grid; the pipeline builds it, capped at ``max_voxels``); preset: the
    :data:`PRESETS` name these settings came from (None: built by hand); lncc_window: local
    NCC's window (voxels of each level); mi_reg_weight: ``reg_weight`` when "auto" picks mutual
    information (None: ``reg_weight`` x :data:`MI_REG_SCALE`)."""

    steps: int = 150
    learning_rate: float = 0.2
    similarity: str = "auto"
    similarity_kwargs: dict = field(default_factory=dict)
    regulariser: str = "diffusion"
    # 4.0: folding <= 0.1 % on Mindboggle pairs at the cost of ~0.02 Dice against 1.0
    reg_weight: float = 4.0
    levels: tuple[int, ...] = (4, 2, 1)
    labels_weight: float = 0.0
    landmarks_weight: float = 0.0
    patience: int = 25
    min_delta: float = 1e-3
    preview_every: int = 10
    level_steps: tuple[int, ...] | None = None
    early_stop: str = "last"
    diffeomorphic: bool = False
    integration_steps: int = 6
    spacing_mm: float | None = None
    max_voxels: int = 4_000_000
    preset: str | None = None
    lncc_window: int = 7
    mi_reg_weight: float | None = None


@dataclass
class RefineResult:
    """The refined field ``(1, 3, D, H, W)`` in voxels of the input grid, and the history;
    ``inverse``: the displacement of the inverse map on the same grid (diffeomorphic only)."""

    displacement: torch.Tensor
    losses: list[float]
    steps_run: int
    stopped_early: bool
    seconds: float
    inverse: torch.Tensor | None = None


def _level_shape(shape, factor: int) -> tuple[int, ...]:
    return tuple(max(2, -(-n // factor)) for n in shape)


#: MI's gradients outweigh local NCC's: with "auto" MI the regulariser weight is this times larger
MI_REG_SCALE = 3.0


def for_model(settings: RefineSettings, multimodal: bool) -> RefineSettings:
    """``settings`` with an ``"auto"`` similarity made concrete: MI for a multi-modal model
    (local NCC misreads a T1/T2 pair: on the spine pair it took cord Dice from 0.88 to 0.62 with
    1 % folding), with ``reg_weight`` x :data:`MI_REG_SCALE` (at the lncc weight MI folded 0.18 %
    on Mindboggle 1<-2 and the spine pair; at 3x: 0.01 % and 0 %, Dice 0.594 and 0.849), or
    ``mi_reg_weight`` where set; else local NCC over ``lncc_window``^3 windows."""
    if settings.similarity != "auto":
        return settings
    if multimodal:
        weight = settings.mi_reg_weight or settings.reg_weight * MI_REG_SCALE
        return replace(settings, similarity="mi", similarity_kwargs={}, reg_weight=weight)
    return replace(settings, similarity="lncc", similarity_kwargs={"window": settings.lncc_window})


def refine_field(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    initial: torch.Tensor | None = None,
    settings: RefineSettings | None = None,
    supervision: Supervision | None = None,
) -> Generator[Progress, None, RefineResult]:
    """Refine a pull field for ``moving``/``fixed`` ``(1, 1, D, H, W)`` on one grid.

    ``initial``: ``(1, 3, D, H, W)`` voxels (e.g. the network's output); zeros if None.
    Yields :class:`Progress` per step (``preview`` holds the field every ``preview_every``
    steps, on the input grid); returns a :class:`RefineResult`. Closing the generator cancels;
    sending :data:`progress.STOP` ends the optimisation and returns the field reached so far.
    ``supervision``: label maps and/or landmarks on the input grid, weighted by the settings; the
    terms see the level's field resized to the input grid.
    """
    settings = for_model(settings or RefineSettings(), multimodal=False)
    start = time.perf_counter()
    shape = tuple(fixed.shape[2:])
    current = (
        torch.zeros(1, 3, *shape, device=fixed.device, dtype=fixed.dtype)
        if initial is None
        else initial.detach().to(fixed.dtype)
    )
    similarity = losses.similarity_loss(settings.similarity, **settings.similarity_kwargs)
    regulariser = losses.REGULARISERS[settings.regulariser]
    budget = level_budget(settings)
    total = sum(budget)

    def displacement_of(param: torch.Tensor) -> torch.Tensor:
        if not settings.diffeomorphic:
            return param
        # The gradient goes through the squarings: taking d exp(v) / dv as the identity (as
        # log-domain optimisers do) cost a third of the time but 0.012 Dice on Mindboggle 1<-2.
        return spatial.integrate_velocity(param, settings.integration_steps)

    history: list[float] = []
    step, stopped, halted = 0, False, False
    for index, (factor, n) in enumerate(zip(settings.levels, budget)):
        last = index == len(settings.levels) - 1
        watch = last or settings.early_stop == "each"
        plateau = Plateau(settings.patience, settings.min_delta)
        level_shape = _level_shape(shape, factor)
        mov = downsample_image(moving, level_shape) if factor > 1 else moving
        fix = downsample_image(fixed, level_shape) if factor > 1 else fixed
        param = torch.nn.Parameter(spatial.resize_field(current, level_shape).clone())
        optimiser = torch.optim.Adam([param], lr=settings.learning_rate)
        for _ in range(n):
            optimiser.zero_grad(set_to_none=True)
            disp = displacement_of(param)
            loss = similarity(spatial.warp(mov, disp), fix)
            loss = loss + settings.reg_weight * regulariser(param)
            if supervision is not None:
                extra, _ = supervision.loss(
                    spatial.resize_field(disp, shape),
                    settings.labels_weight,
                    settings.landmarks_weight,
                )
                loss = loss + extra
            loss.backward()
            optimiser.step()
            step += 1
            value = float(loss.detach())
            history.append(value)
            preview = None
            if settings.preview_every and step % settings.preview_every == 0:
                with torch.no_grad():
                    field = spatial.resize_field(displacement_of(param.detach()), shape)
                preview = {"displacement": field}
            command = yield Progress(
                step,
                total,
                f"refining the field (level {index + 1}/{len(settings.levels)})",
                stage="refine",
                loss=value,
                preview=preview,
            )
            reason = stop_reason(command, plateau, value, watch=watch)
            if reason:
                stopped, halted = True, reason == "user"
                break
        current = spatial.resize_field(param.detach(), shape)
        if halted:
            break
    inverse = None
    with torch.no_grad():
        if settings.diffeomorphic:
            inverse = spatial.integrate_velocity(-current, settings.integration_steps)
            current = spatial.integrate_velocity(current, settings.integration_steps)
    seconds = time.perf_counter() - start
    return RefineResult(current, history, step, stopped, seconds, inverse)


def level_budget(settings: RefineSettings) -> list[int]:
    """Steps per level: ``level_steps``, else ``steps`` split evenly (the rest at the last)."""
    if settings.level_steps is not None:
        if len(settings.level_steps) != len(settings.levels):
            raise ValueError("level_steps needs one step count per level")
        return [int(n) for n in settings.level_steps]
    per_level = max(1, settings.steps // len(settings.levels))
    budget = [per_level] * len(settings.levels)
    budget[-1] = max(0, settings.steps - per_level * (len(settings.levels) - 1))
    return budget


#: what each preset sets; see :func:`refine_settings` (measured by ``benchmarks.refine_mindboggle``)
PRESETS: dict[str, dict] = {
    # the network's working grid, the displacement itself: the behaviour of ``--refine 150``
    "fast": {"steps": 150},
    # a 1.25 mm grid of its own, a stationary velocity field (no folding, an exact inverse),
    # early stop at every level
    "accurate": {
        "steps": 65,
        "levels": (4, 2, 1),
        # Mindboggle 1<-2 from cfwn's prediction (FireANTs SyN: 0.674, 0.006 % folding):
        # 1.5 mm, 25 steps a level: 0.664 (weight 1), 0.669 (0.5); 1.25 mm: 0.677 (1), 0.685
        # (0.5) in 78 s; 1.25 mm, 5 squarings, 15 steps at the finest level: 0.681 (0.75,
        # 0.0001 % folding) and 0.684 (0.5, 0.0007 %) in 47 and 45 s
        "level_steps": (25, 25, 15),
        "diffeomorphic": True,
        "integration_steps": 5,
        "spacing_mm": 1.25,
        "reg_weight": 0.75,
        # mutual information keeps fast's weight (4 x 3): at 3 it took the spine pair's cord
        # Dice from 0.884 (affine) to 0.757
        "mi_reg_weight": 12.0,
        "early_stop": "each",
        "patience": 10,
        "min_delta": 1e-4,
    },
}


def refine_settings(spec: str | int, **overrides) -> RefineSettings:
    """:class:`RefineSettings` for ``--refine SPEC``: a preset name of :data:`PRESETS`, or a step
    count (the ``fast`` behaviour with that many steps; 0: off). ``overrides``: fields to set."""
    if isinstance(spec, str) and not spec.isdigit():
        if spec not in PRESETS:
            raise ValueError(
                f"unknown refinement preset {spec!r}; choose from {', '.join(PRESETS)}"
            )
        return RefineSettings(**{**PRESETS[spec], "preset": spec, **overrides})
    return RefineSettings(steps=int(spec), **overrides)
