"""The `deepwarp` command line: outputs, the bad-input contract, warp and models."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from napari_deepwarp.cli import main


def phantom(path, size, spacing, origin, angle, seed, labels_path=None):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in size[::-1]], indexing="ij")
    img = np.zeros(size[::-1], np.float32)
    lab = np.zeros(size[::-1], np.uint8)
    for k in range(1, 5):
        c, r = rng.uniform(-0.4, 0.4, 3), rng.uniform(0.25, 0.4, 3)
        m = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 < 1
        img[m] += rng.uniform(0.3, 1.0)
        lab[m] = k
    img += 0.02 * rng.standard_normal(img.shape).astype(np.float32)
    direction = sitk.VersorTransform((0, 0, 1), np.deg2rad(angle)).GetMatrix()
    for array, p in ((img, path), (lab, labels_path)):
        if p is None:
            continue
        im = sitk.GetImageFromArray(array)
        im.SetSpacing(spacing)
        im.SetOrigin(origin)
        im.SetDirection(direction)
        sitk.WriteImage(im, str(p))
    return path


@pytest.fixture
def pair(tmp_path):
    f = phantom(
        tmp_path / "fixed.nii.gz",
        (36, 32, 24),
        (1.2, 1.0, 1.5),
        (0.0, 0.0, 0.0),
        10,
        1,
        tmp_path / "fixed_labels.nii.gz",
    )
    m = phantom(
        tmp_path / "moving.mha",
        (34, 34, 22),
        (1.1, 1.1, 1.6),
        (1.0, -1.0, 0.5),
        -5,
        2,
        tmp_path / "moving_labels.nrrd",
    )
    return tmp_path, f, m


@pytest.fixture
def mono_pair(tmp_path):
    """One anatomy and contrast on two grids: a one-modality pair for ``--model auto``."""
    f = phantom(tmp_path / "fixed.nii.gz", (36, 32, 24), (1.2, 1.0, 1.5), (0, 0, 0), 10, 1)
    m = phantom(tmp_path / "moving.mha", (34, 34, 22), (1.1, 1.1, 1.6), (1, -1, 0.5), -5, 1)
    return tmp_path, f, m


def test_register_writes_every_output_on_the_fixed_grid(pair, capsys):
    d, f, m = pair
    out = d / "out"
    code = main(
        [
            "register",
            str(f),
            str(m),
            "-o",
            str(out),
            "--fixed-labels",
            str(d / "fixed_labels.nii.gz"),
            "--moving-labels",
            str(d / "moving_labels.nrrd"),
            "--finetune",
            "1",  # one step: a CPU without native bfloat16 emulates it, 20-300x slower
            "--device",
            "cpu",
            "--precision",
            "bfloat16",
            "--max-size",
            "32",
            "-q",
        ]
    )
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "displacement.nii.gz",
        "metrics.json",
        "transform.h5",
        "warped.nii.gz",
        "warped_labels.nii.gz",
    ]
    fixed = sitk.ReadImage(str(f))
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "displacement.nii.gz"):
        img = sitk.ReadImage(str(out / name))
        assert img.GetSize() == fixed.GetSize()
        assert np.allclose(img.GetOrigin(), fixed.GetOrigin(), atol=1e-4)
        assert np.allclose(img.GetDirection(), fixed.GetDirection(), atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["device"] == "cpu" and "mean_dice_after" in metrics
    assert metrics["precision"] == "bfloat16"
    assert "labels_after" in metrics and metrics["seconds"]["total"] > 0

    # `deepwarp warp` with either saved transform reproduces the propagated labels exactly
    for transform in ("transform.h5", "displacement.nii.gz"):
        target = d / f"again_{transform.split('.')[0]}.nii.gz"
        assert (
            main(
                [
                    "warp",
                    str(d / "moving_labels.nrrd"),
                    "-t",
                    str(out / transform),
                    "-r",
                    str(f),
                    "-o",
                    str(target),
                    "--labels",
                ]
            )
            == 0
        )
        again = sitk.GetArrayFromImage(sitk.ReadImage(str(target)))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_labels.nii.gz")))
        assert (again != ref).mean() < 1e-3


def test_the_summary_line_names_the_device_and_the_networks_precision(pair, capsys):
    d, f, m = pair
    args = ["register", str(f), str(m), "-o", str(d / "out"), "--device", "cpu"]
    assert main([*args, "--max-size", "32", "--checkpoint", "none", "--precision", "float32"]) == 0
    assert "s on cpu (float32)" in capsys.readouterr().out
    assert main([*args, "--model", "affine"]) == 0
    assert "s on cpu\n" in capsys.readouterr().out  # no network, no precision


def test_affine_only_is_a_method(pair):
    d, f, m = pair
    assert main(["register", str(f), str(m), "-o", str(d / "aff"), "--model", "affine", "-q"]) == 0
    metrics = json.loads((d / "aff" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["model"] == "affine" and metrics["working_grid"] is None


def write(path, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    if array.ndim == 4:  # a time series of 3D volumes, not a vector image
        img = sitk.JoinSeries([sitk.GetImageFromArray(a) for a in array])
    else:
        img = sitk.GetImageFromArray(array)
    if img.GetDimension() == 3:
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return str(path)


BAD_CASES = {
    "2D": (lambda d: write(d / "bad.nii.gz", np.ones((8, 9), np.float32)), "2D"),
    "4D": (lambda d: write(d / "bad.nii.gz", np.random.rand(2, 8, 9, 10).astype(np.float32)), "4D"),
    "missing": (lambda d: str(d / "nothing.nii.gz"), "no such file"),
    "nan": (
        lambda d: write(
            d / "bad.mha", np.where(np.random.rand(8, 9, 10) > 0.5, np.nan, 1.0).astype(np.float32)
        ),
        "NaN",
    ),
    "constant": (
        lambda d: write(d / "bad.nii.gz", np.full((8, 9, 10), 3.0, np.float32)),
        "constant",
    ),
    "far away": (
        lambda d: write(
            d / "bad.nii.gz", np.random.rand(8, 9, 10).astype(np.float32), origin=(9000.0, 0.0, 0.0)
        ),
        "does not overlap",
    ),
    "tiny": (
        lambda d: write(
            d / "bad.nii.gz", np.random.rand(3, 3, 3).astype(np.float32), origin=(5.0, 5.0, 5.0)
        ),
        "affine stage failed",
    ),
    "unreadable": (
        lambda d: (d / "bad.nii.gz").write_bytes(b"garbage") and str(d / "bad.nii.gz"),
        "cannot read",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_moving_image_exits_2_with_one_line_and_writes_nothing(pair, capsys, case):
    d, f, _ = pair
    make, expected = BAD_CASES[case]
    bad = make(d)
    out = d / "out"
    code = main(["register", str(f), bad, "-o", str(out), "--model", "affine", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("deepwarp: error:") and expected in err and "\n" not in err
    assert not out.exists() or list(out.iterdir()) == []


def test_mismatched_labels_and_unknown_model_are_refused(pair, capsys):
    d, f, m = pair
    small = write(d / "small_labels.nii.gz", np.zeros((5, 5, 5), np.uint8))
    assert main(["register", str(f), str(m), "-o", str(d / "o"), "--fixed-labels", small]) == 2
    assert "does not match its image" in capsys.readouterr().err
    assert main(["register", str(f), str(m), "-o", str(d / "o"), "--model", "nonesuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nonesuch'" in err and "voxelmorph" in err
    assert not (d / "o").exists() or list((d / "o").iterdir()) == []


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "voxelmorph" in out and "affine" in out


def test_a_card_trained_with_another_loss_says_so():
    from napari_deepwarp.cli import _card_summary

    card = {"architecture": "conv2warp", "config": {"widths": [4] * 7}, "training": {}}
    own = {**card, "loss": {"similarity": {"name": "ncc_ssd"}}}
    other = {**card, "loss": {"similarity": {"name": "lncc"}}}
    assert "not its paper's" not in _card_summary(Path("own.pt"), own)
    assert "config widths=[4, 4, 4, 4, 4, 4, 4]" in _card_summary(Path("own.pt"), own)
    assert "trained with lncc + diffusion, not its paper's ncc_ssd" in _card_summary(
        Path("other.pt"), other
    )


def test_console_script_and_core_without_qt():
    """`python -m napari_deepwarp.cli` runs; importing the core loads neither Qt nor napari."""
    code = (
        "import sys, napari_deepwarp.core.pipeline, napari_deepwarp.core.models; "
        "bad = [m for m in ('qtpy', 'napari', 'PyQt5', 'PySide6', 'magicgui') if m in sys.modules]; "
        "print(*bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "napari_deepwarp.cli", "register", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert help_text.returncode == 0 and "--finetune" in help_text.stdout


@pytest.mark.parametrize(
    "model", ["cfwn", "conv2warp", "fcn_ms", "lindef", "mi_unet", "voxelmorph"]
)
def test_every_model_registers_from_the_command_line(pair, model, one_thread):
    """Each architecture runs the whole pipeline (with a two-step fine-tune) and writes outputs."""
    d, f, m = pair
    out = d / model
    code = main(
        [
            "register",
            str(f),
            str(m),
            "-o",
            str(out),
            "--model",
            model,
            "--no-affine",
            "--finetune",
            "2",
            "--max-size",
            "16",
            "--device",
            "cpu",
            "-q",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["model"] == model and metrics["finetune_steps"] == 2
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz")))
    assert np.isfinite(field).all()


def test_register_with_field_refinement(pair):
    d, f, m = pair
    out = d / "refined"
    code = main(
        [
            "register",
            str(f),
            str(m),
            "-o",
            str(out),
            "--refine",
            "6",
            "--max-size",
            "32",
            "--fixed-labels",
            str(d / "fixed_labels.nii.gz"),
            "--moving-labels",
            str(d / "moving_labels.nrrd"),
            "--device",
            "cpu",
            "-q",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["refine_steps"] == 6 and metrics["seconds"]["refine"] > 0


def test_supervision_options(pair, capsys):
    """--labels-weight and --landmarks reach the run; misuse is refused with the fix."""
    d, f, m = pair
    base = ["register", str(f), str(m), "--max-size", "24", "--device", "cpu", "-q"]
    labels = ["--fixed-labels", str(d / "fixed_labels.nii.gz")]
    labels += ["--moving-labels", str(d / "moving_labels.nrrd")]
    assert main([*base, "-o", str(d / "a"), "--labels-weight", "1", "--refine", "4"]) == 2
    assert "--fixed-labels and --moving-labels" in capsys.readouterr().err
    assert main([*base, "-o", str(d / "b"), *labels, "--labels-weight", "1"]) == 2
    assert "--refine STEPS" in capsys.readouterr().err
    points = d / "points.csv"
    points.write_text("x,y,z\n10,12,14\n20,15,16\n", encoding="utf-8")
    run = [*base, "-o", str(d / "c"), *labels, "--labels-weight", "1", "--refine", "4"]
    assert main([*run, "--landmarks", str(points), str(points)]) == 0
    metrics = json.loads((d / "c" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["tre_before_mm"] == 0.0 and metrics["tre_after_mm"] >= 0.0
    assert metrics["refine_steps"] == 4


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A checkpoints folder with one voxelmorph checkpoint marked default."""
    from napari_deepwarp import resources
    from napari_deepwarp.core.checkpoint import make_card, save_checkpoint
    from napari_deepwarp.core.models.registry import create_model

    folder = tmp_path / "shipped"
    model = create_model("voxelmorph")
    card = make_card(
        model,
        working_shape=[32, 32, 32],
        training={"data": "synthetic pairs", "steps": 7, "duration_s": 60.0, "hardware": "CPU"},
        metrics={"validation_mean_dice": 0.5},
        default=True,
    )
    save_checkpoint(folder / "vm_test.pt", model, card)
    monkeypatch.setattr(resources, "checkpoints_dir", lambda: folder)
    return folder / "vm_test.pt"


