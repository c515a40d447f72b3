"""Synthetic training pairs: shapes, ranges, randomness under control, the same anatomy."""

import itertools
from dataclasses import replace

import numpy as np
import torch
from conftest import mean_dice

from napari_deepwarp.core import spatial
from napari_deepwarp.core.synth import (
    SynthSettings,
    random_deformation,
    random_label_map,
    synthetic_pair,
    true_field,
)

SMALL = SynthSettings(shape=(24, 28, 20))


def test_true_field_registers_the_pair():
    """A smooth anatomy pulled through two random deformations: the true field maps one onto
    the other up to interpolation error, and asking for it leaves the pair unchanged."""
    s = SynthSettings(shape=(32, 32, 32))
    g = torch.Generator().manual_seed(0)
    z, y, x = torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij")
    anatomy = (torch.sin(z / 3) + torch.cos(y / 4) + torch.sin(x / 5 + z / 7))[None, None]
    fixed_def, moving_def = (random_deformation(s, 1, g, "cpu") for _ in range(2))
    fixed, moving = spatial.warp(anatomy, fixed_def), spatial.warp(anatomy, moving_def)
    u = true_field(fixed_def, moving_def)
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6), slice(6, -6))
    before = (moving - fixed)[inner].abs().mean()
    after = (spatial.warp(moving, u) - fixed)[inner].abs().mean()
    assert after < 0.05 * before
    plain, with_field = synthetic_pair(SMALL, seed=2), synthetic_pair(SMALL, seed=2, field=True)
    assert with_field["field"].shape == (1, 3, *SMALL.shape)
    for key, value in plain.items():
        assert torch.equal(value, with_field[key]), key


def test_pair_shapes_ranges_and_determinism():
    a = synthetic_pair(SMALL, batch=2, seed=3)
    b = synthetic_pair(SMALL, batch=2, seed=3)
    c = synthetic_pair(SMALL, batch=2, seed=4)
    for key in ("moving", "fixed"):
        assert a[key].shape == (2, 1, 24, 28, 20) and a[key].dtype == torch.float32
        assert float(a[key].min()) >= 0.0 and float(a[key].max()) <= 1.0
    assert a["moving_labels"].dtype == torch.int64
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["moving"], c["moving"])


def test_label_count_in_range():
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        n = random_label_map(SMALL, 1, g, "cpu").unique().numel()
        assert SMALL.labels[0] // 2 <= n <= SMALL.labels[1]


def test_deformations_are_smooth_and_mostly_invertible():
    g = torch.Generator().manual_seed(1)
    field = random_deformation(SynthSettings(shape=(32, 32, 32)), 2, g, "cpu")
    assert field.shape == (2, 3, 32, 32, 32)
    det = spatial.jacobian_determinant(field)
    assert float((det <= 0).float().mean()) < 0.01


def test_both_sides_show_the_same_anatomy_with_different_contrast():
    p = synthetic_pair(
        SynthSettings(
            shape=(32, 32, 32),
            translation=0.0,
            rotation=0.0,
            scaling=0.0,
            shear=0.0,
            displacement=1.0,
        ),
        seed=5,
    )
    assert mean_dice(p["fixed_labels"], p["moving_labels"]) > 0.5  # small deformations only
    per_label = [
        (
            float(p["moving"][p["moving_labels"] == k].mean()),
            float(p["fixed"][p["fixed_labels"] == k].mean()),
        )
        for k in p["moving_labels"].unique()[:8]
    ]
    assert any(abs(m - f) > 0.1 for m, f in per_label)  # independent contrasts


def test_same_contrast_shares_the_label_intensities():
    s = SynthSettings(shape=(32, 32, 32), same_contrast=True, bias=0.0, noise=(0.0, 0.0))
    s.gamma, s.blur = 0.0, (0.0, 0.0)
    p = synthetic_pair(s, seed=5)
    labels = p["moving_labels"].unique()
    means = [
        (
            float(p["moving"][p["moving_labels"] == k].mean()),
            float(p["fixed"][p["fixed_labels"] == k].mean()),
        )
        for k in labels
        if (p["fixed_labels"] == k).any()
    ]
    # one contrast up to the min-max normalisation of each side: a linear map between them
    m, f = np.array(means).T
    assert np.corrcoef(m, f)[0, 1] > 0.999


