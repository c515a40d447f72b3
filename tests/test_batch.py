"""`deepwarp register-batch`: one row per pair, bad rows skipped, shards under torchrun."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from napari_deepwarp.batch import read_pairs
from napari_deepwarp.cli import main
from napari_deepwarp.resources import sample_pair_paths


@pytest.fixture()
def pairs_csv(tmp_path):
    """Three good rows (one with relative paths and labels, one unnamed) and one bad row."""
    paths = sample_pair_paths()
    data = tmp_path / "data"
    data.mkdir()
    for key, path in paths.items():
        shutil.copy(path, data / f"{key}.nii.gz")
    rows = [
        "fixed,moving,fixed_labels,moving_labels,name",
        ",".join(f"data/{k}.nii.gz" for k in paths) + ",with_labels",
        f"{paths['fixed']},{tmp_path / 'nowhere.nii.gz'},,,broken",
        f"{paths['fixed']},{paths['moving']}",
        f"{paths['fixed']},{paths['moving']},,,third",
    ]
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def summary(path):
    with open(path, newline="", encoding="utf-8") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def test_read_pairs_resolves_relative_paths_and_flags_bad_rows(pairs_csv, tmp_path):
    pairs = read_pairs(pairs_csv)
    assert [p.name for p in pairs] == ["with_labels", "broken", "2", "third"]
    assert pairs[0].fixed == tmp_path / "data" / "fixed.nii.gz"
    assert pairs[0].moving_labels == tmp_path / "data" / "moving_labels.nii.gz"
    assert pairs[2].fixed_labels is None and all(p.error is None for p in pairs)
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "a.nii.gz\na.nii.gz,b.nii.gz,c.nii.gz\nx,y,,,n\nx,y,,,n\nx,y,,,../up\n", encoding="utf-8"
    )
    errors = [p.error for p in read_pairs(bad)]
    assert "fixed and moving" in errors[0] and "both label maps" in errors[1]
    assert errors[2] is None and "earlier row" in errors[3] and "plain folder" in errors[4]


def test_batch_writes_every_good_pair_and_reports_the_bad_one(pairs_csv, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["register-batch", str(pairs_csv), "-o", str(out), "--model", "affine"])
    assert code == 2  # one row failed
    err = capsys.readouterr().err
    assert "4 pairs, 3 ok, 1 failed" in err
    rows = summary(out / "summary.csv")
    assert [rows[n]["status"] for n in ("with_labels", "broken", "2", "third")] == [
        "ok",
        "failed",
        "ok",
        "ok",
    ]
    assert "nowhere.nii.gz" in rows["broken"]["message"]
    assert float(rows["with_labels"]["mean_dice_after"]) > float(
        rows["with_labels"]["mean_dice_before"]
    )
    assert sorted(p.name for p in (out / "with_labels").iterdir()) == [
        "displacement.nii.gz",
        "metrics.json",
        "transform.h5",
        "warped.nii.gz",
        "warped_labels.nii.gz",
    ]
    assert (out / "2" / "warped.nii.gz").exists() and not (out / "broken").exists()


def test_batch_equals_register_and_exits_0_when_all_rows_are_good(tmp_path):
    """One loaded model for all rows gives what `deepwarp register` gives for each pair.

    No affine stage here: SimpleITK's multi-threaded affine stage differs slightly from run to run.
    """
    p = sample_pair_paths()
    pairs = tmp_path / "pairs.csv"
    row = f"{p['fixed']},{p['moving']},{p['fixed_labels']},{p['moving_labels']}"
    pairs.write_text(f"{row},x\n{row},y\n", encoding="utf-8")
    method = ["-q", "--model", "voxelmorph", "--no-affine", "--refine", "5", "--max-size", "32"]
    method += ["--device", "cpu"]
    out = tmp_path / "out"
    assert main(["register-batch", str(pairs), "-o", str(out), *method]) == 0
    assert {r["status"] for r in summary(out / "summary.csv").values()} == {"ok"}
    single = tmp_path / "single"
    args = ["register", str(p["fixed"]), str(p["moving"]), "-o", str(single)]
    args += ["--fixed-labels", str(p["fixed_labels"]), "--moving-labels", str(p["moving_labels"])]
    assert main([*args, *method]) == 0
    one = json.loads((single / "metrics.json").read_text(encoding="utf-8"))
    for name in ("x", "y"):
        batch = json.loads((out / name / "metrics.json").read_text(encoding="utf-8"))
        assert batch["refine_steps"] == 5
        for key in ("mean_dice_after", "folding_percent", "ncc_after"):
            assert batch[key] == pytest.approx(one[key], abs=1e-9), (name, key)


def test_missing_pairs_file_is_a_clean_error(tmp_path, capsys):
    code = main(["register-batch", str(tmp_path / "none.csv"), "-o", str(tmp_path / "o")])
    assert code == 2
    assert "no such pairs file" in capsys.readouterr().err


def test_two_ranks_shard_the_rows_and_rank_0_merges(pairs_csv, tmp_path):
    """As under `torchrun --nproc_per_node 2`: RANK/WORLD_SIZE set, no process group."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "napari_deepwarp.cli", "register-batch", str(pairs_csv)]
    cmd += ["-o", str(out), "--model", "affine", "--device", "cpu"]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", DEEPWARP_RUN_ID="test-run")
        env["OMP_NUM_THREADS"] = "1"
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    # Rank 0 holds rows 0 and 2 (all good); rank 1 rows 1 (bad) and 3. Rank 0 reports them all.
    assert codes == [2, 2], results
    assert "4 pairs, 3 ok, 1 failed" in results[0][1].decode()
    rows = summary(out / "summary.csv")
    assert [rows[n]["row"] for n in ("with_labels", "broken", "2", "third")] == ["0", "1", "2", "3"]
    for name in ("with_labels", "2", "third"):
        assert rows[name]["status"] == "ok"
        assert (out / name / "displacement.nii.gz").exists()
    assert not list(out.glob("summary-rank*.csv"))


