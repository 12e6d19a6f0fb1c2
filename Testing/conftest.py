"""Shared fixtures: the real 3D-IRCADb patients (from LIVERSEG_DATA or ../shared/data) and synthetic DICOM."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Slicer's real MRML classes (slicer-core) plus stand-ins for what only the Slicer application
# provides; must be on sys.path before anything imports `slicer`.
sys.path.insert(0, str(Path(__file__).resolve().parent / "slicer_harness"))
from LiverSegUNetLib.io.ircadb import IrcadbPatient, default_data_root
from patients import PATIENTS

GET_DATA = (
    "3D-IRCADb-01 not found at {root}. Download it from "
    "https://www.ircad.fr/research/data-sets/liver-segmentation-3d-ircadb-01/ "
    "and place the patient folders (3Dircadb1.1, ...) under <data>/3Dircadb1/, or point LIVERSEG_DATA at <data>."
)
GET_MSD = (
    "msd_liver_2d (2D liver slices from the Medical Segmentation Decathlon Task03 Liver, "
    "http://medicaldecathlon.com/, as images/*.jpg and masks/*.jpg) not found at {root}; "
    "place it beside 3Dircadb1/ under <data>, or point LIVERSEG_DATA at <data>."
)


@pytest.fixture(scope="session")
def ircadb_root() -> Path:
    """Folder holding the 3Dircadb1.N patient folders; skips (fails under CI=true) when absent."""
    root = default_data_root() / "3Dircadb1"
    if not all((root / p).is_dir() for p in PATIENTS):
        message = GET_DATA.format(root=root)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def msd_root(ircadb_root) -> Path:
    """The optional msd_liver_2d training slices beside 3Dircadb1/; skips (fails under CI=true) when absent."""
    root = ircadb_root.parent / "msd_liver_2d"
    if not (root / "images").is_dir():
        message = GET_MSD.format(root=root)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root


_cache: dict[str, IrcadbPatient] = {}


@pytest.fixture(scope="session")
def patient(ircadb_root):
    """Factory returning a cached IrcadbPatient by folder name."""

    def get(name: str) -> IrcadbPatient:
        if name not in _cache:
            _cache[name] = IrcadbPatient(ircadb_root / name)
        return _cache[name]

    return get


@pytest.fixture(scope="session")
def sample_ct():
    """The bundled sample CT (openly licensed, present everywhere), read once."""
    from LiverSegUNetLib.io import read_volume
    from LiverSegUNetLib.sample import sample_ct_path

    return read_volume(sample_ct_path())


@pytest.fixture(scope="session")
def bundled_model():
    """The bundled model, loaded once."""
    from LiverSegUNetLib.weights import load_model

    return load_model(device="cpu")
