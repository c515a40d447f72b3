"""Training: exact resume, the log and the card, real-volume datasets with a cache, DDP."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import run_generator

from napari_deepwarp.core import datasets, spatial
from napari_deepwarp.core.checkpoint import load_checkpoint, read_card
from napari_deepwarp.core.io import InputError
from napari_deepwarp.core.models.registry import create_model
from napari_deepwarp.core.synth import SynthSettings
from napari_deepwarp.core.train import TrainSettings, _objective, state_path, train


def settings(tmp_path, name="vm.pt", **kw):
    base = {
        "model": "voxelmorph",
        "output": tmp_path / name,
        "shape": (32, 32, 32),
        "steps": 4,
        "learning_rate": 1e-3,
        "checkpoint_every": 2,
        "validate_every": 2,
        "validation_count": 1,
        "log_every": 1,
        "command": "deepwarp train (test)",
    }
    base.update(kw)
    return TrainSettings(**base)


def test_resume_continues_exactly(tmp_path, one_thread):
    _, straight = run_generator(train(settings(tmp_path, "a.pt")))
    run_generator(train(settings(tmp_path, "b.pt", steps=2)))
    events, resumed = run_generator(train(settings(tmp_path, "b.pt", resume=True)))
    assert [e.step for e in events] == [3, 4]
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values()
    ):
        assert torch.equal(a, b), name
    log = [
        json.loads(ln) for ln in (tmp_path / "b.log.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in log if "val_dice" in r] == [2, 4]


def test_a_resumed_card_lists_every_run(tmp_path, one_thread):
    run_generator(train(settings(tmp_path, steps=2, command="deepwarp train --steps 2")))
    assert "legs" not in read_card(tmp_path / "vm.pt")["training"]
    resumed = settings(tmp_path, steps=4, resume=True, command="deepwarp train --steps 4 --resume")
    run_generator(train(resumed))
    training = read_card(tmp_path / "vm.pt")["training"]
    assert training["command"] == "deepwarp train --steps 4 --resume"
    legs = training["legs"]
    assert [leg["command"] for leg in legs] == [
        "deepwarp train --steps 2",
        "deepwarp train --steps 4 --resume",
    ]
    assert [leg["steps"] for leg in legs] == [[1, 2], [3, 4]]
    assert all("CPU" in leg["hardware"] and leg["duration_s"] > 0 for leg in legs)
    assert training["duration_s"] >= sum(leg["duration_s"] for leg in legs) - 0.2


def test_a_resumed_run_trains_at_its_own_learning_rate(tmp_path, one_thread):
    """Adam's saved state carries the last run's rate; a resumed run uses its own, as its
    command and card say, so that a later leg can anneal it."""
    run_generator(train(settings(tmp_path, steps=2)))
    before, _ = load_checkpoint(tmp_path / "vm.pt")
    run_generator(train(settings(tmp_path, steps=3, resume=True, learning_rate=1e-12)))
    after, card = load_checkpoint(tmp_path / "vm.pt")
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-9, msg=name)  # at 1e-3 it moves ~1e-3
    assert card["training"]["learning_rate"] == 1e-12
    assert [leg["learning_rate"] for leg in card["training"]["legs"]] == [1e-3, 1e-12]


def test_checkpoint_card_records_how_it_was_made(tmp_path, one_thread):
    run_generator(train(settings(tmp_path, steps=2)))
    card = read_card(tmp_path / "vm.pt")
    assert card["architecture"] == "voxelmorph" and card["working_shape"] == [32, 32, 32]
    training = card["training"]
    assert training["steps"] == 2 and training["command"] == "deepwarp train (test)"
    assert "CPU" in training["hardware"] and training["duration_s"] > 0
    assert "synthetic" in training["data"]
    assert 0 <= card["metrics"]["validation_mean_dice"] <= 1
    model, _ = load_checkpoint(tmp_path / "vm.pt")
    assert model.name == "voxelmorph"
    assert state_path(tmp_path / "vm.pt").exists()
    with pytest.raises(InputError, match="already trained for 2 steps"):
        run_generator(train(settings(tmp_path, steps=2, resume=True)))


def test_training_lowers_the_loss(tmp_path, one_thread):
    events, _ = run_generator(
        train(settings(tmp_path, steps=40, checkpoint_every=40, validate_every=40))
    )
    log = [
        json.loads(ln)
        for ln in (tmp_path / "vm.log.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    losses = [r["loss"] for r in log if "loss" in r]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.01
    assert events[-1].stage == "train" and events[-1].loss is not None


def _losses(path):
    log = path.with_suffix(".log.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["loss"] for r in map(json.loads, log) if "loss" in r]


def test_bfloat16_training_learns_like_float32_and_is_recorded(tmp_path, one_thread):
    """Forward passes in bfloat16: the weights stay float32, the first loss matches float32's
    closely (but not exactly), and the loss falls as it does in float32. On a 16^3 grid: a CPU
    without native bfloat16 (AVX2 only) emulates it, 20 to 300 times slower than float32 per
    convolution, and at 32^3 this test ran past its 10-minute timeout on one."""
    runs = {}
    for name in ("float32", "bfloat16"):
        s = settings(
            tmp_path, f"{name}.pt", steps=40, shape=(16, 16, 16), checkpoint_every=40,
            validate_every=40,
        )  # fmt: skip
        s.precision = name
        _, runs[name] = run_generator(train(s))
        runs[name].losses = _losses(tmp_path / f"{name}.pt")
    low, full = runs["bfloat16"].losses, runs["float32"].losses
    assert low[0] != full[0] and abs(low[0] - full[0]) < 0.01 * abs(full[0])
    assert np.mean(low[-10:]) < np.mean(low[:10]) - 0.005
    assert np.mean(full[-10:]) < np.mean(full[:10]) - 0.005
    assert all(p.dtype == torch.float32 for p in runs["bfloat16"].model.parameters())
    assert read_card(tmp_path / "bfloat16.pt")["training"]["precision"] == "bfloat16"
    assert read_card(tmp_path / "float32.pt")["training"]["precision"] == "float32"


def test_float16_training_goes_through_a_gradient_scaler(tmp_path, one_thread, monkeypatch):
    """float16 (emulated, so slow, on a CPU: a small grid and few steps) scales the loss."""
    scaled = []
    original = torch.amp.GradScaler.scale
    monkeypatch.setattr(
        torch.amp.GradScaler,
        "scale",
        lambda self, x: scaled.append(self.is_enabled()) or original(self, x),
    )
    s = settings(tmp_path, "half.pt", steps=3, shape=(16, 16, 16), checkpoint_every=3)
    s.precision = "float16"
    _, result = run_generator(train(s))
    assert scaled == [True] * 3
    assert all(np.isfinite(_losses(tmp_path / "half.pt")))
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert read_card(tmp_path / "half.pt")["training"]["precision"] == "float16"


def write_volume(path, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))


@pytest.fixture
def volume_folder(tmp_path):
    """Three labelled ellipsoid phantoms, shifted a little, named like Mindboggle's files."""
    folder = tmp_path / "volumes"
    folder.mkdir()
    z, y, x = np.meshgrid(*[np.arange(28)] * 3, indexing="ij")
    for i in range(3):
        c = 14 + i
        ball = ((z - c) / 8.0) ** 2 + ((y - 14) / 6.0) ** 2 + ((x - 13) / 9.0) ** 2 < 1
        core = ((z - c) / 4.0) ** 2 + ((y - 14) / 3.0) ** 2 + ((x - 13) / 4.0) ** 2 < 1
        labels = ball.astype(np.uint8) + core
        image = (labels * 40.0 + 10.0).astype(np.float32)
        write_volume(folder / f"sub{i}_t1.nii.gz", image, origin=(i * 0.5, 0.0, 0.0))
        write_volume(folder / f"sub{i}_labels.nii.gz", labels, origin=(i * 0.5, 0.0, 0.0))
    return folder


