"""Synthetic training pairs, so that checkpoints need no licensed data.

One random label map (smoothed random noise, argmax over ``n_labels`` channels) is deformed twice
by random smooth transforms (affine jitter + a smooth displacement): the two results are the
moving and fixed label maps. With ``background`` > 0, the anatomy is cut to a random smooth
blob on a dark background (label 0, intensity 0 before bias and noise), as skull-stripped MR or
a body in air looks after windowing; real scans on a working grid are mostly background, and a
network trained on full-cube anatomy deforms that background at random. With ``still`` > 0, a
pair is drawn that often with no motion between its sides (both label maps under the same
transform, true field zero; the images still differ in bias, blur, noise, gamma and, unless
``same_contrast``, contrast): a network that only ever sees moving pairs learns no reason to
keep still where the two images agree, and on out-of-distribution real scans it drifts. Each
side then gets its own image: random intensity per label (with ``merge`` > 0, that often shared
by random groups of labels), a smooth multiplicative bias field, blur, noise and a gamma, so that
a network trained on them learns shape, not one contrast (with ``same`` > 0, that often both
sides share one contrast). With ``anatomy``, the label map is a file's (a brain template's
tissue classes, say) instead of random blobs, so the pairs have the shape of real anatomy; label
0 is then the file's background, dark when ``background`` > 0. Everything runs in torch on the
chosen device, batched.

Shapes: label maps ``(B, 1, D, H, W)`` int64, images ``(B, 1, D, H, W)`` float32 in [0, 1],
fields ``(B, 3, D, H, W)`` pull displacements in voxels (see :mod:`spatial`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from napari_deepwarp.core import spatial
from napari_deepwarp.core.io import read_volume
from napari_deepwarp.core.models.blocks import gaussian_smooth
from napari_deepwarp.core.preprocess import resample, training_grid


@dataclass
class SynthSettings:
    """Ranges of the random draws. Lengths are in voxels of ``shape``; angles in degrees."""

    shape: tuple[int, int, int] = (64, 64, 64)
    labels: tuple[int, int] = (16, 32)
    label_grid: int = 8  # control points per axis of the label noise (smaller: larger blobs)
    bias: float = 0.3  # amplitude of the log bias field
    blur: tuple[float, float] = (0.0, 1.0)  # Gaussian sigma range
    noise: tuple[float, float] = (0.0, 0.05)  # noise standard deviation range
    gamma: float = 0.25  # log-gamma standard deviation
    rotation: float = 10.0
    scaling: float = 0.08
    shear: float = 0.04
    translation: float = 4.0
    displacement: float = 4.0  # largest smooth displacement
    field_grid: int = 5  # control points per axis of the smooth displacement
    # True: both sides share the per-label intensities (one contrast, as for a same-modality
    # loss such as NCC); bias, blur, noise and gamma stay independent
    same_contrast: bool = False
    # probability that a pair's anatomy is a smooth blob on a dark background (see module doc);
    # the blob's radii are ``blob`` (low, high) fractions of the half-extent of each axis
    background: float = 0.0
    blob: tuple[float, float] = (0.55, 0.9)
    # probability that a pair has no motion between its sides (same transform; true field 0)
    still: float = 0.0
    # probability that an image's labels share a few intensities (see ``_intensities``)
    merge: float = 0.0
    # with ``background`` > 0: probability that an image shows one tissue (a label, or with
    # ``anatomy_parts`` all parts of one of the file's labels) as dark as the background, as T1
    # shows CSF or ultrasound shows fluid, or a remapping paints an unlabelled tissue like air
    dark: float = 0.0
    # probability that a batch of pairs shares one contrast although ``same_contrast`` is False,
    # so that a network for two modalities also sees pairs of one, where it may move boldly
    same: float = 0.0
    # probability that a moving image is cut to a smaller field of view: 0 beyond a plane near
    # one face, or two, at most ``fov_depth`` of the axis deep, as a scan of another field of
    # view leaves 0 where the affine stage finds no data (the spine T1 on the T2's grid). The
    # label maps stay whole, so the network learns to carry the field across such straight,
    # artificial edges rather than pull the tissue next to them
    fov: float = 0.0
    fov_depth: float = 0.25
    # a label-map file (NIfTI, NRRD, MHA) to use as the anatomy instead of random blobs, e.g.
    # tissue classes of a brain template: pairs shaped like real anatomy (see ``file_anatomy``);
    # "" draws blobs
    anatomy: str = ""
    # with ``anatomy``: each of its labels is cut into up to this many random parts, so that a
    # few tissue classes also show contrast within them, as parcels or nuclei do
    anatomy_parts: int = 1
    # with ``anatomy`` and ``anatomy_parts`` > 1: True cuts each side into parts by a random
    # map of its own, so that the contrast within a tissue differs between the sides as between
    # two subjects (no part boundary is in both); the label maps returned are then the tissue
    # classes, which both sides share. False (default) cuts the anatomy once, before warping
    parts_per_side: bool = False
    # with ``anatomy``: the probability that a batch's anatomy is the file's (else random blobs),
    # so that a network for many kinds of scan sees both
    anatomy_share: float = 1.0
    # with ``anatomy``: up to this many times larger in voxels. Per batch a whole zoom ``z`` from
    # 1 to this is drawn, the anatomy framed on a grid ``z`` times ``shape`` and a random crop of
    # ``shape`` taken, so that a network trained on small cubes also sees anatomy as large as at
    # its finer inference grid (trained at 32, run at 96: a brain three times as wide)
    anatomy_zoom: int = 1
    # False: the fixed side gets no affine jitter (its smooth displacement only), so its anatomy
    # fills the grid as the pipeline frames a fixed image on its foreground box, and the moving
    # side carries the whole misalignment: pairs as a network's own affine branch meets them
    # without the affine stage (LinDef ``--no-affine``)
    fixed_affine: bool = True
    # with ``anatomy``: True frames it along the world's axes and keeps it upright (no random
    # axis orientation), as the pipeline frames a fixed image for a network whose
    # ``working_axes`` is "world" (LinDef's keypoint affine); False (default) frames it along the
    # file's axes and draws one of the 48 axis orientations per pair
    world_axes: bool = False


def _uniform(low: float, high: float, shape, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=device) * (high - low) + low


def _smooth_noise(batch, channels, grid, shape, g, device) -> torch.Tensor:
    coarse = torch.randn(batch, channels, grid, grid, grid, generator=g, device=device)
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)


def random_label_map(s: SynthSettings, batch: int, g: torch.Generator, device) -> torch.Tensor:
    """``(B, 1, D, H, W)`` labels ``0 .. n - 1`` with ``n`` drawn from ``s.labels``."""
    n = int(torch.randint(s.labels[0], s.labels[1] + 1, (1,), generator=g, device=device))
    return _smooth_noise(batch, n, s.label_grid, s.shape, g, device).argmax(1, keepdim=True)


@functools.lru_cache(maxsize=4)
def _anatomy_on_grid(path: str, shape: tuple[int, int, int], axes: str = "image") -> np.ndarray:
    """The label map at ``path`` on an isotropic grid of ``shape`` over its foreground (labels
    > 0) along ``axes``, as the pipeline frames a fixed image; labels renumbered
    ``0 .. n - 1``, 0 kept 0."""
    labels = read_volume(path, labels=True)
    inside = labels.with_array((labels.array > 0).astype(np.float32))
    on_grid = resample(labels, training_grid(inside, shape, axes), None, "nearest").array
    values, compact = np.unique(on_grid, return_inverse=True)
    if values[0] != 0:  # no background on the grid: keep label numbers meaning "not background"
        compact = compact + 1
    return compact.reshape(on_grid.shape).astype(np.int64)


def random_orientation(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``labels`` ``(1, 1, D, H, W)`` with its axes flipped at random and, on a cube, permuted at
    random: one of the 48 axis-aligned orientations (8 without the permutation) that scans come in.
    """
    flips = [2 + a for a in range(3) if float(torch.rand(1, generator=g)) < 0.5]
    out = labels.flip(flips) if flips else labels
    if len(set(labels.shape[2:])) == 1:
        out = out.permute(0, 1, *(2 + torch.randperm(3, generator=g)).tolist())
    return out


