"""Score liver models on held-out patients made to look like other CTs: thick or thin slices, no contrast (two
mappings), the arterial phase, low dose, another pixel size (finer, or coarse and area-averaged), a sharp
reconstruction kernel. Each variant goes through the product's own ``segment()`` on its own grid, and the Dice is
taken against the expert mask carried to that grid. Run from the repository root with the project installed:

    python -m training.robustness --runs training/runs/loo                    # every leave-one-out fold's model
    python -m training.robustness --runs training/runs/loo --experiments liver_scratch_msd
    python -m training.robustness --model LiverSegUNet/LiverSegUNetLib/models/liver_unet2d.json   # any model card
    python -m training.robustness ... --conditions native,unenhanced -o training/results/robustness.json
    python -m training.robustness --runs training/runs/loo --ensemble liver_multi+liver_robust
    python -m training.robustness --runs training/runs/loo --experiments liver_elastic --thresholds 0.4,0.5
    python -m training.robustness --runs training/runs/loo --experiments liver_robust --openings 0,6,7.5
    python -m training.robustness --runs training/runs/loo --experiments liver_general --explain   # where it errs
    python -m training.robustness --runs training/runs/loo --experiments liver_general_avg --floors 0,90
    python -m training.robustness --runs training/runs/loo --experiments liver_general_avg --floors 60 --slices 0,1.6

With ``--runs``, each fold's model is scored on the patient it did not see (its card's
``test_patients``); ``--ensemble A+B`` scores instead, per fold, the ensemble of those experiments'
fold models (the mean of their liver logits, as ``training.export`` builds an ensemble card). With
``--model``, on the patients given (default: all), which may include patients it was trained on (the
table says so). ``--thresholds`` scores every model at each of those probability thresholds instead of
its card's (named ``model@threshold``), ``--openings`` at each radius of the clean-up's thin-bridge cut
(``model@open<mm>``), ``--views`` in each set of directions (``model@views=axial``), ``--floors`` at each liver
floor (``model@floor=90``: a liver found darker than that is run again with the soft tissue raised), ``--slices``
at each slice distance (``model@slices=1.6``: thicker slices are run on slices interpolated between them; with
``--floors``, ``model@floor=60@slices=1.6``). Writes the JSON and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from LiverSegUNetLib.inference import segment
from LiverSegUNetLib.io.ircadb import IrcadbPatient, default_data_root
from LiverSegUNetLib.metrics import dice
from LiverSegUNetLib.preprocess import FULL_UNTIL_HU, MIN_SLICE_MM, VIEWS
from LiverSegUNetLib.volume import Volume
from LiverSegUNetLib.weights import load_model

from training import appearance, labels, overlap

Variant = Callable[[Volume, Volume, dict, np.random.Generator], tuple[Volume, Volume]]


def _thick(mm: float) -> Variant:
    return lambda ct, liver, masks, rng: (
        appearance.thick_slices(ct, mm),
        appearance.thick_slices(liver, mm, is_mask=True),
    )


def _pixels(mm: float) -> Variant:
    return lambda ct, liver, masks, rng: (
        appearance.in_plane_pixels(ct, mm),
        appearance.in_plane_pixels(liver, mm, is_mask=True),
    )


def _coarse(mm: float, slices_mm: float = 0.0) -> Variant:
    def variant(ct, liver, masks, rng):
        ct, liver = appearance.coarse_pixels(ct, mm), appearance.coarse_pixels(liver, mm, is_mask=True)
        return _thick(slices_mm)(ct, liver, masks, rng) if slices_mm else (ct, liver)

    return variant


def _unenhanced_thick(mm: float) -> Variant:
    return lambda ct, liver, masks, rng: _thick(mm)(appearance.unenhanced(ct, masks, rng), liver, masks, rng)


#: Condition name -> (what it simulates, how the CT and its liver mask are changed).
CONDITIONS: dict[str, tuple[str, Variant]] = {
    "native": (
        "as acquired (contrast-enhanced, 1.6 mm slices, 0.57-0.78 mm pixels)",
        lambda ct, liver, masks, rng: (ct, liver),
    ),
    "thick_3mm": ("3 mm slices (contiguous slabs averaged from the thin ones)", _thick(3.0)),
    "thick_5mm": ("5 mm slices (contiguous slabs averaged from the thin ones)", _thick(5.0)),
    "thin_0.8mm": (
        "0.8 mm slices (interpolated, with the noise of thinner slices; appearance.thin_slices): neighbouring "
        "slices half as far apart as in training",
        lambda ct, liver, masks, rng: (
            appearance.thin_slices(ct, 0.8, rng),
            appearance.thin_slices(liver, 0.8, is_mask=True),
        ),
    ),
    "unenhanced": (
        "no intravenous contrast (liver 55, spleen 45, vessels 40 HU; training/appearance.py)",
        lambda ct, liver, masks, rng: (appearance.unenhanced(ct, masks, rng), liver),
    ),
    "unenhanced_3mm": ("no contrast and 3 mm slices", _unenhanced_thick(3.0)),
    "unenhanced_dark": (
        "no contrast, darker: liver 45, spleen 36, vessels 36 HU (an unenhanced CT from another hospital; "
        "appearance.DARK_UNENHANCED_HU)",
        lambda ct, liver, masks, rng: (
            appearance.unenhanced(ct, masks, rng, targets=appearance.DARK_UNENHANCED_HU),
            liver,
        ),
    ),
    "arterial": (
        "late arterial phase: liver 75, spleen 120, aorta 300, portal vein 140, hepatic veins 60 HU, the rest as "
        "acquired (appearance.ARTERIAL_HU)",
        lambda ct, liver, masks, rng: (appearance.arterial(ct, masks, rng), liver),
    ),
    "low_dose": (
        f"low dose: +{appearance.LOW_DOSE_NOISE_HU:g} HU correlated noise",
        lambda ct, liver, masks, rng: (appearance.low_dose(ct, rng), liver),
    ),
    "pixel_1.0mm": ("1.0 mm pixels (resampled over the same field of view)", _pixels(1.0)),
    "pixel_0.6mm": ("0.6 mm pixels (resampled over the same field of view)", _pixels(0.6)),
    "pixel_2mm": (
        "2 mm pixels, area-averaged (a small reconstruction matrix or a downsampled export; training/appearance.py)",
        _coarse(2.0),
    ),
    "voxels_3mm": (
        "3 mm voxels: 3 mm pixels, area-averaged, and 3 mm slices (a low-resolution series)",
        _coarse(3.0, 3.0),
    ),
    "sharp_kernel": (
        f"a sharp reconstruction kernel (in-plane unsharp masking, {appearance.SHARP_AMOUNT:g} x the detail finer "
        f"than {appearance.SHARP_SIGMA_MM:g} mm: about 3 x the noise)",
        lambda ct, liver, masks, rng: (appearance.sharp_kernel(ct), liver),
    ),
}


def variants(patient: IrcadbPatient, conditions: list[str], seed: int = 0):
    """Yield ``(condition, ct, liver)`` for one patient, each made from the original with a fixed seed."""
    ct = patient.ct
    masks = appearance.masks_of(patient)
    liver = ct.with_array(masks["liver"])
    for condition in conditions:
        rng = np.random.default_rng([seed, sum(map(ord, patient.name + condition))])
        yield (condition, *CONDITIONS[condition][1](ct, liver, masks, rng))


def flip_tta(network, device: str):
    """A runtime that averages the network's logits on each slice and on its left-right mirror (2x the compute)."""
    from LiverSegUNetLib.runtime import runtime_network

    plain = runtime_network(network, device)

    def run(x):
        return (plain.run(x) + plain.run(x.flip(-1)).flip(-1)) / 2

    return plain._replace(run=run, precision=plain.precision + " flip-TTA")


