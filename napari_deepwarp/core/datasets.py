"""Where training pairs come from: synthetic pairs, or real volumes from a folder or a CSV.

A *source* hands out batches by step number: ``source.batch(step, rank, size, device)`` returns
``{"moving", "fixed"}`` images ``(B, 1, D, H, W)`` float32 in [0, 1] and, where known,
``{"moving_labels", "fixed_labels"}`` ``(B, 1, D, H, W)`` int64. The draw depends only on
``(seed, step, rank)``, so a resumed run sees exactly the batches it would have seen, and each
process of a distributed run sees its own.

Real volumes get the pipeline's preprocessing: the affine stage (moving onto fixed), resampling
onto an isotropic grid of the training shape over the fixed image's foreground, and the intensity
preset. The result of each pair is cached on disk (``.npz``), keyed by the files' paths, sizes and
modification times and by the preprocessing settings, so the affine stage runs once per pair.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from napari_deepwarp.core.affine import AffineSettings, run_affine
from napari_deepwarp.core.io import InputError, read_volume
from napari_deepwarp.core.preprocess import (
    IntensityPreset,
    intensity_window,
    network_input,
    resample,
    training_grid,
)
from napari_deepwarp.core.synth import SynthSettings, synthetic_pair

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_WORDS = ("label", "seg", "mask", "aseg", "parc")
CACHE_VERSION = 2  # 2: anti-aliased network inputs


def _seed(*parts: int) -> int:
    """A 62-bit seed from integers, stable across runs and platforms."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


class SynthSource:
    """Synthetic pairs (:mod:`synth`) of ``settings.shape``, drawn fresh for every step."""

    description = "synthetic pairs (random label maps, random contrasts, random smooth warps)"

    def __init__(self, settings: SynthSettings | None = None, seed: int = 0, field: bool = False):
        """``field``: each batch also holds ``field``, the true pull field (:mod:`synth`)."""
        self.settings, self.seed, self.field = settings or SynthSettings(), seed, field
        anatomy = self.settings.anatomy
        if anatomy:
            share = self.settings.anatomy_share
            mixed = (
                "" if share >= 1 else f" in {share:.0%} of the batches, random blobs in the rest"
            )
            self.description = (
                f"synthetic pairs drawn from the label map {Path(anatomy).name}{mixed} "
                "(random contrasts, random smooth warps)"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.settings.shape)

    def batch(self, step: int, rank: int, size: int, device) -> dict[str, torch.Tensor]:
        seed = _seed(self.seed, step, rank)
        return synthetic_pair(self.settings, size, seed, device, field=self.field)


@dataclass
class Entry:
    """One volume file and its optional label map."""

    image: Path
    labels: Path | None = None


