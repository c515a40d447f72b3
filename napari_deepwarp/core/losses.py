"""Training losses: image similarity terms and displacement-field regularisers.

Images are tensors ``(B, C, D, H, W)``; displacement fields ``u`` are ``(B, 3, D, H, W)`` in
voxels, channels ``(dz, dy, dx)`` (see :mod:`napari_deepwarp.core.spatial`). Every function is
differentiable, works on any device, and returns a scalar tensor where **lower is better**.
Reduced-precision inputs (float16/bfloat16) are computed in float32; float64 stays float64.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "REGULARISERS",
    "SIMILARITY_LOSSES",
    "affine_l1_to_identity_loss",
    "bending_energy_loss",
    "clamped_l2_loss",
    "diffusion_loss",
    "l1_to_identity_loss",
    "local_ncc_loss",
    "local_ncc_map",
    "mse_loss",
    "mutual_information_loss",
    "ncc_loss",
    "ncc_ssd_loss",
    "similarity_loss",
    "soft_dice_loss",
    "total_variation_loss",
]


def _work(x: torch.Tensor) -> torch.Tensor:
    """``x`` in a dtype good enough for accumulations: at least float32."""
    if x.dtype == torch.float64:
        return x
    return x.float()


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() != 5:
        raise ValueError(f"expected (B, C, D, H, W) tensors, got shape {tuple(a.shape)}")


def _standardise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per batch item ``(x - mean) / sqrt(var + eps**2)`` over ``C, D, H, W`` (population var)."""
    flat = x.flatten(1)
    centred = flat - flat.mean(dim=1, keepdim=True)
    var = (centred * centred).mean(dim=1, keepdim=True)
    return centred / torch.sqrt(var + eps * eps)


# --------------------------------------------------------------------------------------------
# Similarity terms
# --------------------------------------------------------------------------------------------


