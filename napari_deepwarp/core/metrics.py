"""Evaluation metrics (not training losses): overlap, surface distance, field quality, intensity.

Inputs are numpy arrays or torch tensors, arrays ``(z, y, x)`` (or tensors whose last three axes
are ``z, y, x``); spacings are ``(z, y, x)`` millimetres; landmarks are ``(N, 3)`` in ``(x, y, z)``
order. Work is done with torch on the input's device (numpy inputs: CPU), in float64 where it is
available; results are Python floats or dicts of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "dice_per_label",
    "folding_percent",
    "hd95",
    "hd95_per_label",
    "intensity_similarity",
    "jaccard_per_label",
    "jacobian_percentiles",
    "local_ncc",
    "mean_dice",
    "mutual_information",
    "ncc",
    "overlap_per_label",
    "overlap_per_label_many",
    "psnr",
    "sdlogj",
    "ssim",
    "tre_mm",
]


def _tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.as_tensor(np.ascontiguousarray(x))


def _float(x) -> torch.Tensor:
    t = _tensor(x)
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _same_shape(a, b) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")


# --------------------------------------------------------------------------------------------
# Label overlap
# --------------------------------------------------------------------------------------------


def _label_tensor(x) -> torch.Tensor:
    t = _tensor(x)
    if t.is_floating_point():
        t = torch.round(t)
    return t.reshape(-1).to(torch.int64)


def _label_counts(
    fixed, warped, prepared: tuple | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Label values and, per value, voxel counts in fixed, in warped, and in both.

    ``prepared``: ``_prepare_labels(fixed)``, to convert a fixed map once for several warped ones.
    """
    _same_shape(fixed, warped)
    f, f_lo, f_hi = prepared if prepared is not None else _prepare_labels(fixed)
    w = _label_tensor(warped).to(f.device)
    if f.numel() == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty
    w_lo, w_hi = (int(v) for v in torch.aminmax(w))
    lo, hi = min(f_lo, w_lo), max(f_hi, w_hi)
    if lo >= 0 and hi <= max(1 << 20, f.numel()):
        values = torch.arange(hi + 1, device=f.device)
        fi, wi = f, w
    else:  # negative or huge label values: compact them first
        values, inverse = torch.unique(torch.cat([f, w]), return_inverse=True)
        fi, wi = inverse[: f.numel()], inverse[f.numel() :]
    n = values.numel()
    count_f = torch.bincount(fi, minlength=n)
    count_w = torch.bincount(wi, minlength=n)
    # Voxels where the maps disagree go to a spare bin n, dropped afterwards.
    count_both = torch.bincount(torch.where(fi == wi, fi, n), minlength=n + 1)[:n]
    return tuple(t.cpu().numpy() for t in (values, count_f, count_w, count_both))  # type: ignore[return-value]


def _prepare_labels(fixed) -> tuple[torch.Tensor, int, int]:
    """A label map as a flat int64 tensor with its min and max (0, 0 when empty)."""
    f = _label_tensor(fixed)
    if f.numel() == 0:
        return f, 0, 0
    lo, hi = torch.aminmax(f)
    return f, int(lo), int(hi)


def overlap_per_label_many(
    fixed_labels, warped_labels: Sequence, labels: Iterable[int] | None = None
) -> list[dict[int, dict[str, float]]]:
    """:func:`overlap_per_label` of one fixed map against several warped maps (e.g. before,
    affine, after); the fixed map is converted once. Same values as one call per map."""
    prepared = _prepare_labels(fixed_labels)
    wanted = None if labels is None else list(labels)
    return [_overlap(fixed_labels, w, wanted, prepared) for w in warped_labels]


def overlap_per_label(
    fixed_labels, warped_labels, labels: Iterable[int] | None = None
) -> dict[int, dict[str, float]]:
    """Dice and Jaccard per label of two integer label maps of the same shape.

    ``labels``: the labels to report; by default those present in *both* maps, 0 excluded.
    Returns ``{label: {"dice": d, "jaccard": j}}`` sorted by label; a requested label absent
    from both maps gets NaN. One pass of ``bincount``s over the volume, not a loop per label.
    Float maps are rounded to the nearest integer.
    """
    return _overlap(fixed_labels, warped_labels, labels, None)


