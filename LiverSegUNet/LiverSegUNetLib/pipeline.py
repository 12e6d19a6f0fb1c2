"""File in, files out: read a CT, segment it, write the requested outputs and a JSON summary."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import Cancelled, InputError, LiverSegError
from .inference import Progress, Segmentation, segment
from .io import case_name, is_ircadb_patient, read_volume
from .io.dicomseg import check_dicom_seg_source, write_dicom_seg
from .io.images import is_image_file
from .io.segnrrd import legend_tsv, write_nifti, write_seg_nrrd
from .measure import measurements
from .outputs import atomic_write_bytes, write_all
from .preview import preview_image, write_png
from .system import machine
from .terminology import LIVER
from .volume import Volume

Writer = Callable[[Path, Volume, Segmentation], None]


@dataclass(frozen=True)
class Format:
    """An output format: its file suffix, how it is written from the CT and the segmentation, and any
    companion files (kind -> (suffix, writer)) written with it."""

    suffix: str
    write: Writer
    check: Callable[[Volume, str], None] | None = None  # refuses an input the format cannot be made from
    companions: dict[str, tuple[str, Writer]] = field(default_factory=dict)


#: Output formats by the name ``--format`` takes.
FORMATS = {
    "seg.nrrd": Format(".seg.nrrd", lambda path, ct, result: write_seg_nrrd(result.masks, path, result.structures)),
    "nifti": Format(
        ".nii.gz",
        lambda path, ct, result: write_nifti(result.masks, path),
        companions={
            "nifti_legend": (".labels.tsv", lambda path, ct, result: path.write_text(legend_tsv(result.structures)))
        },
    ),
    "dicom-seg": Format(
        ".seg.dcm",
        lambda path, ct, result: write_dicom_seg(result.masks, ct, path, result.structures, result.model_id),
        check_dicom_seg_source,
    ),
}

NO_LIVER = "no liver found: is it an abdominal CT that covers the liver?"
#: The structure whose volume the summary and batch table report as ``liver_volume_ml``.
LIVER_NAME = LIVER.name


def output_paths(
    input_path: str | os.PathLike, out_dir: str | os.PathLike, formats: list[str], preview: bool = True
) -> dict[str, Path]:
    """The files a run writes for one input, by kind (``seg.nrrd``, ``nifti``, ``nifti_legend``, ``summary``,
    ``preview``)."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InputError(f"unknown output format(s) {unknown or formats}; choose from {', '.join(FORMATS)}")
    name = case_name(input_path)
    out_dir = Path(out_dir)
    paths = {}
    for f in formats:
        paths[f] = out_dir / f"{name}{FORMATS[f].suffix}"
        paths.update({kind: out_dir / f"{name}{suffix}" for kind, (suffix, _) in FORMATS[f].companions.items()})
    paths["summary"] = out_dir / f"{name}.summary.json"
    if preview:
        paths["preview"] = out_dir / f"{name}.preview.png"
    return paths


