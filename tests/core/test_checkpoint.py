"""Checkpoints: round trip, weights_only loading, refusals with the field named, atomic save."""

from __future__ import annotations

import hashlib
import json
import pickle
from datetime import datetime

import numpy as np
import pytest
import torch

import napari_deepwarp
from napari_deepwarp.core import checkpoint as ckpt
from napari_deepwarp.core.checkpoint import (
    CARD_FIELDS,
    CheckpointError,
    file_sha256,
    load_checkpoint,
    make_card,
    parent_reference,
    read_card,
    save_checkpoint,
    working_size,
)
from napari_deepwarp.core.models.voxelmorph import VoxelMorph, VoxelMorphConfig

SMALL = {"enc_channels": (8, 16, 16, 16), "dec_channels": (16, 16, 16, 16, 8)}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_model(**overrides):
    torch.manual_seed(0)
    model = VoxelMorph(VoxelMorphConfig(**{**SMALL, **overrides}))
    with torch.no_grad():  # make the field non-trivial so that a round trip is a real check
        model.flow.conv.weight.normal_(0, 1e-2)
        model.flow.conv.bias.uniform_(-0.1, 0.1)
    return model


def saved(tmp_path, model=None, name="model.pt", **card_fields):
    model = model or small_model()
    path = save_checkpoint(tmp_path / name, model, make_card(model, **card_fields))
    return path, model


def rewrite(path, edit):
    """Load the raw dict, let ``edit`` change it, and write it back (a hand-tampered file)."""
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)


def assert_one_line_naming(err, path, field):
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    assert f"'{field}'" in message


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("diffeomorphic", [False, True])
def test_round_trip_gives_identical_outputs(tmp_path, diffeomorphic):
    model = small_model(diffeomorphic=diffeomorphic).eval()
    path, _ = saved(tmp_path, model, working_spacing_mm=2.0, working_shape=[16, 16, 32])
    loaded, card = load_checkpoint(path)
    assert type(loaded) is VoxelMorph and not loaded.training
    assert loaded.config == model.config  # lists in the card are tuples again
    moving, fixed = torch.rand(2, 1, 16, 16, 32), torch.rand(2, 1, 16, 16, 32)
    with torch.no_grad():
        a, b = model(moving, fixed), loaded(moving, fixed)
    assert a.displacement.abs().max() > 1e-3
    assert torch.equal(a.displacement, b.displacement)
    assert torch.equal(a.extras["warped"], b.extras["warped"])
    assert card["working_shape"] == [16, 16, 32] and card["working_spacing_mm"] == 2.0
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_file_loads_with_weights_only_and_card_is_plain_json(tmp_path):
    path, model = saved(
        tmp_path,
        metrics={"dice": np.float32(0.5), "hd95_mm": 3.0},
        training={"steps": 10},
        intensity_preset="mr",
    )
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "napari-deepwarp-checkpoint"
    assert payload["format_version"] == 1
    assert set(payload["state_dict"]) == set(model.state_dict())
    card = payload["card"]
    assert json.loads(json.dumps(card)) == card
    assert set(CARD_FIELDS) <= set(card)
    assert card["architecture"] == "voxelmorph"
    assert card["config"]["enc_channels"] == [8, 16, 16, 16]
    assert card["metrics"]["dice"] == pytest.approx(0.5)
    assert card["training"] == {
        "data": None,
        "steps": 10,
        "command": None,
        "hardware": None,
        "duration_s": None,
    }
    assert card["software"]["napari_deepwarp"] == napari_deepwarp.__version__
    assert card["software"]["torch"] == torch.__version__
    assert datetime.fromisoformat(card["created"]).tzinfo is not None
    assert card["loss"]["similarity"] == {"name": "lncc", "window": 9}
    assert card["parent"] is None and card["tuned_on"] is None
    assert read_card(path) == card


def test_tampered_config_is_refused_naming_config(tmp_path):
    path, _ = saved(tmp_path)
    rewrite(path, lambda p: p["card"]["config"].update(enc_channels=[4, 16, 16, 16]))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert_one_line_naming(err, path, "config")
    message = str(err.value)
    assert "enc_channels=(4, 16, 16, 16)" in message
    assert "'unet.enc.0.0.conv.weight' has shape (8, 2, 3, 3, 3)" in message
    assert "expects (4, 2, 3, 3, 3)" in message


def test_config_with_more_layers_or_unknown_fields_is_refused(tmp_path):
    path, _ = saved(tmp_path)
    rewrite(path, lambda p: p["card"]["config"].update(dec_channels=[16, 16, 16, 16, 8, 8]))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert_one_line_naming(err, path, "config")
    rewrite(path, lambda p: p["card"]["config"].update(bogus=1))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert_one_line_naming(err, path, "config")
    assert "bogus" in str(err.value)


