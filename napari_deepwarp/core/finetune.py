"""Instance optimisation: fit a copy of the network to one pair (the papers' test-time tuning).

The source model is never changed: every step works on a deep copy. By default the loss the
network was trained with is minimised: its paper's, or the similarity + diffusion that replaced
it in training (``model.trained_objective``, from the checkpoint's card); a similarity and a
regularisation weight given in the settings replace either.

Multi-resolution is a scale space: the first levels feed Gaussian-smoothed images (sigma in
working voxels, coarse to fine) to the network and the loss, which widens the capture range; the
last level uses the images as they are. The step budget is split evenly across levels.
Early stop: at the last level, when the loss has not improved by ``min_delta`` (relative) for
``patience`` steps. A step whose loss or gradient is not finite is skipped, as in training
(:func:`precision.guarded_step`): the copy keeps its weights, and the step still counts.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Generator
from dataclasses import dataclass, field

import torch

from napari_deepwarp.core import losses
from napari_deepwarp.core.models.blocks import gaussian_smooth
from napari_deepwarp.core.models.registry import RegistrationModel, RegistrationOutput
from napari_deepwarp.core.precision import autocast, guarded_step
from napari_deepwarp.core.progress import Plateau, Progress, stop_reason
from napari_deepwarp.core.supervision import Supervision


@dataclass
class FinetuneSettings:
    """steps: Adam steps in all; learning_rate: Adam's; similarity: None for the loss the model
    was trained with (its own, or ``model.trained_objective``), else a name from
    :data:`losses.SIMILARITY_LOSSES` with ``similarity_kwargs``; reg_weight: weight of
    ``regulariser`` on the displacement when ``similarity`` is set; level_sigmas: Gaussian
    sigmas (working voxels) of the levels before the final, unsmoothed one; labels_weight /
    landmarks_weight: weights of the supervision terms of :mod:`supervision` (0: off)."""

    steps: int = 100
    learning_rate: float = 1e-3
    similarity: str | None = None
    similarity_kwargs: dict = field(default_factory=dict)
    regulariser: str = "diffusion"
    reg_weight: float = 1.0
    level_sigmas: tuple[float, ...] = (2.0,)
    labels_weight: float = 0.0
    landmarks_weight: float = 0.0
    patience: int = 40
    min_delta: float = 1e-3
    preview_every: int = 10
    seed: int | None = 0


@dataclass
class FinetuneResult:
    """The tuned copy, its field on the input grid ``(1, 3, D, H, W)`` voxels, and the history
    (``skipped_steps``: steps whose loss or gradient was not finite, left without an update)."""

    model: RegistrationModel
    displacement: torch.Tensor
    losses: list[float]
    steps_run: int
    stopped_early: bool
    seconds: float
    skipped_steps: int = 0


def _objective(model: RegistrationModel, settings: FinetuneSettings):
    if settings.similarity is None:
        if model.trained_objective is None:
            return model.loss
        name, weight = model.trained_objective
        settings = dataclasses.replace(
            settings, similarity=name, regulariser="diffusion", reg_weight=weight
        )
    similarity = losses.similarity_loss(settings.similarity, **settings.similarity_kwargs)
    regulariser = losses.REGULARISERS[settings.regulariser]

    def loss(output: RegistrationOutput, moving, fixed):
        warped = output.extras.get("warped")
        if warped is None:
            from napari_deepwarp.core.spatial import warp

            warped = warp(moving, output.displacement)
        sim = similarity(warped, fixed)
        reg = regulariser(output.displacement)
        return sim + settings.reg_weight * reg, {
            "similarity": sim.detach(),
            "regularisation": reg.detach(),
        }

    return loss


def finetune_network(
    model: RegistrationModel,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    settings: FinetuneSettings | None = None,
    supervision: Supervision | None = None,
    dtype: torch.dtype = torch.float32,
) -> Generator[Progress, None, FinetuneResult]:
    """Optimise a deep copy of ``model`` on one pair ``(1, 1, D, H, W)`` on the working grid.

    ``supervision``: label maps and/or landmarks on the same grid, weighted by the settings.
    ``dtype``: the forward passes' autocast precision (:mod:`precision`); the weights, the
    optimiser and the returned field stay float32. float16 scales the loss (``GradScaler``) so
    that small gradients do not underflow; bfloat16 needs no scaling.

    Yields :class:`Progress` after every step (``preview`` holds the current field every
    ``preview_every`` steps); returns a :class:`FinetuneResult`. Closing the generator cancels;
    sending :data:`progress.STOP` ends the optimisation and returns the network as it is.
    """
    settings = settings or FinetuneSettings()
    start = time.perf_counter()
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    tuned = copy.deepcopy(model).to(moving.device).train()
    if settings.similarity is not None:  # what the copy learns with from now on (its card)
        diffusion = settings.regulariser == "diffusion"
        tuned.trained_objective = (settings.similarity, settings.reg_weight) if diffusion else None
    for p in tuned.parameters():
        p.requires_grad_(True)
    objective = _objective(tuned, settings)
    optimiser = torch.optim.Adam(tuned.parameters(), lr=settings.learning_rate)
    scaler = torch.amp.GradScaler(moving.device.type, enabled=dtype == torch.float16)
    sigmas = [*settings.level_sigmas, 0.0]
    per_level = max(1, settings.steps // len(sigmas))
    history: list[float] = []
    step, skipped, stopped, halted = 0, 0, False, False
    plateau = Plateau(settings.patience, settings.min_delta)
    for level, sigma in enumerate(sigmas):
        last = level == len(sigmas) - 1
        n = settings.steps - step if last else per_level
        mov, fix = gaussian_smooth(moving, sigma), gaussian_smooth(fixed, sigma)
        for _ in range(n):
            optimiser.zero_grad(set_to_none=True)
            with autocast(moving.device, dtype):
                output = tuned(mov, fix)
                loss, _terms = objective(output, mov, fix)
                if supervision is not None:
                    extra, _ = supervision.loss(
                        output.displacement, settings.labels_weight, settings.landmarks_weight
                    )
                    loss = loss + extra
            scaler.scale(loss).backward()
            value, stepped = guarded_step(optimiser, scaler, tuned.parameters(), loss)
            skipped += not stepped
            step += 1
            history.append(value)
            preview = None
            if settings.preview_every and step % settings.preview_every == 0:
                preview = {"displacement": output.displacement.detach().float()}
            command = yield Progress(
                step,
                settings.steps,
                f"fine-tuning (level {level + 1}/{len(sigmas)})",
                stage="finetune",
                loss=value,
                preview=preview,
            )
            reason = stop_reason(command, plateau, value, watch=last)
            if reason:
                stopped, halted = True, reason == "user"
                break
        if halted:
            break
    tuned.eval()
    with torch.no_grad(), autocast(moving.device, dtype):
        displacement = tuned(moving, fixed).displacement.detach()
    displacement = displacement.float()
    seconds = time.perf_counter() - start
    return FinetuneResult(tuned, displacement, history, step, stopped, seconds, skipped)