def test_ranks_share_the_output_folder_and_none_removes_it(pairs_csv, tmp_path, monkeypatch):
    """Rank 0 once removed the folder its check had created while rank 1 was writing into it
    (rank 1 then failed and rank 0 waited for its summary). Under torchrun the check is shared."""
    from napari_deepwarp.core import io

    seen = []

    def check(folder, option="-o", shared=False):
        seen.append(shared)
        raise io.InputError("stop here")

    monkeypatch.setattr(io, "check_output_folder", check)
    args = ["register-batch", str(pairs_csv), "-o", str(tmp_path / "out"), "--model", "affine"]
    for world in ("2", "1"):
        monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setenv("RANK", "0")
        assert main(args) == 2
    monkeypatch.delenv("WORLD_SIZE")
    assert main(args) == 2
    assert seen == [True, False, False]


def test_each_rank_takes_its_own_gpu(monkeypatch):
    """Under torchrun on a node with GPUs, rank r runs on GPU LOCAL_RANK (mod the GPU count);
    one process, a CPU run or no CUDA binds nothing."""
    import torch

    from napari_deepwarp.batch import bind_local_gpu

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for local, expected in (("1", 1), ("6", 2)):
        monkeypatch.setenv("LOCAL_RANK", local)
        assert bind_local_gpu("auto", world=8) == expected
    assert chosen == [1, 2]
    assert bind_local_gpu("cuda", world=1) is None  # one process: the default GPU
    assert bind_local_gpu("cpu", world=8) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bind_local_gpu("auto", world=8) is None
    assert chosen == [1, 2]


def test_the_summary_shows_each_pairs_verdict_and_auto_choice(tmp_path):
    """The same verdict as `deepwarp register`'s metrics.json, one row per pair; each pair's
    model chosen for that pair by --model auto (the default)."""
    p = sample_pair_paths()
    pairs = tmp_path / "pairs.csv"
    row = f"{p['fixed']},{p['moving']},{p['fixed_labels']},{p['moving_labels']}"
    pairs.write_text(f"{row},a\n{p['fixed']},{p['moving']},,,b\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["register-batch", str(pairs), "-o", str(out), "-q", "--device", "cpu"]) == 0
    rows = summary(out / "summary.csv")
    for name in ("a", "b"):
        metrics = json.loads((out / name / "metrics.json").read_text(encoding="utf-8"))
        verdict = metrics["verdict"]
        assert rows[name]["verdict"] == verdict["word"] and rows[name]["model"] == metrics["model"]
        assert rows[name]["similarity"] == "local NCC" == verdict["similarity_name"]
        assert float(rows[name]["similarity_result"]) == pytest.approx(
            verdict["similarity_result"], rel=1e-5
        )
        assert rows[name]["returned"] == (
            "deformable" if verdict["returned"] == "result" else "affine"
        )
        assert metrics["auto"]["modality"] == "mono"
