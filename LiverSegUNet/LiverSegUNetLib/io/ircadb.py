"""Read a 3D-IRCADb-01 patient folder (zipped or unzipped, as the official download) and its organ masks."""

from __future__ import annotations

import os
import re
import zipfile
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..volume import Volume
from . import dicom


def is_ircadb_patient(path: str | os.PathLike) -> bool:
    """True when ``path`` looks like a 3D-IRCADb patient folder (``3Dircadb1.N``)."""
    p = Path(path)
    return p.is_dir() and any((p / n).exists() for n in ("PATIENT_DICOM.zip", "PATIENT_DICOM"))


class IrcadbPatient:
    """One patient: the CT as a Volume and any organ mask, voxel for voxel on the CT grid.

    Zips are read in place, nothing is extracted to disk.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not is_ircadb_patient(self.folder):
            raise InputError(f"{self.folder}: not a 3D-IRCADb patient folder (no PATIENT_DICOM.zip or PATIENT_DICOM/)")
        self.name = self.folder.name

    def _sources(self, kind: str, sub: str = "") -> list[dicom.DicomSource]:
        folder = self.folder / kind / sub if sub else self.folder / kind
        if folder.is_dir():
            return dicom.sources_in_folder(folder)
        archive_path = self.folder / f"{kind}.zip"
        if not archive_path.is_file():
            raise InputError(f"{self.folder}: neither {kind}/ nor {kind}.zip present")
        archive = self._archive(archive_path)
        prefix = f"{kind}/{sub}/" if sub else f"{kind}/"
        return dicom.sources_in_zip(archive, prefix)

    def _archive(self, path: Path) -> zipfile.ZipFile:
        cache = self.__dict__.setdefault("_archives", {})
        if path not in cache:
            try:
                cache[path] = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise InputError(f"{path}: not a readable zip archive ({exc})") from exc
        return cache[path]

    @cached_property
    def ct(self) -> Volume:
        """The CT in Hounsfield units."""
        vol = dicom.read_series(self._sources("PATIENT_DICOM"), what=str(self.folder))
        return Volume(vol.array, vol.spacing_mm, vol.origin_lps, vol.direction, {**vol.metadata, "patient": self.name})

    @cached_property
    def organs(self) -> list[str]:
        """Names of the organ masks available for this patient (folder names under MASKS_DICOM)."""
        folder = self.folder / "MASKS_DICOM"
        if folder.is_dir():
            return sorted(p.name for p in folder.iterdir() if p.is_dir())
        path = self.folder / "MASKS_DICOM.zip"
        if not path.is_file():
            return []
        names = {m.group(1) for n in self._archive(path).namelist() if (m := re.match(r"MASKS_DICOM/([^/]+)/.", n))}
        return sorted(names)

    def mask(self, organ: str) -> Volume:
        """The expert mask of ``organ`` as a uint8 0/1 Volume on the CT's grid."""
        if organ not in self.organs:
            raise InputError(f"{self.name}: no mask named '{organ}'; available: {', '.join(self.organs)}")
        vol = dicom.read_series(self._sources("MASKS_DICOM", organ), what=f"{self.name} mask {organ}")
        ct = self.ct
        if vol.shape != ct.shape or not vol.same_grid(ct, tol_mm=0.01):
            raise InputError(f"{self.name}: mask '{organ}' is not on the CT's grid ({vol.shape} vs {ct.shape})")
        return ct.with_array((vol.array > 0).astype(np.uint8), organ=organ)


def default_data_root() -> Path:
    """Where the 3D-IRCADb data lives: ``$LIVERSEG_DATA``, else ``../shared/data`` beside the project."""
    env = os.environ.get("LIVERSEG_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"