def segment_file(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model=None,
    formats: tuple[str, ...] = ("seg.nrrd",),
    device: str = "auto",
    postprocess: bool = True,
    series_uid: str | None = None,
    preview: bool = True,
    batch_size: int = 16,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    allow_non_ct: bool = False,
    runtime=None,
) -> dict:
    """Segment one CT and write its outputs together (all or none); returns the summary dict.

    ``runtime`` is passed to :func:`segment` (the default torch runtime when None).
    """
    t_start = time.perf_counter()
    paths = output_paths(input_path, out_dir, list(formats), preview)
    ct = read_volume(input_path, series_uid, allow_non_ct)
    for f in formats:
        if FORMATS[f].check:
            FORMATS[f].check(ct, str(input_path))
    t_read = time.perf_counter() - t_start
    if progress:  # only once the input is read: a bad path gets its error line alone
        progress("read", 1.0)
    result = segment(
        ct,
        model,
        device=device,
        postprocess=postprocess,
        batch_size=batch_size,
        progress=progress,
        cancel=cancel,
        runtime=runtime,
    )
    seconds = {"read": t_read, **result.seconds}
    structures = measurements(result.structures, result.masks)
    liver = next((row for row in structures if row["name"] == LIVER_NAME), None)
    summary = {
        "case": case_name(input_path),
        "input": str(input_path),
        "liver_volume_ml": liver["volume_ml"] if liver else None,
        "liver_found": bool(liver and liver["found"]),
        "structures": structures,
        "slices": ct.shape[0],
        "shape_kji": list(ct.shape),
        "spacing_mm": [round(s, 4) for s in ct.spacing_mm],
        "model_id": result.model_id,
        "device": result.device,
        "precision": result.precision,
        "postprocess": postprocess,
        "soft_tissue_raised_hu": round(result.raised_hu, 1),
        "outputs": {k: p.name for k, p in paths.items()},
        "liverseg_version": __version__,
        "machine": machine(),
    }
    writers = {}
    for f in formats:
        writers[paths[f]] = lambda p, f=f: FORMATS[f].write(p, ct, result)
        for kind, (_, write) in FORMATS[f].companions.items():
            writers[paths[kind]] = lambda p, write=write: write(p, ct, result)
    if "preview" in paths:
        writers[paths["preview"]] = lambda p: write_png(preview_image(ct, result.masks, result.structures), p)

    def write_summary(p: Path) -> None:
        seconds["write"] = time.perf_counter() - t_write
        seconds["total"] = time.perf_counter() - t_start
        summary["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        p.write_text(json.dumps(summary, indent=2) + "\n")

    writers[paths["summary"]] = write_summary
    if progress:
        progress("write", 0.0)
    t_write = time.perf_counter()
    write_all(writers)
    if progress:
        progress("write", 1.0)
    return summary


log = logging.getLogger(__name__)


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The cases named by ``paths``: a folder holding only study folders/images stands for each of them."""
    cases = []
    for path in map(Path, paths):
        if path.is_dir() and not is_ircadb_patient(path):
            entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
            if entries and not any(p.is_file() and not is_image_file(p) for p in entries):
                cases += [p for p in entries if p.is_dir() or is_image_file(p)]
                continue
        cases.append(path)
    return cases


def finished_summary(
    input_path: str | os.PathLike, out_dir: str | os.PathLike, formats: list[str], preview: bool = True
) -> dict | None:
    """The summary of an earlier complete run of this case with these outputs, or None."""
    paths = output_paths(input_path, out_dir, formats, preview)
    try:
        summary = json.loads(paths["summary"].read_text())
    except (OSError, ValueError):
        return None
    wanted = {k: p.name for k, p in paths.items()}
    if summary.get("outputs") != wanted or not all(p.is_file() and p.stat().st_size > 0 for p in paths.values()):
        return None
    return summary


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def segment_batch(
    inputs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    on_case: Callable[[dict], None] | None = None,
    write_summary: bool = True,
    **options,
) -> list[dict]:
    """Segment every case independently: a failing case is recorded and skipped, finished ones are kept.

    Cases whose outputs already exist complete are skipped unless ``overwrite``. With
    ``write_summary``, writes ``batch_summary.json`` into ``out_dir`` (also when interrupted).
    Returns one row per case (a finished case's row also holds its summary dict).
    """
    formats, preview = list(options.get("formats", ("seg.nrrd",))), options.get("preview", True)
    rows: list[dict] = []
    seen: dict[str, Path] = {}
    try:
        for path in expand_inputs(inputs):
            name = case_name(path)
            row = {
                "case": name,
                "input": str(path),
                "status": "failed",
                "reason": "",
                "liver_volume_ml": None,
                "seconds": None,
            }
            t = time.perf_counter()
            try:
                if name in seen:
                    raise InputError(f"same case name as {seen[name]}; rename one so their outputs do not collide")
                seen[name] = path
                done = None if overwrite else finished_summary(path, out_dir, formats, preview)
                if done is not None:
                    row.update(
                        status="skipped",
                        reason="outputs exist (use --overwrite to redo)",
                        liver_volume_ml=done["liver_volume_ml"],
                    )
                else:
                    summary = segment_file(path, out_dir, **options)
                    row.update(status="ok", liver_volume_ml=summary["liver_volume_ml"], summary=summary)
                    if summary["liver_volume_ml"] is not None and not summary["liver_found"]:
                        row["reason"] = NO_LIVER
            except (KeyboardInterrupt, Cancelled):
                row["reason"] = "interrupted"
                rows.append(row)
                raise
            except LiverSegError as exc:
                row["reason"] = str(exc)
            except Exception as exc:  # one bad study must not end the batch; the log keeps the traceback
                log.debug("case %s failed", name, exc_info=True)
                row["reason"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            row["seconds"] = round(time.perf_counter() - t, 2)
            row["rss_mb"] = round(_rss_mb(), 1)
            rows.append(row)
            if on_case:
                on_case(row)
    finally:
        if write_summary:
            table = [{k: v for k, v in r.items() if k != "summary"} for r in rows]  # each case has its own file
            atomic_write_bytes(Path(out_dir) / "batch_summary.json", (json.dumps(table, indent=1) + "\n").encode())
    return rows