def file_anatomy(s: SynthSettings, batch: int, g: torch.Generator, device) -> torch.Tensor:
    """``(B, 1, D, H, W)`` labels: ``s.anatomy``'s on the grid in a random axis-aligned
    orientation each (:func:`random_orientation`; upright along the world's axes with
    ``s.world_axes``), with ``s.anatomy_zoom`` > 1 magnified and cropped at random
    (:func:`random_crop`), each label (not 0) cut into up to ``s.anatomy_parts`` parts by one
    random label map (:func:`random_label_map`)."""
    axes = "world" if s.world_axes else "image"
    zoom = 1
    if s.anatomy_zoom > 1:  # drawn only when asked for, so other settings keep their stream
        zoom = int(torch.randint(1, s.anatomy_zoom + 1, (1,), generator=g, device=device))
    framed = tuple(n * zoom for n in s.shape)
    grid = torch.from_numpy(_anatomy_on_grid(s.anatomy, framed, axes))[None, None]
    cpu = torch.Generator().manual_seed(
        int(torch.randint(0, 2**62, (1,), generator=g, device=device))
    )
    if s.world_axes:
        labels = grid.expand(batch, -1, -1, -1, -1).clone()
    else:
        labels = torch.cat([random_orientation(grid, cpu) for _ in range(batch)])
    if zoom > 1:
        labels = torch.cat([random_crop(item[None], s.shape, cpu) for item in labels])
    labels = labels.to(device)
    if s.anatomy_parts <= 1:
        return labels
    return cut_into_parts(labels, s, g)


