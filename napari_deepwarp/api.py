"""Convenience functions for notebooks and scripts: one call, paths or volumes, a result."""

from __future__ import annotations

import os
from collections.abc import Callable

from napari_deepwarp.core.io import read_volume
from napari_deepwarp.core.models.registry import RegistrationModel, create_model
from napari_deepwarp.core.progress import Progress
from napari_deepwarp.core.volume import Volume

PathOrVolume = str | os.PathLike | Volume


def _volume(value: PathOrVolume | None, labels: bool = False) -> Volume | None:
    if value is None or isinstance(value, Volume):
        return value
    return read_volume(value, labels=labels)


def _points(value):
    if value is None or not isinstance(value, str | os.PathLike):
        return value
    from napari_deepwarp.core.io import read_landmarks

    return read_landmarks(value)


def load_model(name_or_checkpoint: str, device: str = "cpu") -> RegistrationModel:
    """A registered architecture by name (untrained), or a network from a checkpoint file."""
    if str(name_or_checkpoint).endswith(".pt") or os.path.exists(name_or_checkpoint):
        from napari_deepwarp.core.checkpoint import load_checkpoint

        return load_checkpoint(name_or_checkpoint, device=device)[0]
    return create_model(name_or_checkpoint).to(device)


def register(
    fixed: PathOrVolume,
    moving: PathOrVolume,
    model: str | RegistrationModel | None = None,
    fixed_labels: PathOrVolume | None = None,
    moving_labels: PathOrVolume | None = None,
    finetune_steps: int = 0,
    refine_steps: int | str = 0,
    fixed_landmarks=None,
    moving_landmarks=None,
    progress: Callable[[Progress], None] | None = None,
    **settings,
):
    """Register ``moving`` onto ``fixed``; returns a :class:`~core.pipeline.RegistrationResult`.

    ``model``: a registry name (with its shipped checkpoint where there is one, else
    untrained), ``"affine"``, a checkpoint path, a model instance, or None / ``"auto"`` for the
    shipped checkpoint that fits the pair's modality (as ``deepwarp register`` does; the working
    grid then defaults to the checkpoint's size unless refining). The result's ``verdict`` says
    whether it improved on the affine stage; where it made the pair worse, the result is the
    affine stage's unless ``if_worse="keep"`` is passed (see ``RegistrationSettings``).
    ``finetune_steps`` / ``refine_steps``: network fine-tuning / field refinement (0: off;
    ``refine_steps`` may also name a preset, ``"fast"`` or ``"accurate"``).
    ``fixed_landmarks`` / ``moving_landmarks``: corresponding points ``(N, 3)``, (x, y, z) mm, or
    landmark files (CSV, Slicer .fcsv): TRE is reported.
    ``settings``: fields of :class:`~core.pipeline.RegistrationSettings` (device, affine, ...).
    ``progress``: called with every :class:`Progress` event.
    """
    from napari_deepwarp.core.checkpoint import default_checkpoint, load_checkpoint, working_size
    from napari_deepwarp.core.finetune import FinetuneSettings
    from napari_deepwarp.core.pipeline import RegistrationSettings
    from napari_deepwarp.core.pipeline import register as run
    from napari_deepwarp.core.refine import refine_settings

    network, card = None, None
    if isinstance(model, RegistrationModel):
        network, name = model, model.name
    elif model in (None, "auto"):
        name = "auto"
        settings.setdefault("max_size", None)  # the checkpoint chosen for the pair says
    else:
        path = model if model and str(model).endswith(".pt") else None
        if path is None and model != "affine":
            path = default_checkpoint(model)
        if path is not None:
            network, card = load_checkpoint(path)
        name = network.name if network is not None else model
    settings.setdefault("max_size", working_size(card, refining=bool(refine_steps)))
    config = RegistrationSettings(
        model=name,
        finetune=FinetuneSettings(steps=finetune_steps),
        refine=refine_settings(refine_steps),
        **settings,
    )
    generator = run(
        _volume(fixed),
        _volume(moving),
        config,
        network,
        _volume(fixed_labels, True),
        _volume(moving_labels, True),
        _points(fixed_landmarks),
        _points(moving_landmarks),
    )
    try:
        while True:
            event = next(generator)
            if progress is not None:
                progress(event)
    except StopIteration as stop:
        return stop.value