def test_background_puts_the_anatomy_on_a_dark_surround():
    s = SynthSettings(shape=(32, 32, 32), background=1.0, noise=(0.0, 0.0), bias=0.0)
    s.gamma, s.blur = 0.0, (0.0, 0.0)
    p = synthetic_pair(s, batch=2, seed=7)
    for side in ("moving", "fixed"):
        labels, image = p[f"{side}_labels"], p[side]
        outside = labels == 0
        assert 0.4 < float(outside.float().mean()) < 0.95  # a blob, not the whole cube
        corners = labels[:, :, ::31, ::31, ::31]
        assert bool((corners == 0).all())
        assert float(image[outside].max()) == 0.0  # the darkest intensity, before noise
        assert float(image[~outside].mean()) > 0.2
    # Without background, the anatomy fills the cube (label 0 is just one of many labels).
    plain = synthetic_pair(SynthSettings(shape=(32, 32, 32)), seed=7)
    assert float((plain["fixed_labels"] == 0).float().mean()) < 0.3


def test_still_pairs_have_no_motion_and_the_rest_are_unchanged():
    base = SynthSettings(shape=(24, 24, 24), background=0.9)
    moving_pairs = synthetic_pair(base, batch=6, seed=3, field=True)
    all_still = synthetic_pair(SynthSettings(**{**base.__dict__, "still": 1.0}), 6, 3, field=True)
    assert torch.equal(all_still["moving_labels"], all_still["fixed_labels"])
    assert float(all_still["field"].abs().max()) == 0.0
    assert not torch.equal(all_still["moving"], all_still["fixed"])  # their own noise, bias...
    assert not torch.equal(moving_pairs["moving_labels"], moving_pairs["fixed_labels"])
    # A mix: each pair is either still (same labels, zero field) or moving (a real field).
    mixed = synthetic_pair(SynthSettings(**{**base.__dict__, "still": 0.5}), 6, 11, field=True)
    same = [torch.equal(m, f) for m, f in zip(mixed["moving_labels"], mixed["fixed_labels"])]
    norms = mixed["field"].abs().amax(dim=(1, 2, 3, 4))
    assert 0 < sum(same) < 6
    assert [bool(n == 0) for n in norms] == same
    # still = 0 draws nothing extra: the default random stream (and old seeds) are unchanged.
    again = synthetic_pair(SynthSettings(**{**base.__dict__, "still": 0.0}), 6, 3, field=True)
    assert torch.equal(again["moving"], moving_pairs["moving"])


def test_merged_labels_share_intensities_each_side_its_own_grouping():
    base = SynthSettings(shape=(24, 24, 24), noise=(0.0, 0.0), bias=0.0, blur=(0.0, 0.0))
    base.gamma, base.labels = 0.0, (20, 20)

    def distinct(image, labels):  # intensities of the labels present, rounded
        return {round(float(image[labels == k][0]), 4) for k in labels.unique().tolist()}

    plain = synthetic_pair(base, batch=1, seed=5)
    present = len(plain["fixed_labels"].unique())
    assert len(distinct(plain["fixed"], plain["fixed_labels"])) == present
    # merge = 1: every image deals its labels into at most half as many shared intensities,
    # each side its own grouping (independent contrasts), so their boundaries differ.
    merged = synthetic_pair(SynthSettings(**{**base.__dict__, "merge": 1.0}), batch=1, seed=5)
    for side in ("moving", "fixed"):
        assert len(distinct(merged[side], merged[f"{side}_labels"])) <= 10
    assert torch.equal(merged["fixed_labels"], plain["fixed_labels"])  # the anatomy is the same

    def grouping(side):  # the sets of labels that share one intensity
        image, labels = merged[side], merged[f"{side}_labels"]
        groups = {}
        for k in labels.unique().tolist():
            groups.setdefault(round(float(image[labels == k][0]), 4), set()).add(k)
        return {frozenset(g) for g in groups.values()}

    assert grouping("moving") != grouping("fixed")
    # merge = 0 draws nothing extra: old seeds give the same pairs.
    again = synthetic_pair(SynthSettings(**{**base.__dict__, "merge": 0.0}), batch=1, seed=5)
    assert torch.equal(again["moving"], plain["moving"])