def test_folder_dataset_pairs_images_with_labels_and_caches(volume_folder, tmp_path, monkeypatch):
    entries = datasets.scan_folder(volume_folder)
    assert [(e.image.name, e.labels.name) for e in entries] == [
        (f"sub{i}_t1.nii.gz", f"sub{i}_labels.nii.gz") for i in range(3)
    ]
    source = datasets.VolumeSource(volume_folder, (16, 16, 16), tmp_path / "cache")
    batch = source.batch(step=1, rank=0, size=2, device="cpu")
    assert (
        batch["fixed"].shape == (2, 1, 16, 16, 16) and batch["moving_labels"].dtype == torch.int64
    )
    assert 0.0 <= float(batch["fixed"].min()) and float(batch["fixed"].max()) <= 1.0
    cached = sorted((tmp_path / "cache").glob("*.npz"))
    assert cached
    calls = []
    monkeypatch.setattr(datasets, "run_affine", lambda *a, **k: calls.append(1))
    again = source.batch(step=1, rank=0, size=2, device="cpu")
    assert not calls and torch.equal(again["fixed"], batch["fixed"])  # from the cache
    # each process (rank) draws its own pairs
    draws = {r: [source.pair_indices(step, r, 2) for step in range(1, 6)] for r in (0, 1)}
    assert draws[0] != draws[1]


