"""Colour tables (FreeSurfer LUT, 3D Slicer, ITK-SNAP) and names in metrics.json via the CLI."""

import json
import sys

import numpy as np
import pytest

from napari_deepwarp.core.io import InputError, read_volume
from napari_deepwarp.core.label_names import (
    LabelNames,
    LabelNamesError,
    looks_like_label_names,
    name_labels,
    parse_label_names,
    read_label_names,
)
from napari_deepwarp.resources import resources_dir, sample_pair_paths

FREESURFER = """\
#$Id: FreeSurferColorLUT.txt
#No. Label Name:                            R   G   B   A
0   Unknown                                 0   0   0   0
17  Left-Hippocampus                      220 216  20   0
1002    ctx-lh-caudalanteriorcingulate    125 100 160   0
"""
SLICER = """\
# Color table file /tmp/GenericAnatomyColors.ctbl
# 3 values
0 background 0 0 0 0
17 left_hippocampus 220 216 20 255
53 right_hippocampus 220 216 20 255
"""
ITKSNAP = """\
################################################
# ITK-SnAP Label Description File
#    IDX:   Zero-based index
#    -R-:   Red color component (0..255)
################################################
    0     0    0    0        0  0  0    "Clear Label"
   17   220  216   20        1  1  1    "Left Hippocampus # head"
   53   220  216   20      0.5  1  1    "Right Hippocampus"
"""


@pytest.mark.parametrize(
    "text, names",
    [
        (
            FREESURFER,
            {0: "Unknown", 17: "Left-Hippocampus", 1002: "ctx-lh-caudalanteriorcingulate"},
        ),
        (SLICER, {0: "background", 17: "left_hippocampus", 53: "right_hippocampus"}),
        (ITKSNAP, {0: "Clear Label", 17: "Left Hippocampus # head", 53: "Right Hippocampus"}),
    ],
    ids=["freesurfer", "slicer", "itksnap"],
)
def test_each_format_gives_names_and_colours(text, names):
    table = parse_label_names(text, "t.txt")
    assert table.names == names
    assert table.colours[17] == pytest.approx((220 / 255, 216 / 255, 20 / 255))


def test_a_file_that_is_not_a_colour_table_is_refused_with_its_line(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("0 Unknown 0 0 0 0\nthis is prose, not a table\n", encoding="utf-8")
    with pytest.raises(LabelNamesError, match=r"notes.txt: line 2"):
        read_label_names(bad)
    assert issubclass(LabelNamesError, InputError)  # the CLI's exit 2 with one line
    assert not looks_like_label_names(bad)
    (tmp_path / "empty.ctbl").write_text("# nothing\n", encoding="utf-8")
    assert not looks_like_label_names(tmp_path / "empty.ctbl")
    good = tmp_path / "lut.txt"
    good.write_text(FREESURFER, encoding="utf-8")
    assert looks_like_label_names(good)


def test_features_and_colours_for_a_labels_layer():
    table = parse_label_names(FREESURFER)
    features = table.features(np.array([[0, 17], [17, 99]]))
    assert list(features["index"]) == [0, 17, 99]
    assert list(features["name"]) == ["background", "Left-Hippocampus", "label 99"]
    colours = table.colour_dict([0, 17, 99])
    assert colours[17][:3] == pytest.approx(table.colours[17]) and 99 not in colours
    assert colours[None][3] == 0 and colours[0][3] == 0


def test_name_labels_adds_names_to_every_stage():
    metrics = {
        "labels_before": {"17": {"dice": 0.5}, "99": {"dice": 0.1}},
        "labels_after": {"17": {"dice": 0.7}, "1002": {"dice": 0.6}},
    }
    name_labels(metrics, parse_label_names(FREESURFER, "lut.txt"))
    assert metrics["labels_after"]["17"]["name"] == "Left-Hippocampus"
    assert metrics["labels_before"]["99"]["name"] == "label 99"
    assert metrics["label_names"] == {
        "17": "Left-Hippocampus",
        "99": "label 99",
        "1002": "ctx-lh-caudalanteriorcingulate",
    }
    assert metrics["label_names_source"] == "lut.txt"
    assert name_labels({"a": 1}, None) == {"a": 1}


def test_the_shipped_table_names_every_mindboggle_label():
    """The values that occur in the Mindboggle-101 maps of ../shared/data (listed here, so the
    test runs without the data)."""
    table = read_label_names(resources_dir() / "label_names" / "mindboggle_dkt_LUT.txt")
    present = [4, 5, 6, 7, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28, 30, 43, 44, 45, 46]
    present += [49, 50, 51, 52, 53, 54, 58, 60, 62, 72, 85, 91, 92, 630, 631, 632]
    present += [1000 + k for k in (*range(2, 4), *range(5, 32), 33, 34, 35)]
    present += [2000 + k for k in (*range(2, 4), *range(5, 32), 34, 35)]
    assert all(v in table.names for v in present)
    assert table.name(17) == "Left-Hippocampus" and table.name(2035) == "ctx-rh-insula"


def test_register_with_label_names_writes_them_into_metrics_json(tmp_path, capsys):
    from napari_deepwarp.cli import main

    paths = sample_pair_paths()
    values = np.unique(read_volume(paths["fixed_labels"], labels=True).array)
    lut = tmp_path / "sample_LUT.txt"
    lut.write_text(
        "".join(f"{int(v)} structure-{int(v)} 10 20 30 0\n" for v in values), encoding="utf-8"
    )
    args = ["register", str(paths["fixed"]), str(paths["moving"]), "-o", str(tmp_path / "out")]
    args += ["--fixed-labels", str(paths["fixed_labels"])]
    args += ["--moving-labels", str(paths["moving_labels"]), "--model", "affine", "-q"]
    assert main([*args, "--label-names", str(lut)]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    label = next(iter(metrics["labels_after"]))
    assert metrics["labels_after"][label]["name"] == f"structure-{label}"
    assert metrics["label_names"][label] == f"structure-{label}"
    bad = tmp_path / "bad.txt"
    bad.write_text("not a table\n", encoding="utf-8")
    assert main([*args[:4], str(tmp_path / "out2"), *args[5:], "--label-names", str(bad)]) == 2
    assert "bad.txt: line 1" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_register_batch_takes_label_names(tmp_path):
    from napari_deepwarp.cli import main

    paths = sample_pair_paths()
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "fixed,moving,fixed_labels,moving_labels,name\n"
        + ",".join(str(paths[k]) for k in ("fixed", "moving", "fixed_labels", "moving_labels"))
        + ",one\n",
        encoding="utf-8",
    )
    lut = tmp_path / "lut.ctbl"
    lut.write_text("1 first 1 2 3 255\n2 second 4 5 6 255\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["register-batch", str(pairs), "-o", str(out), "--model", "affine", "-q"]
    assert main([*args, "--label-names", str(lut)]) == 0
    metrics = json.loads((out / "one" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["label_names"]["1"] == "first"
    assert metrics["labels_after"]["2"]["name"] == "second"


def test_label_names_module_needs_no_qt():
    import subprocess

    code = (
        "import sys, napari_deepwarp.core.label_names; "
        "sys.exit(any(m.split('.')[0] in ('qtpy', 'napari') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_labelnames_defaults():
    assert LabelNames().name(3) == "label 3" and len(LabelNames()) == 0