def _overlap(fixed_labels, warped_labels, labels, prepared) -> dict[int, dict[str, float]]:
    values, count_f, count_w, count_both = _label_counts(fixed_labels, warped_labels, prepared)
    index = {int(v): i for i, v in enumerate(values)}
    if labels is None:
        present = (count_f > 0) & (count_w > 0) & (values != 0)
        wanted = [int(v) for v in values[present]]
    else:
        wanted = sorted({int(v) for v in labels})
    out: dict[int, dict[str, float]] = {}
    for label in wanted:
        i = index.get(label)
        nf, nw, nb = (0, 0, 0) if i is None else (count_f[i], count_w[i], count_both[i])
        nb, total = int(nb), int(nf) + int(nw)
        if total == 0:
            out[label] = {"dice": math.nan, "jaccard": math.nan}
        else:
            out[label] = {"dice": 2.0 * nb / total, "jaccard": nb / (total - nb)}
    return out


def dice_per_label(fixed_labels, warped_labels, labels=None) -> dict[int, float]:
    """``{label: Dice}``; see :func:`overlap_per_label` for the choice of labels."""
    return {k: v["dice"] for k, v in overlap_per_label(fixed_labels, warped_labels, labels).items()}


def jaccard_per_label(fixed_labels, warped_labels, labels=None) -> dict[int, float]:
    """``{label: Jaccard}``; see :func:`overlap_per_label` for the choice of labels."""
    per_label = overlap_per_label(fixed_labels, warped_labels, labels)
    return {k: v["jaccard"] for k, v in per_label.items()}


def mean_dice(fixed_labels, warped_labels, labels=None) -> float:
    """Mean Dice over labels (NaN entries ignored; NaN when there is no label)."""
    values = [d for d in dice_per_label(fixed_labels, warped_labels, labels).values()]
    values = [d for d in values if not math.isnan(d)]
    return float(np.mean(values)) if values else math.nan