def test_folder_pairs_on_world_axes_do_not_depend_on_how_a_volume_is_stored(
    volume_folder, tmp_path
):
    """``axes="world"`` (a network that works upright): a fixed volume stored in another axis
    order gives the same training pair; image axes give its array re-oriented; cached apart."""
    import SimpleITK as sitk

    stored = tmp_path / "stored"
    stored.mkdir()
    for name in ("sub0_t1.nii.gz", "sub0_labels.nii.gz", "sub1_t1.nii.gz", "sub1_labels.nii.gz"):
        image = sitk.ReadImage(str(volume_folder / name))
        if name.startswith("sub0"):  # the fixed volume of pair (0, 1), in another axis order
            image = sitk.DICOMOrient(image, "SAR")
        sitk.WriteImage(image, str(stored / name))
    shape = (16, 16, 16)

    def pair(folder, axes):
        return datasets.VolumeSource(folder, shape, tmp_path / "cache", affine=False, axes=axes)

    world = [pair(f, "world").prepared(0, 1) for f in (volume_folder, stored)]
    for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
        np.testing.assert_allclose(world[0][key], world[1][key], atol=1e-5)
    image = [pair(f, "image").prepared(0, 1) for f in (volume_folder, stored)]
    assert not np.allclose(image[0]["fixed"], image[1]["fixed"], atol=1e-3)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4


def test_training_on_a_csv_of_pairs_with_validation(volume_folder, tmp_path, one_thread):
    csv_path = tmp_path / "pairs.csv"
    rows = ["fixed,moving,fixed_labels,moving_labels"]
    rows += [
        f"volumes/sub{i}_t1.nii.gz,volumes/sub{j}_t1.nii.gz,volumes/sub{i}_labels.nii.gz,"
        f"volumes/sub{j}_labels.nii.gz"
        for i, j in ((0, 1), (1, 2))
    ]
    csv_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    s = settings(tmp_path, data=str(csv_path), validation=str(csv_path), steps=2)
    _, result = run_generator(train(s))
    card = read_card(tmp_path / "vm.pt")
    assert "pairs.csv" in card["training"]["data"] and "pairs.csv" in card["metrics"]["validation"]
    assert result.val_dice_before > 0.5  # same anatomy, affinely aligned


