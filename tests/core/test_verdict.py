"""The quality verdict, the guard (--if-worse) and the modality-aware model choice."""

import json

import numpy as np
import pytest
import torch
from conftest import run_generator

from napari_deepwarp.core import pipeline
from napari_deepwarp.core import verdict as V
from napari_deepwarp.core.models.registry import RegistrationModel, RegistrationOutput
from napari_deepwarp.core.pipeline import (
    RegistrationSettings,
    WorseThanBaseline,
    alternative,
    register,
)
from napari_deepwarp.core.volume import Grid, Volume

GRID = Grid((28, 32, 30), (1.2, 1.0, 1.1), (3.0, -2.0, 1.0), np.eye(3))


def labelled_blobs(grid: Grid = GRID, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(z, y, x)`` of 6 ellipsoids on a background, and a T1-like image of them."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in grid.shape], indexing="ij")
    labels = np.zeros(grid.shape, np.int16)
    labels[(z / 0.9) ** 2 + (y / 0.9) ** 2 + (x / 0.9) ** 2 < 1] = 1
    for k in range(2, 7):
        c, r = rng.uniform(-0.45, 0.45, 3), rng.uniform(0.15, 0.3, 3)
        labels[
            ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 < 1
        ] = k
    values = np.array([0.0, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0])
    image = values[labels] + rng.normal(0, 0.02, grid.shape)
    return labels, image.astype(np.float32)


def test_the_strided_grid_holds_every_sth_voxel_of_the_fixed_grid():
    grid = Grid((160, 256, 256), (1.0, 1.0, 1.2), (5.0, 6.0, 7.0), np.eye(3)[[1, 0, 2]])
    stride, small = V.strided_grid(grid)
    assert stride == 2 and small.shape == (80, 128, 128)
    assert np.prod(small.shape) <= V.MAX_VOXELS
    index = np.array([3, 5, 7, 1.0])  # (z, y, x) on the strided grid
    big = np.array([*(index[:3] * stride), 1.0])
    np.testing.assert_allclose(
        small.index_to_world_matrix() @ index, grid.index_to_world_matrix() @ big
    )
    assert V.strided_grid(GRID)[0] == 1


def test_otsu_separates_two_levels_and_the_foreground_falls_back_to_everything():
    values = np.concatenate([np.full(500, 0.1), np.full(300, 0.8)])
    assert 0.1 < V.otsu_threshold(values) < 0.8
    assert V.foreground(np.zeros((4, 4, 4))).all()


def test_one_modality_or_two_from_the_intensity_relation():
    labels, t1 = labelled_blobs()
    mask = V.foreground(t1)
    monotonic = 3.0 * t1**2 + 0.1  # another scanner, same contrast: a monotonic map
    assert not V.decide_modality(t1, monotonic, mask).multimodal
    # T2-like: the label values reordered, so no monotonic map relates the two
    t2 = np.array([0.0, 0.8, 0.2, 1.0, 0.35, 0.6, 0.1])[labels].astype(np.float32)
    two = V.decide_modality(t1, t2, mask)
    assert two.multimodal and two.similarity == "mi" and "monotonic" in two.reason
    assert V.decide_modality(t1, t1, mask, "ct", "mr").multimodal
    assert not V.decide_modality(t1, t2, mask, "ct", "ct").multimodal


@pytest.mark.parametrize(
    ("baseline", "result", "dice", "word"),
    [
        (0.40, 0.50, None, "improved"),
        (0.40, 0.30, None, "worse than affine"),
        (0.40, 0.401, None, "no better than affine"),
        (0.40, 0.38, (0.50, 0.60), "improved"),  # the labels decide where both are given
        (0.40, 0.50, (0.74, 0.70), "worse than affine"),
        (0.40, 0.50, (0.74, 0.745), "no better than affine"),
    ],
)
def test_the_word_and_its_reason(baseline, result, dice, word):
    got, reason = V.judge("mi", 0.1, baseline, result, "affine", "the network", *dice or ())
    assert got == word
    assert f"mutual information {result:.3f}" in reason and f"{baseline:.3f}" in reason
    assert ("mean Dice" in reason) == (dice is not None)


@pytest.mark.parametrize("dice", [None, (0.50, 0.60)])
def test_a_field_that_folds_past_the_limit_is_worse_whatever_the_similarity_says(dice):
    limit = V.FOLDING_LIMIT
    args = ("mi", 0.1, 0.231, 0.277, "affine", "fine-tuning", *(dice or ()))
    assert V.judge(*args, folding_percent=limit)[0] == "improved"  # at the limit: allowed
    word, reason = V.judge(*args, folding_percent=1.445)
    assert word == "worse than affine"
    assert "folds 1.45 % of the volume" in reason and f"limit {limit} %" in reason
    assert "mutual information 0.277" in reason and "0.231" in reason  # still reported
    assert ("mean Dice 0.600" in reason) == (dice is not None)


class Scrambler(RegistrationModel):
    """A 'network' that predicts a large smooth wave: it makes any pair worse."""

    name = "scrambler"

    def predict(self, moving, fixed):
        d, h, w = moving.shape[2:]
        z = torch.linspace(0, 6.3, d).view(1, 1, d, 1, 1).expand(1, 3, d, h, w)
        return RegistrationOutput(displacement=4.0 * torch.sin(z * 2))


def _pair():
    labels, image = labelled_blobs()
    fixed = Volume.on_grid(image, GRID, "fixed")
    moving = Volume.on_grid(np.roll(image, 2, axis=2), GRID, "moving")
    return fixed, moving, Volume.on_grid(labels, GRID), Volume.on_grid(np.roll(labels, 2, 2), GRID)


def _run(if_worse, labels=False, model=None):
    fixed, moving, fl, ml = _pair()
    settings = RegistrationSettings(model="voxelmorph", device="cpu", max_size=32)
    settings.if_worse = if_worse
    lab = (fl, ml) if labels else (None, None)
    return run_generator(register(fixed, moving, settings, model or Scrambler(), *lab))[1]


def test_the_guard_hands_back_the_affine_stage_and_keeps_the_network_one_call_away():
    result = _run("affine", labels=True)
    v = result.metrics["verdict"]
    assert v["word"] == "worse than affine" and v["returned"] == "affine"
    assert "handed back the affine stage's result" in v["line"]
    assert result.working_field is None and result.rejected is not None
    fixed, moving, *_ = _pair()
    affine_only = RegistrationSettings(model="affine", device="cpu")
    reference = run_generator(register(fixed, moving, affine_only))[1]
    np.testing.assert_allclose(result.warped.array, reference.warped.array, atol=1e-5)
    assert result.metrics["mean_dice_after"] == pytest.approx(v["dice_baseline"])
    other = run_generator(alternative(result))[1]
    assert other.working_field is not None and other.metrics["verdict"]["returned"] == "result"
    assert other.metrics["mean_dice_after"] == pytest.approx(v["dice_result"])
    assert other.metrics["mean_dice_after"] < result.metrics["mean_dice_after"]
    back = run_generator(alternative(other))[1]  # and back to the affine stage's
    assert back.working_field is None and back.verdict.returned == "affine"
    assert other.verdict.returned == "result"  # each result keeps its own verdict
    assert back.metrics["seconds"]["total"] < result.metrics["seconds"]["total"]


def test_keep_returns_the_worse_result_with_its_verdict_and_fail_raises():
    kept = _run("keep")
    assert kept.metrics["verdict"]["word"] == "worse than affine"
    assert kept.metrics["verdict"]["returned"] == "result" and kept.working_field is not None
    with pytest.raises(WorseThanBaseline, match="worse than affine: local NCC"):
        _run("fail")


def test_a_network_that_helps_is_kept():
    fixed, moving, fl, ml = _pair()
    settings = RegistrationSettings(model="voxelmorph", device="cpu", max_size=32, affine=False)
    from napari_deepwarp.core.refine import RefineSettings

    settings.refine = RefineSettings(steps=60)
    result = run_generator(register(fixed, moving, settings, None, fl, ml))[1]
    v = result.metrics["verdict"]
    assert v["word"] == "improved" and v["baseline"] == "unregistered", v["line"]
    assert v["returned"] == "result" and result.working_field is not None
    assert v["folding_percent"] == result.metrics["folding_percent"]
    assert v["jacobian_p1"] <= 1.0 <= v["jacobian_p99"]


class BackgroundFolder(RegistrationModel):
    """A 'network' that leaves the anatomy where it is and tears a corner of the background."""

    name = "background_folder"

    def predict(self, moving, fixed):
        d, h, w = (n // 3 for n in moving.shape[2:])
        field = torch.zeros(1, 3, *moving.shape[2:])
        generator = torch.Generator().manual_seed(0)
        field[:, :, :d, :h, :w] = 4.0 * torch.randn(1, 3, d, h, w, generator=generator)
        return RegistrationOutput(displacement=field)


def test_the_pipeline_judges_a_folded_field_worse_where_the_similarity_is_unchanged():
    image = labelled_blobs()[1]
    fixed, moving = Volume.on_grid(image, GRID, "fixed"), Volume.on_grid(image, GRID, "moving")
    settings = RegistrationSettings(model="voxelmorph", device="cpu", max_size=32, affine=False)
    settings.if_worse = "keep"
    result = run_generator(register(fixed, moving, settings, BackgroundFolder()))[1]
    v = result.metrics["verdict"]
    similarity = (v["similarity"], v["similarity_before"], v["similarity_baseline"])
    unfolded = V.judge(*similarity, v["similarity_result"], "unregistered")[0]
    assert unfolded == "no better than unregistered"  # the similarity alone: within tolerance
    assert v["folding_percent"] > V.FOLDING_LIMIT
    assert v["word"] == "worse than unregistered" and "tissue does not fold" in v["reason"]


@pytest.mark.parametrize(("contrast", "kind", "architecture"), [("same", "mono", "cfwn"),
                                                               ("t2", "multi", "mi_unet")])  # fmt: skip
def test_auto_picks_the_shipped_checkpoint_for_the_pairs_modality(contrast, kind, architecture):
    labels, image = labelled_blobs()
    if contrast == "t2":
        image = np.array([0.0, 0.8, 0.2, 1.0, 0.35, 0.6, 0.1], np.float32)[np.roll(labels, 2, 2)]
    else:
        image = np.roll(image, 2, axis=2)
    fixed = Volume.on_grid(labelled_blobs()[1], GRID, "fixed")
    moving = Volume.on_grid(image, GRID, "moving")
    settings = RegistrationSettings(model="auto", device="cpu", max_size=None)
    result = run_generator(register(fixed, moving, settings))[1]
    auto = result.metrics["auto"]
    assert auto["modality"] == kind and auto["checkpoint"].startswith(architecture)
    assert result.metrics["model"] == architecture and auto["line"].startswith(
        "two modalities" if kind == "multi" else "one modality"
    )
    assert result.metrics["verdict"]["similarity"] == ("mi" if kind == "multi" else "lncc")
    assert settings.model == "auto"  # the caller's settings are not changed


def test_the_cli_fails_with_exit_3_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from napari_deepwarp.cli import main
    from napari_deepwarp.core.io import write_volume

    fixed, moving, *_ = _pair()
    write_volume(fixed, tmp_path / "f.nii.gz")
    write_volume(moving, tmp_path / "m.nii.gz")
    monkeypatch.setattr(pipeline, "create_model", lambda name: Scrambler())
    args = ["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "--device", "cpu"]
    args += ["--model", "voxelmorph", "--checkpoint", "none", "--max-size", "32", "-q"]
    assert main([*args, "-o", str(tmp_path / "fail"), "--if-worse", "fail"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepwarp: worse than affine: local NCC")
    assert not (tmp_path / "fail").exists()
    assert main([*args, "-o", str(tmp_path / "guarded")]) == 0
    assert "handed back the affine stage's result" in capsys.readouterr().err  # even with -q
    metrics = json.loads((tmp_path / "guarded" / "metrics.json").read_text())
    assert metrics["verdict"]["returned"] == "affine"
