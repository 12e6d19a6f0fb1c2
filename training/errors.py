"""Where along the body a liver model errs on one patient: for each slab of slices, the expert liver, what the
model missed and what it added (ml), the median HU of the missed tissue, and the Dice within the slab. The
model runs through the product's own ``segment()``; ``--raw`` shows the network's thresholded output before
the postprocessing (largest component without thin bridges, holes filled). Run from the repository root:

    python -m training.errors --model training/runs/loo/3Dircadb1.17/liver_elastic/model.json --patient 3Dircadb1.17
    python -m training.errors --patient 3Dircadb1.7 --slab-mm 16 --raw       # the bundled model

Slabs are counted along the volume's slice axis (index 0 of the array), first slice first; only slabs that
hold liver in the mask or in the output are listed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from LiverSegUNetLib.inference import segment
from LiverSegUNetLib.io.ircadb import IrcadbPatient, default_data_root
from LiverSegUNetLib.metrics import dice
from LiverSegUNetLib.weights import DEFAULT_MODEL, load_model


def slab_rows(
    reference: np.ndarray, found: np.ndarray, hu: np.ndarray, spacing_k_mm: float, voxel_ml: float, slab_mm: float
) -> list[dict]:
    """Per slab of ``slab_mm`` (at least one slice) along axis 0, the liver in ``reference``, the output
    ``found``'s misses and additions in ml, the median HU of the missed voxels, and the slab's Dice."""
    if reference.shape != found.shape or reference.shape != hu.shape:
        raise ValueError(f"shapes differ: mask {reference.shape}, output {found.shape}, CT {hu.shape}")
    step = max(1, int(round(slab_mm / spacing_k_mm)))
    rows = []
    for first in range(0, reference.shape[0], step):
        ref, out = reference[first : first + step], found[first : first + step]
        if not ref.any() and not out.any():
            continue
        missed = ref & ~out
        rows.append(
            {
                "slices": (first, first + ref.shape[0] - 1),
                "liver_ml": float(ref.sum() * voxel_ml),
                "missed_ml": float(missed.sum() * voxel_ml),
                "added_ml": float((out & ~ref).sum() * voxel_ml),
                "missed_hu": float(np.median(hu[first : first + step][missed])) if missed.any() else None,
                "dice": dice(out, ref),
            }
        )
    return rows


def render(rows: list[dict]) -> str:
    """The rows as a markdown table, with the totals as the last line."""
    lines = ["| slices | liver ml | missed ml | added ml | missed median HU | Dice |", "|---|---|---|---|---|---|"]
    for r in rows:
        hu = "" if r["missed_hu"] is None else f"{r['missed_hu']:.0f}"
        lines.append(
            f"| {r['slices'][0]}-{r['slices'][1]} | {r['liver_ml']:.1f} | {r['missed_ml']:.1f} | {r['added_ml']:.1f} "
            f"| {hu} | {r['dice']:.3f} |"
        )
    total = {k: sum(r[k] for r in rows) for k in ("liver_ml", "missed_ml", "added_ml")}
    lines.append(f"| all | {total['liver_ml']:.1f} | {total['missed_ml']:.1f} | {total['added_ml']:.1f} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model card (.json); default: bundled")
    parser.add_argument("--patient", required=True, help="3D-IRCADb patient folder name, e.g. 3Dircadb1.17")
    parser.add_argument("--data", type=Path, default=None, help="folder holding 3Dircadb1/ (default: $LIVERSEG_DATA)")
    parser.add_argument("--slab-mm", type=float, default=8.0, help="slab thickness in mm (default 8)")
    parser.add_argument("--raw", action="store_true", help="the output before postprocessing")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.slab_mm <= 0:
        parser.error(f"--slab-mm {args.slab_mm}: give a thickness in mm above 0, e.g. 8")
    folder = (args.data or default_data_root()) / "3Dircadb1" / args.patient
    if not folder.is_dir():
        parser.error(f"no patient folder {folder}; name one of 3Dircadb1/ (e.g. 3Dircadb1.17) and check --data")
    patient = IrcadbPatient(folder)
    ct, reference = patient.ct, patient.mask("liver").array > 0
    model = load_model(args.model, device=args.device)
    found = segment(ct, model, device=args.device, postprocess=not args.raw).mask.array > 0
    rows = slab_rows(reference, found, ct.array, ct.spacing_mm[2], ct.voxel_volume_ml, args.slab_mm)
    trained = args.patient in model.card.get("provenance", {}).get("train_patients", [])
    print(f"{model.model_id} on {args.patient}" + (" (a training patient: not held out)" if trained else ""))
    print(f"Dice {dice(found, reference):.3f} ({'before' if args.raw else 'after'} postprocessing)\n")
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
