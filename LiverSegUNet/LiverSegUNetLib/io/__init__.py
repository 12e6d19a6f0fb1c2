"""Readers and writers: DICOM series, 3D-IRCADb patients, NRRD/NIfTI, Slicer .seg.nrrd."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from ..volume import Volume
from .dicom import read_dicom_folder
from .images import IMAGE_SUFFIXES, is_image_file, read_image
from .ircadb import IrcadbPatient, is_ircadb_patient


def read_volume(path: str | os.PathLike, series_uid: str | None = None, allow_non_ct: bool = False) -> Volume:
    """Read a CT from a DICOM folder, a 3D-IRCADb patient folder, or an NRRD/NIfTI file.

    DICOM series of another modality (MR, PET, ...) are refused unless ``allow_non_ct``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        if is_ircadb_patient(path):
            return IrcadbPatient(path).ct
        return read_dicom_folder(path, series_uid, allow_non_ct)
    if is_image_file(path):
        return read_image(path)
    raise InputError(
        f"{path}: unsupported input; give a DICOM folder, a 3D-IRCADb patient folder, or a .nrrd/.nii/.nii.gz file"
    )


def case_name(path: str | os.PathLike) -> str:
    """A file-name-safe name for a case, from its input path (``3Dircadb1.1``, ``ct`` for ``ct.nii.gz``)."""
    name = Path(path).name
    for suffix in sorted((".seg.nrrd", *IMAGE_SUFFIXES), key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name or "case"
