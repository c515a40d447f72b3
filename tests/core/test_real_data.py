"""Real volumes from ../shared/data (skipped with a reason where the folder is absent)."""

from pathlib import Path

import pytest
import torch

from napari_deepwarp.core.finetune import FinetuneSettings
from napari_deepwarp.core.io import read_volume
from napari_deepwarp.core.pipeline import RegistrationSettings, register
from napari_deepwarp.core.refine import RefineSettings

MINDBOGGLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "mindboggle"
pytestmark = pytest.mark.skipif(
    not MINDBOGGLE.is_dir(), reason=f"real data not found at {MINDBOGGLE} (not shipped)"
)


def mindboggle(subject: int, kind: str):
    return read_volume(MINDBOGGLE / f"oasis_trt20_{subject}_{kind}.nii.gz", labels=kind == "labels")


def run(settings: RegistrationSettings, fixed: int, moving: int) -> dict:
    gen = register(
        mindboggle(fixed, "t1"),
        mindboggle(moving, "t1"),
        settings,
        None,
        mindboggle(fixed, "labels"),
        mindboggle(moving, "labels"),
    )
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value.metrics


def test_field_refinement_reaches_well_beyond_the_affine_stage():
    """Native-space brains: affine first, then the field refined on a 64-voxel working grid."""
    metrics = run(
        RegistrationSettings(device="cpu", max_size=64, refine=RefineSettings(steps=100)), 1, 2
    )
    assert len(metrics["labels_after"]) > 80
    assert metrics["mean_dice_affine"] > metrics["mean_dice_before"] + 0.15
    assert metrics["mean_dice_after"] > metrics["mean_dice_affine"] + 0.1
    assert metrics["folding_percent"] < 0.5


def test_finetuned_voxelmorph_improves_on_the_affine_stage():
    """Instance optimisation from scratch: slower to converge; a short run must still help."""
    settings = RegistrationSettings(device="cpu", max_size=48, finetune=FinetuneSettings(steps=80))
    metrics = run(settings, 3, 4)
    assert metrics["mean_dice_after"] > metrics["mean_dice_affine"] + 0.005
    assert metrics["folding_percent"] < 0.5


def test_a_mindboggle_folder_is_a_labelled_training_set(tmp_path):
    """The folder layout users have (sub_t1 + sub_labels) pairs up, and a real pair is
    preprocessed like the pipeline: affinely aligned, so its labels already overlap."""
    from napari_deepwarp.core.datasets import VolumeSource, mean_dice, scan_folder

    entries = scan_folder(MINDBOGGLE)
    assert len(entries) == 5 and all(e.labels is not None for e in entries)
    assert all(e.labels.name == e.image.name.replace("_t1", "_labels") for e in entries)
    source = VolumeSource(MINDBOGGLE, (48, 48, 48), tmp_path)
    pair = {k: torch.from_numpy(v)[None, None] for k, v in source.prepared(0, 1).items()}
    dice = mean_dice(pair["fixed_labels"], pair["moving_labels"])
    assert dice > 0.3  # after the affine stage (about 0.015 before it)