def _is_volume(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def _stem_key(path: Path) -> str:
    """The name up to its last underscore, suffix removed: ``sub1_t1.nii.gz`` -> ``sub1``."""
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.rsplit("_", 1)[0]


def scan_folder(folder: Path) -> list[Entry]:
    """Images in ``folder`` with their label maps: a file whose name holds a label word
    (label, seg, mask, aseg, parc) is the label map of the image that shares its name up to the
    last underscore (``sub1_t1.nii.gz`` and ``sub1_labels.nii.gz``)."""
    files = sorted(p for p in folder.iterdir() if _is_volume(p))
    labels = [p for p in files if any(w in p.name.lower() for w in LABEL_WORDS)]
    images = [p for p in files if p not in labels]
    by_key = {_stem_key(p): p for p in labels}
    return [Entry(p, by_key.get(_stem_key(p))) for p in images]


def read_pairs_csv(path: Path) -> tuple[list[Entry], list[tuple[int, int]] | None]:
    """A CSV with a header: ``image[,labels]`` (one volume per row, random pairs) or
    ``fixed,moving[,fixed_labels,moving_labels]`` (listed pairs). Paths relative to the CSV."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise InputError(f"{path}: no rows; give a header line and one volume or pair per row")
    columns = set(rows[0])

    def resolve(value: str | None) -> Path | None:
        if not value:
            return None
        p = Path(value)
        return p if p.is_absolute() else path.parent / p

    if {"fixed", "moving"} <= columns:
        entries: list[Entry] = []
        pairs = []
        for row in rows:
            fixed = Entry(resolve(row["fixed"]), resolve(row.get("fixed_labels")))
            moving = Entry(resolve(row["moving"]), resolve(row.get("moving_labels")))
            pairs.append((len(entries), len(entries) + 1))
            entries += [fixed, moving]
        return entries, pairs
    if "image" in columns:
        return [Entry(resolve(r["image"]), resolve(r.get("labels"))) for r in rows], None
    raise InputError(
        f"{path}: unknown columns {sorted(columns)}; use 'image[,labels]' or "
        "'fixed,moving[,fixed_labels,moving_labels]'"
    )


class VolumeSource:
    """Real volumes from a folder or a CSV (see :func:`scan_folder`, :func:`read_pairs_csv`).

    Without listed pairs, every step draws random ordered pairs of different volumes.
    ``cache``: folder for the preprocessed pairs. ``affine``: run the affine stage. ``axes``:
    how the training grid lies (:data:`~napari_deepwarp.core.preprocess.WORKING_AXES`), as the
    network's working grid will.
    """

    def __init__(
        self,
        path: str | Path,
        shape: tuple[int, int, int],
        cache: str | Path,
        seed: int = 0,
        affine: bool = True,
        modality: str = "auto",
        affine_settings: AffineSettings | None = None,
        axes: str = "image",
    ):
        path = Path(path)
        if path.is_dir():
            self.entries, self.pairs = scan_folder(path), None
        elif path.is_file() and path.suffix.lower() == ".csv":
            self.entries, self.pairs = read_pairs_csv(path)
        else:
            raise InputError(
                f"{path}: give a folder of volumes, a CSV of volumes or pairs, or 'synth'"
            )
        for entry in self.entries:
            for p in (entry.image, entry.labels):
                if p is not None and not p.exists():
                    raise InputError(f"{p}: listed in {path} but there is no such file")
        if self.pairs is None and len(self.entries) < 2:
            raise InputError(f"{path}: found {len(self.entries)} volume(s); training needs two")
        self.shape, self.seed, self.affine, self.modality = tuple(shape), seed, affine, modality
        self.affine_settings = affine_settings or AffineSettings()
        self.axes = axes
        self.cache = Path(cache)
        self.description = f"{len(self.entries)} volumes from {path}"

    @property
    def labelled(self) -> bool:
        return all(e.labels is not None for e in self.entries)

    def pair_indices(self, step: int, rank: int, size: int) -> list[tuple[int, int]]:
        rng = np.random.default_rng(_seed(self.seed, step, rank))
        if self.pairs is not None:
            return [self.pairs[i] for i in rng.integers(0, len(self.pairs), size)]
        out = []
        for _ in range(size):
            i, j = rng.choice(len(self.entries), 2, replace=False)
            out.append((int(i), int(j)))
        return out

    def batch(self, step: int, rank: int, size: int, device) -> dict[str, torch.Tensor]:
        items = [self.prepared(f, m) for f, m in self.pair_indices(step, rank, size)]
        keys = set.intersection(*(set(item) for item in items))
        return {
            k: torch.from_numpy(np.stack([item[k] for item in items]))[:, None].to(device)
            for k in sorted(keys)
        }

    def _key(self, fixed: Entry, moving: Entry) -> str:
        files = [p for e in (fixed, moving) for p in (e.image, e.labels) if p is not None]
        stamp = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        settings = [CACHE_VERSION, list(self.shape), self.affine, self.modality]
        settings.append(repr(self.affine_settings))
        if self.axes != "image":  # keys of image-axes pairs stay those already cached
            settings.append(self.axes)
        return hashlib.sha256(json.dumps([stamp, settings]).encode()).hexdigest()[:24]

    def prepared(self, fixed_index: int, moving_index: int) -> dict[str, np.ndarray]:
        """The pair on the training grid, from the cache or computed (and cached) now."""
        fixed, moving = self.entries[fixed_index], self.entries[moving_index]
        path = self.cache / f"{self._key(fixed, moving)}.npz"
        if path.exists():
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        arrays = preprocess_pair(
            fixed, moving, self.shape, self.affine, self.modality, self.affine_settings, self.axes
        )
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        return arrays


def preprocess_pair(
    fixed: Entry,
    moving: Entry,
    shape: tuple[int, int, int],
    affine: bool = True,
    modality: str = "auto",
    affine_settings: AffineSettings | None = None,
    axes: str = "image",
) -> dict[str, np.ndarray]:
    """``fixed``/``moving`` float32 in [0, 1] and, where given, label maps (int64), on the
    training grid of the fixed volume (along ``axes``), the moving side through the affine
    stage."""
    f, m = read_volume(fixed.image), read_volume(moving.image)
    grid = training_grid(f, shape, axes)
    transform = run_affine(f, m, affine_settings).transform if affine else None
    preset = IntensityPreset(modality)
    out = {
        "fixed": network_input(f, grid, intensity_window(f.array, preset)),
        "moving": network_input(m, grid, intensity_window(m.array, preset), transform),
    }
    if fixed.labels is not None and moving.labels is not None:
        fl, ml = read_volume(fixed.labels, labels=True), read_volume(moving.labels, labels=True)
        out["fixed_labels"] = resample(fl, grid, None, "nearest").array.astype(np.int64)
        out["moving_labels"] = resample(ml, grid, transform, "nearest").array.astype(np.int64)
    out["fixed"] = out["fixed"].astype(np.float32)
    out["moving"] = out["moving"].astype(np.float32)
    return out


def validation_pairs(
    spec: str | Path | None,
    shape: tuple[int, int, int],
    cache: str | Path,
    synth: SynthSettings | None = None,
    count: int = 4,
    axes: str = "image",
) -> tuple[list[dict[str, torch.Tensor]], str]:
    """Labelled validation pairs on the training grid, and what they are, in words.

    ``spec``: a CSV of listed labelled pairs or a folder of labelled volumes (``count`` pairs
    taken in order), or None for ``count`` fixed synthetic pairs (seeds not used in training).
    ``axes``: how the grid of real pairs lies (see :class:`VolumeSource`).
    """
    if spec is None:
        s = synth or SynthSettings(shape=shape)
        pairs = [synthetic_pair(s, 1, _seed(-1, i), "cpu") for i in range(count)]
        return pairs, f"{count} synthetic labelled pairs"
    source = VolumeSource(spec, shape, cache, axes=axes)
    if not source.labelled:
        raise InputError(f"{spec}: validation needs a label map for every volume")
    indices = source.pairs or [(i, (i + 1) % len(source.entries)) for i in range(count)]
    pairs = []
    for f, m in indices[: max(count, len(source.pairs or []))]:
        arrays = source.prepared(f, m)
        pairs.append({k: torch.from_numpy(v)[None, None] for k, v in arrays.items()})
    return pairs, f"{len(pairs)} labelled pairs from {spec}"


def mean_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean Dice over the labels (not 0) of ``a`` and ``b`` ``(1, 1, D, H, W)``; NaN if none."""
    from napari_deepwarp.core.metrics import overlap_per_label

    per_label = overlap_per_label(a[0, 0].cpu().numpy(), b[0, 0].cpu().numpy())
    values = [v["dice"] for v in per_label.values()]
    return float(np.mean(values)) if values else math.nan
