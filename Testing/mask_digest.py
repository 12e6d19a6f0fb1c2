"""Print a digest of the bundled model's mask for each CT, to check that a change leaves the output identical.

    python Testing/mask_digest.py ../shared/data/3Dircadb1/3Dircadb1.17 \
        LiverSegUNet/LiverSegUNetLib/sample_data/totalseg_example_ct

Run it on two commits (or two checkouts, with PYTHONPATH=<checkout>/LiverSegUNet) on the same
machine and compare: the same digest means the same mask, voxel for voxel. Digests are compared on
one machine only; another CPU may round bfloat16 differently.
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np
from LiverSegUNetLib.inference import segment
from LiverSegUNetLib.io import read_volume
from LiverSegUNetLib.weights import load_model


def main(paths: list[str]) -> int:
    model = load_model(device="cpu")
    for path in paths:
        ct = read_volume(path)
        for postprocess in (True, False):
            result = segment(ct, model, device="cpu", postprocess=postprocess)
            digest = hashlib.sha256(np.packbits(result.mask.array)).hexdigest()[:16]
            print(f"{path} postprocess={postprocess} {result.precision} {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
