"""The quality verdict of a run: is what it hands back better than the simpler stage it started
from (the affine stage; the unregistered pair with ``--no-affine``)?

Everything here is measured on the **fixed image's foreground** (Otsu threshold of the
intensity-windowed fixed image) on a strided subsample of the fixed grid: every ``s``-th voxel
along each axis, ``s`` the smallest stride that keeps at most :data:`MAX_VOXELS` voxels (1 for
a prostate or spine volume, 2 for a 256x256x160 brain). The images are sampled at exactly those
fixed voxels, so nothing is smoothed or resampled twice.

The similarity that fits the pair: local squared NCC over windows of about
:data:`LNCC_WINDOW_MM` for one modality, mutual information (32 bins, nats) for two. One
modality or two is decided by :func:`decide_modality` from the fixed image and the moving image
after the affine stage.

The word (:func:`judge`): ``worse than affine`` when the similarity fell by more than
:data:`TOLERANCE` (relative), ``improved`` when it rose by more than that, ``no better than
affine`` otherwise. With label maps on both sides the mean Dice decides instead, with a margin
of :data:`DICE_MARGIN` (the labels are the user's own ground truth; the similarity is reported
beside it). Whatever they say, a field that folds more than :data:`FOLDING_LIMIT` % of the
volume is ``worse``: tissue does not fold, and a similarity that was optimised on the pair can
be raised by tearing it (fine-tuning with mutual information on the spine T1/T2 pair, two runs:
0.231 -> 0.276-0.277, the cord Dice 0.884 -> 0.540, 1.3-1.4 % folded).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from napari_deepwarp.core import metrics as M
from napari_deepwarp.core.volume import Grid

#: at most this many voxels in the strided grid the verdict is measured on
MAX_VOXELS = 2_000_000
#: local NCC window, mm (rounded to an odd number of strided voxels, at least 3)
LNCC_WINDOW_MM = 9.0
#: relative change of the similarity that counts as better or worse
TOLERANCE = 0.02
#: a monotonic intensity map must explain at least this share of what any map explains. Measured
#: after the affine stage: 0.99-1.00 on seven Mindboggle T1 pairs (1.00 still with noise of 40 %
#: of the range, or a gamma and a bias field), 0.00 and 0.09 on the spine T1/T2 pair. The prostate
#: MR/ultrasound pair falls either side: 0.92 after the affine stage from the images, 0.96 after
#: the one from the label maps (its intensities relate weakly, 20 % of the variance, but mostly
#: monotonically); there the Dice-based verdict judges the result
MONOTONIC_SHARE = 0.95
#: below this correlation ratio the intensities are too unrelated to call the pair one modality
MIN_EXPLAINED = 0.02
#: Dice fall that counts as worse (the margin the checkpoints must beat the affine stage by)
DICE_MARGIN = 0.01
#: % of the volume folded (Jacobian determinant <= 0) above which a result is worse, whatever
#: the similarity or Dice: the bound every shipped checkpoint must meet. Measured: the shipped
#: networks fold at most 0.13 % on the Mindboggle pairs, fine-tuning 200 steps at most 0.26 %,
#: refinement (--refine 150) 0.07 %; fine-tuning with mutual information on the spine and
#: prostate pairs of two modalities 1.3-1.4 % and 1.6 %, while it wrecked the cord and the gland
FOLDING_LIMIT = 0.5

SIMILARITY_NAMES = {"lncc": "local NCC", "mi": "mutual information"}
WORDS = ("improved", "no better than", "worse than")


def strided_grid(grid: Grid, max_voxels: int = MAX_VOXELS) -> tuple[int, Grid]:
    """``(s, G)``: the smallest stride ``s`` that keeps at most ``max_voxels`` voxels, and the
    grid ``G`` of every ``s``-th voxel of ``grid`` (``array[::s, ::s, ::s]`` lies on it)."""
    s = 1
    while math.prod(len(range(0, n, s)) for n in grid.shape) > max_voxels:
        s += 1
    shape = tuple(len(range(0, n, s)) for n in grid.shape)
    spacing = tuple(float(v) * s for v in grid.spacing)
    return s, Grid(shape, spacing, tuple(grid.origin), np.array(grid.direction, copy=True))


def otsu_threshold(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of ``values`` (any shape): the cut that maximises the between-class
    variance of a ``bins``-bin histogram."""
    counts, edges = np.histogram(values, bins)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts).astype(np.float64)
    above = below[-1] - below
    mass = np.cumsum(counts * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mass[-1] * below / below[-1] - mass) ** 2 / (below * above)
    if not np.isfinite(between).any():
        return float(centres[0])
    return float(centres[np.nanargmax(np.where(np.isfinite(between), between, np.nan))])


