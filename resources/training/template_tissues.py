"""Write a brain template's tissue classes as a label map, the anatomy of brain-shaped pairs.

The MNI ICBM152 2009a template (Fonov et al., NeuroImage 2011) comes with nilearn
(``pip install nilearn``; not a dependency of napari-deepwarp): a skull-stripped T1 and grey- and
white-matter probability maps, 197 x 233 x 189 at 1 mm. Inside the brain (T1 > 0) each voxel
gets the most likely class, with cerebrospinal fluid as what grey and white matter leave:

    0 background, 1 cerebrospinal fluid, 2 grey matter, 3 white matter

Used by ``deepwarp train --synth anatomy=PATH`` (see resources/training/README.md). Nothing of
the template is shipped: only networks trained on pairs drawn from it.

Usage: python resources/training/template_tissues.py OUT.nii.gz
"""

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def template_file(kind: str) -> Path:
    import nilearn

    name = f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
    return Path(nilearn.__file__).parent / "datasets" / "data" / name


def tissue_labels() -> sitk.Image:
    """The template's tissue classes (uint8, the template's grid)."""
    t1 = sitk.ReadImage(str(template_file("t1")))
    gm, wm = (sitk.GetArrayFromImage(sitk.ReadImage(str(template_file(k)))) for k in ("gm", "wm"))
    gm, wm = gm.astype(np.float32) / 255, wm.astype(np.float32) / 255
    csf = np.clip(1 - gm - wm, 0, 1)
    labels = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
    labels[sitk.GetArrayFromImage(t1) == 0] = 0
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(t1)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    image = tissue_labels()
    sitk.WriteImage(image, sys.argv[1], useCompression=True)
    counts = np.bincount(sitk.GetArrayFromImage(image).ravel(), minlength=4)
    print(sys.argv[1], "voxels per class (background, CSF, GM, WM):", counts.tolist())