def random_crop(volume: torch.Tensor, shape, g: torch.Generator) -> torch.Tensor:
    """A crop of ``shape`` at a uniformly random place inside ``volume`` ``(1, C, D, H, W)``."""
    starts = [
        int(torch.randint(0, big - n + 1, (1,), generator=g))
        for big, n in zip(volume.shape[2:], shape, strict=True)
    ]
    (z, y, x), (d, h, w) = starts, shape
    return volume[:, :, z : z + d, y : y + h, x : x + w]


def cut_into_parts(labels: torch.Tensor, s: SynthSettings, g: torch.Generator) -> torch.Tensor:
    """``labels`` ``(B, 1, D, H, W)`` with each label but 0 cut into up to ``s.anatomy_parts``
    parts by one random label map: label ``l`` becomes ``(l - 1) * k + part + 1``."""
    k = s.anatomy_parts
    parts = random_label_map(replace(s, labels=(k, k)), len(labels), g, labels.device)
    return torch.where(labels > 0, (labels - 1) * k + parts + 1, 0)


def random_foreground(s: SynthSettings, batch: int, g: torch.Generator, device) -> torch.Tensor:
    """``(B, 1, D, H, W)`` bool: a random ellipsoid about the centre, its surface made irregular
    by smooth noise (about 15 % of its radius); each item is all True with ``1 - s.background``."""
    axes = [torch.linspace(-1, 1, n, device=device) for n in s.shape]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    radii = _uniform(*s.blob, (batch, 3), g, device)
    r = (zz / radii[:, 0, None, None, None]) ** 2 + (yy / radii[:, 1, None, None, None]) ** 2
    r = (r + (xx / radii[:, 2, None, None, None]) ** 2).sqrt()[:, None]
    wobble = _smooth_noise(batch, 1, 4, s.shape, g, device) * 0.15
    keep = torch.rand(batch, generator=g, device=device) >= s.background
    return (r < 1 + wobble) | keep[:, None, None, None, None]


def random_affine(s: SynthSettings, batch: int, g: torch.Generator, device) -> torch.Tensor:
    """``(B, 3, 4)`` voxel maps about the volume centre: rotation, scaling, shear, translation."""
    out = []
    centre = torch.tensor([(n - 1) / 2 for n in s.shape], device=device)
    for _ in range(batch):
        angles = _uniform(-s.rotation, s.rotation, (3,), g, device) * math.pi / 180
        rot = torch.eye(3, device=device)
        for axis, angle in enumerate(angles):
            c, si = torch.cos(angle), torch.sin(angle)
            i, j = [a for a in range(3) if a != axis]
            r = torch.eye(3, device=device)
            r[i, i], r[i, j], r[j, i], r[j, j] = c, -si, si, c
            rot = rot @ r
        scale = torch.diag(1 + _uniform(-s.scaling, s.scaling, (3,), g, device))
        shear = torch.eye(3, device=device) + torch.triu(
            _uniform(-s.shear, s.shear, (3, 3), g, device), diagonal=1
        )
        a = rot @ scale @ shear
        t = centre - a @ centre + _uniform(-s.translation, s.translation, (3,), g, device)
        out.append(torch.cat([a, t[:, None]], dim=1))
    return torch.stack(out)


