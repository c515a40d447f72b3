"""Spatial operations on dense fields: the one place where the conventions live.

Conventions (every module follows these; nothing else restates them):

* Arrays are ``(z, y, x)``, as napari and ``SimpleITK.GetArrayFromImage`` give them.
  Tensors are ``(B, C, D, H, W)`` with ``D, H, W`` = ``z, y, x``.
* A displacement field inside the engine is a tensor ``(B, 3, D, H, W)`` whose channels are
  ``(dz, dy, dx)``, in voxels of the grid it lives on, with the *pull* convention::

      warped(p) = moving(p + u(p))

  i.e. ``u`` maps each fixed-grid voxel ``p`` to the point of the moving image it takes its
  value from.
* At the boundary (files, napari layers) a field becomes a *physical* field: an ITK vector image
  of ``(x, y, z)`` millimetre displacements in LPS world coordinates, mapping fixed points to
  moving points, so that ``sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field))``
  reproduces the warp shown by the plugin (see :mod:`napari_deepwarp.core.io`).
* :func:`voxel_to_normalized` is the only function that turns voxel positions into
  ``grid_sample`` coordinates (``align_corners=True``: voxel ``0`` is ``-1``, voxel ``N-1`` is ``+1``);
  :func:`normalization_matrix` is the same map as a 4x4 matrix, for composing it with other
  affine maps on the host (float64) so that per-voxel work is done once (:func:`sample_at`).
* A field is resized with its values scaled by the ratio of voxel sizes (:func:`resize_field`).
* Sampling outside the image follows ITK's linear interpolator when ``padding="itk"``: points
  within half a voxel of the edge take the clamped edge value, points further out take ``0``.
  That is what lets our warp match ``sitk.Resample`` voxel for voxel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

Shape3 = Sequence[int]


def identity_grid(shape: Shape3, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of every voxel: ``(1, 3, D, H, W)``, channels ``(z, y, x)``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None]


def voxel_to_normalized(coords: torch.Tensor, shape: Shape3) -> torch.Tensor:
    """Voxel positions ``(B, 3, D', H', W')`` (z, y, x) on a grid of ``shape`` -> ``grid_sample`` grid.

    Returns ``(B, D', H', W', 3)`` in ``(x, y, z)`` order, normalised for ``align_corners=True``.
    An axis of length 1 maps to 0 so that it samples its only voxel.
    """
    scale = torch.tensor(
        [2.0 / (n - 1) if n > 1 else 0.0 for n in shape], device=coords.device, dtype=coords.dtype
    ).view(1, 3, 1, 1, 1)
    normalized = coords * scale - (scale > 0).to(coords.dtype)
    return normalized.permute(0, 2, 3, 4, 1).flip(-1)


def normalization_matrix(shape: Shape3) -> np.ndarray:
    """4x4 float64 matrix: voxel ``(z, y, x, 1)`` on a grid of ``shape`` -> ``grid_sample``
    coordinates ``(x, y, z, 1)`` (``align_corners=True``), as :func:`voxel_to_normalized`.

    An axis of length 1 keeps scale 1 and offset 0 (``grid_sample`` reads its only voxel
    whatever the coordinate), so that the map stays invertible.
    """
    m = np.zeros((4, 4))
    for row, (axis, n) in enumerate(zip((2, 1, 0), tuple(shape)[::-1])):
        m[row, axis], m[row, 3] = (2.0 / (n - 1), -1.0) if n > 1 else (1.0, 0.0)
    m[3, 3] = 1.0
    return m


def affine_points(
    matrix: np.ndarray, shape: Shape3, device=None, dtype=torch.float32
) -> torch.Tensor:
    """``matrix[:3, :3] @ p + matrix[:3, 3]`` for every voxel ``p = (z, y, x)`` of ``shape``.

    ``matrix``: 4x4 or 3x4 (float64 numpy). Returns ``(1, D, H, W, 3)`` channels-last, in the
    order of ``matrix``'s rows. The z and y terms are summed in float64 on a ``(D, H)`` plane,
    so the only full-size work is one broadcast addition (no index grid is materialised).
    """
    m = np.asarray(matrix, dtype=np.float64)
    d, h, w = (int(n) for n in shape)
    plane = (
        np.arange(d)[:, None, None] * m[:3, 0] + np.arange(h)[None, :, None] * m[:3, 1] + m[:3, 3]
    )
    row = np.arange(w)[:, None] * m[:3, 2]
    plane_t = torch.as_tensor(plane, dtype=dtype, device=device).view(1, d, h, 1, 3)
    row_t = torch.as_tensor(row, dtype=dtype, device=device).view(1, 1, 1, w, 3)
    return plane_t + row_t


def _flat3(points: torch.Tensor) -> torch.Tensor:
    """``(1, D, H, W, 3)`` -> ``(N, 3)``; a view for channels-last and for channels-first
    (``(1, 3, D, H, W)`` permuted) storage, a copy otherwise."""
    if points.is_contiguous():
        return points.view(-1, 3)
    first = points.permute(0, 4, 1, 2, 3)
    if first.is_contiguous():
        return first.reshape(3, -1).T
    return points.reshape(-1, 3)


def _map_points(
    points: torch.Tensor | None,
    matrix: np.ndarray | None,
    extra: torch.Tensor | None = None,
    extra_matrix: np.ndarray | None = None,
    shape: Shape3 | None = None,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """``matrix @ p + extra_matrix @ e`` as ``(1, D, H, W, 3)`` contiguous; ``points=None``: the
    voxel indices of ``shape`` (never materialised)."""
    if points is None:
        out = affine_points(np.eye(4) if matrix is None else matrix, shape, device, dtype)
        flat = out.view(-1, 3)
    else:
        flat_in = _flat3(points.to(dtype))
        if matrix is None:
            flat = flat_in.clone()
        else:
            m = torch.as_tensor(_as4(matrix)[:3], dtype=dtype).to(points.device)
            flat = torch.addmm(m[:, 3], flat_in, m[:, :3].T)
        out = flat.view(points.shape)
    if extra is not None:
        e = torch.as_tensor(np.asarray(extra_matrix, np.float64), dtype=flat.dtype)
        flat.addmm_(extra.reshape(3, -1).T.to(flat.dtype), e.to(flat.device).T)
    return out


def transform_points(
    points: torch.Tensor,
    matrix: np.ndarray | None,
    extra: torch.Tensor | None = None,
    extra_matrix: np.ndarray | None = None,
) -> torch.Tensor:
    """``matrix @ p (+ extra_matrix @ e)`` for channels-last points ``(1, D, H, W, 3)``.

    ``matrix``: 4x4/3x4 float64 on the host (None: identity); ``extra``: an optional
    channels-first ``(1, 3, D, H, W)`` term (e.g. a displacement) added through the 3x3
    ``extra_matrix`` in the same pass. Returns ``(1, D, H, W, 3)`` contiguous, ``points``' dtype.
    """
    return _map_points(points, matrix, extra, extra_matrix, dtype=points.dtype)


def sample_at(
    image: torch.Tensor,
    points: torch.Tensor | None,
    matrix: np.ndarray | None = None,
    mode: str = "linear",
    padding: str = "border",
    extra: torch.Tensor | None = None,
    extra_matrix: np.ndarray | None = None,
    shape: Shape3 | None = None,
) -> torch.Tensor:
    """Sample ``image (1, C, D, H, W)`` at voxel positions ``matrix @ p (+ extra_matrix @ e)``.

    ``points``: channels-last ``(1, D', H', W', 3)`` in any frame (world mm, another grid's
    voxels...), or None for the voxel indices ``(z, y, x)`` of a grid of ``shape`` (never
    materialised); ``matrix`` (4x4 float64, None: identity) maps them to the image's voxel
    ``(z, y, x)``; ``extra``/``extra_matrix`` as in :func:`transform_points`. The matrices are
    composed with :func:`normalization_matrix` on the host, so a linear/border sample is one
    matrix product and one ``grid_sample``. ``mode``/``padding`` as :func:`sample`, same results.
    Returns ``(1, C, D', H', W')``.
    """
    _check_modes(mode, padding)
    if padding == "itk" or mode == "nearest":
        images = [(image, mode)]
        return sample_many_at(images, points, matrix, padding, extra, extra_matrix, shape)[0]
    norm = normalization_matrix(image.shape[2:])
    m = norm @ (np.eye(4) if matrix is None else _as4(matrix))
    em = None if extra is None else norm[:3, :3] @ np.asarray(extra_matrix, np.float64)
    grid = _map_points(points, m, extra, em, shape, image.device, _grid_dtype(image, points))
    return F.grid_sample(
        image,
        grid.to(image.dtype),
        mode="bilinear",
        padding_mode="zeros" if padding == "zeros" else "border",
        align_corners=True,
    )


def sample_many_at(
    images: Sequence[tuple[torch.Tensor, str]],
    points: torch.Tensor | None,
    matrix: np.ndarray | None = None,
    padding: str = "itk",
    extra: torch.Tensor | None = None,
    extra_matrix: np.ndarray | None = None,
    shape: Shape3 | None = None,
) -> list[torch.Tensor]:
    """:func:`sample_at` for several images on one grid (same spatial shape) at the same points,
    each ``(image, mode)``: the positions and ITK's inside mask are computed once (e.g. an image
    and its label map). Returns one ``(1, C, D', H', W')`` per image."""
    for _, mode in images:
        _check_modes(mode, padding)
    in_shape = images[0][0].shape[2:]
    if any(img.shape[2:] != in_shape for img, _ in images):
        raise ValueError("sample_many_at: all images must have the same spatial shape")
    # Voxel positions + 0.5 in (x, y, z) order: ITK's inside test and rounding need them.
    flip = _flip_half()
    m = flip @ (np.eye(4) if matrix is None else _as4(matrix))
    em = None if extra is None else flip[:3, :3] @ np.asarray(extra_matrix, np.float64)
    dtype = max((_grid_dtype(img, points) for img, _ in images), key=lambda d: d.itemsize)
    coords = _map_points(points, m, extra, em, shape, images[0][0].device, dtype)
    inside = _inside_half(coords, in_shape) if padding == "itk" else None
    norm = normalization_matrix(in_shape)
    xyz_scale = norm[[0, 1, 2], [2, 1, 0]]  # per axis, coordinates already in (x, y, z)
    scale = torch.as_tensor(xyz_scale, dtype=coords.dtype).to(coords.device)
    offsets = {
        mode: torch.as_tensor(norm[:3, 3] - shift * xyz_scale, dtype=coords.dtype).to(coords.device)
        for mode, shift in (("linear", 0.5), ("nearest", 0.0))
    }
    outs = []
    for i, (image, mode) in enumerate(images):
        c = coords if i == len(images) - 1 else coords.clone()
        if mode == "nearest":
            c.floor_()  # floor(p + 0.5): ITK's rounding, half up
        grid = c.mul_(scale).add_(offsets[mode])  # linear: c - 0.5, nearest: the voxel
        out = F.grid_sample(
            image,
            grid.to(image.dtype),
            mode="bilinear" if mode == "linear" else "nearest",
            padding_mode="zeros" if padding == "zeros" else "border",
            align_corners=True,
        )
        if inside is not None:
            out.mul_(inside.to(out.dtype))
        outs.append(out)
    return outs


def resample_affine(
    image: torch.Tensor,
    matrix: np.ndarray,
    shape: Shape3,
    mode: str = "linear",
    padding: str = "border",
) -> torch.Tensor:
    """``image`` sampled at ``matrix @ p`` for every voxel ``p`` of a grid of ``shape``:
    ``(1, C, *shape)``. ``matrix`` (4x4 float64) maps that grid's voxels to the image's."""
    return sample_at(image, None, matrix, mode, padding, shape=shape)


def _check_modes(mode: str, padding: str) -> None:
    if mode not in ("linear", "nearest"):
        raise ValueError(f"unknown sampling mode {mode!r}; use 'linear' or 'nearest'")
    if padding not in ("border", "zeros", "itk"):
        raise ValueError(f"unknown padding {padding!r}; use 'border', 'zeros' or 'itk'")


def _grid_dtype(image: torch.Tensor, points: torch.Tensor | None) -> torch.dtype:
    """Positions in float64 when the image or the points are float64, else float32."""
    if image.dtype == torch.float64 or (points is not None and points.dtype == torch.float64):
        return torch.float64
    return torch.float32


def _as4(matrix) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape == (3, 4):
        m = np.vstack([m, [0.0, 0.0, 0.0, 1.0]])
    return m


def _flip_half() -> np.ndarray:
    """Voxel ``(z, y, x, 1)`` -> ``(x + 0.5, y + 0.5, z + 0.5, 1)``."""
    m = np.zeros((4, 4))
    m[0, 2] = m[1, 1] = m[2, 0] = m[3, 3] = 1.0
    m[:3, 3] = 0.5
    return m


def _inside_half(coords: torch.Tensor, shape: Shape3) -> torch.Tensor:
    """``0 <= c < n`` on all axes of channels-last ``(1, D, H, W, 3)`` coords in (x, y, z) + 0.5."""
    upper = torch.tensor(list(shape)[::-1], dtype=coords.dtype, device=coords.device)
    ok = (coords >= 0).logical_and_(coords < upper)
    # Two strided ANDs beat .all(dim=-1), a reduction over an axis of 3, by ~40%.
    return (ok[..., 0] & ok[..., 1]).logical_and_(ok[..., 2])[:, None]


def sample(
    image: torch.Tensor, coords: torch.Tensor, mode: str = "linear", padding: str = "border"
) -> torch.Tensor:
    """Sample ``image (B, C, D, H, W)`` at voxel positions ``coords (B, 3, D', H', W')``.

    ``mode``: ``"linear"`` (trilinear) or ``"nearest"`` (ITK rounding: ``floor(c + 0.5)``).
    ``padding``: ``"border"`` (clamp), ``"zeros"`` (linear blend towards 0 outside), or ``"itk"``
    (ITK interpolators: clamp within half a voxel of the edge, 0 beyond).
    Returns ``(B, C, D', H', W')``.
    """
    shape = image.shape[2:]
    if mode not in ("linear", "nearest"):
        raise ValueError(f"unknown sampling mode {mode!r}; use 'linear' or 'nearest'")
    if padding not in ("border", "zeros", "itk"):
        raise ValueError(f"unknown padding {padding!r}; use 'border', 'zeros' or 'itk'")
    if coords.shape[0] != image.shape[0] and coords.shape[0] == 1:
        coords = coords.expand(image.shape[0], *coords.shape[1:])
    inside = None
    if padding == "itk":
        upper = torch.tensor([n - 0.5 for n in shape], device=coords.device, dtype=coords.dtype)
        upper = upper.view(1, 3, 1, 1, 1)
        inside = ((coords >= -0.5) & (coords < upper)).all(dim=1, keepdim=True)
    if mode == "nearest":
        # Round half up like ITK (grid_sample's 'nearest' rounds half to even).
        coords = torch.floor(coords + 0.5)
    grid = voxel_to_normalized(coords, shape).to(image.dtype)
    out = F.grid_sample(
        image,
        grid,
        mode="bilinear" if mode == "linear" else "nearest",
        padding_mode="zeros" if padding == "zeros" else "border",
        align_corners=True,
    )
    if inside is not None:
        out = out * inside.to(out.dtype)
    return out


def warp(
    image: torch.Tensor, disp: torch.Tensor, mode: str = "linear", padding: str = "border"
) -> torch.Tensor:
    """Pull ``image (B, C, D, H, W)`` through ``disp (B, 3, D, H, W)``: ``out(p) = image(p + u(p))``.

    ``disp`` is in voxels of the image's grid and must have the image's spatial shape.
    """
    if disp.shape[2:] != image.shape[2:]:
        raise ValueError(
            f"field shape {tuple(disp.shape[2:])} != image shape {tuple(image.shape[2:])}"
        )
    if mode == "nearest" or padding == "itk":
        coords = identity_grid(disp.shape[2:], disp.device, disp.dtype) + disp
        return sample(image, coords, mode=mode, padding=padding)
    if disp.shape[0] != image.shape[0] and disp.shape[0] == 1:
        disp = disp.expand(image.shape[0], *disp.shape[1:])
    # grid = N @ (p + u): the identity part comes from a (D, H) plane and a row, the field's part
    # from one small matrix product; no index grid, no flipped copy.
    shape = disp.shape[2:]
    norm = normalization_matrix(shape)
    base = affine_points(norm, shape, disp.device, disp.dtype)
    lin = torch.as_tensor(norm[:3, :3], dtype=disp.dtype, device=disp.device)
    grid = torch.matmul(disp.movedim(1, -1), lin.T) + base
    return F.grid_sample(
        image,
        grid.to(image.dtype),
        mode="bilinear",
        padding_mode="zeros" if padding == "zeros" else "border",
        align_corners=True,
    )


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Field of ``p -> q = p + first(p) -> q + second(q)``: ``first(p) + second(p + first(p))``.

    Warping with the result equals warping with ``second`` and then with ``first``:
    ``warp(warp(img, second), first) ~= warp(img, compose(first, second))``.
    """
    return first + warp(second, first, padding="border")


def invert(disp: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Inverse ``w`` of ``p -> p + disp(p)`` (voxels, ``(B, 3, D, H, W)``), by fixed-point
    iteration of ``w(q) = -disp(q + w(q))``: the map takes ``q + w(q)`` to ``q`` for every
    voxel ``q``, i.e. ``compose(w, disp) ~= 0``, and pulling through ``w`` undoes pulling
    through ``disp``: ``warp(warp(img, disp), w) ~= img``.

    Converges where the map is a contraction perturbation of the identity (``|grad disp| < 1``);
    outside the grid ``disp`` is extended by its border values.
    """
    inverse = -disp
    for _ in range(iterations):
        inverse = -warp(disp, inverse, padding="border")
    return inverse


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring of a stationary velocity field ``(B, 3, D, H, W)`` (voxels).

    Returns the displacement of ``exp(v)`` after ``2**steps`` self-compositions.
    """
    disp = velocity / (2**steps)
    for _ in range(steps):
        disp = compose(disp, disp)
    return disp


def resize_field(disp: torch.Tensor, shape: Shape3) -> torch.Tensor:
    """Resample a field to ``shape`` over the same physical extent, values rescaled to new voxels.

    Grids are corner-aligned (voxel 0 and voxel N-1 coincide), so one old voxel equals
    ``(new - 1) / (old - 1)`` new voxels along each axis.
    """
    old = disp.shape[2:]
    if tuple(old) == tuple(shape):
        return disp
    out = F.interpolate(disp, size=tuple(shape), mode="trilinear", align_corners=True)
    factors = [(n - 1) / (o - 1) if o > 1 else 1.0 for n, o in zip(shape, old)]
    return out * torch.tensor(factors, device=disp.device, dtype=disp.dtype).view(1, 3, 1, 1, 1)


def _diff(field: torch.Tensor, axis: int) -> torch.Tensor:
    """Central difference along spatial ``axis`` (0..2), one-sided at the two edges."""
    dim, n = axis + 2, field.shape[axis + 2]
    out = torch.empty_like(field)
    if n == 1:
        return out.zero_()
    inner = out.narrow(dim, 1, n - 2) if n > 2 else None
    if inner is not None:
        torch.sub(field.narrow(dim, 2, n - 2), field.narrow(dim, 0, n - 2), out=inner)
        inner.mul_(0.5)
    out.narrow(dim, 0, 1).copy_(field.narrow(dim, 1, 1) - field.narrow(dim, 0, 1))
    out.narrow(dim, n - 1, 1).copy_(field.narrow(dim, n - 1, 1) - field.narrow(dim, n - 2, 1))
    return out


def spatial_gradient(field: torch.Tensor) -> torch.Tensor:
    """Finite differences of ``field (B, C, D, H, W)`` along (z, y, x): ``(B, C, 3, D, H, W)``.

    Central differences inside, one-sided at the edges, per voxel.
    """
    return torch.stack([_diff(field, axis) for axis in range(3)], dim=2)


def jacobian_determinant(disp: torch.Tensor, base: np.ndarray | None = None) -> torch.Tensor:
    """det(I + grad u) of a displacement ``(B, 3, D, H, W)`` in voxels: ``(B, 1, D, H, W)``.

    The determinant does not depend on the voxel size, so it is also the determinant of the
    physical map when ``u`` is in voxels of its own grid. Values <= 0 mark folding.
    ``base`` (3x3, rows/columns (z, y, x)): ``det(base + grad u)`` instead, for a map
    ``p -> base @ p + u(p)`` (an affine composed with a field) without materialising it.
    Written out by cofactors: ~8x faster than a batched ``torch.linalg.det`` on large grids.
    """
    base = np.eye(3) if base is None else np.asarray(base, dtype=np.float64)
    depth = disp.shape[2]
    slab = max(1, SLAB_VOXELS // max(1, disp[0, 0, 0].numel()))
    if depth <= slab:
        return _det(disp, base)
    # In slabs of z with one slice of halo each side: the same central differences, and the
    # 3x3 derivative tensor is a slab's, not the volume's (380 MB less for a brain).
    out = torch.empty((disp.shape[0], 1, *disp.shape[2:]), dtype=disp.dtype, device=disp.device)
    for z0 in range(0, depth, slab):
        z1 = min(z0 + slab, depth)
        lo, hi = max(z0 - 1, 0), min(z1 + 1, depth)
        det = _det(disp[:, :, lo:hi], base)
        out[:, :, z0:z1] = det[:, :, z0 - lo : z0 - lo + (z1 - z0)]
    return out


#: voxels per slab of :func:`jacobian_determinant` on large grids (about 2M: 9 x 8 MB of
#: derivatives at a time)
SLAB_VOXELS = 2_000_000


def _det(disp: torch.Tensor, base: np.ndarray) -> torch.Tensor:
    """Cofactor determinant of ``base + grad u`` with every temporary preallocated once.

    The derivatives are stored doubled (no ``* 0.5`` pass inside; edges doubled) together with
    ``2 base``, and the result is divided by 8: the same value in one pass fewer per entry.
    """
    shape = (disp.shape[0], 1, *disp.shape[2:])
    j = torch.empty((3, 3, *shape), dtype=disp.dtype, device=disp.device)
    for r in range(3):
        field = disp[:, r : r + 1]
        for c in range(3):
            _double_diff(field, c, j[r, c])
            if base[r, c] != 0.0:
                j[r, c].add_(2.0 * float(base[r, c]))
    det = torch.empty(shape, dtype=disp.dtype, device=disp.device)
    cof = torch.empty_like(det)
    tmp = torch.empty_like(det)
    # det = j00 (j11 j22 - j12 j21) - j01 (j10 j22 - j12 j20) + j02 (j10 j21 - j11 j20)
    for col, (a, b, c, d, sign) in enumerate(
        (
            ((1, 1), (2, 2), (1, 2), (2, 1), 1.0),
            ((1, 0), (2, 2), (1, 2), (2, 0), -1.0),
            ((1, 0), (2, 1), (1, 1), (2, 0), 1.0),
        )
    ):
        torch.mul(j[a], j[b], out=cof)
        torch.mul(j[c], j[d], out=tmp)
        cof.sub_(tmp)
        if col == 0:
            torch.mul(j[0, 0], cof, out=det)
        else:
            cof.mul_(j[0, col])
            det.add_(cof, alpha=sign)
    return det.mul_(0.125)


def _double_diff(field: torch.Tensor, axis: int, out: torch.Tensor) -> torch.Tensor:
    """Twice :func:`_diff` (``f[i+1] - f[i-1]`` inside, doubled one-sided at the edges) into
    ``out``."""
    dim, n = axis + 2, field.shape[axis + 2]
    if n == 1:
        return out.zero_()
    if n > 2:
        torch.sub(
            field.narrow(dim, 2, n - 2), field.narrow(dim, 0, n - 2), out=out.narrow(dim, 1, n - 2)
        )
    first = field.narrow(dim, 1, 1) - field.narrow(dim, 0, 1)
    last = field.narrow(dim, n - 1, 1) - field.narrow(dim, n - 2, 1)
    out.narrow(dim, 0, 1).copy_(first.mul_(2.0))
    out.narrow(dim, n - 1, 1).copy_(last.mul_(2.0))
    return out


def affine_to_field(matrix: torch.Tensor, shape: Shape3) -> torch.Tensor:
    """Displacement of ``p -> A[:, :3] p + A[:, 3]`` for ``matrix (B, 3, 4)`` acting on voxel (z, y, x).

    Returns ``(B, 3, D, H, W)`` voxels.
    """
    grid = identity_grid(shape, matrix.device, matrix.dtype)
    flat = grid.flatten(2)  # (1, 3, N)
    mapped = matrix[:, :, :3] @ flat + matrix[:, :, 3:]
    return (mapped - flat).view(matrix.shape[0], 3, *shape)


def fit_affine(disp: torch.Tensor) -> torch.Tensor:
    """The affine map closest to ``p -> p + disp(p)`` in least squares over every voxel.

    ``disp (B, 3, D, H, W)`` voxels; returns ``(B, 3, 4)`` acting on voxel ``(z, y, x)`` as in
    :func:`affine_to_field` (which returns the field of an affine exactly, so ``fit_affine``
    recovers it). Computed in float64 about the grid's centre, well conditioned at any size.
    """
    shape = tuple(disp.shape[2:])
    grid = identity_grid(shape, disp.device, torch.float64).flatten(2)[0]  # (3, N)
    centre = grid.mean(1, keepdim=True)
    x = torch.cat([grid - centre, torch.ones_like(grid[:1])])  # (4, N)
    y = grid + disp.double().flatten(2)  # (B, 3, N)
    a = torch.linalg.solve(x @ x.T, (y @ x.T).transpose(1, 2)).transpose(1, 2)  # (B, 3, 4)
    linear = a[:, :, :3]
    shift = a[:, :, 3:] - linear @ centre
    return torch.cat([linear, shift], 2).to(disp.dtype)
