"""Bad input refused, nothing half-done: one table of hostile inputs to `deepwarp`, each refused
with exit code 2 and one line on stderr, no traceback, and nothing in the output folder.

Then what must be accepted rather than refused (multi-channel label maps, oblique and
left-handed directions) and what must clean up (Ctrl-C and SIGTERM mid-run).
"""

from __future__ import annotations

import errno
import gzip
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from napari_deepwarp.cli import main
from napari_deepwarp.core import io

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def blobs(shape=(20, 22, 24), seed=0) -> np.ndarray:
    """A smooth float32 image ``(z, y, x)`` of a few Gaussian blobs, in [0, ~1.5]."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    img = np.zeros(shape, np.float32)
    for _ in range(6):
        c, r = rng.uniform(-0.5, 0.5, 3), rng.uniform(0.15, 0.35)
        d2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2
        img += np.float32(rng.uniform(0.3, 1.0)) * np.exp(-d2 / (2 * r * r)).astype(np.float32)
    return img


def write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), compress=True, **kw) -> str:
    """Write ``array`` (z, y, x) or a 4D stack (t, z, y, x) with SimpleITK; returns the path."""
    if array.ndim == 4 and not kw.get("vector"):
        img = sitk.JoinSeries([sitk.GetImageFromArray(a) for a in array])
    else:
        img = sitk.GetImageFromArray(array, isVector=bool(kw.get("vector")))
    if img.GetDimension() >= 3:
        extra = (1.0,) * (img.GetDimension() - 3)  # a 4D stack: the 4th axis is not space
        img.SetSpacing((*spacing, *extra))
        img.SetOrigin((*kw.get("origin", (0.0, 0.0, 0.0)), *[0.0] * len(extra)))
    sitk.WriteImage(img, str(path), useCompression=compress)
    return str(path)


def cut(path: str, fraction: float = 0.6) -> str:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])
    return path


def flip_byte(path: str, at: float = 0.6) -> str:
    data = bytearray(Path(path).read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    return path


def huge_header(path: Path) -> str:
    """A gzipped NIfTI-1 header declaring 100000^3 float32 voxels, followed by 64 bytes."""
    small = path.with_name("small.nii")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 2, 2), np.float32)), str(small))
    header = bytearray(small.read_bytes()[:352])
    small.unlink()
    struct.pack_into("<8h", header, 40, 3, 32767, 32767, 32767, 1, 1, 1, 1)
    with gzip.open(path, "wb") as f:
        f.write(bytes(header) + bytes(64))
    return str(path)


def singular_direction(path: Path) -> str:
    """An NRRD whose direction matrix has two equal rows (determinant 0)."""
    write(path, blobs(), compress=False)
    header, sep, data = path.read_bytes().partition(b"\n\n")
    header = header.replace(b"(1,0,0) (0,1,0)", b"(1,0,0) (1,0,0)")
    path.write_bytes(header + sep + data)
    return str(path)


def code_checkpoint(path: Path) -> str:
    torch.save(torch.nn.Linear(2, 2), path)  # a whole module: pickled code
    return str(path)


def plain_pickle(path: Path) -> str:
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "obj": Path("x")}, f)
    return str(path)


# --- the table: (what to change in the base command, expected part of the message) ------------
# Each builder gets the folder and the base argv ``[register, FIXED, MOVING, -o, OUT, --model
# affine, -q]`` and returns the argv to run.
def moving(make):
    return lambda d, argv: [*argv[:2], make(d), *argv[3:]]


def options(*extra):
    return lambda d, argv: [*argv, *extra]


def network(*extra):
    """An untrained network without the affine stage: the quickest way to the working grid."""
    return lambda d, argv: [
        *argv[:5],
        "--model",
        "voxelmorph",
        "--checkpoint",
        "none",
        "--no-affine",
        "-q",
        *extra,
    ]


def output(make):
    return lambda d, argv: [*argv[:4], make(d), *argv[5:]]


def a_file(d: Path) -> str:
    (d / "taken").write_text("a file, not a folder")
    return str(d / "taken")


NUMERIC = {
    "--finetune": "-5",
    "--refine": "-1",
    "--working-spacing": "0",
    "--max-size": "-3",
    "--labels-weight": "-1",
    "--reg-weight": "-2",
    "--landmarks-weight": "-1",
    "--lr": "0",
}

CASES = {
    "truncated nii.gz": (moving(lambda d: cut(write(d / "m.nii.gz", blobs()))), "cut off"),
    "corrupt gzip byte": (moving(lambda d: flip_byte(write(d / "m.nii.gz", blobs()))), "corrupt"),
    "truncated nii": (moving(lambda d: cut(write(d / "m.nii", blobs()), 0.9)), "cut off"),
    "truncated mha": (moving(lambda d: cut(write(d / "m.mha", blobs()), 0.9)), "cut off"),
    "corrupt mha byte": (moving(lambda d: flip_byte(write(d / "m.mha", blobs()))), "corrupt"),
    "truncated nrrd": (moving(lambda d: cut(write(d / "m.nrrd", blobs()), 0.9)), "cut off"),
    "2D": (moving(lambda d: write(d / "m.nii.gz", blobs()[0])), "2D"),
    "4D": (moving(lambda d: write(d / "m.nii.gz", np.stack([blobs()] * 2))), "4D with 2"),
    "vector image": (
        moving(lambda d: write(d / "m.mha", np.stack([blobs()] * 3, -1), vector=True)),
        "3 components",
    ),
    "huge declared size": (moving(lambda d: huge_header(d / "m.nii.gz")), "memory available"),
    "NaN voxels": (
        moving(lambda d: write(d / "m.mha", np.where(blobs() > 0.5, np.nan, blobs()))),
        "NaN",
    ),
    "infinite voxels": (
        moving(lambda d: write(d / "m.nrrd", np.where(blobs() > 0.5, np.inf, blobs()))),
        "NaN/Inf",
    ),
    "constant": (moving(lambda d: write(d / "m.nii.gz", np.full((8, 9, 10), 3.0))), "constant"),
    "unknown refinement preset": (options("--refine", "slow"), "neither a preset"),
    "labels of another grid": (
        options("--moving-labels", "LABELS_SMALL"),
        "does not match its image",
    ),
    "singular direction": (moving(lambda d: singular_direction(d / "m.nrrd")), "determinant"),
    "missing file": (moving(lambda d: str(d / "nothing.nii.gz")), "no such file"),
    "empty folder": (
        moving(lambda d: (d / "dicom").mkdir() or str(d / "dicom")),
        "no DICOM series",
    ),
    "NaN landmark": (
        options("--landmarks", "LM_NAN", "LM_NAN", "--landmarks-weight", "0"),
        "NaN or infinite",
    ),
    "not an image": (
        moving(lambda d: (d / "m.nii.gz").write_bytes(b"hello") and str(d / "m.nii.gz")),
        "cannot read",
    ),
    "checkpoint holding code": (network("--checkpoint", "CODE_PT"), "holds Python objects"),
    "plain pickle checkpoint": (network("--checkpoint", "PICKLE_PT"), "plain Python pickle"),
    "missing checkpoint": (network("--checkpoint", "NO_PT"), "no such checkpoint"),
    **{
        f"{flag} {value}": (options(flag, value), f"argument {flag}:")
        for flag, value in NUMERIC.items()
    },
    "--lr nan": (options("--lr", "nan"), "argument --lr:"),
    "working grid too small": (network("--max-size", "4"), "below the smallest"),
    "working spacing too coarse": (network("--working-spacing", "500"), "below the smallest"),
    "output is a file": (output(a_file), "is an existing file"),
    "output under a file": (output(lambda d: str(Path(a_file(d)) / "out")), "cannot create"),
    "output in /proc": (output(lambda d: "/proc/deepwarp-no/out"), "cannot create"),
    "disk full": (options("DISK_FULL"), "No space left on device"),
    "Ctrl-C while writing": (options("INTERRUPT"), "interrupted"),
}
EXIT = {"Ctrl-C while writing": 130}


@pytest.fixture
def pair(tmp_path):
    fixed = write(tmp_path / "fixed.nii.gz", blobs(seed=1), spacing=(1.1, 1.0, 1.2))
    moving_ = write(tmp_path / "moving.nii.gz", blobs(seed=2), spacing=(1.0, 1.1, 1.0))
    return tmp_path, fixed, moving_


def run(argv) -> int:
    """``main(argv)``, with argparse's ``SystemExit`` turned into its exit code."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.is_dir() else []


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(pair, case, capsys, monkeypatch):
    d, fixed, moving_ = pair
    make, expected = CASES[case]
    out = d / "out"
    argv = make(d, ["register", fixed, moving_, "-o", str(out), "--model", "affine", "-q"])
    swap = {
        "LABELS_SMALL": lambda: write(d / "small_labels.nii.gz", np.zeros((5, 6, 7), np.uint8)),
        "CODE_PT": lambda: code_checkpoint(d / "code.pt"),
        "PICKLE_PT": lambda: plain_pickle(d / "pickle.pt"),
        "NO_PT": lambda: str(d / "absent.pt"),
        "LM_NAN": lambda: (d / "lm.csv").write_text("x,y,z\n1,nan,3\n") and str(d / "lm.csv"),
    }
    argv = [swap[a]() if a in swap else a for a in argv]
    if "DISK_FULL" in argv or "INTERRUPT" in argv:
        error = KeyboardInterrupt() if "INTERRUPT" in argv else None

        def full_disk(img, path):  # half a file, then the disk is full (or Ctrl-C)
            Path(path).write_bytes(b"\x1f\x8b" + bytes(1000))
            raise error or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

        monkeypatch.setattr(io, "_write_nifti_gz", full_disk)
        argv = [a for a in argv if a not in ("DISK_FULL", "INTERRUPT")]
    code = run(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == EXIT.get(case, 2), err
    assert len(lines) == 1 and lines[0].startswith("deepwarp"), err
    assert expected in lines[0] and "Traceback" not in err
    assert "weights_only" not in err  # never torch's advice to load code
    assert everything_under(out) == []
    if not case.startswith("output"):
        assert not out.exists()  # not even the empty folder


@pytest.mark.skipif(IS_ROOT, reason="as root, chmod does not stop writes")
def test_a_read_only_output_folder_is_refused(pair, capsys):
    d, fixed, moving_ = pair
    locked = d / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = run(["register", fixed, moving_, "-o", str(locked / "out"), "--model", "affine"])
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot create or write the output folder" in err and "\n" not in err


def test_other_commands_check_their_outputs_up_front(pair, capsys):
    d, fixed, moving_ = pair
    taken = a_file(d)
    assert run(["warp", moving_, "-t", fixed, "-r", fixed, "-o", str(d)]) == 2
    assert "names an existing folder" in capsys.readouterr().err
    pairs = d / "pairs.csv"
    pairs.write_text(f"fixed,moving\n{fixed},{moving_}\n", encoding="utf-8")
    assert run(["register-batch", str(pairs), "-o", taken, "--model", "affine", "-q"]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert run(["train", "--steps", "0", "-o", str(d / "x.pt")]) == 2
    assert "argument --steps" in capsys.readouterr().err
    for setting, expected in (
        ("label_grid=9.5", "takes a whole number"),
        ("still=yes", "takes a number"),
    ):
        assert run(["train", "--steps", "1", "--synth", setting, "-o", str(d / "x.pt")]) == 2
        assert expected in capsys.readouterr().err
    assert not (d / "x.pt").exists()


# --- accepted: multi-channel label maps ----------------------------------------------------------
def test_multi_channel_label_maps_are_read_one_label_per_channel(tmp_path):
    labels = np.zeros((10, 11, 12), np.int32)
    labels[2:6, 3:8, 2:9], labels[5:9, 1:5, 6:11], labels[1:3, 8:10, 1:4] = 1, 2, 3
    onehot = np.stack([labels == k for k in range(4)]).astype(np.float32)  # (C, z, y, x)
    masks = onehot[1:].copy()
    masks[1, 2:6, 3:8, 2:9] = 1.0  # mask 2 overlaps mask 1: later channels win
    as_4d = write(tmp_path / "masks.nii.gz", masks, spacing=(0.5, 0.6, 0.7))
    as_vector = write(tmp_path / "onehot.mha", np.moveaxis(onehot, 0, -1), vector=True)
    with pytest.warns(io.InputNote, match="3-channel label map read as labels 1-3") as notes:
        vol = io.read_volume(as_4d, labels=True)
    assert "masks.nii.gz" in str(notes[0].message) and "\n" not in str(notes[0].message)
    expected = labels.copy()
    expected[2:6, 3:8, 2:9] = 2
    np.testing.assert_array_equal(vol.array, expected)
    assert vol.spacing == pytest.approx((0.5, 0.6, 0.7)) and vol.shape == (10, 11, 12)
    with pytest.warns(io.InputNote, match="4-channel label map read as labels 0-3 .*one-hot"):
        np.testing.assert_array_equal(io.read_volume(as_vector, labels=True).array, labels)
    with pytest.raises(io.InputError, match="4D with 3 volumes"):
        io.read_volume(as_4d)  # an image, not labels: still refused
    odd = write(tmp_path / "odd.nii.gz", np.stack([labels * 1.5] * 2).astype(np.float32))
    with pytest.raises(io.InputError, match="neither binary masks nor one-hot"):
        io.read_volume(odd, labels=True)


def test_multi_channel_label_maps_register_with_a_note(pair, capsys):
    d, fixed, moving_ = pair
    channels = []
    for name, image in (("fixed", fixed), ("moving", moving_)):
        array = sitk.GetArrayFromImage(sitk.ReadImage(image))
        spacing = sitk.ReadImage(image).GetSpacing()
        masks = np.stack([array > t for t in (0.3, 0.6, 0.9)]).astype(np.uint8)  # nested masks
        channels.append(write(d / f"{name}_labels.nii.gz", masks, spacing=spacing))
    out = d / "out"
    argv = ["register", fixed, moving_, "-o", str(out), "--model", "affine", "-q"]
    code = run([*argv, "--fixed-labels", channels[0], "--moving-labels", channels[1]])
    err = capsys.readouterr().err
    notes = [ln for ln in err.splitlines() if ln.startswith("deepwarp: note:")]
    assert code == 0, err
    assert len(notes) == 2 and all("3-channel label map read as labels 1-3" in n for n in notes)
    assert "InputNote" not in err and "warnings.warn" not in err
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_labels.nii.gz")))
    assert set(np.unique(warped)) == {0, 1, 2, 3}


@pytest.mark.skipif(not (DATA / "prostate_mr_us").is_dir(), reason="../shared/data is absent")
def test_the_shared_prostate_label_maps_read():
    for side in ("fixed", "moving"):
        image = io.read_volume(DATA / "prostate_mr_us" / f"{side}_images_case000025.nii.gz")
        with pytest.warns(io.InputNote, match="3-channel label map"):
            labels = io.read_volume(
                DATA / "prostate_mr_us" / f"{side}_labels_case000025.nii.gz", labels=True
            )
        assert labels.grid.same_as(image.grid)
        assert set(np.unique(labels.array)) == {0, 1, 2, 3}


# --- accepted: oblique and left-handed directions ------------------------------------------------
OBLIQUE = sitk.VersorTransform((0.3, 0.2, 1.0), 0.5).GetMatrix()
LEFT_HANDED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("direction", [OBLIQUE, LEFT_HANDED], ids=["oblique", "left-handed"])
def test_oblique_and_left_handed_grids_register_in_physical_space(tmp_path, direction):
    """The moving image is the fixed one resampled onto a grid with another direction: the
    network's path (no affine stage, an untrained network: a near-zero field) must give
    SimpleITK's identity resampling, and the affine stage must stay near the identity."""
    fixed = sitk.GetImageFromArray(blobs((24, 28, 32), seed=3))
    fixed.SetSpacing((1.0, 1.1, 1.2))
    fixed.SetOrigin((3.0, -4.0, 5.0))
    grid = sitk.Image([36, 36, 36], sitk.sitkFloat32)
    grid.SetDirection(direction)
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint([15.5, 13.5, 11.5]))
    corner = np.array(grid.TransformContinuousIndexToPhysicalPoint([17.5] * 3))
    grid.SetOrigin(tuple(centre - corner))
    moving_ = sitk.Resample(fixed, grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    det = np.linalg.det(np.reshape(moving_.GetDirection(), (3, 3)))
    assert det == pytest.approx(np.linalg.det(np.reshape(direction, (3, 3))))
    sitk.WriteImage(fixed, str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(moving_, str(tmp_path / "moving.nii.gz"))
    argv = ["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "-q"]
    net = ["--model", "voxelmorph", "--checkpoint", "none", "--no-affine", "--max-size", "32"]
    assert run([*argv, "-o", str(tmp_path / "net"), *net, "--if-worse", "keep"]) == 0
    assert run([*argv, "-o", str(tmp_path / "aff"), "--model", "affine"]) == 0
    f = sitk.GetArrayFromImage(fixed)
    identity = sitk.GetArrayFromImage(sitk.Resample(moving_, fixed))
    inside = f > 0.05
    assert np.abs(identity - f)[inside].mean() < 0.01  # the copy is the same in physical space
    warped = sitk.ReadImage(str(tmp_path / "net" / "warped.nii.gz"))
    assert warped.GetDirection() == pytest.approx(fixed.GetDirection())
    assert np.abs(sitk.GetArrayFromImage(warped) - identity).max() < 1e-3
    affine = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "aff" / "warped.nii.gz")))
    assert np.corrcoef(affine[inside], f[inside])[0, 1] > 0.99
    transform = sitk.ReadTransform(str(tmp_path / "aff" / "transform.h5"))
    points = [fixed.TransformIndexToPhysicalPoint(i) for i in ((4, 4, 4), (28, 24, 20))]
    moved = [np.subtract(transform.TransformPoint(p), p) for p in points]
    assert max(np.linalg.norm(m) for m in moved) < 1.5  # mm: near the identity


# --- Ctrl-C and SIGTERM mid-run ------------------------------------------------------------------
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(
    "sig, code, said",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
    ids=["Ctrl-C", "SIGTERM"],
)
def test_a_signal_mid_run_exits_cleanly_and_leaves_nothing(tmp_path, sig, code, said):
    """Signalled while refining (its progress bar is on stderr): one line, the exit code of
    the signal, and no output folder."""
    fixed = write(tmp_path / "fixed.nii.gz", blobs((40, 40, 40), seed=1))
    moving_ = write(tmp_path / "moving.nii.gz", blobs((40, 40, 40), seed=2))
    out = tmp_path / "out"
    # A run in the background (a CI job started with &) inherits SIGINT ignored, and Python then
    # keeps ignoring it: the child takes Ctrl-C as a terminal would give it.
    interruptible = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "runpy.run_module('napari_deepwarp.cli', run_name='__main__')"
    )
    command = [sys.executable, "-c", interruptible, "register", fixed, moving_]
    command += ["-o", str(out), "--model", "voxelmorph", "--checkpoint", "none", "--no-affine"]
    command += ["--refine", "100000", "--max-size", "32", "--device", "cpu"]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stderr=stderr, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while "refine" not in log.read_text(errors="replace"):  # shown after 1 s of refining
            assert process.poll() is None and time.monotonic() < deadline, log.read_bytes()
            time.sleep(0.1)
        process.send_signal(sig)
        process.wait(timeout=60)
    finally:
        process.kill()
    err = log.read_text(encoding="utf-8", errors="replace")
    assert process.returncode == code, err
    # the last line, on a line of its own after the progress bar's text
    assert err.endswith(f"\ndeepwarp: {said}; nothing was written\n"), err
    assert err.count("deepwarp:") == 1 and "Traceback" not in err
    assert everything_under(out) == [] and not out.exists()