def test_unknown_architecture_is_refused(tmp_path):
    path, _ = saved(tmp_path)
    rewrite(path, lambda p: p["card"].update(architecture="no-such-net"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert_one_line_naming(err, path, "architecture")
    assert "no-such-net" in str(err.value) and "voxelmorph" in str(err.value)
    assert read_card(path)["architecture"] == "no-such-net"  # the card alone is still readable


def test_missing_card_field_is_refused(tmp_path):
    path, _ = saved(tmp_path)
    rewrite(path, lambda p: p["card"].pop("working_spacing_mm"))
    for reader in (load_checkpoint, read_card):
        with pytest.raises(CheckpointError) as err:
            reader(path)
        assert_one_line_naming(err, path, "working_spacing_mm")
        assert "missing" in str(err.value)


def test_non_checkpoint_files_are_refused(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n", encoding="utf-8")
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(3)}, plain)
    pickled = tmp_path / "pickled.pt"
    with open(pickled, "wb") as fh:
        pickle.dump({"format": ckpt.FORMAT, "obj": datetime(2020, 1, 1)}, fh)
    newer = tmp_path / "newer.pt"
    torch.save({"format": ckpt.FORMAT, "format_version": 99, "card": {}, "state_dict": {}}, newer)
    for path in (text, plain, pickled):
        for reader in (load_checkpoint, read_card):
            with pytest.raises(CheckpointError) as err:
                reader(path)
            assert "not a napari-deepwarp checkpoint" in str(err.value)
            assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(newer)
    assert_one_line_naming(err, newer, "format_version")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path, model = saved(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    before = path.read_bytes()
    # Overwriting works and still leaves a single file.
    save_checkpoint(path, model, make_card(model, modality="T1w MR"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    assert read_card(path)["modality"] == "T1w MR"

    # A save that fails half-way leaves the previous file untouched and no temp file.
    save_checkpoint(path, model, make_card(model))
    before = path.read_bytes()
    real_save = torch.save

    def broken_save(obj, fh, *args, **kwargs):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, make_card(model))
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_save_refuses_a_card_that_does_not_describe_the_model(tmp_path):
    model = small_model()
    card = make_card(model)
    card["config"]["enc_channels"] = [16, 32, 32, 32]
    with pytest.raises(ValueError, match="'config'"):
        save_checkpoint(tmp_path / "x.pt", model, card)
    card = make_card(model)
    del card["created"]
    with pytest.raises(ValueError, match="'created'"):
        save_checkpoint(tmp_path / "x.pt", model, card)
    with pytest.raises(TypeError, match="'metrics.curve'"):
        make_card(model, metrics={"curve": np.zeros(3)})
    with pytest.raises(ValueError, match="'architecture'"):
        make_card(model, architecture="other")
    assert list(tmp_path.iterdir()) == []


def test_sha256_and_parent_reference_for_fine_tuned_cards(tmp_path):
    path, model = saved(tmp_path, name="parent.pt")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == digest
    parent = parent_reference(path)
    assert parent == {"name": "parent.pt", "sha256": digest, "architecture": "voxelmorph"}
    child, _ = saved(
        tmp_path, model, name="child.pt", parent=parent, tuned_on={"fixed": "a.nii.gz", "steps": 5}
    )
    card = read_card(child)
    assert card["parent"]["sha256"] == digest
    assert card["tuned_on"]["steps"] == 5


def test_working_size_prefers_the_chosen_inference_size_then_the_training_size():
    trained = {"working_shape": [32, 32, 32]}
    assert working_size(trained) == 32
    assert working_size({**trained, "inference_size": 48}) == 48
    assert working_size(None) == 96
    # refining always gets at least a 96-voxel grid
    assert working_size({**trained, "inference_size": 48}, refining=True) == 96
    assert working_size({"working_shape": [128, 128, 128]}, refining=True) == 128


def test_config_changes_name_the_fields_set_away_from_the_defaults():
    from napari_deepwarp.core.checkpoint import config_changes
    from napari_deepwarp.core.models.lindef import LinDef, LinDefConfig

    assert config_changes(make_card(LinDef())) is None
    changed = make_card(LinDef(LinDefConfig(use_affine=False, dec_channels=(16, 16))))
    # as `deepwarp train --config` takes them; lists and tuples compare alike
    assert config_changes(changed) == "dec_channels=[16, 16], use_affine=false"
    assert config_changes({"architecture": "no_such_model", "config": {"a": 1}}) is None
