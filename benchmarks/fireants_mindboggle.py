"""FireANTs (greedy or SyN, cross-correlation, on CPU) on Mindboggle pairs: Dice, folding, time.

    python -m benchmarks.fireants_mindboggle --pairs 1:2 --method syn --out fireants.json

FireANTs is the optimisation-based tool a researcher picks for the best Dice (Jena et al.,
2024). Its pipeline is run as its authors show it: moments, affine (cross-correlation), then
the deformable stage at scales 4, 2, 1 with 200, 100, 50 iterations, Adam at 0.5, a 5-voxel
cross-correlation window. The deformation is written as an ANTs displacement field and applied
with SimpleITK (nearest neighbour) to the moving labels, so Dice is measured exactly as for the
other rows (labels present in both maps, :func:`metrics.overlap_per_label`); folding is the share
of fixed-grid voxels where the determinant of the whole map's Jacobian is <= 0.

FireANTs 1.5.0 pins SimpleITK 2.2.1, which has no wheel for this Python; install it without
its dependencies: ``pip install --no-deps fireants==1.5.0`` (the rest it needs, tqdm and
scipy, comes with the ``bench`` extra's packages). Slow on a CPU (it is built for GPUs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mindboggle"

SCALES = (4, 2, 1)
ITERATIONS = (200, 100, 50)


def _path(i: int, kind: str) -> str:
    return str(DATA / f"oasis_trt20_{i}_{kind}.nii.gz")


def folding_percent(field) -> float:
    """Share (%) of voxels where det(I + du/dx) <= 0 for a physical displacement field image."""
    import SimpleITK as sitk

    u = sitk.GetArrayFromImage(field).astype(np.float64)  # (z, y, x, 3) mm, components x, y, z
    spacing = np.array(field.GetSpacing())
    direction = np.array(field.GetDirection()).reshape(3, 3)
    to_index = np.linalg.inv(direction @ np.diag(spacing))  # d(index)/d(x)
    # du/d(index) along axes x, y, z of the array (axis 2, 1, 0)
    grads = [np.gradient(u, axis=a) for a in (2, 1, 0)]
    du_di = np.stack(grads, axis=-1)  # (..., 3 components, 3 index axes)
    jac = np.eye(3) + du_di @ to_index
    det = np.linalg.det(jac)
    return float((det <= 0).mean() * 100)


def run_pair(fixed: int, moving: int, method: str, threads: int, iterations=ITERATIONS) -> dict:
    import SimpleITK as sitk
    import torch
    from fireants.io.image import BatchedImages, Image
    from fireants.registration.affine import AffineRegistration
    from fireants.registration.greedy import GreedyRegistration
    from fireants.registration.moments import MomentsRegistration
    from fireants.registration.syn import SyNRegistration

    from napari_deepwarp.core.metrics import overlap_per_label

    torch.set_num_threads(threads)
    fixed_b = BatchedImages([Image.load_file(_path(fixed, "t1"), device="cpu")])
    moving_b = BatchedImages([Image.load_file(_path(moving, "t1"), device="cpu")])
    seconds = {}
    start = time.perf_counter()
    moments = MomentsRegistration(scale=4, fixed_images=fixed_b, moving_images=moving_b)
    moments.optimize()
    affine = AffineRegistration(
        [4, 2, 1],
        [200, 100, 50],
        fixed_b,
        moving_b,
        optimizer="Adam",
        optimizer_lr=3e-3,
        cc_kernel_size=5,
        init_rigid=moments.get_affine_init(),
    )
    affine.optimize()
    seconds["affine"] = time.perf_counter() - start
    kind = SyNRegistration if method == "syn" else GreedyRegistration
    deformable = kind(
        scales=list(SCALES),
        iterations=list(iterations),
        fixed_images=fixed_b,
        moving_images=moving_b,
        cc_kernel_size=5,
        deformation_type="compositive",
        smooth_grad_sigma=1.0,
        smooth_warp_sigma=0.25,
        optimizer="Adam",
        optimizer_lr=0.5,
        init_affine=affine.get_affine_matrix().detach(),
    )
    deformable.optimize()
    seconds["total"] = time.perf_counter() - start
    seconds["deformable"] = seconds["total"] - seconds["affine"]
    with tempfile.TemporaryDirectory() as tmp:
        warp_path = str(Path(tmp) / "warp.nii.gz")
        deformable.save_as_ants_transforms([warp_path])
        field = sitk.ReadImage(warp_path, sitk.sitkVectorFloat64)
    fixed_labels = sitk.ReadImage(_path(fixed, "labels"))
    moving_labels = sitk.ReadImage(_path(moving, "labels"))
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))
    warped = sitk.Resample(moving_labels, fixed_labels, transform, sitk.sitkNearestNeighbor)
    per = overlap_per_label(sitk.GetArrayFromImage(fixed_labels), sitk.GetArrayFromImage(warped))
    import fireants

    return {
        "pair": f"{fixed}<-{moving}",
        "method": f"FireANTs {method} {getattr(fireants, '__version__', '1.5.0')}",
        "settings": f"cc 5, scales {SCALES}, iterations {tuple(iterations)}, Adam 0.5, {threads} threads",
        "labels": len(per),
        "dice_after": float(np.mean([v["dice"] for v in per.values()])),
        "folding_percent": folding_percent(field),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="1:2", help="fixed:moving,... subject numbers")
    parser.add_argument("--method", choices=("syn", "greedy"), default="syn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--iterations", default="200,100,50", help="deformable iterations at scales 4, 2, 1"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON, appended to by pair")
    args = parser.parse_args(argv)
    rows = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else []
    for spec in args.pairs.split(","):
        f, m = (int(i) for i in spec.split(":"))
        iterations = tuple(int(n) for n in args.iterations.split(","))
        row = run_pair(f, m, args.method, args.threads, iterations)
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if (r["pair"], r["method"]) != (row["pair"], row["method"])]
        rows.append(row)
        args.out.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