def _optimise(model, objective, batch, steps: int, lr: float):
    """Adam on one batch: yields each step's output and loss terms (after the update)."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        output = model(batch["moving"], batch["fixed"])
        loss, terms = objective(output, batch)
        loss.backward()
        optimiser.step()
        yield output, terms


def test_field_supervision_pulls_the_prediction_to_the_true_field(tmp_path, one_thread):
    run = settings(tmp_path, field_weight=2.0, labels_weight=1.0)
    model = create_model("voxelmorph")
    batch = datasets.SynthSource(SynthSettings(shape=(32, 32, 32)), seed=1, field=True).batch(
        1, 0, 1, "cpu"
    )
    errors = []
    for output, terms in _optimise(model, _objective(model, run), batch, 25, lr=1e-3):
        epe = (output.displacement - batch["field"]).square().sum(1).mean()
        assert float(terms["field"]) == pytest.approx(float(epe), rel=1e-5)
        errors.append(float(terms["field"]))
    assert errors[-1] < 0.5 * errors[0]


def test_field_supervision_is_logged_and_carded(tmp_path, one_thread):
    run_generator(train(settings(tmp_path, steps=2, field_weight=1.0)))
    log = (tmp_path / "vm.log.jsonl").read_text(encoding="utf-8").splitlines()
    assert all("field" in json.loads(ln) for ln in log if "loss" in json.loads(ln))
    loss = read_card(tmp_path / "vm.pt")["loss"]
    assert loss["field"]["weight"] == 1.0 and "similarity" in loss
    with pytest.raises(InputError, match="--field-weight needs --data synth"):
        run_generator(train(settings(tmp_path, "b.pt", data=str(tmp_path), field_weight=1.0)))


def test_bad_data_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="training needs two"):
        datasets.VolumeSource(tmp_path / "empty", (16, 16, 16), tmp_path / "c")
    bad = tmp_path / "bad.csv"
    bad.write_text("path\nx.nii.gz\n", encoding="utf-8")
    with pytest.raises(InputError, match="unknown columns"):
        datasets.VolumeSource(bad, (16, 16, 16), tmp_path / "c")


def test_two_processes_under_torchrun(tmp_path):
    """DistributedDataParallel with gloo: two CPU processes, rank 0 writes one checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "napari_deepwarp.cli",
        "train",
        "--steps",
        "2",
        "--shape",
        "32",
        "32",
        "32",
        "-o",
        str(out),
        "--checkpoint-every",
        "2",
        "--validate-every",
        "2",
        "-q",
        "--device",
        "cpu",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    card = read_card(out)
    assert "x 2 processes" in card["training"]["hardware"]
    assert card["training"]["batch_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.log.jsonl", "ddp.pt", "ddp.state.pt"]


