"""File in, files out: read a CT, segment it, write the requested outputs and a JSON summary."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .errors import InputError
from .inference import Progress, segment
from .io import case_name, read_volume
from .io.segnrrd import write_nifti, write_seg_nrrd
from .outputs import write_all
from .preview import preview_image, write_png
from .terminology import LIVER

FORMATS = {"seg.nrrd": ".seg.nrrd", "nifti": ".nii.gz"}


def output_paths(
    input_path: str | os.PathLike, out_dir: str | os.PathLike, formats: list[str], preview: bool = True
) -> dict[str, Path]:
    """The files a run writes for one input, by kind (``seg.nrrd``, ``nifti``, ``summary``, ``preview``)."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InputError(f"unknown output format(s) {unknown or formats}; choose from {', '.join(FORMATS)}")
    name = case_name(input_path)
    out_dir = Path(out_dir)
    paths = {f: out_dir / f"{name}{FORMATS[f]}" for f in formats}
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
) -> dict:
    """Segment one CT and write its outputs together (all or none); returns the summary dict."""
    t_start = time.perf_counter()
    paths = output_paths(input_path, out_dir, list(formats), preview)
    if progress:
        progress("read", 0.0)
    ct = read_volume(input_path, series_uid)
    t_read = time.perf_counter() - t_start
    result = segment(
        ct, model, device=device, postprocess=postprocess, batch_size=batch_size, progress=progress, cancel=cancel
    )
    seconds = {"read": t_read, **result.seconds}
    summary = {
        "case": case_name(input_path),
        "input": str(input_path),
        "liver_volume_ml": round(result.volume_ml, 1),
        "slices": ct.shape[0],
        "shape_kji": list(ct.shape),
        "spacing_mm": [round(s, 4) for s in ct.spacing_mm],
        "model_id": result.model_id,
        "device": result.device,
        "precision": result.precision,
        "postprocess": postprocess,
        "outputs": {k: p.name for k, p in paths.items()},
        "liverseg_version": __version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
    writers = {}
    if "seg.nrrd" in paths:
        writers[paths["seg.nrrd"]] = lambda p: write_seg_nrrd(result.mask, p, LIVER)
    if "nifti" in paths:
        writers[paths["nifti"]] = lambda p: write_nifti(result.mask, p)
    if "preview" in paths:
        writers[paths["preview"]] = lambda p: write_png(preview_image(ct, result.mask, LIVER.color_rgb), p)

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
