"""resources/ship_checkpoints.py: figures into the cards, and the default only where earned."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import load_script

from napari_deepwarp.core.checkpoint import make_card, read_card, save_checkpoint
from napari_deepwarp.core.models.registry import create_model


@pytest.fixture(scope="module")
def ship():
    return load_script("ship_checkpoints.py")


def _checkpoint(path: Path, default: bool = False) -> None:
    model = create_model("voxelmorph", enc_channels=[4, 4], dec_channels=[4, 4])
    card = make_card(model, metrics={"validation_mean_dice": 0.5}, default=default)
    save_checkpoint(path, model, card)


def _benchmark(path: Path, dice: dict[str, float], affine: float = 0.42) -> None:
    entries = [{"name": "affine stage alone", "results": {"inference": {"dice": affine}}}]
    for name, value in dice.items():
        result = {"dice": value, "folding_percent": 0.0, "wall_s": 1.0, "pairs": ["1<-2"]}
        entries.append({"name": name, "path": f"x/{name}", "results": {"inference": result}})
    report = {"command": "python -m benchmarks.checkpoints_mindboggle", "checkpoints": entries}
    path.write_text(json.dumps(report), encoding="utf-8")


def _ship(ship, monkeypatch, trained: Path, out: Path, benchmark: Path) -> None:
    args = ["--trained", trained, "--out", out, "--benchmark", benchmark]
    monkeypatch.setattr(sys, "argv", ["ship_checkpoints.py", *map(str, args)])
    ship.main()


def test_one_new_checkpoint_cannot_take_the_default_from_a_better_shipped_one(
    ship, tmp_path, monkeypatch
):
    """Shipping one checkpoint alone: the shipped default measured in the same run keeps the
    default when it is better, and loses it (and only its flag changes) when it is worse."""
    shipped, trained = tmp_path / "shipped", tmp_path / "trained"
    _checkpoint(shipped / "best.pt", default=True)
    _checkpoint(trained / "new.pt")
    _benchmark(tmp_path / "b.json", {"best.pt": 0.58, "new.pt": 0.46})
    _ship(ship, monkeypatch, trained, shipped, tmp_path / "b.json")
    new, best = read_card(shipped / "new.pt"), read_card(shipped / "best.pt")
    assert new["default"] is False and best["default"] is True
    assert new["metrics"]["mindboggle_mean_dice"] == 0.46
    assert new["metrics"]["mindboggle_mean_dice_affine_stage"] == 0.42
    assert "mindboggle_mean_dice" not in best["metrics"]  # its own figures stay as they were

    _benchmark(tmp_path / "c.json", {"best.pt": 0.50, "new.pt": 0.60})
    _ship(ship, monkeypatch, trained, shipped, tmp_path / "c.json")
    assert read_card(shipped / "new.pt")["default"] is True
    assert read_card(shipped / "best.pt")["default"] is False


def test_a_card_written_before_a_config_field_existed_is_shipped_with_the_full_config(
    ship, tmp_path, monkeypatch
):
    """A card written before its architecture gained a config field loads with that field's
    default; re-shipping it writes the config the model now has, instead of refusing."""
    import torch

    trained = tmp_path / "trained"
    _checkpoint(trained / "old.pt")
    payload = torch.load(trained / "old.pt", weights_only=False)
    del payload["card"]["config"]["similarity_window"]  # a field added after it was trained
    torch.save(payload, trained / "old.pt")
    _benchmark(tmp_path / "b.json", {"old.pt": 0.50})
    _ship(ship, monkeypatch, trained, tmp_path / "shipped", tmp_path / "b.json")
    card = read_card(tmp_path / "shipped" / "old.pt")
    assert card["config"]["similarity_window"] == 9 and card["config"]["enc_channels"] == [4, 4]
    assert card["metrics"]["mindboggle_mean_dice"] == 0.5


def test_no_default_below_the_affine_stage(ship, tmp_path, monkeypatch):
    _checkpoint(tmp_path / "trained" / "weak.pt")
    _benchmark(tmp_path / "b.json", {"weak.pt": 0.421})
    out = tmp_path / "shipped"
    _ship(ship, monkeypatch, tmp_path / "trained", out, tmp_path / "b.json")
    assert read_card(out / "weak.pt")["default"] is False