# --------------------------------------------------------------------------------------------
# Surface distance
# --------------------------------------------------------------------------------------------


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (or on the array border)."""
    from scipy import ndimage  # imported on use: 0.2-0.4 s that a run without labels skips

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _hd_masks(a: np.ndarray, b: np.ndarray, spacing: Sequence[float], percentile: float) -> float:
    has_a, has_b = bool(a.any()), bool(b.any())
    if not has_a and not has_b:
        return 0.0
    if not has_a or not has_b:
        return math.inf
    # Crop to the union's bounding box plus one voxel: distances between the two surfaces and
    # the surfaces themselves are unchanged, and the distance transforms get much cheaper.
    nonzero = np.nonzero(a | b)
    box = tuple(
        slice(max(int(idx.min()) - 1, 0), min(int(idx.max()) + 2, n))
        for idx, n in zip(nonzero, a.shape)
    )
    from scipy import ndimage

    sa, sb = _surface(a[box]), _surface(b[box])
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    return float(max(np.percentile(to_b, percentile), np.percentile(to_a, percentile)))


def _spacing(spacing_zyx, ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing_zyx, float), (ndim,)))
    if any(s <= 0 for s in spacing):
        raise ValueError(f"spacing must be positive, got {spacing_zyx!r}")
    return spacing


def hd95(a_mask, b_mask, spacing_zyx, percentile: float = 95.0) -> float:
    """Robust (95th percentile) symmetric Hausdorff distance between two masks, in mm.

    Surfaces are the mask voxels with a face neighbour outside. For each surface voxel the
    Euclidean distance (anisotropic ``spacing_zyx``, exact EDT) to the other surface is taken;
    the result is ``max(P95(a -> b), P95(b -> a))`` as in MONAI and DeepMind's surface-distance
    package (``numpy.percentile``, linear interpolation). Both masks empty: 0; one empty: inf.
    """
    a, b = _numpy(a_mask).astype(bool), _numpy(b_mask).astype(bool)
    _same_shape(a, b)
    return _hd_masks(a, b, _spacing(spacing_zyx, a.ndim), percentile)


def hd95_per_label(
    a_labels, b_labels, spacing_zyx, labels: Iterable[int] | None = None, percentile: float = 95.0
) -> dict[int, float]:
    """``{label: hd95 in mm}`` for two label maps; labels default to those in both maps but 0.

    Each label is processed inside its bounding box, so many small labels stay cheap.
    """
    a, b = _numpy(a_labels), _numpy(b_labels)
    _same_shape(a, b)
    a, b = np.rint(a).astype(np.int64), np.rint(b).astype(np.int64)
    spacing = _spacing(spacing_zyx, a.ndim)
    if labels is None:
        labels = np.intersect1d(np.unique(a), np.unique(b))
        labels = labels[labels != 0]
    from scipy import ndimage

    out: dict[int, float] = {}
    boxes_a = ndimage.find_objects(a) if a.size and a.min() >= 0 else None
    boxes_b = ndimage.find_objects(b) if b.size and b.min() >= 0 else None
    for label in sorted({int(v) for v in labels}):
        if boxes_a is None or boxes_b is None or label <= 0:
            out[label] = _hd_masks(a == label, b == label, spacing, percentile)
            continue
        found = [
            boxes[label - 1]
            for boxes in (boxes_a, boxes_b)
            if label - 1 < len(boxes) and boxes[label - 1] is not None
        ]
        if not found:
            out[label] = 0.0  # absent from both maps
            continue
        box = tuple(
            slice(
                max(min(s[d].start for s in found) - 1, 0),
                min(max(s[d].stop for s in found) + 1, n),
            )
            for d, n in enumerate(a.shape)
        )
        out[label] = _hd_masks(a[box] == label, b[box] == label, spacing, percentile)
    return out


# --------------------------------------------------------------------------------------------
# Field quality
# --------------------------------------------------------------------------------------------


def _masked(values, mask, convert: bool = True) -> torch.Tensor:
    """``values`` inside ``mask`` (all of them when None), flat; in float64 unless not
    ``convert`` (then in their own dtype, without a copy where no mask is given)."""
    t = _float(values) if convert else _tensor(values)
    if mask is None:
        return t.reshape(-1)
    m = _tensor(mask).to(device=t.device, dtype=torch.bool)
    return t[torch.broadcast_to(m, t.shape)]


def folding_percent(jac_det, mask=None) -> float:
    """Percentage of voxels with Jacobian determinant ``<= 0`` (inside ``mask`` if given).

    ``mask`` (bool) must broadcast to ``jac_det``'s shape. NaN when no voxel is counted.
    """
    v = _masked(jac_det, mask, convert=False)  # a count: no float64 copy of a full-size field
    if v.numel() == 0:
        return math.nan
    return float(100.0 * (v <= 0).sum().item() / v.numel())


def sdlogj(jac_det, mask=None, clip: float = 1e-9) -> float:
    """Standard deviation (population) of ``log(max(det, clip))`` (inside ``mask`` if given).

    Determinants are clipped to ``>= 1e-9`` before the log, so folded voxels count as
    ``log(1e-9) ~ -20.7`` and raise SDlogJ sharply rather than giving NaN.
    """
    v = _masked(jac_det, mask, convert=False)
    if v.numel() == 0:
        return math.nan
    logs = torch.log(torch.clamp(v.float(), min=clip))  # float32 logs, float64 statistics
    centred = logs - logs.double().mean().float()
    return float(torch.linalg.vector_norm(centred, dtype=torch.float64) / math.sqrt(v.numel()))


def jacobian_percentiles(jac_det, mask=None, q: Sequence[float] = (1.0, 99.0)) -> list[float]:
    """Percentiles ``q`` (in [0, 100]) of the Jacobian determinant (inside ``mask`` if given),
    e.g. the 1st and 99th: how much the field compresses and stretches. NaN when empty."""
    v = _masked(jac_det, mask)
    if v.numel() == 0:
        return [math.nan for _ in q]
    if v.numel() > 4_000_000:  # torch.quantile's limit is 16M; a strided subsample is plenty
        v = v[:: v.numel() // 2_000_000 + 1]
    return [float(x) for x in torch.quantile(v.float(), torch.tensor([p / 100 for p in q]))]


# --------------------------------------------------------------------------------------------
# Landmarks
# --------------------------------------------------------------------------------------------


def tre_mm(points_a_xyz, points_b_xyz, spacing_xyz=None) -> dict[str, float]:
    """Target registration error of corresponding points ``(N, 3)`` in ``(x, y, z)``.

    Points are physical millimetres, or voxel indices when ``spacing_xyz`` (mm) is given.
    Returns ``{"mean", "std" (population), "median", "max"}`` of the Euclidean distances, mm.
    """
    pa = np.asarray(_numpy(points_a_xyz), dtype=np.float64)
    pb = np.asarray(_numpy(points_b_xyz), dtype=np.float64)
    if pa.ndim != 2 or pa.shape[1] != 3 or pa.shape != pb.shape:
        raise ValueError(f"expected two (N, 3) point arrays, got {pa.shape} and {pb.shape}")
    diff = pa - pb
    if spacing_xyz is not None:
        diff = diff * np.asarray(spacing_xyz, dtype=np.float64)
    dist = np.linalg.norm(diff, axis=1)
    if dist.size == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "max": math.nan}
    return {
        "mean": float(dist.mean()),
        "std": float(dist.std()),
        "median": float(np.median(dist)),
        "max": float(dist.max()),
    }


# --------------------------------------------------------------------------------------------
# Intensity similarity
# --------------------------------------------------------------------------------------------


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    _same_shape(a, b)
    ta = _float(a)
    return ta, _float(b).to(ta.device)


def _centred(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat ``t - mean(t)`` and its squared norm."""
    d = t.reshape(-1) - t.mean()
    return d, torch.dot(d, d)


