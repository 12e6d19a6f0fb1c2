"""The ``liverseg`` command: segment CTs and evaluate segmentations from the shell."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

from . import __version__
from .errors import Cancelled, InputError, LiverSegError, WeightsError

EXIT_INPUT, EXIT_WEIGHTS, EXIT_CANCELLED = 2, 3, 130
#: The reader of standard output went away (``liverseg ... | head``): stop, as a command killed by SIGPIPE does.
EXIT_BROKEN_PIPE = 141


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends a run like Ctrl-C: staged files are removed, finished cases stay


class StageProgress:
    """The progress of a case's named stages on stderr (tqdm), silent when stderr is not a terminal."""

    def __init__(self) -> None:
        self._bar = None

    def __call__(self, stage: str, fraction: float) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=100, file=sys.stderr, disable=None, leave=False, bar_format=BAR_FORMAT)
        self._bar.set_description_str(stage, refresh=False)
        self._bar.n = round(100 * fraction)
        self._bar.refresh()

    def close(self) -> None:
        """Clear the bar (the case's result line follows)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


BAR_FORMAT = "{desc:<12} {bar:30} {percentage:3.0f}% {elapsed}"


def _segment(args: argparse.Namespace) -> int:
    from .measure import describe, raised_note
    from .pipeline import segment_batch
    from .runtime import resolve_device
    from .weights import ACCURATE_MODEL, STRUCTURES_MODEL, load_model

    if args.sample:
        from .sample import sample_ct_path

        args.input = [sample_ct_path(), *args.input]
    if not args.input:
        raise InputError("no input given: name a CT (DICOM folder, NRRD/NIfTI file, ...), or use --sample")
    device = resolve_device(args.device)
    for flag, path, what, how in (
        ("structures", STRUCTURES_MODEL, "multi-structure", "trained by training/ (configs/liver_multi.toml)"),
        ("accurate", ACCURATE_MODEL, "accurate (ensemble)", "built by python -m training.export A.json B.json"),
    ):
        if getattr(args, flag):
            if not path.is_file():
                raise InputError(
                    f"--{flag}: no {what} model is bundled with this version; use the default model, "
                    f"or --model CARD.json with one {how}"
                )
            args.model = path
    t = time.perf_counter()
    model = load_model(args.model, device=device)
    load_s = time.perf_counter() - t
    options = dict(
        model=model,
        formats=tuple(args.format.split(",")),
        device=device,
        postprocess=not args.no_postprocess,
        series_uid=args.series_uid,
        preview=not args.no_preview,
        batch_size=args.batch_size,
        allow_non_ct=args.allow_non_ct,
    )
    single = len(args.input) == 1 and not (args.input[0].is_dir() and _is_study_folder(args.input[0]))
    bar = None if args.quiet else StageProgress()

    def report(row: dict) -> None:
        if bar:
            bar.close()
        if row["status"] == "failed":
            print(f"liverseg: {'error' if single else row['case'] + ': failed'}: {row['reason']}", file=sys.stderr)
        elif row["status"] == "ok" and row["reason"]:
            print(f"liverseg: warning: {row['case']}: {row['reason']}", file=sys.stderr)
        elif not single:
            ml = f"liver {row['liver_volume_ml']:.1f} ml" if row["liver_volume_ml"] is not None else ""
            print(f"{row['case']}: {row['status']} {ml} {row['reason']}".rstrip())

    rows = segment_batch(
        args.input,
        args.output,
        overwrite=args.overwrite,
        on_case=report,
        write_summary=not single,
        **options,
        progress=bar,
    )
    if single and rows[0]["status"] == "ok":
        summary = rows[0]["summary"]
        s = summary["seconds"]
        found = (
            f"liver {summary['liver_volume_ml']:.1f} ml"
            if summary["liver_volume_ml"] is not None
            else describe(summary["structures"])
        )
        print(
            f"{summary['case']}: {found} in {summary['slices']} slices; "
            f"{s['total']:.1f} s (read {s['read']:.1f}, model {s['inference']:.1f}, "
            f"post {s.get('postprocess', 0):.1f}, write {s['write']:.1f}; model load {load_s:.2f}) "
            f"on {summary['device']} {summary['precision']}"
        )
        if len(summary["structures"]) > 1 and summary["liver_volume_ml"] is not None:
            print(f"  {describe(summary['structures'])}")
        if summary["soft_tissue_raised_hu"]:
            print(f"  {raised_note(summary['soft_tissue_raised_hu'])}")
        for kind, name in summary["outputs"].items():
            print(f"  {kind:<9} {Path(args.output) / name}")
    elif not single:
        counts = {k: sum(r["status"] == k for r in rows) for k in ("ok", "skipped", "failed")}
        print(
            f"{len(rows)} cases: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed; "
            f"table in {Path(args.output) / 'batch_summary.json'}"
        )
    return EXIT_INPUT if any(r["status"] == "failed" for r in rows) else 0


def _is_study_folder(path: Path) -> bool:
    from .pipeline import expand_inputs

    return expand_inputs([path]) != [path]


def _evaluate(args: argparse.Namespace) -> int:
    from .io.ircadb import IrcadbPatient, is_ircadb_patient
    from .io.segnrrd import read_mask
    from .metrics import all_metrics

    pred = read_mask(args.prediction, args.segment)
    ref = (
        IrcadbPatient(args.reference).mask(args.organ)
        if is_ircadb_patient(args.reference)
        else read_mask(args.reference)
    )
    if not pred.same_grid(ref, tol_mm=0.01):
        raise InputError(
            f"{args.prediction} and {args.reference} are not on the same voxel grid "
            f"({pred.shape} vs {ref.shape}); resample one onto the other first"
        )
    values = all_metrics(pred.array, ref.array, ref.spacing_mm)
    values["prediction_ml"] = float(pred.array.sum()) * pred.voxel_volume_ml
    values["reference_ml"] = float(ref.array.sum()) * ref.voxel_volume_ml
    if args.json:
        print(
            json.dumps(
                {k: (None if isinstance(v, float) and math.isnan(v) else round(v, 5)) for k, v in values.items()}
            )
        )
    else:
        units = {"assd_mm": " mm", "hd95_mm": " mm", "prediction_ml": " ml", "reference_ml": " ml"}
        for key, value in values.items():
            print(f"{key:<14} {value:.4f}{units.get(key, '')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``liverseg``."""
    parser = argparse.ArgumentParser(
        prog="liverseg", description="Liver segmentation of abdominal CT with a bundled U-Net."
    )
    parser.add_argument("--version", action="version", version=f"liverseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser(
        "segment",
        help="segment the liver of one CT",
        description="Segment the liver of one or many CTs: DICOM series folders, 3D-IRCADb patient folders "
        "(zipped or not), .nrrd/.nii/.nii.gz files, or folders of such studies. Writes <case>.seg.nrrd (and/or "
        "<case>.nii.gz), <case>.preview.png and <case>.summary.json into OUTPUT. With several cases each is "
        "processed on its own: a failing one is reported and skipped, cases already done are skipped "
        "(--overwrite redoes them), and OUTPUT/batch_summary.json lists them all. Exit code: 0 all done, "
        "2 some input failed, 3 model file bad, 130 interrupted (rerun to continue), 141 output pipe closed.",
    )
    seg.add_argument(
        "input",
        type=Path,
        nargs="*",
        help="CT(s): DICOM folder, 3D-IRCADb patient folder, NRRD/NIfTI file, or a folder of such studies",
    )
    seg.add_argument(
        "--sample",
        action="store_true",
        help="also segment the bundled sample CT (20 contrast-enhanced slices, TotalSegmentator example, "
        "Apache-2.0 / CC BY 4.0)",
    )
    seg.add_argument("-o", "--output", type=Path, required=True, help="output folder (created if missing)")
    seg.add_argument(
        "--format",
        default="seg.nrrd",
        help="comma-separated: seg.nrrd, nifti, dicom-seg (DICOM input only; needs highdicom) (default: seg.nrrd)",
    )
    seg.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda (default: auto)")
    seg.add_argument("--no-postprocess", action="store_true", help="keep the raw thresholded network output")
    seg.add_argument("--series-uid", help="SeriesInstanceUID to use when the folder holds several series")
    seg.add_argument("--no-preview", action="store_true", help="do not write the PNG preview")
    which = seg.add_mutually_exclusive_group()
    which.add_argument("--model", type=Path, help="model card (.json) to use instead of the bundled model")
    which.add_argument(
        "--structures",
        action="store_true",
        help="the bundled multi-structure model: liver, tumours, vessels and neighbouring organs as segments",
    )
    which.add_argument(
        "--accurate",
        action="store_true",
        help=(
            "the bundled accurate liver model: the default network and a second one from another training run, "
            "averaged (on the test patients 0.002-0.007 above the default), about 1.5 times the time"
        ),
    )
    seg.add_argument("--batch-size", type=int, default=16, help="slices per network batch (default: 16)")
    seg.add_argument("--overwrite", action="store_true", help="redo cases whose outputs already exist")
    seg.add_argument("--allow-non-ct", action="store_true", help="run on DICOM series whose modality is not CT")
    seg.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    seg.set_defaults(func=_segment)

    ev = sub.add_parser(
        "evaluate",
        help="compare a segmentation with a reference",
        description="Print Dice, VOE, RVD, ASSD and HD95 of PRED against REFERENCE (a labelmap/.seg.nrrd "
        "on the same grid, or a 3D-IRCADb patient folder whose expert mask is used).",
    )
    ev.add_argument("prediction", type=Path, help="predicted mask: .seg.nrrd, .nrrd or .nii.gz")
    ev.add_argument("reference", type=Path, help="reference mask file, or a 3D-IRCADb patient folder")
    ev.add_argument("--organ", default="liver", help="mask to use from a 3D-IRCADb folder (default: liver)")
    ev.add_argument("--segment", default=None, help="segment name to take from a .seg.nrrd prediction")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=_evaluate)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``liverseg``; returns the exit code (0 ok, 2 bad input, 3 bad model, 130 cancelled, 141 stdout closed)."""
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except InputError as exc:
        print(f"liverseg: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except WeightsError as exc:
        print(f"liverseg: model error: {exc}", file=sys.stderr)
        return EXIT_WEIGHTS
    except (Cancelled, KeyboardInterrupt):
        print(
            "liverseg: interrupted; finished cases are kept, the unfinished one left no file "
            "(run the same command again to continue)",
            file=sys.stderr,
        )
        return EXIT_CANCELLED
    except LiverSegError as exc:
        print(f"liverseg: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except BrokenPipeError:
        # what was written is complete (outputs are written whole before their lines are printed); point
        # stdout at nothing so that the interpreter's own flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