def test_same_shares_one_contrast_between_the_sides_that_often():
    base = SynthSettings(shape=(24, 24, 24), noise=(0.0, 0.0), bias=0.0, blur=(0.0, 0.0))
    base.gamma, base.labels = 0.0, (12, 12)

    def intensity_of(pair, side):  # label -> intensity, on that side
        image, labels = pair[side], pair[f"{side}_labels"]
        return {k: round(float(image[labels == k][0]), 4) for k in labels.unique().tolist()}

    def shares_contrast(pair):
        moving, fixed = intensity_of(pair, "moving"), intensity_of(pair, "fixed")
        common = sorted(set(moving) & set(fixed) - {0})
        return all(moving[k] == fixed[k] for k in common)

    always = SynthSettings(**{**base.__dict__, "same": 1.0})
    assert all(shares_contrast(synthetic_pair(always, seed=s)) for s in range(4))
    never = [shares_contrast(synthetic_pair(base, seed=s)) for s in range(4)]
    assert not any(never)
    half = SynthSettings(**{**base.__dict__, "same": 0.5})
    mixed = [shares_contrast(synthetic_pair(half, seed=s)) for s in range(12)]
    assert 0 < sum(mixed) < 12
    # same = 0 draws nothing extra: old seeds give the same pairs.
    again = synthetic_pair(SynthSettings(**{**base.__dict__, "same": 0.0}), seed=2)
    assert torch.equal(again["moving"], synthetic_pair(base, seed=2)["moving"])


def _write_anatomy(path):
    """A box of label 5 holding a ball of label 9, off-centre in a 2 mm x 1 mm x 1 mm volume
    with an origin away from zero: (z, y, x) array (30, 50, 40)."""
    import SimpleITK as sitk

    z, y, x = np.meshgrid(np.arange(30), np.arange(50), np.arange(40), indexing="ij")
    labels = np.zeros((30, 50, 40), np.uint8)
    labels[5:25, 10:40, 8:30] = 5
    labels[(z * 2 - 30) ** 2 + (y - 25) ** 2 + (x - 19) ** 2 < 64] = 9
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((1.0, 1.0, 2.0))
    image.SetOrigin((-20.0, 7.0, 3.0))
    sitk.WriteImage(image, str(path))
    return labels


def test_file_anatomy_is_framed_like_a_fixed_image_and_renumbered(tmp_path):
    """The label map lands on an isotropic cube over its foreground (the pipeline's framing):
    labels renumbered in order (5 -> 1, 9 -> 2), the box spanning the grid's longest axis less
    the margin, and the ball inside the box."""
    from napari_deepwarp.core.synth import _anatomy_on_grid

    _write_anatomy(tmp_path / "anatomy.nii.gz")
    grid = _anatomy_on_grid(str(tmp_path / "anatomy.nii.gz"), (24, 24, 24))
    assert grid.shape == (24, 24, 24) and set(np.unique(grid)) == {0, 1, 2}
    # box: 40 mm (z), 30 mm (y), 22 mm (x); the grid spans 40 mm + 2 x 8 mm margin = 56 mm
    extent = [
        np.ptp(np.flatnonzero((grid > 0).any(axis=tuple(b for b in range(3) if b != a))))
        for a in range(3)
    ]
    assert abs((extent[0] + 1) * 56 / 24 - 40) <= 56 / 24
    assert extent[0] > extent[1] > extent[2]
    ball = np.argwhere(grid == 2).mean(0)
    assert np.all(np.abs(ball - 11.5) < 2)  # the ball is centred in the box, the box on the grid