def _ncc_centred(da, saa, db, sbb) -> float:
    denom = torch.sqrt(saa * sbb)
    if denom.item() == 0:
        return 0.0
    return float((torch.dot(da, db) / denom).clamp(-1.0, 1.0))


def ncc(a, b) -> float:
    """Global normalised cross-correlation (Pearson) of two images, in ``[-1, 1]``.

    0 when either image is constant.
    """
    ta, tb = _pair(a, b)
    return _ncc_centred(*_centred(ta), *_centred(tb))


def local_ncc(a, b, window: int = 9, mask=None) -> float:
    """Mean local squared NCC of two images ``(z, y, x)`` over ``window``-voxel cubes (the
    similarity VoxelMorph-style networks optimise), averaged inside ``mask`` (bool, same shape)
    if given; in ``[0, 1]``, NaN when the mask is empty. See :func:`losses.local_ncc_map`."""
    from napari_deepwarp.core.losses import local_ncc_map

    _same_shape(a, b)
    ta, tb = (_tensor(x).float()[None, None] for x in (a, b))  # float32: box sums of ~1M voxels
    cc = local_ncc_map(ta, tb.to(ta.device), window)[0, 0]
    if mask is not None:
        cc = cc[_tensor(mask).to(device=cc.device, dtype=torch.bool)]
    return float(cc.double().mean()) if cc.numel() else math.nan


def _bin_index(t: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin of every value: ``bins`` equal bins over ``[min, max]``, right edge in the last."""
    t = t.reshape(-1)
    lo, hi = torch.aminmax(t)
    if (hi - lo).item() == 0:
        return torch.zeros_like(t, dtype=torch.int32)
    x = t - lo
    x.div_(hi - lo).mul_(bins).floor_()  # the same operations, in place: floor((t-lo)/(hi-lo)*b)
    return x.to(torch.int32).clamp_(0, bins - 1)  # int32: bincount runs twice as fast


def _mi_from_bins(ia: torch.Tensor, ib: torch.Tensor, bins: int, dtype) -> float:
    joint = torch.bincount(ia * bins + ib, minlength=bins * bins)
    p = joint.reshape(bins, bins).to(dtype) / ia.numel()
    pa, pb = p.sum(dim=1, keepdim=True), p.sum(dim=0, keepdim=True)
    nz = p > 0
    return float((p[nz] * torch.log(p[nz] / (pa * pb)[nz])).sum())


def mutual_information(a, b, bins: int = 32) -> float:
    """Mutual information in nats from a plain joint histogram (no Parzen smoothing).

    ``bins`` equal bins over each image's own ``[min, max]`` (right edge in the last bin), as
    ``numpy.histogram2d(a, b, bins)`` does.
    """
    ta, tb = _pair(a, b)
    if ta.numel() == 0:
        return math.nan
    return _mi_from_bins(_bin_index(ta, bins), _bin_index(tb, bins), bins, ta.dtype)


def intensity_similarity(reference, images: Sequence, bins: int = 32) -> list[dict[str, float]]:
    """``{"ncc": ncc(reference, im), "mi": mutual_information(reference, im, bins)}`` for each
    image, with the reference's conversion, centring and binning done once (the same values as
    the single calls; e.g. the fixed image against the moving image before and after)."""
    ref = _float(reference)
    if ref.numel() == 0:
        return [{"ncc": 0.0, "mi": math.nan} for _ in images]
    d_ref, s_ref = _centred(ref)
    bins_ref = _bin_index(ref, bins)
    out = []
    for image in images:
        _same_shape(reference, image)
        t = _float(image).to(ref.device)
        value = _ncc_centred(d_ref, s_ref, *_centred(t))
        out.append(
            {"ncc": value, "mi": _mi_from_bins(bins_ref, _bin_index(t, bins), bins, ref.dtype)}
        )
    return out


def _data_range(ta: torch.Tensor, tb: torch.Tensor, data_range) -> float:
    if data_range is not None:
        return float(data_range)
    return float(torch.maximum(ta.max(), tb.max()) - torch.minimum(ta.min(), tb.min()))


def _filter_valid(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable correlation of ``x (N, 1, D, H, W)`` with a 1D ``kernel`` along each axis,
    only where the window fits ('valid')."""
    w = kernel.numel()
    for shape in ((w, 1, 1), (1, w, 1), (1, 1, w)):
        x = F.conv3d(x, kernel.view(1, 1, *shape))
    return x


