"""The three shared 3D-IRCADb patients load as the data README describes them."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from LiverSegUNetLib.errors import InputError
from LiverSegUNetLib.io import read_volume
from LiverSegUNetLib.io.ircadb import IrcadbPatient

EXPECTED = {  # slices, in-plane spacing (mm), slice spacing (mm), liver volume (ml): ../shared/data/README.md
    "3Dircadb1.1": (129, 0.57, 1.6, 1489),
    "3Dircadb1.7": (151, 0.782, 1.6, 1430),
    "3Dircadb1.17": (119, 0.743, 1.6, 1861),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_patient_matches_published_facts(patient, name):
    slices, in_plane, gap, liver_ml = EXPECTED[name]
    p = patient(name)
    assert p.ct.shape == (slices, 512, 512)
    assert p.ct.spacing_mm == pytest.approx((in_plane, in_plane, gap), abs=1e-3)
    assert p.ct.array.min() >= -1025 and p.ct.array.max() <= 1025
    liver = p.mask("liver")
    assert liver.same_grid(p.ct)
    assert liver.array.sum() * liver.voxel_volume_ml == pytest.approx(liver_ml, rel=0.01)
    assert {"liver", "bone"} <= set(p.organs)
    # contrast-enhanced portal-venous phase: liver reads about 100-120 HU
    assert 90 < float(p.ct.array[liver.array > 0].mean()) < 130


def test_unzipped_layout_reads_the_same(patient, ircadb_root, tmp_path):
    folder = tmp_path / "3Dircadb1.17"
    with zipfile.ZipFile(ircadb_root / "3Dircadb1.17" / "PATIENT_DICOM.zip") as z:
        z.extractall(folder)
    with zipfile.ZipFile(ircadb_root / "3Dircadb1.17" / "MASKS_DICOM.zip") as z:
        z.extractall(folder, [n for n in z.namelist() if n.startswith("MASKS_DICOM/liver/")])
    unzipped, zipped = IrcadbPatient(folder), patient("3Dircadb1.17")
    np.testing.assert_array_equal(unzipped.ct.array, zipped.ct.array)
    assert unzipped.ct.same_grid(zipped.ct)
    assert unzipped.organs == ["liver"]
    np.testing.assert_array_equal(unzipped.mask("liver").array, zipped.mask("liver").array)
    # the generic reader recognises a patient folder
    assert read_volume(folder).same_grid(zipped.ct)


def test_unknown_organ_lists_available(patient):
    with pytest.raises(InputError, match="available: .*liver"):
        patient("3Dircadb1.1").mask("pancreas")


def test_not_a_patient_folder(tmp_path):
    with pytest.raises(InputError, match="not a 3D-IRCADb patient folder"):
        IrcadbPatient(tmp_path)