#: The zooms of :func:`scale_tta`: inside the training's random scale (0.85-1.2), so each is a view it has seen.
TTA_SCALES = (0.9, 1.0, 1.1)


def _deepest(network) -> int:
    """2 ** the deepest pooling level of ``network`` (of any member of an ensemble): what its input sides divide by."""
    depths = [m.depth for m in network.modules() if hasattr(m, "depth") and isinstance(m.depth, int)]
    return 2 ** max(depths)


def scale_tta(network, device: str, scales=TTA_SCALES):
    """A runtime that averages the network's logits on each slice zoomed by each of ``scales`` (bilinear, padded
    to what the network divides by) and brought back to the slice's pixels (``len(scales)`` x the compute,
    more for zooms above 1)."""
    import torch.nn.functional as F
    from LiverSegUNetLib.runtime import runtime_network

    plain = runtime_network(network, device)
    multiple = _deepest(network)

    def run(x):
        h, w = x.shape[-2:]
        total = None
        for scale in scales:
            size = (round(h * scale), round(w * scale))
            zoomed = x if size == (h, w) else F.interpolate(x.float(), size=size, mode="bilinear").to(x.dtype)
            padded = F.pad(zoomed, (0, -size[1] % multiple, 0, -size[0] % multiple))
            logits = plain.run(padded)[..., : size[0], : size[1]].float()
            back = logits if size == (h, w) else F.interpolate(logits, size=(h, w), mode="bilinear")
            total = back if total is None else total + back
        return (total / len(scales)).to(x.dtype)

    return plain._replace(run=run, precision=plain.precision + " scale-TTA")