def random_deformation(
    s: SynthSettings, batch: int, g: torch.Generator, device, affine: bool = True
) -> torch.Tensor:
    """``(B, 3, D, H, W)`` pull field: a smooth displacement, then an affine jitter (none
    without ``affine``)."""
    smooth = _smooth_noise(batch, 3, s.field_grid, s.shape, g, device)
    smooth = smooth * (s.displacement / smooth.abs().amax().clamp_min(1e-6))
    if not affine:
        return smooth
    affine = spatial.affine_to_field(random_affine(s, batch, g, device), s.shape)
    return spatial.compose(smooth, affine)


def _intensities(
    n: int, s: SynthSettings, g: torch.Generator, device, parts: int = 1
) -> torch.Tensor:
    """Random intensity per label; label 0 is the dark background when ``s.background`` > 0,
    and with probability ``s.dark`` so is one tissue: labels ``1 + t * parts`` to
    ``(t + 1) * parts`` for a random ``t`` (``parts``: labels per tissue, as
    :func:`cut_into_parts` numbers them).

    With probability ``s.merge`` the labels are first dealt at random into ``k`` classes (``k``
    from 2 to half the labels) that share one intensity each, as a modality shows several
    structures alike that another tells apart (T1 shows the cortex's parcels as one grey that
    T2, ultrasound or a label-wise remapping may not). Drawn per image, so one side of a pair
    of independent contrasts has boundaries the other lacks, and the network learns to leave
    them alone."""
    values = torch.rand(n, generator=g, device=device)
    if s.merge > 0 and n > 3 and float(torch.rand(1, generator=g, device=device)) < s.merge:
        k = int(torch.randint(2, n // 2 + 1, (1,), generator=g, device=device))
        values = values[torch.randint(0, k, (n,), generator=g, device=device)]
    if s.background > 0:
        values[0] = 0.0
        if s.dark > 0 and n > 2 and float(torch.rand(1, generator=g, device=device)) < s.dark:
            tissues = -(-(n - 1) // parts)  # the last may have parts absent here
            t = int(torch.randint(0, tissues, (1,), generator=g, device=device))
            values[1 + t * parts : 1 + (t + 1) * parts] = 0.0
    return values


def labels_to_image(
    labels: torch.Tensor,
    s: SynthSettings,
    g: torch.Generator,
    intensities: list[torch.Tensor] | None = None,
    parts: int = 1,
) -> torch.Tensor:
    """A random-contrast image ``(B, 1, D, H, W)`` in [0, 1] for each label map of the batch.

    ``intensities``: per batch item, the intensity of each label (drawn here if None);
    ``parts``: labels per tissue (see :func:`_intensities`).
    """
    device = labels.device
    images = []
    for i, lab in enumerate(labels):
        n = int(lab.max()) + 1
        if intensities is None:
            intensity = _intensities(n, s, g, device, parts)
        else:
            intensity = intensities[i]
        image = intensity[lab][None]  # (1, 1, D, H, W)
        bias = _smooth_noise(1, 1, 4, s.shape, g, device) * s.bias
        image = image * torch.exp(bias)
        sigma = float(_uniform(*s.blur, (1,), g, device))
        image = gaussian_smooth(image, sigma) if sigma >= 0.3 else image
        sigma = float(_uniform(*s.noise, (1,), g, device))
        image = image + sigma * torch.randn(image.shape, generator=g, device=device)
        lo, hi = image.amin(), image.amax()
        image = ((image - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
        gamma = float(torch.exp(torch.randn(1, generator=g, device=device) * s.gamma))
        images.append(image**gamma)
    return torch.cat(images)


def cut_field_of_view(images: torch.Tensor, s: SynthSettings, g: torch.Generator) -> torch.Tensor:
    """``images (B, 1, D, H, W)`` with, per item and with probability ``s.fov``, one or two
    slabs at random faces set to 0, each ``1`` to ``s.fov_depth`` of its axis deep (a copy)."""
    out = images.clone()
    device = images.device
    for item in range(images.shape[0]):
        if float(torch.rand(1, generator=g, device=device)) >= s.fov:
            continue
        for _ in range(int(torch.randint(1, 3, (1,), generator=g, device=device))):
            axis = int(torch.randint(0, 3, (1,), generator=g, device=device))
            n = images.shape[2 + axis]
            depth = int(
                torch.randint(1, max(2, int(s.fov_depth * n) + 1), (1,), generator=g, device=device)
            )
            cut = [slice(None)] * 3
            low = float(torch.rand(1, generator=g, device=device)) < 0.5
            cut[axis] = slice(0, depth) if low else slice(n - depth, n)
            out[(item, slice(None), *cut)] = 0.0
    return out


def synthetic_pair(
    s: SynthSettings | None = None,
    batch: int = 1,
    seed: int | None = None,
    device="cpu",
    field: bool = False,
) -> dict[str, torch.Tensor]:
    """A batch of pairs: ``moving``, ``fixed`` images and ``moving_labels``, ``fixed_labels``;
    with ``field``, also ``field``: the true moving-to-fixed pull field (:func:`true_field`).

    Both label maps are the same random anatomy (or ``s.anatomy``'s) under two independent random
    transforms (the same one for a still pair, with probability ``s.still``; the fixed side's
    without its affine part unless ``s.fixed_affine``; with ``s.parts_per_side``, each side's
    image cut into parts of its own, the label maps the uncut tissue classes);
    each image has its own random contrast (or, with ``s.same_contrast`` or with probability
    ``s.same`` for the whole batch, both share the per-label intensities); with probability
    ``s.fov``, the moving image cut to a smaller field of view (:func:`cut_field_of_view`).
    Deterministic for a given ``seed``.
    """
    s = s or SynthSettings()
    g = torch.Generator(device=device)
    g.manual_seed(int(torch.randint(0, 2**62, (1,))) if seed is None else seed)
    from_file = bool(s.anatomy)
    if from_file and s.anatomy_share < 1:  # drawn only when asked for, as ``still`` is
        from_file = float(torch.rand(1, generator=g, device=device)) < s.anatomy_share
    per_side = from_file and s.parts_per_side and s.anatomy_parts > 1
    if from_file:
        anatomy = file_anatomy(replace(s, anatomy_parts=1) if per_side else s, batch, g, device)
    else:
        anatomy = random_label_map(s, batch, g, device)
        if s.background > 0:
            anatomy = torch.where(random_foreground(s, batch, g, device), anatomy + 1, 0)
    anatomy = anatomy.float()
    deformations = [
        random_deformation(s, batch, g, device, affine=side == 0 or s.fixed_affine)
        for side in range(2)
    ]
    still = None
    if s.still > 0:  # drawn only when asked for, so other settings keep their random stream
        still = (torch.rand(batch, generator=g, device=device) < s.still)[:, None, None, None, None]
        deformations[0] = torch.where(still, deformations[1], deformations[0])
    labels = [spatial.warp(anatomy, d, mode="nearest").long() for d in deformations]
    shown = [cut_into_parts(lab, s, g) for lab in labels] if per_side else labels
    parts = s.anatomy_parts if from_file else 1
    shared = None
    same = s.same_contrast
    if not same and s.same > 0:  # drawn only when asked for, as ``still`` is
        same = float(torch.rand(1, generator=g, device=device)) < s.same
    if same:
        n = int(anatomy.max()) * (s.anatomy_parts if per_side else 1) + 1
        shared = [_intensities(n, s, g, device, parts) for _ in range(batch)]
    pair = {
        "moving": labels_to_image(shown[0], s, g, shared, parts),
        "fixed": labels_to_image(shown[1], s, g, shared, parts),
        "moving_labels": labels[0],
        "fixed_labels": labels[1],
    }
    if s.fov > 0:  # drawn last and only when asked for, so that the rest of the pair is the same
        pair["moving"] = cut_field_of_view(pair["moving"], s, g)
    if field:
        pair["field"] = true_field(deformations[1], deformations[0])
        if still is not None:  # exactly zero, not a numerical inverse composed with its map
            pair["field"] = torch.where(still, 0.0, pair["field"])
    return pair


def true_field(fixed_deformation: torch.Tensor, moving_deformation: torch.Tensor) -> torch.Tensor:
    """The pull field ``u`` that registers the pair exactly: ``moving(p + u(p)) = fixed(p)``.

    Both sides are the anatomy ``A`` pulled through their deformation (``fixed(p) = A(p +
    f(p))``, ``moving(q) = A(q + m(q))``), so ``u = compose(f, invert(m))``; ``(B, 3, D, H, W)``
    voxels. No random draw: asking for it leaves the pair itself unchanged.
    """
    return spatial.compose(fixed_deformation, spatial.invert(moving_deformation))
