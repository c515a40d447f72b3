"""Mixed precision for the network: what ``"auto"`` means on a device, and the autocast context
that runs a forward pass (and fine-tuning) in it.

Only the network runs in reduced precision. Its field is returned as float32, and everything
after it (the warp at full resolution, the Jacobian, the metrics, field refinement) stays in
float32. Losses take reduced-precision inputs in float32 (see :mod:`losses`).

``"auto"`` picks bfloat16 where the hardware computes it natively and float32 elsewhere:
- on CUDA: GPUs that compute bfloat16 natively (Ampere and later; not the emulation that
  ``torch.cuda.is_bf16_supported()`` also counts by default);
- on the CPU: processors with AVX512-BF16 or AMX. Elsewhere oneDNN emulates bfloat16, which
  is slower than float32.

bfloat16 keeps float32's exponent range, so it needs no loss scaling. float16 is available on
request. On the CPU, torch 2.13's bfloat16 convolution gets a garbage weight gradient when its
input is 2 voxels deep; :class:`~napari_deepwarp.core.models.blocks.ConvBlock` runs such a
layer in float32. As a backstop, every optimiser step (training and fine-tuning) goes through
:func:`guarded_step`, which skips a step whose loss or gradient is not finite.

What bfloat16 costs in accuracy was checked on the shipped checkpoints with
``python -m benchmarks.precision_mindboggle`` (figures in the README).
"""

from __future__ import annotations

import contextlib
import math

import torch

from napari_deepwarp.core.io import InputError

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bfloat16(device: torch.device | str) -> bool:
    """True where ``device`` computes bfloat16 in hardware (see the module docstring)."""
    kind = torch.device(device).type
    if kind == "cuda":
        # including_emulation=False: GPUs before Ampere emulate bfloat16, slower than float32.
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if kind == "cpu":
        cpu = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(cpu, name, lambda: False)() for name in checks)
    return False


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """The network's compute dtype for ``precision`` (one of :data:`PRECISIONS`) on ``device``."""
    if precision == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    if precision not in _DTYPES:
        raise InputError(f"unknown precision {precision!r}; use one of: {', '.join(PRECISIONS)}")
    return _DTYPES[precision]


def autocast(device: torch.device | str, dtype: torch.dtype):
    """A context that runs the operations autocast covers in ``dtype`` (convolutions and matrix
    products; float32 where autocast keeps it, such as sampling); a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def precision_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (as the settings and metrics write it)."""
    return str(dtype).removeprefix("torch.")


def guarded_step(
    optimiser: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    parameters,
    loss: torch.Tensor,
    max_norm: float = math.inf,
) -> tuple[float, bool]:
    """After ``scaler.scale(loss).backward()``: unscale, clip the gradient norm to ``max_norm``
    and step, unless the loss or the gradient is not finite (the step is then skipped, and the
    weights stay as they were). Returns ``(loss value, stepped)``: one read from the device."""
    scaler.unscale_(optimiser)
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    value, norm_value = torch.stack([loss.detach().float(), norm.float()]).tolist()
    stepped = math.isfinite(value) and math.isfinite(norm_value)
    if stepped:
        scaler.step(optimiser)
    scaler.update()
    return value, stepped