#: ``--tta`` choices: how each slice's logits are averaged over transformed copies of it.
TTA = {"flip": flip_tta, "scale": scale_tta}


#: Expert masks that are not "beside the liver": the liver itself, and the whole body (3D-IRCADb's ``skin``).
NOT_BESIDE = ("liver", "skin")
#: An expert structure is named in what a segmentation added when it holds at least this share (%) of the liver.
BESIDE_SHARE = 0.5


def expert_map(patient: IrcadbPatient) -> tuple[np.ndarray, list[str]]:
    """The patient's expert masks other than :data:`NOT_BESIDE` as one uint8 label map (label ``n`` is
    ``names[n - 1]``, the expert's own mask name; where masks overlap the later name wins) and those names."""
    names = [o for o in patient.organs if o not in NOT_BESIDE]
    out = np.zeros(patient.ct.shape, np.uint8)
    for label, name in enumerate(names, start=1):
        out[patient.mask(name).array > 0] = label
    return out, names


def errors(
    mask: np.ndarray,
    reference: np.ndarray,
    hu: np.ndarray,
    tumours: np.ndarray | None = None,
    beside: tuple[np.ndarray, list[str]] | None = None,
) -> str:
    """Where a segmentation is wrong: the missed (false negative) and the added (false positive) voxels, each
    as a share of the reference volume and with its median HU, beside the reference's median HU; with
    ``tumours`` (the expert's liver tumours, on the same grid), also the share of the reference missed in them;
    with ``beside`` (:func:`expert_map`, on the same grid), the expert structures the added voxels lie in, each
    that holds at least :data:`BESIDE_SHARE` % of the reference, largest first."""
    seg, ref = mask > 0, reference > 0
    volume = max(int(ref.sum()), 1)
    parts = [f"reference median {np.median(hu[ref]):.0f} HU"]
    for name, wrong in (("missed", ref & ~seg), ("added", seg & ~ref)):
        share = 100 * wrong.sum() / volume
        parts.append(f"{name} {share:.1f}%" + (f" at median {np.median(hu[wrong]):.0f} HU" if wrong.any() else ""))
        if name == "missed" and tumours is not None:
            inside = tumours > 0
            parts[-1] += (
                f" ({100 * (wrong & inside).sum() / volume:.1f}% in its tumours of {100 * inside.sum() / volume:.1f}%)"
            )
        if name == "added" and beside is not None and wrong.any():
            labels_map, names = beside
            shares = 100 * np.bincount(labels_map[wrong], minlength=len(names) + 1)[1:] / volume
            named = sorted(((s, n) for s, n in zip(shares, names) if s >= BESIDE_SHARE), reverse=True)
            if named:
                parts[-1] += " (" + ", ".join(f"{s:.1f}% in its {n}" for s, n in named) + ")"
    return ", ".join(parts)


