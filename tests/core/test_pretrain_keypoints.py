"""resources/training/pretrain_keypoints.py: the detector alone learns from the true affine of
framed synthetic pairs, starts from the parent's prediction, and resumes where it stopped."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import load_script

from napari_deepwarp.core.checkpoint import load_checkpoint, save_checkpoint
from napari_deepwarp.core.models.lindef import LinDef, LinDefConfig

SMALL = {"enc_channels": (4, 4), "enc_dilations": (1, 2), "dec_channels": (4,)}


@pytest.fixture(scope="module")
def script():
    return load_script("training/pretrain_keypoints.py")


@pytest.fixture()
def parent_and_anatomy(tmp_path):
    """A small trained-looking LinDef w/o Affine checkpoint and a two-label anatomy file."""
    torch.manual_seed(0)
    model = LinDef(LinDefConfig(use_affine=False, **SMALL))
    with torch.no_grad():
        model.gradients.conv.weight.normal_(0, 0.05)
    save_checkpoint(tmp_path / "parent.pt", model)
    labels = np.zeros((20, 24, 22), np.uint8)
    labels[3:17, 4:20, 3:19] = 1
    labels[6:12, 8:14, 5:12] = 2
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / "anatomy.nii.gz"))
    return tmp_path / "parent.pt", tmp_path / "anatomy.nii.gz"


def test_point_term_and_rotation_read(script):
    """Points that the true map carries exactly cost nothing; the rotation read is 1 for the
    true map, 0 for the identity and about 0.5 for half the angle."""
    angle = math.radians(20)
    rot = torch.tensor(
        [[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]]
    )
    target = torch.cat([rot, torch.tensor([[1.0], [2.0], [-1.0]])], dim=1)[None]
    fixed = torch.rand(1, 7, 3) * 16
    moving = fixed @ rot.T + target[:, None, :, 3]
    assert float(script.point_term(target, fixed, moving)) < 1e-9
    spread = float((fixed - fixed.mean(1, keepdim=True)).square().sum(-1).mean())
    shifted = float(script.point_term(target, fixed, moving + 1.0))
    assert shifted == pytest.approx(3.0 / spread, rel=1e-5)
    # gathered points cost more than spread ones for the same error in voxels
    gathered = fixed.mean(1, keepdim=True) + 0.01 * (fixed - fixed.mean(1, keepdim=True))
    moved = gathered @ rot.T + target[:, None, :, 3] + 1.0
    assert float(script.point_term(target, gathered, moved)) > 1000 * shifted
    assert script.rotation_read(target, target) == pytest.approx(1.0, abs=1e-4)
    identity = torch.eye(3, 4)[None]
    assert script.rotation_read(identity, target) == pytest.approx(0.0, abs=1e-4)
    half = torch.tensor(
        [[1, 0, 0], [0, math.cos(angle / 2), -math.sin(angle / 2)]]
        + [[0, math.sin(angle / 2), math.cos(angle / 2)]]
    )
    half = torch.cat([half, torch.zeros(3, 1)], dim=1)[None]
    assert script.rotation_read(half, target) == pytest.approx(0.5, abs=1e-3)


def test_detector_trains_alone_from_the_parent_and_resumes(script, parent_and_anatomy, tmp_path):
    parent_path, anatomy = parent_and_anatomy
    out = tmp_path / "kp.pt"
    common = [
        "--init", str(parent_path), "--anatomy", str(anatomy), "-o", str(out),
        "--shape", "12", "--config", "keypoints=6", "keypoint_channels=[4]",
        "keypoint_dilations=[1]", "affine_iterations=2", "--point-weight", "1",
        "--log-every", "2", "--save-every", "2", "--lr", "1e-2", "--parts-per-side",
    ]  # fmt: skip
    script.main([*common, "--steps", "4"])
    model, card = load_checkpoint(out)
    assert card["config"]["affine_pooling"] == "keypoints" and card["config"]["use_affine"]
    assert card["config"]["affine_iterations"] == 2 and card["training"]["steps"] == 4
    assert card["parent"]["sha256"] and card["name"] == "kp" and "keypoints" in card["description"]
    assert card["metrics"] == {}  # the parent's figures do not describe this network
    assert "parts cut per side" in card["training"]["data"]
    parent, _ = load_checkpoint(parent_path)
    detector = {k: v for k, v in model.state_dict().items() if k.startswith("keypoints.")}
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("keypoints.")}
    # only the detector trained: every other weight is the parent's (or the identity head's)
    for key, value in rest.items():
        if key in parent.state_dict():
            assert torch.equal(value, parent.state_dict()[key]), key
    assert torch.equal(rest["affine.bias"], torch.eye(3, 4).flatten())
    assert float(detector["keypoints.heatmaps.weight"].abs().max()) > 0
    lines = [json.loads(line) for line in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    assert all(math.isfinite(line["affine_loss"] + line["point_loss"]) for line in lines)

    # resuming runs on from step 4 to step 6, as one run would have; a line that a stopped
    # run logged past its last save is dropped
    with out.with_suffix(".log.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": 5, "affine_loss": 0.0}) + "\n")
    script.main([*common, "--steps", "6", "--resume"])
    one_run = tmp_path / "one.pt"
    script.main([*[a if a != str(out) else str(one_run) for a in common], "--steps", "6"])
    resumed, _ = load_checkpoint(out)
    straight, _ = load_checkpoint(one_run)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in out.with_suffix(".log.jsonl").open()]
    assert steps == [2, 4, 6]


def test_a_trained_pooled_head_is_refused(script, parent_and_anatomy, tmp_path):
    """The script does not run the pooled head; a parent whose head is trained is refused."""
    _, anatomy = parent_and_anatomy
    model = LinDef(LinDefConfig(use_affine=True, **SMALL))
    with torch.no_grad():
        model.affine.weight.fill_(1e-3)
    save_checkpoint(tmp_path / "headed.pt", model)
    args = ["--init", str(tmp_path / "headed.pt"), "--anatomy", str(anatomy)]
    with pytest.raises(SystemExit, match="pooled affine head is trained"):
        script.main([*args, "-o", str(tmp_path / "x.pt"), "--steps", "1"])


def test_a_resumed_leg_keeps_the_saved_rate_unless_given(script, parent_and_anatomy, tmp_path):
    """--resume keeps the saved learning rate; --lr on a resumed leg replaces it (annealing)."""
    parent_path, anatomy = parent_and_anatomy
    out = tmp_path / "kp.pt"
    common = [
        "--init", str(parent_path), "--anatomy", str(anatomy), "-o", str(out), "--shape", "12",
        "--config", "keypoints=6", "keypoint_channels=[4]", "keypoint_dilations=[1]",
        "--save-every", "1", "--log-every", "1",
    ]  # fmt: skip
    state_path = out.with_suffix(".state.pt")

    def rate():
        return torch.load(state_path, weights_only=True)["optimiser"]["param_groups"][0]["lr"]

    script.main([*common, "--steps", "2", "--lr", "1e-2"])
    script.main([*common, "--steps", "3", "--resume"])
    assert rate() == 1e-2
    before = torch.load(state_path, weights_only=True)["detector"]
    script.main([*common, "--steps", "4", "--resume", "--lr", "0"])
    assert rate() == 0.0
    after = torch.load(state_path, weights_only=True)
    assert after["step"] == 4
    for key, value in before.items():  # a zero rate moves nothing
        assert torch.equal(after["detector"][key], value), key
