"""The model registry and the contract every architecture follows.

Every model is a :class:`RegistrationModel` registered with ``@register_model(name)`` and
configured by a dataclass. ``forward(moving, fixed)`` takes two tensors ``(B, 1, D, H, W)`` of
one shape, any size, and returns a :class:`RegistrationOutput` whose ``displacement`` is the
*whole* transform as a pull field in voxels (see :mod:`napari_deepwarp.core.spatial`).
Subclasses implement ``predict`` on inputs whose size is a multiple of ``size_multiple``;
``forward`` pads at the high end of each axis (edge values; voxel coordinates unchanged, so
affine matrices need no correction) and crops every output back. ``model.loss(output, moving, fixed)`` is the
training objective of the model's paper, so training and fine-tuning need not know the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RegistrationOutput:
    """What every model returns.

    displacement: ``(B, 3, D, H, W)`` total pull field in voxels of the input grid, channels
        ``(dz, dy, dx)``; includes the affine part where the model has one.
    affine: ``(B, 3, 4)`` or None; the linear part as a map of voxel positions ``(z, y, x)``:
        ``p -> A[:, :, :3] @ p + A[:, :, 3]``.
    multiscale: coarser fields for deep supervision, coarse to fine, each ``(B, 3, d, h, w)`` in
        voxels of its own grid.
    velocity: ``(B, 3, D, H, W)`` stationary velocity (voxels) for diffeomorphic models, else None.
    extras: anything else a model's loss needs (for example the warped images of each level).
    """

    displacement: torch.Tensor
    affine: torch.Tensor | None = None
    multiscale: list[torch.Tensor] = field(default_factory=list)
    velocity: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class RegistrationModel(nn.Module):
    """Base class: subclasses set ``config_class`` and implement ``forward`` and ``loss``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    #: the working grid's shape must be a multiple of this along each axis
    size_multiple: ClassVar[int] = 1
    # trained for pairs of different contrasts (its similarity is mutual information)
    multimodal: ClassVar[bool] = False
    #: inference runs in channels-last memory (``torch.channels_last_3d``), where that was
    #: measured faster for this architecture (``python -m benchmarks.run``, its variants table)
    channels_last: ClassVar[bool] = False
    #: ``(similarity name, diffusion weight)`` when the weights were trained with that loss in
    #: place of the paper's (``deepwarp train --similarity``; set from the checkpoint's card):
    #: fine-tuning then continues with the loss the network learnt with. None: its own loss.
    trained_objective: tuple[str, float] | None = None

    def __init__(self, config=None):
        super().__init__()
        self.config = config if config is not None else self.config_class()

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        """Register ``moving`` to ``fixed``, both ``(B, 1, D, H, W)``; any spatial size."""
        if moving.dim() != 5 or moving.shape != fixed.shape or moving.shape[1] != 1:
            raise ValueError(
                f"{self.name or type(self).__name__} expects moving and fixed of one shape "
                f"(B, 1, D, H, W); got moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)}"
            )
        shape = tuple(moving.shape[2:])
        m = self.size_multiple
        padded = tuple(-(-n // m) * m for n in shape)
        if padded == shape:
            return self.predict(moving, fixed)
        pad = [0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]]
        out = self.predict(
            F.pad(moving, pad, mode="replicate"), F.pad(fixed, pad, mode="replicate")
        )
        return crop_output(out, padded, shape)

    def predict(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        """The network on inputs whose size is a multiple of ``size_multiple``."""
        raise NotImplementedError

    def loss(
        self, output: RegistrationOutput, moving: torch.Tensor, fixed: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The paper's training loss: ``(scalar tensor, {term name: detached 0-d tensor})``.

        Terms stay tensors so that a training or fine-tuning step never waits for the GPU to
        report them; ``float()`` a term where it is logged."""
        raise NotImplementedError

    @property
    def working_axes(self) -> str:
        """How the working grid is laid (:data:`napari_deepwarp.core.preprocess.WORKING_AXES`):
        the config's ``working_axes`` where it has one, else ``"image"``."""
        return str(getattr(self.config, "working_axes", "image"))

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)


def _crop(t: torch.Tensor, padded: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """Crop a tensor on a grid ``padded / k`` (k = 1, 2, 4, ...) to the matching part of ``shape``."""
    factor = padded[0] // t.shape[2] if t.shape[2] else 1
    if any(p != n * factor for p, n in zip(padded, t.shape[2:])):
        return t  # not a spatial tensor of this pyramid: leave it alone
    keep = [-(-n // factor) for n in shape]
    return t[:, :, : keep[0], : keep[1], : keep[2]]


def crop_output(out: RegistrationOutput, padded, shape) -> RegistrationOutput:
    """Crop every spatial tensor of ``out`` from the padded grid back to ``shape``."""

    def crop(value):
        if isinstance(value, torch.Tensor) and value.dim() == 5:
            return _crop(value, padded, shape)
        if isinstance(value, (list, tuple)):
            return type(value)(crop(v) for v in value)
        return value

    return RegistrationOutput(
        displacement=crop(out.displacement),
        affine=out.affine,
        multiscale=crop(out.multiscale),
        velocity=crop(out.velocity),
        extras={k: crop(v) for k, v in out.extras.items()},
    )


_REGISTRY: dict[str, type[RegistrationModel]] = {}


def register_model(name: str):
    """Class decorator: make a :class:`RegistrationModel` available under ``name``."""

    def decorate(cls: type[RegistrationModel]) -> type[RegistrationModel]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_builtin_models() -> None:
    # Importing the package registers the built-in architectures.
    from napari_deepwarp.core import models  # noqa: F401


def available_models() -> dict[str, type[RegistrationModel]]:
    """Registered architectures by name, sorted."""
    _load_builtin_models()
    return dict(sorted(_REGISTRY.items()))


def get_model_class(name: str) -> type[RegistrationModel]:
    models = available_models()
    if name not in models:
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(models)}")
    return models[name]


def build_config(cls: type[RegistrationModel], values: dict[str, Any] | None = None):
    """The model's config dataclass from a dict, refusing fields it does not have."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"model {cls.name!r} has no config field(s) {unknown}; its fields are {sorted(known)}"
        )
    for f in dataclasses.fields(cls.config_class):
        if f.name in values and isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    return cls.config_class(**values)


def create_model(name: str, **config) -> RegistrationModel:
    """Instantiate a registered model with its default config updated by ``config``."""
    cls = get_model_class(name)
    return cls(build_config(cls, config))