def test_a_step_with_a_non_finite_loss_is_skipped(tmp_path, one_thread):
    """A diverging batch must not poison the weights: the step is skipped and logged."""
    s = settings(tmp_path, steps=2, config={"reg_weight": float("nan")})
    _, result = run_generator(train(s))
    torch.manual_seed(s.seed)
    from napari_deepwarp.core.models.registry import create_model

    untouched = create_model("voxelmorph", reg_weight=float("nan"))
    for (name, a), b in zip(result.model.state_dict().items(), untouched.state_dict().values()):
        assert torch.equal(a, b), name
    log = [json.loads(ln) for ln in (tmp_path / "vm.log.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in log if "loss" in r] == [1, 2]


def test_init_from_another_architecture_with_the_same_layers(tmp_path, one_thread):
    """voxelmorph -> mi_unet: the weights are carried over, the new model keeps its own loss."""
    run_generator(train(settings(tmp_path, "vm.pt", steps=1)))
    vm, _ = load_checkpoint(tmp_path / "vm.pt")
    _, result = run_generator(
        train(
            settings(
                tmp_path,
                "mi.pt",
                model="mi_unet",
                init=tmp_path / "vm.pt",
                steps=1,
                learning_rate=0.0,
                contrast="independent",
            )
        )
    )
    card = read_card(tmp_path / "mi.pt")
    assert card["architecture"] == "mi_unet" and card["parent"]["name"] == "vm.pt"
    assert card["parent"]["architecture"] == "voxelmorph"
    assert card["loss"]["similarity"]["name"] == "mi"
    for name, weight in vm.state_dict().items():
        assert torch.equal(result.model.state_dict()[name], weight), name


def test_init_from_an_architecture_with_other_layers_names_both(tmp_path, one_thread):
    run_generator(train(settings(tmp_path, "vm.pt", steps=1)))
    wrong = settings(tmp_path, "fcn.pt", model="fcn_ms", init=tmp_path / "vm.pt")
    with pytest.raises(InputError, match="'voxelmorph' network whose weights do not fit"):
        run_generator(train(wrong))


def test_config_overrides_apply_on_top_of_the_init_checkpoint(tmp_path, one_thread):
    """--init x.pt --config reg_weight=3: the checkpoint's network and weights, the new weight
    of the loss (it was silently dropped); a change of layers is refused by name."""
    run_generator(train(settings(tmp_path, "vm.pt", steps=1)))
    vm, _ = load_checkpoint(tmp_path / "vm.pt")
    tuned = settings(
        tmp_path, "tuned.pt", init=tmp_path / "vm.pt", config={"reg_weight": 3.0}, steps=1
    )
    _, result = run_generator(train(tuned))
    assert result.model.config.reg_weight == 3.0
    assert read_card(tmp_path / "tuned.pt")["config"]["reg_weight"] == 3.0
    assert result.model.config.enc_channels == vm.config.enc_channels  # the rest: the checkpoint's
    wider = settings(
        tmp_path,
        "wide.pt",
        init=tmp_path / "vm.pt",
        config={"enc_channels": [8, 16, 16, 16]},
        steps=1,
    )
    with pytest.raises(InputError, match="changes the layers of the network in --init"):
        run_generator(train(wider))


def test_an_override_may_drop_a_part_of_the_init_network_or_add_an_identity_one(
    tmp_path, one_thread
):
    """--init lindef.pt --config use_affine=false: the paper's "w/o Affine" variant starts from
    the full network's encoder and decoder; the reverse adds the affine head, which starts as
    the exact identity, so the network starts by predicting what its parent predicts."""
    small = {"enc_channels": [4, 4], "enc_dilations": [1, 2], "dec_channels": [4]}
    full = settings(tmp_path, "full.pt", model="lindef", config=small, shape=(16, 16, 16), steps=1)
    run_generator(train(full))
    parent, _ = load_checkpoint(tmp_path / "full.pt")

    def started_from(parent_name, name, **config):
        init = tmp_path / parent_name
        return settings(tmp_path, name, model=None, init=init, config=config, shape=(16, 16, 16))

    dropped = started_from("full.pt", "noaffine.pt", use_affine=False)
    dropped.steps, dropped.learning_rate = 1, 0.0
    _, result = run_generator(train(dropped))
    assert result.model.affine is None
    kept = result.model.state_dict()
    assert kept and all(torch.equal(kept[k], parent.state_dict()[k]) for k in kept)
    assert read_card(tmp_path / "noaffine.pt")["config"]["use_affine"] is False
    added = started_from("noaffine.pt", "again.pt", use_affine=True)
    added.steps, added.learning_rate = 1, 0.0
    _, again = run_generator(train(added))
    assert again.model.affine is not None
    noaffine, _ = load_checkpoint(tmp_path / "noaffine.pt")
    pair = [torch.rand(1, 1, 16, 16, 16) for _ in range(2)]
    with torch.no_grad():
        before = noaffine.eval()(*pair).displacement
        after = again.model.eval()(*pair).displacement
    assert torch.allclose(before, after, atol=1e-5)
    # A head that would change the prediction is refused.
    from napari_deepwarp.core import train as train_module

    target = train_module._create("lindef", {**small, "use_affine": True})
    with torch.no_grad():
        target.affine.bias.add_(0.1)
    real = train_module._create
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(train_module, "_create", lambda name, config: target)
    try:
        with pytest.raises(InputError, match="new layers without weights.*affine"):
            run_generator(train(started_from("noaffine.pt", "bad.pt", use_affine=True)))
    finally:
        monkeypatch.undo()
    assert train_module._create is real


def test_synth_anatomy_trains_and_a_wrong_type_is_named(tmp_path, one_thread):
    """``--synth anatomy=PATH`` draws pairs from a label-map file and the card records it;
    a number where a path belongs is named with an example."""
    import SimpleITK as sitk

    labels = np.zeros((20, 20, 20), np.uint8)
    labels[4:16, 5:15, 6:14] = 1
    labels[8:12, 8:12, 8:12] = 2
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / "tissues.nii.gz"))
    anatomy = str(tmp_path / "tissues.nii.gz")
    run_generator(train(settings(tmp_path, steps=2, synth={"anatomy": anatomy})))
    training = read_card(tmp_path / "vm.pt")["training"]
    assert training["synthetic_pairs"]["anatomy"] == anatomy
    assert "drawn from the label map tissues.nii.gz" in training["data"]
    with pytest.raises(InputError, match="anatomy takes a file path"):
        run_generator(train(settings(tmp_path, name="x.pt", steps=2, synth={"anatomy": 3})))