def ncc_loss(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``1 - NCC(a, b)``, global normalised cross-correlation per batch item, averaged.

    ``NCC = mean(za * zb)`` with ``z = (x - mean) / sqrt(var + eps**2)`` over ``C, D, H, W``
    (population variance). In ``[0, 2]``; a constant image gives NCC 0, i.e. loss 1.
    """
    _check_pair(a, b)
    za, zb = _standardise(_work(a), eps), _standardise(_work(b), eps)
    return 1.0 - (za * zb).mean(dim=1).mean()


def ncc_ssd_loss(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Conv2Warp's NCC-derived SSD: ``1/(2N) * sum((za - zb)**2)``, per batch item, averaged.

    ``z = (x - mean) / sqrt(var + eps**2)`` over the ``N = C*D*H*W`` voxels of one item
    (population variance). The paper's OCR'd formula shows ``|x - mean|`` in the numerators; that
    absolute value would break the equivalence with NCC the paper relies on, so it is *not* used
    here. Without it, ``sum(z**2) = N`` for ``eps -> 0`` and the loss equals ``1 - NCC``.
    """
    _check_pair(a, b)
    za, zb = _standardise(_work(a), eps), _standardise(_work(b), eps)
    return (0.5 * ((za - zb) ** 2).mean(dim=1)).mean()


def _window3(window: int | Sequence[int]) -> tuple[int, int, int]:
    win = (int(window),) * 3 if isinstance(window, int) else tuple(int(w) for w in window)
    if len(win) != 3 or any(w < 1 or w % 2 == 0 for w in win):
        raise ValueError(f"window must be an odd int or a 3-tuple of odd ints, got {window!r}")
    return win  # type: ignore[return-value]


def _box_sum_cut(x: torch.Tensor, window: tuple[int, int, int], scale: bool) -> torch.Tensor:
    """Box sums of ``x (B, C, D, H, W)`` over a centred window cut at the volume edges.

    Separable: one cumulative sum per axis and a difference of shifted slices. With ``scale``
    every axis' sum is divided by its count of voxels inside, before summing (the adjoint).
    """
    for axis, w in enumerate(window):
        dim, n = axis + 2, x.shape[axis + 2]
        if w == 1 or n == 1:
            continue
        r = w // 2
        idx = torch.arange(n, device=x.device)
        count = (torch.clamp(idx + r, max=n - 1) - torch.clamp(idx - r, min=0) + 1).to(x.dtype)
        shape = [1, 1, 1, 1, 1]
        shape[dim] = n
        count = count.view(shape)
        if scale:
            x = x / count
        pad = [0] * 6
        pad[2 * (2 - axis)], pad[2 * (2 - axis) + 1] = r + 1, r
        csum = torch.cumsum(F.pad(x, pad), dim=dim)
        x = csum.narrow(dim, w, n) - csum.narrow(dim, 0, n)
        if not scale:
            x = x / count
    return x


class _BoxMean(torch.autograd.Function):
    """Mean over a centred box cut at the edges; its adjoint is again a cut box sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
        ctx.window = window
        return _box_sum_cut(x, window, scale=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return _box_sum_cut(grad, ctx.window, scale=True), None


def _box_mean(x: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """Mean of ``x (B, C, D, H, W)`` over a centred box, counting only voxels inside the volume.

    Cutting the box at the edges keeps local statistics unbiased there, so local NCC stays
    exactly invariant to affine intensity changes.
    """
    return _BoxMean.apply(x.contiguous(), window)


def local_ncc_map(
    a: torch.Tensor, b: torch.Tensor, window: int | Sequence[int] = 9, eps: float = 1e-5
) -> torch.Tensor:
    """Local squared NCC per voxel, ``(B, C, D, H, W)`` in ``[0, 1]`` (VoxelMorph's LNCC).

    ``window``: odd side length in voxels, or a ``(d, h, w)`` tuple of odd ints. Per voxel
    ``cc = cov**2 / (var_a * var_b)`` of the window (cut at the volume edges), with each local
    variance clamped to ``>= eps`` (intensity units squared) so flat regions give ``cc = 0``
    rather than NaN. Box sums are separable cumulative-sum differences in at least float32.
    """
    _check_pair(a, b)
    win = _window3(window)
    a, b = _work(a), _work(b)
    # Centring per item leaves local NCC unchanged and reduces cancellation in E[x^2] - E[x]^2.
    a = a - a.flatten(1).mean(dim=1).view(-1, 1, 1, 1, 1)
    b = b - b.flatten(1).mean(dim=1).view(-1, 1, 1, 1, 1)
    c = a.shape[1]
    means = _box_mean(torch.cat([a, b, a * a, b * b, a * b], dim=1), win)
    m_a, m_b, m_aa, m_bb, m_ab = torch.split(means, c, dim=1)
    cross = m_ab - m_a * m_b
    var_a = torch.clamp(m_aa - m_a * m_a, min=eps)
    var_b = torch.clamp(m_bb - m_b * m_b, min=eps)
    return cross * cross / (var_a * var_b)


def local_ncc_loss(
    a: torch.Tensor, b: torch.Tensor, window: int | Sequence[int] = 9, eps: float = 1e-5
) -> torch.Tensor:
    """``1 - mean local squared NCC`` over cubic windows (see :func:`local_ncc_map`), in
    ``[0, 1]``."""
    return 1.0 - local_ncc_map(a, b, window, eps).mean()


def mutual_information_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    bins: int = 32,
    sigma_ratio: float = 0.5,
    mask: torch.Tensor | None = None,
    max_samples: int | None = None,
) -> torch.Tensor:
    """Negative Parzen-window mutual information (nats), per batch item, averaged.

    Intensities are assumed to lie roughly in ``[0, 1]`` and are clamped to it. Each voxel spreads
    over ``bins`` equally spaced bin centres with a Gaussian kernel of
    ``sigma = sigma_ratio / bins`` (a fraction of the bin width), weights normalised per voxel.
    The joint histogram is ``Wa^T @ Wb`` of the ``(N, bins)`` weight matrices (no
    ``N x bins x bins`` tensor). ``mask`` (broadcastable to ``a``, bool or soft weights) weights
    the voxels. ``max_samples`` draws that many voxel positions at random (``torch.randperm``, the
    same positions for every batch item; reproducible with ``torch.manual_seed``).
    """
    _check_pair(a, b)
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    a, b = _work(a), _work(b)
    batch = a.shape[0]
    fa = a.reshape(batch, -1).clamp(0.0, 1.0)
    fb = b.reshape(batch, -1).clamp(0.0, 1.0)
    weights = None
    if mask is not None:
        mask = mask.to(device=fa.device, dtype=fa.dtype)
        weights = torch.broadcast_to(mask, a.shape).reshape(batch, -1)
    if max_samples is not None and max_samples < fa.shape[1]:
        idx = torch.randperm(fa.shape[1], device=fa.device)[: int(max_samples)]
        fa, fb = fa[:, idx], fb[:, idx]
        if weights is not None:
            weights = weights[:, idx]

    centres = (torch.arange(bins, device=fa.device, dtype=fa.dtype) + 0.5) / bins
    inv_two_sigma2 = 1.0 / (2.0 * (sigma_ratio / bins) ** 2)

    def parzen(x: torch.Tensor) -> torch.Tensor:  # (B, N) -> (B, N, bins), rows sum to 1
        d = x[..., None] - centres
        return torch.softmax(d * d * -inv_two_sigma2, dim=-1)

    wa, wb = parzen(fa), parzen(fb)
    if weights is not None:
        wa = wa * weights[..., None]
        total = weights.sum(dim=1).clamp_min(1e-12).view(batch, 1, 1)
    else:
        total = torch.full((batch, 1, 1), float(fa.shape[1]), device=fa.device, dtype=fa.dtype)
    joint = torch.bmm(wa.transpose(1, 2), wb) / total  # (B, bins, bins)
    p_a = joint.sum(dim=2, keepdim=True)
    p_b = joint.sum(dim=1, keepdim=True)
    tiny = 1e-10
    mi = (joint * (torch.log(joint + tiny) - torch.log(p_a * p_b + tiny))).sum(dim=(1, 2))
    return -mi.mean()


def mse_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference over all voxels and batch items."""
    _check_pair(a, b)
    return ((_work(a) - _work(b)) ** 2).mean()


def soft_dice_loss(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``1 - mean soft Dice`` of one-hot or probability maps ``(B, K, D, H, W)``.

    Per item and channel ``dice = (2 * sum(a * b) + eps) / (sum(a) + sum(b) + eps)``, averaged
    over batch and channels (so a channel empty in both maps counts as a perfect match). Drop the
    background channel before calling if it should not count.
    """
    _check_pair(a, b)
    a, b = _work(a), _work(b)
    inter = (a * b).sum(dim=(2, 3, 4))
    total = a.sum(dim=(2, 3, 4)) + b.sum(dim=(2, 3, 4))
    return 1.0 - ((2.0 * inter + eps) / (total + eps)).mean()


# --------------------------------------------------------------------------------------------
# Regularisers on a displacement u (B, 3, D, H, W), voxels
# --------------------------------------------------------------------------------------------


def _check_field(u: torch.Tensor) -> None:
    if u.dim() != 5:
        raise ValueError(f"expected a field (B, 3, D, H, W), got shape {tuple(u.shape)}")


def _forward_differences(u: torch.Tensor) -> list[torch.Tensor]:
    """Forward differences along z, y, x (axes of length 1 are skipped)."""
    return [torch.diff(u, dim=axis) for axis in (2, 3, 4) if u.shape[axis] > 1]


def diffusion_loss(u: torch.Tensor) -> torch.Tensor:
    """Mean squared forward differences of ``u``, averaged over the three axes (VoxelMorph 'l2').

    ``(mean(du/dz**2) + mean(du/dy**2) + mean(du/dx**2)) / 3``, voxels**2 per voxel**2.
    """
    _check_field(u)
    diffs = _forward_differences(_work(u))
    if not diffs:
        return u.new_zeros((), dtype=_work(u).dtype)
    return torch.stack([(d * d).mean() for d in diffs]).mean()


def total_variation_loss(u: torch.Tensor) -> torch.Tensor:
    """Mean absolute forward differences of ``u``, averaged over the three axes ('l1' gradient)."""
    _check_field(u)
    diffs = _forward_differences(_work(u))
    if not diffs:
        return u.new_zeros((), dtype=_work(u).dtype)
    return torch.stack([d.abs().mean() for d in diffs]).mean()


def bending_energy_loss(u: torch.Tensor) -> torch.Tensor:
    """Bending energy of ``u``: ``mean(u_zz^2) + mean(u_yy^2) + mean(u_xx^2)`` plus twice
    ``mean(u_zy^2) + mean(u_zx^2) + mean(u_yx^2)``.

    Each mean runs over components and the voxels where its finite difference is defined
    (second differences ``u[i+1] - 2u[i] + u[i-1]``; mixed terms are forward differences of
    forward differences), as in MONAI's ``BendingEnergyLoss``. Zero for any affine field.
    """
    _check_field(u)
    u = _work(u)
    axes = [axis for axis in (2, 3, 4) if u.shape[axis] > 1]
    terms = []
    for i, ax in enumerate(axes):
        if u.shape[ax] > 2:
            terms.append((torch.diff(u, n=2, dim=ax) ** 2).mean())
        for ax2 in axes[i + 1 :]:
            terms.append(2.0 * (torch.diff(torch.diff(u, dim=ax), dim=ax2) ** 2).mean())
    if not terms:
        return u.new_zeros(())
    return torch.stack(terms).sum()


def clamped_l2_loss(
    u: torch.Tensor, reference: torch.Tensor, low: float = 0.0, high: float = 0.25
) -> torch.Tensor:
    """Conv2Warp's constrained smoothness term: ``clamp(mean((u - reference)**2), low, high)``.

    ``reference`` is the upsampled coarser field (same shape as ``u``). Outside ``[low, high]``
    the gradient is zero; that is the paper's guard against over-smoothing.
    """
    if u.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(u.shape)} vs {tuple(reference.shape)}")
    return torch.clamp(((_work(u) - _work(reference)) ** 2).mean(), min=low, max=high)


def l1_to_identity_loss(u: torch.Tensor) -> torch.Tensor:
    """``mean(|u|)``: distance of a displacement field to the identity, voxels."""
    return _work(u).abs().mean()


def affine_l1_to_identity_loss(matrix: torch.Tensor) -> torch.Tensor:
    """``mean(|A - [I | 0]|)`` for affine matrices ``(B, 3, 4)`` acting on voxel (z, y, x)."""
    if matrix.dim() != 3 or matrix.shape[1:] != (3, 4):
        raise ValueError(f"expected (B, 3, 4) matrices, got shape {tuple(matrix.shape)}")
    m = _work(matrix)
    eye = torch.eye(3, 4, device=m.device, dtype=m.dtype)
    return (m - eye).abs().mean()


SIMILARITY_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "ncc": ncc_loss,
    "lncc": local_ncc_loss,
    "ncc_ssd": ncc_ssd_loss,
    "mi": mutual_information_loss,
    "mse": mse_loss,
}

REGULARISERS: dict[str, Callable[..., torch.Tensor]] = {
    "diffusion": diffusion_loss,
    "tv": total_variation_loss,
    "bending": bending_energy_loss,
    "l1": l1_to_identity_loss,
}


def similarity_loss(name: str, **kwargs) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The similarity term ``name`` (a key of :data:`SIMILARITY_LOSSES`) with ``kwargs`` bound.

    Returns ``f(a, b) -> scalar loss``. Raises ``ValueError`` naming the valid choices, and
    ``TypeError`` at once for a keyword the loss does not take.
    """
    try:
        fn = SIMILARITY_LOSSES[name]
    except KeyError:
        valid = ", ".join(sorted(SIMILARITY_LOSSES))
        raise ValueError(f"unknown similarity loss {name!r}; choose one of: {valid}") from None
    inspect.signature(fn).bind_partial(None, None, **kwargs)
    return functools.partial(fn, **kwargs) if kwargs else fn