def foreground(fixed_n: np.ndarray) -> np.ndarray:
    """Bool mask of the fixed image's foreground: above Otsu's threshold of its intensities in
    [0, 1]; the whole image when that leaves less than 1 % of it."""
    mask = fixed_n > otsu_threshold(fixed_n)
    return mask if mask.mean() >= 0.01 else np.ones_like(mask)


def _pool_adjacent_violators(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to ``y`` in weighted least squares."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for yi, wi in zip(y, w):
        blocks.append([float(yi), float(wi), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.concatenate([np.full(int(n), m) for m, _, n in blocks])


def explained_variance(
    fixed: np.ndarray, moving: np.ndarray, bins: int = 64
) -> tuple[float, float]:
    """How well the moving intensities explain the fixed ones (1D arrays of the same voxels):
    ``(any_map, monotonic_map)``, the share of the fixed variance explained by the best function
    of the moving intensity (the correlation ratio, over ``bins`` equal-count bins) and by the
    best non-decreasing function (isotonic regression of the bin means)."""
    edges = np.quantile(moving, np.linspace(0, 1, bins + 1)[1:-1])
    index = np.searchsorted(edges, moving)
    n = np.bincount(index, minlength=bins).astype(np.float64)
    sums = np.bincount(index, fixed.astype(np.float64), minlength=bins)
    used = n > 0
    n, means = n[used], sums[used] / n[used]
    centre = float(fixed.mean())
    total = float(((fixed - centre) ** 2).sum())
    if total == 0:
        return 0.0, 0.0
    between = float((n * (means - centre) ** 2).sum())
    misfit = float((n * (means - _pool_adjacent_violators(means, n)) ** 2).sum())
    return between / total, max(0.0, (between - misfit) / total)


@dataclass
class Modality:
    """One modality or two, and why. explained: share of the fixed variance that any map of the
    moving intensities explains; monotonic: share that a non-decreasing map explains."""

    multimodal: bool
    reason: str
    explained: float | None = None
    monotonic: float | None = None

    @property
    def similarity(self) -> str:
        """``"mi"`` for two modalities, ``"lncc"`` for one."""
        return "mi" if self.multimodal else "lncc"


def decide_modality(
    fixed_n: np.ndarray,
    moving_n: np.ndarray,
    mask: np.ndarray,
    fixed_kind: str = "mr",
    moving_kind: str = "mr",
) -> Modality:
    """One modality or two, from the fixed image and the moving image after the affine stage
    (both windowed to [0, 1], on the same voxels) inside ``mask``.

    ``fixed_kind``/``moving_kind``: ``"ct"`` or ``"mr"`` as recognised from the raw intensities
    (Hounsfield range). CT against a non-CT image is two modalities, two CTs are one. Otherwise
    the pair is one modality when a non-decreasing intensity map explains at least
    :data:`MONOTONIC_SHARE` of what any map explains: T1 against T1 gives about 1.0 even when
    the anatomy differs, T1 against T2 (dark and bright swapped, non-monotonic) under 0.1, MR
    against ultrasound 0.92-0.96 (a weak, mostly monotonic relation).
    """
    if (fixed_kind == "ct") != (moving_kind == "ct"):
        which = "fixed" if fixed_kind == "ct" else "moving"
        return Modality(True, f"the {which} image is CT (Hounsfield range), the other is not")
    if fixed_kind == moving_kind == "ct":
        return Modality(False, "both images are CT (Hounsfield range)")
    explained, monotonic = explained_variance(fixed_n[mask], moving_n[mask])
    share = monotonic / explained if explained > 0 else 0.0
    how = (
        f"a monotonic intensity map explains {100 * share:.0f} % of what any map explains "
        f"({100 * monotonic:.0f} % against {100 * explained:.0f} % of the fixed image's variance)"
    )
    if explained < MIN_EXPLAINED:
        return Modality(True, f"intensities barely related ({how})", explained, monotonic)
    return Modality(share < MONOTONIC_SHARE, how, explained, monotonic)


def similarity(name: str, fixed_n: np.ndarray, moving_n: np.ndarray, mask, spacing_mm) -> float:
    """``"lncc"`` (mean local squared NCC, windows of about :data:`LNCC_WINDOW_MM`) or ``"mi"``
    (mutual information, nats) of two images on the same voxels, inside ``mask``."""
    if name == "mi":
        return M.mutual_information(fixed_n[mask], moving_n[mask])
    window = max(3, round(LNCC_WINDOW_MM / float(min(spacing_mm))) | 1)
    # Only the windows around the mask matter: crop to its box plus half a window (same values).
    box = _bounding_box(mask, window // 2)
    return M.local_ncc(fixed_n[box], moving_n[box], window, mask[box])


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of ``mask``'s bounding box grown by ``margin`` voxels (the whole array if empty)."""
    if not mask.any():
        return tuple(slice(None) for _ in mask.shape)
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, hits[0] - margin), hits[-1] + margin + 1))
    return tuple(box)


@dataclass
class Verdict:
    """The judgement of one run; ``as_dict()`` is what ``metrics.json`` holds under
    ``"verdict"``. Similarities are measured as the module docstring says; ``jacobian_p1/p99``
    are percentiles of the judged field's Jacobian determinant inside the foreground."""

    word: str
    reason: str
    baseline: str  # "affine" or "unregistered"
    similarity: str  # "lncc" or "mi"
    similarity_before: float
    similarity_baseline: float
    similarity_result: float
    modality: dict
    folding_percent: float | None = None
    sdlogj: float | None = None
    jacobian_p1: float | None = None
    jacobian_p99: float | None = None
    dice_baseline: float | None = None
    dice_result: float | None = None
    returned: str = "result"  # which result the run handed back: "result" or the baseline
    if_worse: str = "keep"
    stride: int = 1
    foreground_voxels: int = 0

    @property
    def worse(self) -> bool:
        return self.word.startswith("worse")

    def line(self) -> str:
        """One line for a terminal or a status bar: ``improved: local NCC 0.50 ...``."""
        text = f"{self.word}: {self.reason}"
        if self.returned != "result":
            text += f"; handed back the {self.returned} stage's result (--if-worse {self.if_worse})"
        return text

    def as_dict(self) -> dict:
        out = asdict(self)
        out["similarity_name"] = SIMILARITY_NAMES[self.similarity]
        out["line"] = self.line()
        return out


def judge(
    similarity_name: str,
    before: float,
    baseline: float,
    result: float,
    baseline_name: str = "affine",
    stage: str = "the network",
    dice_baseline: float | None = None,
    dice_result: float | None = None,
    folding_percent: float | None = None,
) -> tuple[str, str]:
    """``(word, reason)`` for a result against its baseline stage (see the module docstring).

    With both Dice values (label maps on both sides) the mean Dice decides, the labels being the
    user's own ground truth, and the similarity is reported beside it; without, the similarity
    decides. A result whose field folds more than :data:`FOLDING_LIMIT` % of the volume
    (``folding_percent``) is worse either way. ``stage``: what produced the result, for the
    sentence ("the network", "refinement")."""
    what = SIMILARITY_NAMES[similarity_name]
    where = "after the affine stage" if baseline_name == "affine" else "unregistered"
    sim_text = f"{what} {result:.3f} after {stage} against {baseline:.3f} {where}"
    if dice_baseline is not None and dice_result is not None:
        change, margin = dice_result - dice_baseline, DICE_MARGIN
        text = f"mean Dice {dice_result:.3f} after {stage} against {dice_baseline:.3f} {where}"
        text += f" ({what} {result:.3f} against {baseline:.3f})"
        within = f"within {margin}"
    else:
        change, margin = (result - baseline) / max(abs(baseline), 1e-6), TOLERANCE
        text, within = sim_text, f"within {100 * TOLERANCE:.0f} %"
    if folding_percent is not None and folding_percent > FOLDING_LIMIT:
        folds = f"the field folds {folding_percent:.2f} % of the volume (limit {FOLDING_LIMIT} %)"
        return f"worse than {baseline_name}", f"{text}; {folds}, and tissue does not fold"
    if change < -margin:
        return f"worse than {baseline_name}", text
    if change > margin:
        return "improved", text
    return f"no better than {baseline_name}", f"{text}, {within}"