def same_grid(mask: np.ndarray | None, original: Volume, ct: Volume) -> np.ndarray | None:
    """``mask`` (on the ``original`` CT's grid) when the variant ``ct`` kept that grid, else None."""
    kept = original.shape == ct.shape and np.allclose(original.spacing_mm, ct.spacing_mm)
    return mask if mask is not None and kept else None


def _on_grid(tumours, beside, original: Volume, ct: Volume) -> tuple:
    """The expert's tumours and :func:`expert_map` for :func:`errors`, each None where the variant changed the grid."""
    label_map = same_grid(beside[0], original, ct) if beside is not None else None
    return same_grid(tumours, original, ct), (label_map, beside[1]) if label_map is not None else None


def score(
    models: dict[str, list[tuple[object, str]]],
    data: Path,
    conditions: list[str],
    device: str,
    runtime=None,
    explain: bool = False,
) -> dict:
    """``{model name: {condition: {patient: dice}}}``; each model is a list of (loaded model, patient) pairs.

    ``runtime`` is passed to ``segment()`` (e.g. :func:`flip_tta`); ``explain`` adds :func:`errors` to each
    printed line."""
    by_patient: dict[str, list[tuple[str, object]]] = {}
    for name, pairs in models.items():
        for model, patient in pairs:
            by_patient.setdefault(patient, []).append((name, model))
    results: dict = {name: {c: {} for c in conditions} for name in models}
    for patient_name, entries in by_patient.items():
        patient = IrcadbPatient(data / "3Dircadb1" / patient_name)
        tumours = labels.targets(patient, ["liver_tumours"])[0] if explain else None
        beside = expert_map(patient) if explain else None
        original = patient.ct
        for condition, ct, liver in variants(patient, conditions):
            for name, model in entries:
                t = time.perf_counter()
                seg = segment(ct, model, device=device, runtime=runtime)
                value = dice(seg.mask.array, liver.array)
                results[name][condition][patient_name] = round(float(value), 4)
                print(
                    f"{name} {patient_name} {condition}: Dice {value:.4f} "
                    f"({ct.shape[0]} slices of {ct.spacing_mm[2]:.1f} mm, {time.perf_counter() - t:.1f} s)"
                    + (
                        f"; {errors(seg.mask.array, liver.array, ct.array, *_on_grid(tumours, beside, original, ct))}"
                        if explain
                        else ""
                    ),
                    flush=True,
                )
    return results


def table(results: dict, conditions: list[str], note: str = "", marked: set[str] = frozenset()) -> str:
    """Markdown: one table per model, a row per condition, Dice per patient and the mean; the ``marked``
    models' fold runs may have seen their held-out patient's own extra 2D slices."""
    lines = []
    for name, per_condition in results.items():
        patients = sorted(
            {p for c in per_condition.values() for p in c}, key=lambda p: [int(t) for t in p.split(".")[1:]]
        )
        lines += [
            f"**{name}**{overlap.MARK if name in marked else ''}",
            "",
            "| condition | " + " | ".join(patients) + " | mean | worst |",
            "|---" * (len(patients) + 3) + "|",
        ]
        for condition in (c for c in conditions if c in per_condition):
            values = [per_condition[condition].get(p) for p in patients]
            found = [v for v in values if v is not None]
            cells = [f"{v:.3f}" if v is not None else "" for v in values]
            mean = f"{statistics.mean(found):.3f}" if found else ""
            worst = f"{min(found):.3f}" if found else ""
            lines.append(f"| {condition} | " + " | ".join(cells) + f" | {mean} | {worst} |")
        lines.append("")
    lines += ["Conditions:", ""] + [f"- `{c}`: {CONDITIONS[c][0]}" for c in conditions]
    if note:
        lines += ["", note]
    if marked & set(results):
        lines += [
            "",
            f"{overlap.MARK.strip()} Scored with fold models trained before runs left out the msd_liver_2d slices"
            " of their",
            "held-out patient (LiTS includes 3D-IRCADb-01; `training/overlap.py`), or before that was checked: these",
            "numbers may be flattered.",
        ]
    return "\n".join(lines) + "\n"


