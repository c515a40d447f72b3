"""GPU memory: fall back on a smaller working grid or the CPU when CUDA runs out, and release
the cached memory after a run.

Use from a caller of :func:`napari_deepwarp.core.pipeline.register` (CLI, widget, batch)::

    run = lambda s: register(fixed, moving, s, model, fixed_labels, moving_labels)
    result = yield from with_oom_fallback(run, settings)   # or drain(with_oom_fallback(...))
    release_memory(result.metrics["device"])

Only CUDA's (and MPS's) out-of-memory errors are caught; anything else propagates unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import torch

from napari_deepwarp.core.progress import Progress

R = TypeVar("R")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's ``OutOfMemoryError`` and the equivalent MPS/cuDNN ``RuntimeError``s."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in message or "cudnn_status_alloc_failed" in message
    )


def release_memory(device: str | torch.device | None = None) -> None:
    """Free what the caching allocator holds after a run (``torch.cuda.empty_cache()``; MPS
    likewise). Tensors still referenced stay; drop the result's tensors first if they are on
    the GPU. ``device=None`` or ``"auto"``: every available accelerator.

    No ``gc.collect()`` here: this runs in the widget's worker thread, and a collection there can
    finalise Qt objects while the main thread builds others, which deadlocked napari. Tensors
    are freed by reference counting as soon as nothing holds them."""
    kind = None if device in (None, "auto") else torch.device(device).type
    if kind in (None, "cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if kind in (None, "mps") and mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def smaller_settings(settings: Any, shrink: float = 0.75, min_size: int = 32) -> Any | None:
    """The next attempt after an out-of-memory error: the working grid's largest side times
    ``shrink`` (or its spacing divided by it when the spacing is fixed), down to ``min_size``;
    below that, the same settings on the CPU; None when already on the CPU.

    ``settings``: a :class:`~napari_deepwarp.core.pipeline.RegistrationSettings` (any dataclass
    with ``device``, ``max_size`` and ``working_spacing``); a changed copy is returned.
    """
    if settings.working_spacing is not None:
        # A fixed spacing: coarsen it while the grid it gives is still above min_size.
        if settings.max_size * shrink >= min_size:
            return dataclasses.replace(
                settings,
                working_spacing=settings.working_spacing / shrink,
                max_size=int(settings.max_size * shrink),
            )
    elif int(settings.max_size * shrink) >= min_size:
        return dataclasses.replace(settings, max_size=int(settings.max_size * shrink))
    if str(settings.device) != "cpu":
        return dataclasses.replace(settings, device="cpu")
    return None


def with_oom_fallback(
    run: Callable[[Any], Generator[Progress, None, R]],
    settings: Any,
    shrink: float = 0.75,
    min_size: int = 32,
) -> Generator[Progress, None, R]:
    """Run ``run(settings)`` (a progress generator such as ``register``); on a GPU
    out-of-memory error release the cache and start again with :func:`smaller_settings`,
    yielding a ``Progress(stage="fallback")`` whose message says what changed. The result
    records the settings that worked in ``metrics["oom_fallback"]`` when it has ``metrics``.
    Raises the last error when even the CPU runs out of memory.
    """
    attempt, notes = settings, []
    while True:
        try:
            result = yield from run(attempt)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            release_memory()
            nxt = smaller_settings(attempt, shrink, min_size)
            if nxt is None:
                raise
            if nxt.device != attempt.device:
                note = f"{attempt.device}: out of memory; running on the CPU instead (slower)"
            else:
                note = (
                    f"{attempt.device}: out of memory at working size {attempt.max_size}; "
                    f"retrying at {nxt.max_size}"
                )
            notes.append(note)
            yield Progress(0, 1, note, stage="fallback")
            attempt = nxt
            continue
        metrics = getattr(result, "metrics", None)
        if notes and isinstance(metrics, dict):
            metrics["oom_fallback"] = {
                "notes": notes,
                "device": str(attempt.device),
                "max_size": attempt.max_size,
                "working_spacing": attempt.working_spacing,
            }
        return result
