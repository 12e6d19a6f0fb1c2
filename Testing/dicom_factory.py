"""Write synthetic CT series as real DICOM files with pydicom, for reader tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_series(
    folder: Path,
    hu: np.ndarray,
    *,
    spacing_ij=(0.7, 0.9),
    slice_gap=2.0,
    row_dir=(1, 0, 0),
    col_dir=(0, 1, 0),
    origin=(-100.0, -120.0, 50.0),
    slope=1.0,
    intercept=-1024.0,
    names=None,
    series_uid=None,
    rng=None,
    modality="CT",
    frame_of_reference_uid=None,
) -> list[Path]:
    """Write ``hu`` (``[k, j, i]``) as one DICOM file per slice; returns the paths in slice order.

    Stored values are ``(hu - intercept) / slope`` as uint16; file names are ``names`` or shuffled.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = rng or np.random.default_rng(0)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    normal = np.cross(row_dir, col_dir)
    n = hu.shape[0]
    names = names or [f"f{v:05d}" for v in rng.permutation(n) * 7 + 3]
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / names[k]), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = modality, series_uid, study_uid
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.SeriesDescription = f"synthetic {series_uid[-6:]}"
        ds.InstanceNumber = int(rng.integers(1, 10_000))  # deliberately meaningless
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * slice_gap * normal]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [spacing_ij[1], spacing_ij[0]]  # row spacing (j), column spacing (i)
        ds.SliceThickness = 99.0  # wrong on purpose: spacing must come from positions
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.round((hu[k].astype(np.float64) - intercept) / slope).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