def clean_models(runs: Path, names: list[str]) -> list[str]:
    """Those of ``names`` (experiments, ``ensemble:A+B``, either with ``@threshold``) whose every fold run
    under ``runs`` was trained without its held-out patient's own extra 2D slices."""
    clean = []
    for name in names:
        members = name.split("@")[0].removeprefix("ensemble:").split("+")
        cards = [card for m in members for card in runs.glob(f"*/{m}/model.json")]
        if cards and not any(overlap.saw_own_slices(json.loads(c.read_text())["provenance"]) for c in cards):
            clean.append(name)
    return clean


def loo_models(runs: Path, experiments: list[str], device: str) -> dict[str, list[tuple[object, str]]]:
    """Each experiment's fold models under ``runs/<patient>/<experiment>/model.json``, with their test patient.
    An experiment named ``<experiment>/last`` is a weight-averaged run's last weights (``average_from``)."""
    found: dict[str, list] = {}
    kept = [card for e in experiments if "/" in e for card in runs.glob(f"*/{e}/model.json")]
    for card in sorted(runs.glob("*/*/model.json")) + sorted(kept):
        experiment = "/".join(card.relative_to(runs).parts[1:-1])
        if (experiments and experiment not in experiments) or experiment.startswith("bone"):
            continue
        model = load_model(card, device=device)
        for patient in model.card["provenance"]["test_patients"]:
            found.setdefault(experiment, []).append((model, patient))
    if not found:
        raise SystemExit(
            f"no leave-one-out liver models under {runs}; run python -m training.experiments --stage loo first"
        )
    return found


def fold_ensembles(runs: Path, ensembles: list[str], device: str) -> dict[str, list[tuple[object, str]]]:
    """Per ``A+B+...``, each fold's ensemble of those experiments' liver models, with the fold's test patient."""
    from LiverSegUNetLib.weights import LoadedModel, model_card

    from training.export import ensemble_of

    found: dict[str, list] = {}
    for spec in ensembles:
        members = spec.split("+")
        for fold in sorted(p for p in runs.iterdir() if p.is_dir()):
            cards = [fold / m / "model.json" for m in members]
            if not all(c.exists() for c in cards):
                continue
            models = [load_model(c, device=device) for c in cards]
            network, structures, plan = ensemble_of(models, [models[0].structures[0].name])
            card = model_card(network, plan, f"ensemble:{spec}", structures)
            card["provenance"] = models[0].card["provenance"]
            model = LoadedModel(network.eval().to(device), plan, card, fold)
            for patient in card["provenance"]["test_patients"]:
                found.setdefault(f"ensemble:{spec}", []).append((model, patient))
        if f"ensemble:{spec}" not in found:
            raise SystemExit(f"--ensemble {spec}: no fold under {runs} has all of {members}")
    return found


def parse_views(text: str) -> list[tuple[str, ...]]:
    """``--views``: comma-separated sets of directions, each joined by ``+`` (``axial,axial+coronal``); a
    ValueError says what is wrong."""
    views = [tuple(v.strip().split("+")) for v in text.split(",") if v.strip()]
    if any(set(v) - set(VIEWS) or len(set(v)) != len(v) for v in views):
        raise ValueError(f"--views {text!r}: each set is one or more of {', '.join(VIEWS)} joined by +, each once")
    return views