def test_a_network_on_world_axes_trains_on_upright_pairs_only(tmp_path, one_thread):
    """Anatomy pairs must be framed as the network's working grid will be: upright pairs
    (``world_axes``) for a network on the world's axes, and only for it; each mismatch is
    refused with the fix. Blob pairs have no upright, so they train either network."""
    import SimpleITK as sitk

    labels = np.zeros((20, 20, 20), np.uint8)
    labels[4:16, 5:15, 6:14] = 1
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / "tissues.nii.gz"))
    anatomy = str(tmp_path / "tissues.nii.gz")
    world = {"config": {"working_axes": "world", "enc_channels": [4] * 5, "dec_channels": [4]}}
    upright = {"anatomy": anatomy, "world_axes": True}
    run_generator(
        train(settings(tmp_path, "w.pt", model="lindef", steps=1, synth=upright, **world))
    )
    assert read_card(tmp_path / "w.pt")["config"]["working_axes"] == "world"
    with pytest.raises(InputError, match="train it on upright pairs with --synth world_axes=true"):
        run_generator(
            train(
                settings(
                    tmp_path, "x.pt", model="lindef", steps=1, synth={"anatomy": anatomy}, **world
                )
            )
        )
    with pytest.raises(InputError, match='working_axes="world"\' too, or drop world_axes'):
        run_generator(train(settings(tmp_path, "y.pt", steps=1, synth=upright)))
    run_generator(train(settings(tmp_path, "z.pt", model="lindef", steps=1, **world)))


def test_affine_supervision_teaches_lindefs_linear_branch(tmp_path, one_thread):
    """``affine_weight``: the term is the squared distance between the model's affine field and
    the true field's closest affine, it pulls the linear branch towards that affine, it is
    carded, and a model without a linear part is refused with the fix."""
    run = settings(tmp_path, model="lindef", affine_weight=1.0)
    torch.manual_seed(0)
    model = create_model("lindef", enc_channels=[8, 8, 8, 8, 8], dec_channels=[8, 8, 8])
    synth = SynthSettings(shape=(16, 16, 16), rotation=0, scaling=0, shear=0, translation=3)
    batch = datasets.SynthSource(synth, seed=2, field=True).batch(1, 0, 1, "cpu")
    target = spatial.affine_to_field(spatial.fit_affine(batch["field"]), (16, 16, 16))
    errors = []
    for output, terms in _optimise(model, _objective(model, run), batch, 30, lr=3e-3):
        mine = spatial.affine_to_field(output.affine, (16, 16, 16))
        assert float(terms["affine"]) == pytest.approx(
            float((mine - target).square().sum(1).mean()), rel=1e-4
        )
        errors.append(float(terms["affine"]))
    assert errors[0] > 1 and errors[-1] < 0.2 * errors[0]
    run_generator(train(settings(tmp_path, "l.pt", model="lindef", steps=1, affine_weight=1.0)))
    assert read_card(tmp_path / "l.pt")["loss"]["affine"]["weight"] == 1.0
    with pytest.raises(InputError, match="needs a model with a linear part"):
        run_generator(train(settings(tmp_path, steps=1, affine_weight=1.0)))


def test_synth_settings_that_would_do_nothing_are_refused(tmp_path, one_thread):
    """``dark`` without a background, ``anatomy_zoom`` without an anatomy or with a fixed side
    framed as ``register`` frames it, ``fov`` with a slab of no or more than half an axis: each
    refused with the fix, before any step is trained."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.ones((8, 8, 8), np.uint8)), str(tmp_path / "t.nii"))
    anatomy = str(tmp_path / "t.nii")
    for synth, message in [
        ({"dark": 0.25}, "give --synth background=0.9"),
        ({"anatomy_zoom": 3}, "anatomy_zoom magnifies --synth anatomy=FILE"),
        ({"anatomy": anatomy, "anatomy_zoom": 3, "fixed_affine": False}, "drop one of the two"),
        ({"fov": 0.5, "fov_depth": 0.0}, "between 0 and 0.5"),
        ({"fov": 0.5, "fov_depth": 0.8}, "between 0 and 0.5"),
    ]:
        with pytest.raises(InputError, match=message):
            run_generator(train(settings(tmp_path, "x.pt", steps=1, synth=synth)))
    assert not (tmp_path / "x.pt").exists()