def test_defaults_use_the_shipped_checkpoint_and_models_lists_it(mono_pair, shipped, capsys):
    from napari_deepwarp.core.checkpoint import read_card

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "vm_test.pt (default); synthetic pairs; 7 steps; shape 32x32x32" in out
    assert "validation Dice 0.500" in out and "no shipped checkpoint" in out  # other models
    d, f, m = mono_pair
    assert main(["register", str(f), str(m), "-o", str(d / "o"), "--device", "cpu", "-q"]) == 0
    metrics = json.loads((d / "o" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["model"] == "voxelmorph"
    assert max(metrics["working_grid"]["shape_zyx"]) == 32  # the checkpoint's training size
    tuned = d / "tuned.pt"
    args = ["register", str(f), str(m), "-o", str(d / "t"), "--finetune", "2", "-q"]
    assert main([*args, "--device", "cpu", "--save-finetuned", str(tuned)]) == 0
    card = read_card(tuned)
    assert card["parent"]["name"] == "vm_test.pt" and card["training"]["steps"] == 2
    assert card["tuned_on"].endswith("moving.mha")
    assert main([*args, "--save-finetuned", str(tuned), "--finetune", "0"]) == 2
    assert "--save-finetuned needs --finetune" in capsys.readouterr().err
    none = ["register", str(f), str(m), "-o", str(d / "n"), "--checkpoint", "none", "-q"]
    assert main([*none, "--device", "cpu"]) == 0
    assert (
        max(
            json.loads((d / "n" / "metrics.json").read_text(encoding="utf-8"))["working_grid"][
                "shape_zyx"
            ]
        )
        > 32
    )


def test_a_cards_inference_size_sets_the_default_working_grid(mono_pair, shipped, capsys):
    from napari_deepwarp.core.checkpoint import load_checkpoint, save_checkpoint

    model, card = load_checkpoint(shipped)
    save_checkpoint(shipped, model, {**card, "inference_size": 48})
    assert main(["models"]) == 0
    assert "shape 32x32x32; runs at 48 voxels" in capsys.readouterr().out
    d, f, m = mono_pair
    assert main(["register", str(f), str(m), "-o", str(d / "o"), "--device", "cpu", "-q"]) == 0
    metrics = json.loads((d / "o" / "metrics.json").read_text(encoding="utf-8"))
    assert max(metrics["working_grid"]["shape_zyx"]) == 48


def test_a_checkpoint_below_the_affine_stage_is_flagged(mono_pair, shipped, capsys):
    from napari_deepwarp.core.checkpoint import load_checkpoint, save_checkpoint

    model, card = load_checkpoint(shipped)
    below = {"mindboggle_mean_dice": 0.40, "mindboggle_mean_dice_affine_stage": 0.419}
    save_checkpoint(shipped, model, {**card, "metrics": below})
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "Mindboggle Dice 0.400 (affine stage alone 0.419)" in out
    assert "not clearly above the affine stage: use with --refine" in out
    d, f, m = mono_pair
    run = ["register", str(f), str(m), "--device", "cpu", "-q"]
    assert main([*run, "-o", str(d / "o")]) == 0
    assert (
        "not clearly above the affine stage alone (0.419; it must beat it by more than 0.01); refine"
        in capsys.readouterr().err
    )
    assert main([*run, "-o", str(d / "r"), "--refine", "2"]) == 0
    assert "not clearly above" not in capsys.readouterr().err  # refining: nothing to warn about
    above = {"mindboggle_mean_dice": 0.45, "mindboggle_mean_dice_affine_stage": 0.419}
    save_checkpoint(shipped, model, {**card, "metrics": above})
    assert main([*run, "-o", str(d / "a")]) == 0
    assert "not clearly above" not in capsys.readouterr().err


def test_affine_from_labels_needs_both_label_maps(pair, capsys):
    d, f, m = pair
    code = main(
        ["register", str(f), str(m), "-o", str(d / "out"), "--model", "affine"]
        + ["--affine-from", "labels", "-q"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "label maps on both sides" in err and "\n" not in err


def test_outputs_writes_only_the_files_asked_for(pair, capsys):
    d, f, m = pair
    args = ["register", str(f), str(m), "--model", "affine", "-q"]
    assert main([*args, "-o", str(d / "some"), "--outputs", "warped,metrics"]) == 0
    assert sorted(p.name for p in (d / "some").iterdir()) == ["metrics.json", "warped.nii.gz"]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "-o", str(d / "bad"), "--outputs", "warped,nonsense"])
    assert exit_.value.code == 2 and "name one or more of warped" in capsys.readouterr().err
    assert not (d / "bad").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["register", "--help"],
        ["register", "missing_fixed.nii.gz", "missing_moving.nii.gz", "-o", "out"],
        ["register", "a.nii.gz", "b.nii.gz", "-o", "out", "--refine", "-3"],
    ],
    ids=["help", "register help", "missing file", "bad option"],
)
def test_help_and_bad_input_answer_without_importing_torch(argv, tmp_path):
    """Importing torch takes about a second: --help and a wrong path answer before it."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom napari_deepwarp.cli import main\ntry:\n    main(sys.argv[1:])\n"
        "except SystemExit:\n    pass\nprint('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *argv],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr


def test_a_field_that_is_not_finite_exits_4_and_writes_nothing(pair, capsys, one_thread):
    """A network whose field holds NaN (here: NaN weights in its last layer) is never handed
    back, whatever --if-worse says."""
    import torch

    from napari_deepwarp.core.checkpoint import make_card, save_checkpoint
    from napari_deepwarp.core.models.registry import create_model

    d, f, m = pair
    model = create_model("voxelmorph")
    with torch.no_grad():
        model.flow.conv.weight.fill_(float("nan"))
    checkpoint = save_checkpoint(d / "nan.pt", model, make_card(model))
    out = d / "out"
    argv = [
        "register", str(f), str(m), "-o", str(out), "--checkpoint", str(checkpoint),
        "--if-worse", "keep", "--max-size", "16", "--device", "cpu", "-q",
    ]  # fmt: skip
    assert main(argv) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not finite" in err[0] and "--precision float32" in err[0]
    assert not out.exists() or not any(out.iterdir())