def parse_numbers(text: str, option: str, valid: Callable[[float], bool], hint: str) -> list[float]:
    """Comma-separated numbers for ``option``, each ``valid``; a ValueError says what is wrong (``hint``)."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = None
    if values is None or not all(valid(v) for v in values):
        raise ValueError(f"{option} {text!r}: {hint}")
    return values


def parse_floors(text: str) -> list[float]:
    """``--floors``: comma-separated liver floors in HU (0: off), each the plan's ``liver_floor_hu``; a ValueError
    says what is wrong."""
    hint = f"give liver floors in HU from 0 (off) to below {FULL_UNTIL_HU:g}, e.g. 0,60"
    return parse_numbers(text, "--floors", lambda f: 0 <= f < FULL_UNTIL_HU, hint)


def parse_slices(text: str) -> list[float]:
    """``--slices``: comma-separated slice distances in mm (0: off), each the plan's ``slice_mm``; a ValueError
    says what is wrong."""
    hint = f"give slice distances in mm, 0 (off) or from {MIN_SLICE_MM:g}, e.g. 0,1.6"
    return parse_numbers(text, "--slices", lambda v: v == 0 or v >= MIN_SLICE_MM, hint)


def at_plan_values(models: dict[str, list[tuple[object, str]]], key: str, values: list, tag: str = "") -> dict:
    """Each model once per value of the plan's ``key`` (``threshold``, ``opening_mm``: applied after the network;
    ``views``: the directions it runs in; ``liver_floor_hu``: when it runs again, the soft tissue raised;
    ``slice_mm``: how far apart the slices it reads may lie), named
    ``name@<tag><value>`` (a tuple of views joined by ``+``): the card's plan with that value."""

    def shown(v) -> str:
        return "+".join(v) if isinstance(v, tuple) else f"{v:g}"

    return {
        f"{name}@{tag}{shown(v)}": [
            (dataclasses.replace(m, plan=dataclasses.replace(m.plan, **{key: v})), p) for m, p in pairs
        ]
        for name, pairs in models.items()
        for v in values
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--runs", type=Path, help="leave-one-out runs folder (runs/<patient>/<experiment>/)")
    source.add_argument("--model", type=Path, help="a model card (.json) to score on --patients")
    parser.add_argument(
        "--experiments",
        nargs="*",
        default=[],
        help="with --runs: only these experiments (EXP/last: a weight-averaged run's last weights)",
    )
    parser.add_argument(
        "--ensemble",
        nargs="*",
        default=[],
        help="with --runs: these fold ensembles, each as A+B[+C...] (and only the --experiments named beside them)",
    )
    parser.add_argument("--patients", nargs="*", default=[], help="with --model: patient folder names (default: all)")
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help=f"comma-separated: {', '.join(CONDITIONS)}")
    parser.add_argument("--data", type=Path, default=None, help="folder holding 3Dircadb1/ (default: $LIVERSEG_DATA)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--tta",
        nargs="?",
        const="flip",
        choices=sorted(TTA),
        help="test-time augmentation: flip (alone: --tta; left-right mirror, 2x the compute) or scale "
        f"(zooms {', '.join(f'{z:g}' for z in TTA_SCALES)}, about 3x)",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="also print where each segmentation is wrong: missed and added voxels, their share and median HU, "
        "and (on the patient's own grid) how much of the missed lay in its expert's liver tumours and in which of "
        "its expert's other structures the added lay",
    )
    parser.add_argument(
        "--thresholds", default="", help="comma-separated probability thresholds (0..1) to score instead of the card's"
    )
    parser.add_argument(
        "--openings",
        default="",
        help="comma-separated thin-bridge cut radii in mm (0: largest component only) to score instead of the card's",
    )
    parser.add_argument(
        "--views",
        default="",
        help="comma-separated sets of directions to run the network in instead of the card's, each joined by +, "
        "e.g. axial,axial+coronal+sagittal (named model@views=axial, ...)",
    )
    parser.add_argument(
        "--floors",
        default="",
        help="comma-separated liver floors in HU to score instead of the card's (0: off; a darker liver found is run "
        "again with the soft tissue raised to it), named model@floor=90, ...",
    )
    parser.add_argument(
        "--slices",
        default="",
        help="comma-separated slice distances in mm to score instead of the card's (0: the CT's own; thicker slices "
        "are run on slices interpolated between them), named model@slices=1.6, ...; with --floors, each at each",
    )
    parser.add_argument("-o", "--output", type=Path, help="write the results as JSON here and a .md table beside it")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep what --output holds already: the other models, and the other conditions of the models scored",
    )
    args = parser.parse_args(argv)

    conditions = args.conditions.split(",")
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        parser.error(f"unknown condition(s) {sorted(unknown)}; choose from {', '.join(CONDITIONS)}")
    try:
        thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--thresholds {args.thresholds!r}: give numbers between 0 and 1, e.g. 0.4,0.5")
    if any(not 0 < t < 1 for t in thresholds):
        parser.error(f"--thresholds {args.thresholds!r}: every threshold must lie strictly between 0 and 1")
    try:
        openings = [float(t) for t in args.openings.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--openings {args.openings!r}: give radii in mm, e.g. 0,6,7.5")
    if any(r < 0 for r in openings) or (openings and thresholds):
        parser.error("--openings: radii must be 0 or more, and are not combined with --thresholds")
    try:
        views = parse_views(args.views)
    except ValueError as exc:
        parser.error(str(exc))
    if views and (thresholds or openings):
        parser.error("--views is not combined with --thresholds or --openings")
    try:
        floors = parse_floors(args.floors)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        slices = parse_slices(args.slices)
    except ValueError as exc:
        parser.error(str(exc))
    if (floors or slices) and (thresholds or openings or views):
        parser.error("--floors and --slices are not combined with --thresholds, --openings or --views")
    if args.output and not args.output.parent.is_dir():  # found now, not after the scoring
        parser.error(f"-o {args.output}: the folder {args.output.parent} does not exist; create it or write elsewhere")
    data = args.data or default_data_root()
    if args.runs:
        models = loo_models(args.runs, args.experiments, args.device) if args.experiments or not args.ensemble else {}
        models |= fold_ensembles(args.runs, args.ensemble, args.device)
        note = "Each model is scored on the patient its fold held out."
    else:
        model = load_model(args.model, device=args.device)
        patients = args.patients or sorted(p.name for p in (data / "3Dircadb1").iterdir() if p.is_dir())
        trained_on = set(model.card.get("provenance", {}).get("train_patients", []))
        models = {model.model_id: [(model, p) for p in patients]}
        seen = sorted(trained_on & set(patients))
        note = f"The model was trained on {', '.join(seen)}: those columns are not held out." if seen else ""
    if thresholds:
        models = at_plan_values(models, "threshold", thresholds)
    if openings:
        models = at_plan_values(models, "opening_mm", openings, "open")
    if views:
        models = at_plan_values(models, "views", views, "views=")
    if floors:
        models = at_plan_values(models, "liver_floor_hu", floors, "floor=")
    if slices:
        models = at_plan_values(models, "slice_mm", slices, "slices=")
    t = time.perf_counter()
    results = score(models, data, conditions, args.device, TTA[args.tta] if args.tta else None, args.explain)
    command = "python -m training.robustness " + " ".join(sys.argv[1:] if argv is None else argv)
    clean = clean_models(args.runs, list(results)) if args.runs else list(results)
    if args.merge and args.output and args.output.exists():
        earlier = json.loads(args.output.read_text())
        # a model scored again keeps its other conditions; the file lists every condition any model has
        results = {k: {**earlier["results"].get(k, {}), **v} for k, v in results.items()}
        kept = {k: v for k, v in earlier["results"].items() if k not in results}
        # an entry scored before the check is in no clean list: marked
        clean += [k for k in earlier.get("clean", []) if k in kept]
        results = {**kept, **results}
        conditions = [c for c in CONDITIONS if c in {*earlier["conditions"], *conditions}]
        command = f"{earlier['command']}` then `{command}"
    text = table(results, conditions, note, set(results) - set(clean))
    print(text)
    print(f"({time.perf_counter() - t:.0f} s)")
    if args.output:
        out = {"command": command, "conditions": conditions, "results": results, "clean": clean}
        args.output.write_text(json.dumps(out, indent=1))
        args.output.with_suffix(".md").write_text(f"Written by `{command}`.\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
