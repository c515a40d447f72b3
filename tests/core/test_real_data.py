"""Real volumes from ../shared/data (skipped with a reason where the folder is absent)."""

from pathlib import Path

import pytest
import torch

from napari_deepwarp.core.checkpoint import load_checkpoint, shipped_checkpoints, working_size
from napari_deepwarp.core.finetune import FinetuneSettings
from napari_deepwarp.core.io import read_volume
from napari_deepwarp.core.pipeline import RegistrationSettings, register
from napari_deepwarp.core.preprocess import (
    IntensityPreset,
    intensity_window,
    network_input,
    working_grid,
)
from napari_deepwarp.core.refine import RefineSettings

MINDBOGGLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "mindboggle"
pytestmark = pytest.mark.skipif(
    not MINDBOGGLE.is_dir(), reason=f"real data not found at {MINDBOGGLE} (not shipped)"
)


#: how far (mean, mm) a shipped network may move a real head registered to itself
SELF_MOTION_MM = 1.6


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


@pytest.mark.parametrize("path", [p for p, _ in shipped_checkpoints()], ids=lambda p: p.stem)
def test_a_shipped_checkpoint_keeps_a_scan_registered_to_itself_still(path):
    """A real brain against itself, on the checkpoint's own working grid: the network must
    not move the head. The mean in millimetres: CFWN 0.5, Conv2Warp 0.6, VoxelMorph 0.8, FCN
    1.0, MI-UNet 1.4, LinDef 1.5; LinDef before it saw still pairs 1.9 (self-Dice 0.63)."""
    net, card = load_checkpoint(path)
    scan = mindboggle(1, "t1")
    grid = working_grid(scan, None, working_size(card), net.size_multiple, axes=net.working_axes)
    image = network_input(scan, grid, intensity_window(scan.array, IntensityPreset("auto")))
    x = torch.from_numpy(image).float()[None, None]
    with torch.no_grad():
        field = net.eval()(x, x).displacement[0]
    head = x[0, 0] > 0.1
    mm = field.norm(dim=0)[head] * float(grid.spacing[0])
    assert float(mm.mean()) < SELF_MOTION_MM, (
        f"{path.stem} moves the head {float(mm.mean()):.2f} mm"
    )


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


def test_lindefs_own_affine_branch_registers_native_space_brains_without_the_affine_stage():
    """The shipped LinDef with its keypoint affine (``--no-affine``: its own branch does the
    linear part) on two native-space brains (Dice 0.12 as they are): better than our
    affine stage alone (0.431 on this pair)."""
    path = next(
        p
        for p, c in shipped_checkpoints()
        if c["config"].get("use_affine", True) and c["architecture"] == "lindef"
    )
    net, card = load_checkpoint(path)
    settings = RegistrationSettings(device="cpu", affine=False, max_size=working_size(card))
    settings.if_worse = "keep"
    gen = register(
        mindboggle(3, "t1"), mindboggle(4, "t1"), settings, net,
        mindboggle(3, "labels"), mindboggle(4, "labels"),
    )  # fmt: skip
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        metrics = stop.value.metrics
    assert metrics["mean_dice_before"] < 0.15
    affine_stage = run(RegistrationSettings(device="cpu", model="affine"), 3, 4)
    assert metrics["mean_dice_after"] > affine_stage["mean_dice_after"]
    assert metrics["folding_percent"] < 0.5
