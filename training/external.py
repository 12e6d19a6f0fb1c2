"""Agreement on a CT from another hospital: each model's liver on the bundled sample CT against the liver that
TotalSegmentator draws on it.

    python -m training.external --runs training/runs/loo_rerun --experiments liver_robust liver_deep
    python -m training.external --model LiverSegUNet/LiverSegUNetLib/models/liver_unet2d.json
    python -m training.external --runs training/runs/loo_rerun -o training/runs/external.json
    python -m training.external --runs R --ct CT.nii.gz --reference LABELS.nii.gz --label 5   # another CT

The sample (``LiverSegUNetLib/sample_data/``) comes from University Hospital Basel: another scanner, another
contrast protocol and thicker slices (3 mm at a 2 mm step) than the 3D-IRCADb-01 patients every model here was
trained and tested on, and no 3D-IRCADb-01 fold ever saw it. Its reference
(``training/reference/totalseg_example_ct_liver.nii.gz``, see the README there) is TotalSegmentator's own output
on it, not an expert's mask: Dice against it is agreement with a model trained on about 1200 CTs, which is
itself good to about 0.95-0.97 on the liver. Above that, differences mean little; well below it, the model
leaves out (or adds) tissue one can see in the preview. One CT: a check on how a model transfers, not a score
to rank recipes by to the third decimal.

Each fold model of ``--runs`` is scored (they differ in which two patients they were trained on), as is
any ``--model``; ``--views`` scores each in those sets of directions instead of its card's (as
``training.robustness --views``). The table gives Dice per model and the mean per experiment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from LiverSegUNetLib.inference import segment
from LiverSegUNetLib.io import read_volume
from LiverSegUNetLib.io.segnrrd import read_mask
from LiverSegUNetLib.metrics import dice
from LiverSegUNetLib.outputs import atomic_write_bytes
from LiverSegUNetLib.sample import sample_ct_path
from LiverSegUNetLib.weights import load_model

from training.robustness import at_plan_values, loo_models, parse_floors, parse_slices, parse_views

REFERENCE = Path(__file__).resolve().parent / "reference" / "totalseg_example_ct_liver.nii.gz"


def sample_with_reference(ct_path=None, reference=REFERENCE, label: int = 1):
    """A CT (the bundled sample by default) and the reference liver on its grid: the voxels of ``reference``
    equal to ``label``."""
    from LiverSegUNetLib.io.images import read_image

    ct = read_volume(ct_path or sample_ct_path())
    mask = read_mask(reference) if label == 1 else read_image(reference)
    if not ct.same_grid(mask, tol_mm=0.01):
        raise SystemExit(f"{reference} is not on the CT's voxel grid ({mask.shape} vs {ct.shape})")
    liver = mask.with_array(mask.array == label)
    if not liver.array.any():
        raise SystemExit(f"{reference} has no voxel labelled {label}: give the liver's label with --label")
    return ct, liver


def agreement(
    models: dict[str, list[tuple[object, str]]], device: str = "cpu", case: tuple | None = None
) -> dict[str, dict[str, float]]:
    """``{name: {fold: dice}}``: each model's liver on the sample (or ``case``, a CT and its reference liver)
    against the reference; a fold is named by its held-out patient (``model`` for a model given alone)."""
    ct, liver = case or sample_with_reference()
    results: dict[str, dict[str, float]] = {}
    for name, pairs in models.items():
        for model, fold in pairs:
            value = dice(segment(ct, model, device=device).mask.array, liver.array)
            results.setdefault(name, {})[fold] = round(float(value), 4)
            print(f"{name} {fold}: Dice {value:.4f} against the reference liver", flush=True)
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    """Markdown: a row per experiment, its fold models' Dice and their mean."""
    lines = ["| model | Dice per fold model | mean |", "|---|---|---|"]
    for name, per_fold in results.items():
        cells = ", ".join(f"{fold} {value:.3f}" for fold, value in per_fold.items())
        lines.append(f"| {name} | {cells} | {statistics.mean(per_fold.values()):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--runs", type=Path, help="leave-one-out runs folder (runs/<patient>/<experiment>/)")
    source.add_argument("--model", type=Path, help="a model card (.json)")
    parser.add_argument("--experiments", nargs="*", default=[], help="with --runs: which (default: every liver one)")
    parser.add_argument("--ct", type=Path, help="another CT (DICOM folder, NRRD, NIfTI) instead of the sample")
    parser.add_argument("--reference", type=Path, help="with --ct: its reference mask or label map, same grid")
    parser.add_argument("--label", type=int, default=1, help="the liver's value in --reference (default 1)")
    parser.add_argument(
        "--views",
        default="",
        help="comma-separated sets of directions to run the network in instead of the card's, each joined by +, "
        "e.g. axial,axial+coronal+sagittal (named model@views=axial, ...)",
    )
    parser.add_argument(
        "--floors",
        default="",
        help="comma-separated liver floors in HU to score instead of the card's (as training.robustness --floors)",
    )
    parser.add_argument(
        "--slices",
        default="",
        help="comma-separated slice distances in mm to score instead of the card's (as training.robustness --slices)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-o", "--output", type=Path, help="write the results as JSON here (merged into what is there)")
    args = parser.parse_args(argv)
    try:
        views, floors, slices = parse_views(args.views), parse_floors(args.floors), parse_slices(args.slices)
    except ValueError as exc:
        parser.error(str(exc))
    if args.model:
        models = {args.model.stem: [(load_model(args.model, device=args.device), "model")]}
    else:
        models = loo_models(args.runs, args.experiments, args.device)
    if views:
        models = at_plan_values(models, "views", views, "views=")
    if floors:
        models = at_plan_values(models, "liver_floor_hu", floors, "floor=")
    if slices:
        models = at_plan_values(models, "slice_mm", slices, "slices=")
    if bool(args.ct) != bool(args.reference):
        parser.error("--ct and --reference go together")
    case = sample_with_reference(args.ct, args.reference, args.label) if args.ct else None
    results = agreement(models, args.device, case)
    print(table(results))
    if args.output:
        previous = json.loads(args.output.read_text())["results"] if args.output.exists() else {}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        merged = {"reference": (args.reference or REFERENCE).name, "results": {**previous, **results}}
        atomic_write_bytes(args.output, (json.dumps(merged, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
