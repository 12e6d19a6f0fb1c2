"""Read one CT series from DICOM files (a folder, or members of a zip archive) into a Volume."""

from __future__ import annotations

import io
import logging
import os
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..limits import check_volume_size
from ..volume import Volume

log = logging.getLogger(__name__)

#: Largest single DICOM file (bytes) read from a zip; guards against archives that claim gigabytes.
MAX_MEMBER_BYTES = 256 * 1024 * 1024
#: Relative deviation of a slice gap from the median gap tolerated before the series is refused.
GAP_TOLERANCE = 0.05


@dataclass(frozen=True)
class DicomSource:
    """One DICOM file, on disk or inside a zip archive."""

    name: str
    open: Callable[[], io.BufferedIOBase]


def sources_in_folder(folder: Path) -> list[DicomSource]:
    """Every regular file directly inside ``folder`` (DICOM files often have no extension)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return [DicomSource(str(p), (lambda p=p: open(p, "rb"))) for p in files]


def sources_in_zip(archive: zipfile.ZipFile, prefix: str) -> list[DicomSource]:
    """Every file in ``archive`` directly under the folder ``prefix`` (e.g. ``PATIENT_DICOM/``)."""
    out = []
    for info in archive.infolist():
        name = info.filename
        if info.is_dir() or not name.startswith(prefix) or "/" in name[len(prefix) :]:
            continue
        if info.file_size > MAX_MEMBER_BYTES:
            raise InputError(f"{archive.filename}: member {name} claims {info.file_size} bytes; refusing to read it")
        # a stream, not the whole member: listing headers then decompresses only the first few kB
        out.append(DicomSource(f"{archive.filename}:{name}", (lambda n=name: archive.open(n))))
    return out


def _read_header(src: DicomSource):
    import pydicom

    try:
        with src.open() as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
        for _ in ds:  # decode every element now, so a damaged one shows here and not on first use
            pass
        return ds
    except InputError:
        raise
    except Exception as exc:  # pydicom raises many types on damaged files; such a file is not a usable slice
        log.debug("skipping %s: not DICOM (%s: %s)", src.name, type(exc).__name__, exc)
        return None


@dataclass
class _Slice:
    src: DicomSource
    position: np.ndarray
    orientation: np.ndarray
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    header: object = None  # the pydicom header (no pixels): DICOM-SEG output references it


def list_series(sources: Iterable[DicomSource]) -> dict[str, list]:
    """Group the readable DICOM image headers of ``sources`` by SeriesInstanceUID."""
    series: dict[str, list] = {}
    for src in sources:
        ds = _read_header(src)
        if ds is None or "Rows" not in ds:
            continue
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((src, ds))
    return series


def _describe(uid: str, items: list) -> str:
    ds = items[0][1]
    return f"{uid} ({ds.get('Modality', '?')}, {len(items)} files, '{ds.get('SeriesDescription', '')}')"


def _slice_of(src: DicomSource, ds) -> _Slice:
    try:
        return _parse_slice(src, ds)
    except InputError:
        raise
    except Exception as exc:  # malformed values of any kind
        raise InputError(f"{src.name}: malformed DICOM header ({type(exc).__name__}: {exc})") from exc


def _parse_slice(src: DicomSource, ds) -> _Slice:
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        if tag not in ds:
            raise InputError(f"{src.name}: DICOM tag {tag} is missing; cannot place the slice in space")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputError(
            f"{src.name}: {ds.SamplesPerPixel} samples per pixel (colour image); a CT series is single-channel"
        )
    spacing = tuple(float(v) for v in ds.PixelSpacing)
    position = np.array([float(v) for v in ds.ImagePositionPatient])
    orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if len(spacing) != 2 or not np.all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise InputError(f"{src.name}: PixelSpacing {spacing} is not two positive numbers")
    if position.shape != (3,) or orientation.shape != (6,) or not np.all(np.isfinite(np.r_[position, orientation])):
        raise InputError(f"{src.name}: ImagePositionPatient/ImageOrientationPatient are malformed")
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0 or abs(slope) > 1e4 or abs(intercept) > 1e5:
        raise InputError(f"{src.name}: RescaleSlope/RescaleIntercept ({slope}, {intercept}) are not plausible for CT")
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows < 1 or columns < 1:
        raise InputError(f"{src.name}: image size {rows}x{columns} is empty")
    return _Slice(src, position, orientation, rows, columns, spacing, slope, intercept, ds)


def _pixels(slc: _Slice) -> np.ndarray:
    import pydicom

    try:
        with slc.src.open() as fh:
            ds = pydicom.dcmread(fh)
            pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for damaged pixel data
        raise InputError(f"{slc.src.name}: pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
    if pixels.shape != (slc.rows, slc.columns):
        raise InputError(f"{slc.src.name}: pixel data has shape {pixels.shape}, expected {(slc.rows, slc.columns)}")
    return pixels


def _pixels_in_order(slices: list[_Slice], ahead: int = 8):
    """Each slice's pixels, in order, decoded by a small thread pool a few slices ahead.

    Decompression and file reads release the GIL, so they overlap with header parsing; at most
    ``ahead`` decoded slices wait in memory. A failure stops the pool and is raised in order.
    """
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, min(4, os.cpu_count() or 1))
    if workers == 1 or len(slices) < 2 * workers:
        yield from map(_pixels, slices)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="dicom")
    try:
        pending = [pool.submit(_pixels, s) for s in slices[:ahead]]
        for k in range(len(slices)):
            if k + ahead < len(slices):
                pending.append(pool.submit(_pixels, slices[k + ahead]))
            yield pending[k].result()
            pending[k] = None  # drop the decoded slice once it is copied
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def read_series(
    sources: Iterable[DicomSource], series_uid: str | None = None, what: str = "input", allow_non_ct: bool = True
) -> Volume:
    """Read one series, slices sorted along the slice normal, into a Volume of Hounsfield units.

    ``series_uid`` picks a series when several are present; without it, more than one series is
    an error that lists them.
    """
    series = list_series(sources)
    if not series:
        raise InputError(f"{what}: no DICOM image files found")
    if series_uid is not None:
        if series_uid not in series:
            listing = "; ".join(_describe(u, s) for u, s in series.items())
            raise InputError(f"{what}: series {series_uid} not found; present: {listing}")
        items = series[series_uid]
    elif len(series) > 1:
        listing = "; ".join(_describe(u, s) for u, s in series.items())
        raise InputError(f"{what}: {len(series)} series found, choose one with --series-uid: {listing}")
    else:
        ((series_uid, items),) = series.items()
    modality = str(items[0][1].get("Modality", "") or "")
    if not allow_non_ct and modality not in ("CT", ""):
        raise InputError(
            f"{what}: series modality is {modality}, not CT; this model segments CT in Hounsfield units "
            "(use --allow-non-ct to run it anyway)"
        )
    return _assemble([_slice_of(src, ds) for src, ds in items], what, items[0][1])


def _assemble(slices: list[_Slice], what: str, first_header) -> Volume:
    if len(slices) < 2:
        raise InputError(f"{what}: only {len(slices)} slice; a 3D CT series needs at least 2 slices")
    shapes = {(s.rows, s.columns) for s in slices}
    if len(shapes) > 1:
        raise InputError(f"{what}: slices have mixed sizes {sorted(shapes)}; a series must share one size")
    ref = slices[0].orientation
    if any(not np.allclose(s.orientation, ref, atol=1e-3) for s in slices):
        raise InputError(f"{what}: slices have different ImageOrientationPatient; not one volume")
    spacings = {s.pixel_spacing for s in slices}
    if len(spacings) > 1:
        raise InputError(f"{what}: slices have different PixelSpacing {sorted(spacings)}")
    row_dir, col_dir = ref[:3], ref[3:]
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 0.5:
        raise InputError(f"{what}: ImageOrientationPatient {ref.tolist()} is degenerate")
    normal = normal / np.linalg.norm(normal)
    slices.sort(key=lambda s: float(s.position @ normal))
    z = np.array([float(s.position @ normal) for s in slices])
    gaps = np.diff(z)
    if np.any(gaps < 1e-3):
        dup = slices[int(np.argmin(gaps)) + 1].src.name
        raise InputError(f"{what}: two slices share the same position (e.g. {dup}); duplicate or mixed series")
    gap = float(np.median(gaps))
    bad = np.abs(gaps - gap) > GAP_TOLERANCE * gap
    if np.any(bad):
        k = int(np.argmax(bad))
        if abs(gaps[k] / gap - round(gaps[k] / gap)) < GAP_TOLERANCE and round(gaps[k] / gap) >= 2:
            raise InputError(
                f"{what}: {round(gaps[k] / gap) - 1} slice(s) missing between z={z[k]:.2f} and z={z[k + 1]:.2f} mm "
                f"(spacing {gap:.3f} mm elsewhere); supply the complete series"
            )
        raise InputError(
            f"{what}: uneven slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm); resample it or supply a "
            "series with constant spacing"
        )
    integral = all(s.slope == 1 and s.intercept == round(s.intercept) for s in slices)
    check_volume_size((len(slices), slices[0].rows, slices[0].columns), 2 if integral else 4, what)
    out = np.empty((len(slices), *shapes.pop()), dtype=np.int16 if integral else np.float32)
    for k, (s, px) in enumerate(zip(slices, _pixels_in_order(slices))):
        if (
            integral
            and px.dtype.itemsize <= 2
            and -32768 <= int(px.min()) + s.intercept <= int(px.max()) + s.intercept <= 32767
        ):
            np.add(px, np.int32(s.intercept), out=out[k], casting="unsafe")  # fits int16: no int32 copy
        elif integral:
            out[k] = np.clip(px.astype(np.int32) + int(s.intercept), -32768, 32767)
        else:
            out[k] = px.astype(np.float32) * s.slope + s.intercept
    direction = np.column_stack([row_dir, col_dir, normal])
    spacing = (slices[0].pixel_spacing[1], slices[0].pixel_spacing[0], gap)
    meta = {
        "modality": str(first_header.get("Modality", "")),
        "series_uid": str(first_header.get("SeriesInstanceUID", "")),
        "study_uid": str(first_header.get("StudyInstanceUID", "")),
        "source_files": [s.src.name for s in slices],
        "dicom_headers": [s.header for s in slices],  # in k order
    }
    return Volume(out, spacing, tuple(slices[0].position), direction, meta)


def read_dicom_folder(folder: str | os.PathLike, series_uid: str | None = None, allow_non_ct: bool = True) -> Volume:
    """Read the CT series in a folder of DICOM files (any file names, any order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    return read_series(sources_in_folder(folder), series_uid, what=str(folder), allow_non_ct=allow_non_ct)
