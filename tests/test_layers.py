"""napari-facing data (no viewer): the manifest, the reader and the sample pair, in physical space."""

import numpy as np
import pytest
import SimpleITK as sitk

from napari_deepwarp.cli import main
from napari_deepwarp.layers import get_reader, sample_pair
from napari_deepwarp.resources import sample_pair_paths


def test_manifest_is_valid_and_found_through_the_entry_point():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-deepwarp")
    assert manifest.name == "napari-deepwarp"
    assert {c.id for c in manifest.contributions.commands} >= {
        "napari-deepwarp.get_reader",
        "napari-deepwarp.sample_pair",
    }


def test_sample_pair_layers_carry_physical_geometry():
    layers = sample_pair()
    assert [t for _, _, t in layers] == ["image", "image", "labels", "labels"]
    fixed = sitk.ReadImage(str(sample_pair_paths()["fixed"]))
    data, meta, _ = layers[0]
    assert data.shape == fixed.GetSize()[::-1]
    idx = np.array([3, 5, 7, 1.0])  # (z, y, x)
    world_zyx = (meta["affine"] @ idx)[:3]
    assert np.allclose(world_zyx[::-1], fixed.TransformIndexToPhysicalPoint((7, 5, 3)))
    assert meta["colormap"] == "green" and layers[1][1]["colormap"] == "magenta"


def test_reader_opens_images_and_label_maps(tmp_path):
    paths = sample_pair_paths()
    assert get_reader(str(tmp_path / "notes.txt")) is None
    (image_layer,) = get_reader(str(paths["moving"]))(str(paths["moving"]))
    (label_layer,) = get_reader(str(paths["moving_labels"]))(str(paths["moving_labels"]))
    assert image_layer[2] == "image" and label_layer[2] == "labels"
    assert np.issubdtype(label_layer[0].dtype, np.integer)
    assert not np.allclose(
        image_layer[1]["affine"][:3, :3], np.diag(np.diag(image_layer[1]["affine"][:3, :3]))
    )


def test_demo_registers_the_sample_pair(tmp_path, capsys):
    assert (
        main(
            [
                "demo",
                "-o",
                str(tmp_path),
                "--finetune",
                "2",
                "--no-viewer",
                "--device",
                "cpu",
                "--max-size",
                "32",
            ]
        )
        == 0
    )
    assert (tmp_path / "warped.nii.gz").exists() and (tmp_path / "metrics.json").exists()
    assert "Dice" in capsys.readouterr().out


@pytest.mark.parametrize("direction", ["sagittal", "oblique"])
def test_permuted_scans_display_and_come_back_voxel_for_voxel(direction):
    """A sagittal scan (index z along world x) must not give napari a singular 2D block, and
    reading the layer back must give the original grid and array exactly."""
    from napari_deepwarp.core.volume import Grid, Volume
    from napari_deepwarp.layers import layer_data, volume_from_layer_data

    d = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # Mindboggle's
    if direction == "oblique":
        c, s = np.cos(0.2), np.sin(0.2)
        d = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ d
    grid = Grid((5, 6, 7), (1.0, 1.5, 2.0), (3.0, -4.0, 5.0), d)
    array = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    data, meta, _ = layer_data(Volume.on_grid(array, grid, "scan"), "image")
    linear = meta["affine"][:3, :3]
    assert np.all(np.diag(linear) > 0.9 * np.abs(linear).max(axis=1))  # near-diagonal, positive
    for idx in ([0, 0, 0], [4, 5, 6], [2, 3, 1]):  # every voxel stays where it is in space
        world = grid.index_to_world_matrix() @ [*idx, 1.0]
        view_idx = np.linalg.solve(meta["affine"], [*world[:3][::-1], 1.0])[:3]
        assert np.allclose(view_idx, np.round(view_idx), atol=1e-6)
        assert data[tuple(np.round(view_idx).astype(int))] == array[tuple(idx)]
    back = volume_from_layer_data(data, meta)
    assert back.grid.same_as(grid) and np.array_equal(back.array, array)


def test_float_label_files_open_as_labels(tmp_path):
    """Mindboggle stores label maps as float32: whole numbers in a file named like labels."""
    import SimpleITK as sitk

    from napari_deepwarp.layers import read_layers

    labels = np.zeros((4, 5, 6), np.float32)
    labels[1:3, 2:4, 1:5] = 1035.0
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / "sub1_labels.nii.gz"))
    smooth = labels + 0.5
    sitk.WriteImage(sitk.GetImageFromArray(smooth), str(tmp_path / "sub1_seg_prob.nii.gz"))
    ((data, _, kind),) = read_layers(tmp_path / "sub1_labels.nii.gz")
    assert kind == "labels" and np.issubdtype(data.dtype, np.integer) and data.max() == 1035
    assert read_layers(tmp_path / "sub1_seg_prob.nii.gz")[0][2] == "image"