def ssim(a, b, data_range=None, window: int = 7, gaussian: bool = False) -> float:
    """Mean 3D structural similarity (Wang et al. 2004), ``K1 = 0.01``, ``K2 = 0.03``.

    Default: a uniform ``window**3`` box with sample (``n - 1``) covariances, averaged over the
    voxels where the window fits, which reproduces ``skimage.metrics.structural_similarity(a, b,
    data_range=...)`` on a 3D array. ``gaussian=True``: a normalised Gaussian window of side
    ``window`` and sigma 1.5 with population covariances (skimage's ``gaussian_weights`` uses
    ``window=11``). ``data_range`` defaults to ``max(a, b) - min(a, b)`` (1 if that is 0).
    Tensors with more than 3 axes are treated as a batch of volumes over their last three.
    """
    ta, tb = _pair(a, b)
    if ta.dim() < 3:
        raise ValueError(f"ssim needs volumes with 3 axes (z, y, x), got shape {tuple(ta.shape)}")
    if window < 1 or window % 2 == 0 or any(n < window for n in ta.shape[-3:]):
        raise ValueError(f"window must be odd and fit in the volume {tuple(ta.shape[-3:])}")
    dr = _data_range(ta, tb, data_range) or 1.0
    ta = ta.reshape(-1, 1, *ta.shape[-3:])
    tb = tb.reshape(-1, 1, *tb.shape[-3:])
    if gaussian:
        x = torch.arange(window, device=ta.device, dtype=ta.dtype) - (window - 1) / 2
        kernel = torch.exp(-0.5 * (x / 1.5) ** 2)
        kernel, cov_norm = kernel / kernel.sum(), 1.0
    else:
        kernel = torch.full((window,), 1.0 / window, device=ta.device, dtype=ta.dtype)
        n = window**3
        cov_norm = n / (n - 1) if n > 1 else 1.0
    mu_a, mu_b = _filter_valid(ta, kernel), _filter_valid(tb, kernel)
    var_a = cov_norm * (_filter_valid(ta * ta, kernel) - mu_a * mu_a)
    var_b = cov_norm * (_filter_valid(tb * tb, kernel) - mu_b * mu_b)
    cov = cov_norm * (_filter_valid(ta * tb, kernel) - mu_a * mu_b)
    c1, c2 = (0.01 * dr) ** 2, (0.03 * dr) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return float((num / den).mean())


def psnr(a, b, data_range=None) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range**2 / MSE)`` in dB (inf if identical).

    ``data_range`` defaults to ``max(a, b) - min(a, b)``.
    """
    ta, tb = _pair(a, b)
    mse = float(((ta - tb) ** 2).mean())
    if mse == 0:
        return math.inf
    dr = _data_range(ta, tb, data_range)
    return float(10.0 * math.log10(dr * dr / mse)) if dr > 0 else -math.inf