def test_world_axes_frame_the_anatomy_upright_along_the_worlds_axes(tmp_path):
    """``world_axes``: the anatomy on a grid along the world's axes (the same label map stored
    in another axis order lands identically) and never re-oriented; the default draws one of
    the 48 axis orientations per pair."""
    import SimpleITK as sitk

    from napari_deepwarp.core.synth import _anatomy_on_grid, file_anatomy

    _write_anatomy(tmp_path / "anatomy.nii.gz")
    stored = sitk.DICOMOrient(sitk.ReadImage(str(tmp_path / "anatomy.nii.gz")), "SAR")
    sitk.WriteImage(stored, str(tmp_path / "stored.nii.gz"))
    upright = [
        _anatomy_on_grid(str(tmp_path / n), (24, 24, 24), "world")
        for n in ("anatomy.nii.gz", "stored.nii.gz")
    ]
    assert np.array_equal(*upright)
    image_axes = _anatomy_on_grid(str(tmp_path / "stored.nii.gz"), (24, 24, 24))
    assert not np.array_equal(image_axes, upright[0])
    s = SynthSettings(shape=(24, 24, 24), anatomy=str(tmp_path / "stored.nii.gz"), world_axes=True)
    drawn = [file_anatomy(s, 2, torch.Generator().manual_seed(k), "cpu") for k in range(4)]
    assert all(torch.equal(d[i, 0], torch.from_numpy(upright[0])) for d in drawn for i in range(2))
    plain = SynthSettings(**{**s.__dict__, "world_axes": False})
    orientations = {
        file_anatomy(plain, 1, torch.Generator().manual_seed(k), "cpu")
        .flatten()[::97]
        .tolist()
        .__repr__()
        for k in range(8)
    }
    assert len(orientations) > 1


def test_random_orientation_gives_all_48_axis_aligned_orientations():
    from napari_deepwarp.core.synth import random_orientation

    cube = torch.arange(27).reshape(1, 1, 3, 3, 3)
    g = torch.Generator().manual_seed(0)
    seen = {tuple(random_orientation(cube, g).flatten().tolist()) for _ in range(600)}
    assert len(seen) == 48
    assert all(sorted(s) == list(range(27)) for s in seen)
    flat = torch.arange(24).reshape(1, 1, 2, 3, 4)  # not a cube: flips only, shape kept
    seen = {tuple(random_orientation(flat, g).flatten().tolist()) for _ in range(200)}
    assert len(seen) == 8 and random_orientation(flat, g).shape == flat.shape


