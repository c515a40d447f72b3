"""Field refinement: optimise the displacement itself, starting from the network's prediction.

The fast complement to network fine-tuning: no network in the loop, so a step costs one warp,
one similarity and one regulariser. Coarse to fine: at level ``f`` the field lives on the
working grid downsampled ``f`` times (values rescaled with :func:`spatial.resize_field`) and is
compared with the images downsampled the same way (:func:`blocks.downsample_image`); the step
budget is split evenly across levels. Early stop at the last level, as in fine-tuning.
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
    NCC (7^3 windows);
    reg_weight: weight of ``regulariser``; levels: downsampling factors, coarse to fine;
    labels_weight / landmarks_weight: weights of the supervision terms (0: off)."""

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


@dataclass
class RefineResult:
    """The refined field ``(1, 3, D, H, W)`` in voxels of the input grid, and the history."""

    displacement: torch.Tensor
    losses: list[float]
    steps_run: int
    stopped_early: bool
    seconds: float


def _level_shape(shape, factor: int) -> tuple[int, ...]:
    return tuple(max(2, -(-n // factor)) for n in shape)


#: MI's gradients outweigh local NCC's: with "auto" MI the regulariser weight is this times larger
MI_REG_SCALE = 3.0


def for_model(settings: RefineSettings, multimodal: bool) -> RefineSettings:
    """``settings`` with an ``"auto"`` similarity made concrete: MI for a multi-modal model
    (local NCC misreads a T1/T2 pair: on the spine pair it took cord Dice from 0.88 to 0.62 with
    1 % folding), with ``reg_weight`` x :data:`MI_REG_SCALE` (at the lncc weight MI folded 0.18 %
    on Mindboggle 1<-2 and the spine pair; at 3x: 0.01 % and 0 %, Dice 0.594 and 0.849), else
    local NCC over 7^3 windows."""
    if settings.similarity != "auto":
        return settings
    if multimodal:
        return replace(
            settings,
            similarity="mi",
            similarity_kwargs={},
            reg_weight=settings.reg_weight * MI_REG_SCALE,
        )
    return replace(settings, similarity="lncc", similarity_kwargs={"window": 7})


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
    per_level = max(1, settings.steps // len(settings.levels))
    history: list[float] = []
    step, stopped, halted = 0, False, False
    plateau = Plateau(settings.patience, settings.min_delta)
    for index, factor in enumerate(settings.levels):
        last = index == len(settings.levels) - 1
        n = settings.steps - step if last else per_level
        level_shape = _level_shape(shape, factor)
        mov = downsample_image(moving, level_shape) if factor > 1 else moving
        fix = downsample_image(fixed, level_shape) if factor > 1 else fixed
        param = torch.nn.Parameter(spatial.resize_field(current, level_shape).clone())
        optimiser = torch.optim.Adam([param], lr=settings.learning_rate)
        for _ in range(n):
            optimiser.zero_grad(set_to_none=True)
            loss = similarity(spatial.warp(mov, param), fix)
            loss = loss + settings.reg_weight * regulariser(param)
            if supervision is not None:
                extra, _ = supervision.loss(
                    spatial.resize_field(param, shape),
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
                preview = {"displacement": spatial.resize_field(param.detach(), shape)}
            command = yield Progress(
                step,
                settings.steps,
                f"refining the field (level {index + 1}/{len(settings.levels)})",
                stage="refine",
                loss=value,
                preview=preview,
            )
            reason = stop_reason(command, plateau, value, watch=last)
            if reason:
                stopped, halted = True, reason == "user"
                break
        current = spatial.resize_field(param.detach(), shape)
        if halted:
            break
    return RefineResult(current, history, step, stopped, time.perf_counter() - start)
