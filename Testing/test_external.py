"""Agreement on a CT from another hospital: the bundled sample against TotalSegmentator's liver on it (no 3D-IRCADb
data needed: the sample and the reference are in the repository)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from LiverSegUNetLib.weights import DEFAULT_MODEL

from training import external

ROOT = Path(__file__).resolve().parents[1]


def test_the_reference_is_the_documented_file_on_the_sample_grid():
    readme = (external.REFERENCE.parent / "README.md").read_text()
    digest = hashlib.sha256(external.REFERENCE.read_bytes()).hexdigest()
    assert digest in readme
    ct, liver = external.sample_with_reference()
    assert set(liver.array.ravel().tolist()) == {0, 1}
    ml = float(liver.array.sum()) * liver.voxel_volume_ml
    assert f"{ml:.1f} ml" in readme and 600 < ml < 800  # a liver in every slice of a 40 mm slab


def test_the_default_model_agrees_with_totalsegmentator_on_the_sample(tmp_path):
    """The bundled default model finds the liver TotalSegmentator finds on the sample (a default that left out
    part of the right lobe there scored 0.83), and the tool's output and the README say the same."""
    out = tmp_path / "external.json"
    assert external.main(["--model", str(DEFAULT_MODEL), "-o", str(out)]) == 0
    value = json.loads(out.read_text())["results"][DEFAULT_MODEL.stem]["model"]
    assert value >= 0.95
    card = json.loads(DEFAULT_MODEL.read_text())
    recorded = card["provenance"]["sample_agreement"]
    assert recorded == pytest.approx(value, abs=0.005)  # bfloat16 rounds a little differently on another CPU
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"TotalSegmentator's liver on it:\s+Dice\s+{recorded:.3f}", readme)


def test_another_ct_with_a_label_map_as_reference(tmp_path):
    """``--ct``/``--reference``/``--label``: the sample given as a CT file with a label map in which the liver
    is 5 scores as the bundled pair does; a label the map lacks is refused, naming the option."""
    import SimpleITK as sitk
    from LiverSegUNetLib.io import read_volume
    from LiverSegUNetLib.weights import load_model

    labels = sitk.ReadImage(str(external.REFERENCE)) * 5
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    ct = tmp_path / "ct.nii.gz"
    sample = read_volume(external.sample_ct_path())
    image = sitk.GetImageFromArray(sample.array)
    image.CopyInformation(labels)
    sitk.WriteImage(image, str(ct))
    case = external.sample_with_reference(ct, tmp_path / "labels.nii.gz", 5)
    model = {"m": [(load_model(), "model")]}
    assert external.agreement(model, case=case) == external.agreement(model)
    with pytest.raises(SystemExit, match="--label"):
        external.sample_with_reference(ct, tmp_path / "labels.nii.gz", 3)


def test_other_directions_are_scored_under_their_own_name(tmp_path):
    """``--views`` scores the model in each set of directions (``name@views=...``): its card's own, axial, scores
    as the card does; a direction that does not exist is refused before anything runs."""
    out = tmp_path / "external.json"
    assert external.main(["--model", str(DEFAULT_MODEL), "--views", "axial", "-o", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {f"{DEFAULT_MODEL.stem}@views=axial"}
    recorded = json.loads(DEFAULT_MODEL.read_text())["provenance"]["sample_agreement"]
    assert results[f"{DEFAULT_MODEL.stem}@views=axial"]["model"] == pytest.approx(recorded, abs=0.005)
    with pytest.raises(SystemExit):
        external.main(["--model", str(DEFAULT_MODEL), "--views", "axial+axial"])
    with pytest.raises(ValueError, match="joined by"):
        external.parse_views("coronal,oblique")
    with pytest.raises(ValueError, match="liver floors in HU"):
        external.parse_floors("90,-5")
    with pytest.raises(ValueError, match="slice distances in mm"):
        external.parse_slices("1.6,x")