def test_pairs_from_a_file_anatomy_show_it_cut_into_parts(tmp_path):
    """Both sides are the file's anatomy (its two labels and background, deformed); with
    ``anatomy_parts`` each label is cut into parts that map back to it; seeds repeat."""
    from napari_deepwarp.core.synth import file_anatomy

    _write_anatomy(tmp_path / "anatomy.nii.gz")
    s = SynthSettings(shape=(24, 24, 24), anatomy=str(tmp_path / "anatomy.nii.gz"), background=1)
    pair = synthetic_pair(s, batch=2, seed=5)
    assert torch.equal(pair["fixed"], synthetic_pair(s, batch=2, seed=5)["fixed"])
    for key in ("moving_labels", "fixed_labels"):
        assert set(pair[key].unique().tolist()) == {0, 1, 2}
    # the background (label 0) stays the dark surround: its mean intensity is below the rest's
    for side in ("moving", "fixed"):
        labels = pair[f"{side}_labels"]
        assert pair[side][labels == 0].mean() < pair[side][labels > 0].mean()
    whole = file_anatomy(s, 3, torch.Generator().manual_seed(7), "cpu")
    s3 = SynthSettings(**{**s.__dict__, "anatomy_parts": 3})
    parts = file_anatomy(s3, 3, torch.Generator().manual_seed(7), "cpu")
    assert torch.equal(torch.where(parts > 0, (parts - 1) // 3 + 1, 0), whole)
    assert parts.unique().numel() > whole.unique().numel()


def test_anatomy_share_mixes_file_and_blob_anatomies(tmp_path):
    """``anatomy_share``: that share of batches show the file's anatomy (three labels at most),
    the rest random blobs (many labels)."""
    _write_anatomy(tmp_path / "anatomy.nii.gz")
    s = SynthSettings(
        shape=(16, 16, 16), anatomy=str(tmp_path / "anatomy.nii.gz"), anatomy_share=0.5
    )
    counts = [synthetic_pair(s, seed=i)["fixed_labels"].unique().numel() for i in range(40)]
    from_file = sum(n <= 3 for n in counts)
    assert 10 <= from_file <= 30 and all(n <= 3 or n >= 8 for n in counts)


def test_fixed_affine_off_frames_the_fixed_side_and_moves_only_the_moving_one(tmp_path):
    """``fixed_affine=False``: the fixed labels are the file's anatomy on its framing grid
    (no displacement asked for here), and the moving side carries the whole affine, which the
    true field undoes; with it on (the default) neither side is the plain anatomy."""
    from napari_deepwarp.core.synth import _anatomy_on_grid

    path = tmp_path / "anatomy.nii.gz"
    _write_anatomy(path)
    on_grid = torch.from_numpy(_anatomy_on_grid(str(path), (24, 24, 24)))
    s = SynthSettings(
        shape=(24, 24, 24), anatomy=str(path), displacement=0.0, rotation=20, translation=3
    )
    framed = SynthSettings(**{**s.__dict__, "fixed_affine": False})
    all_orientations = [
        on_grid.flip([a for a in range(3) if flips >> a & 1]).permute(*axes)
        for flips in range(8)
        for axes in itertools.permutations(range(3))
    ]
    orientations = set()
    for seed in range(6):
        pair = synthetic_pair(framed, seed=seed, field=True)
        fixed = pair["fixed_labels"][0, 0]
        # the fixed side is the framed anatomy in one of its axis-aligned orientations
        assert any(torch.equal(fixed, o) for o in all_orientations)
        orientations.add(tuple(fixed.flatten().tolist()))
        assert not torch.equal(pair["moving_labels"], pair["fixed_labels"])
        # ... and the true field registers the moving side onto it
        back = spatial.warp(pair["moving_labels"].float(), pair["field"], mode="nearest")
        assert mean_dice(back.long(), pair["fixed_labels"]) > 0.9
        jittered = synthetic_pair(s, seed=seed)["fixed_labels"][0, 0]
        assert not any(torch.equal(jittered, o) for o in all_orientations)
    assert len(orientations) > 1


def test_parts_per_side_cuts_each_side_its_own_way_and_returns_the_tissues(tmp_path):
    """``parts_per_side``: a pair with no motion and one contrast still differs inside each
    tissue (each side has its own parts), while its label maps are the uncut tissues, equal on
    both sides; cutting once (the default) gives two identical images. With one part the
    setting changes nothing."""
    path = tmp_path / "anatomy.nii.gz"
    _write_anatomy(path)
    s = SynthSettings(
        shape=(24, 24, 24),
        anatomy=str(path),
        anatomy_parts=4,
        same_contrast=True,
        still=1.0,
        bias=0.0,
        blur=(0.0, 0.0),
        noise=(0.0, 0.0),
        gamma=0.0,
    )
    per_side = replace(s, parts_per_side=True)
    for seed in range(3):
        once, twice = synthetic_pair(s, seed=seed), synthetic_pair(per_side, seed=seed)
        assert torch.equal(once["moving"], once["fixed"])
        assert once["fixed_labels"].unique().numel() > 3  # parts: more than 0, 5 and 9
        assert torch.equal(twice["moving_labels"], twice["fixed_labels"])
        assert twice["fixed_labels"].unique().tolist() == [0, 1, 2]
        differs = twice["moving"] != twice["fixed"]
        assert differs[twice["fixed_labels"] == 1].float().mean() > 0.2
        assert not differs[twice["fixed_labels"] == 0].any()
        for side in ("moving", "fixed"):  # several intensities inside one tissue
            assert twice[side][twice["fixed_labels"] == 2].unique().numel() > 1
    one = replace(s, anatomy_parts=1)
    one_per_side = replace(one, parts_per_side=True)
    for key, value in synthetic_pair(one, seed=5).items():
        assert torch.equal(value, synthetic_pair(one_per_side, seed=5)[key]), key


def test_anatomy_zoom_crops_the_anatomy_framed_up_to_that_many_times_larger(tmp_path):
    """``anatomy_zoom=3``: each batch's anatomy is a crop of the file's anatomy framed on a grid
    one, two or three times ``shape`` (all three drawn over some seeds), so its structures are
    larger in voxels on average; the default (1) leaves the anatomy as before."""
    from napari_deepwarp.core.synth import _anatomy_on_grid, file_anatomy

    path = tmp_path / "anatomy.nii.gz"
    _write_anatomy(path)
    shape = (12, 12, 12)
    s = SynthSettings(shape=shape, anatomy=str(path), world_axes=True)
    zoomed = replace(s, anatomy_zoom=3)
    framed = {
        z: torch.from_numpy(_anatomy_on_grid(str(path), tuple(n * z for n in shape), "world"))
        for z in (1, 2, 3)
    }
    n = shape[0]
    crops = {z: f.unfold(0, n, 1).unfold(1, n, 1).unfold(2, n, 1) for z, f in framed.items()}
    zooms, ball = [], {1: [], 3: []}
    for seed in range(12):
        plain = file_anatomy(s, 2, torch.Generator().manual_seed(seed), "cpu")
        assert torch.equal(plain[0, 0], framed[1]) and torch.equal(plain[1, 0], framed[1])
        labels = file_anatomy(zoomed, 2, torch.Generator().manual_seed(seed), "cpu")
        assert labels.shape == (2, 1, *shape)
        found = [z for z in (1, 2, 3) if (crops[z] == labels[0, 0]).flatten(3).all(3).any()]
        assert found, "not a crop of the anatomy at any zoom"
        zooms.append(found[-1])
        if found[-1] in ball:
            ball[found[-1]].append(float((labels == 2).float().mean()))
    assert set(zooms) == {1, 2, 3}
    # the ball fills a larger share of a 3x crop when the crop holds it at all
    assert max(ball[3]) > max(ball[1])


def test_dark_paints_one_whole_tissue_as_the_background(tmp_path):
    """``dark=1``: every image shows one tissue -- with ``anatomy_parts``, all parts of one of
    the file's labels -- at the background's intensity, the others not; the default shows
    none so."""
    path = tmp_path / "anatomy.nii.gz"
    _write_anatomy(path)
    plain = {"bias": 0.0, "blur": (0.0, 0.0), "noise": (0.0, 0.0), "gamma": 0.0, "background": 1.0}
    s = SynthSettings(
        shape=(24, 24, 24), anatomy=str(path), anatomy_parts=4, parts_per_side=True, **plain
    )
    blobs = SynthSettings(shape=(24, 24, 24), labels=(6, 6), **plain)

    def dark_tissues(pair, side):
        labels, image = pair[f"{side}_labels"], pair[side]
        return [t for t in labels.unique().tolist() if t and not image[labels == t].any()]

    darkened = set()
    for seed in range(8):
        for side in ("moving", "fixed"):
            dark = dark_tissues(synthetic_pair(replace(s, dark=1.0), seed=seed), side)
            assert len(dark) == 1  # all four parts of one tissue, the other tissue shown
            darkened.update(dark)
            assert dark_tissues(synthetic_pair(s, seed=seed), side) == []
            assert len(dark_tissues(synthetic_pair(replace(blobs, dark=1.0), seed=seed), side)) == 1
            assert dark_tissues(synthetic_pair(blobs, seed=seed), side) == []
    assert darkened == {1, 2}


def test_fov_cuts_the_moving_image_at_its_faces_and_leaves_the_rest_of_the_pair():
    """``fov=1``: every moving image is 0 in one or two slabs at faces of the grid, at most
    ``fov_depth`` of the axis deep, and equal to the uncut image elsewhere; the fixed image and
    both label maps are those of the same seed without the setting."""
    s = replace(SMALL, noise=(0.0, 0.0), background=0.0)
    for seed in range(6):
        plain = synthetic_pair(s, batch=2, seed=seed)
        cut = synthetic_pair(replace(s, fov=1.0, fov_depth=0.3), batch=2, seed=seed)
        for key in ("fixed", "moving_labels", "fixed_labels"):
            assert torch.equal(cut[key], plain[key])
        changed = cut["moving"] != plain["moving"]
        assert changed.any() and (cut["moving"][changed] == 0).all()
        for item in range(2):
            zero = (cut["moving"][item, 0] == 0) & (plain["moving"][item, 0] > 0)
            # every changed voxel lies in a slab touching a face, no deeper than 30 % of its axis
            faces = torch.zeros_like(zero)
            for axis, n in enumerate(zero.shape):
                depth = int(0.3 * n)
                for part in (slice(0, depth), slice(n - depth, n)):
                    index = [slice(None)] * 3
                    index[axis] = part
                    faces[tuple(index)] = True
            assert zero.any() and not (zero & ~faces).any()
    # the default cuts nothing: no face of the moving image is 0 all over
    moving = synthetic_pair(s, seed=0)["moving"][0, 0]
    for face in (
        moving[0],
        moving[-1],
        moving[:, 0],
        moving[:, -1],
        moving[..., 0],
        moving[..., -1],
    ):
        assert face.any()
