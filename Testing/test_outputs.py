"""Masks written as .seg.nrrd / NIfTI come back on the same voxels in the same place; Slicer reads them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from LiverSegUNetLib.io.segnrrd import read_mask, read_seg_nrrd, write_nifti, write_seg_nrrd
from LiverSegUNetLib.outputs import write_all
from LiverSegUNetLib.preprocess import Reorientation
from LiverSegUNetLib.terminology import LIVER
from LiverSegUNetLib.volume import Volume

# a permuted, flipped, slightly oblique direction (columns = i, j, k axes in LPS)
_c, _s = np.cos(0.2), np.sin(0.2)
OBLIQUE = np.array([[0, _c, -_s], [0, _s, _c], [-1, 0, 0]], dtype=float)


def _mask(direction) -> Volume:
    rng = np.random.default_rng(1)
    a = (rng.random((7, 9, 11)) > 0.6).astype(np.uint8)
    return Volume(a, (0.8, 1.3, 2.5), (12.5, -40.0, 300.0), direction)


def _world_points(vol: Volume) -> np.ndarray:
    k, j, i = np.nonzero(vol.array)
    return (vol.ijk_to_lps() @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3].T


@pytest.mark.parametrize("direction", [np.eye(3), OBLIQUE], ids=["identity", "oblique"])
@pytest.mark.parametrize("suffix", [".seg.nrrd", ".nii.gz"])
def test_round_trip_same_voxels_same_place(tmp_path, direction, suffix):
    mask = _mask(direction)
    path = tmp_path / f"m{suffix}"
    (write_seg_nrrd([mask], path, [LIVER]) if suffix == ".seg.nrrd" else write_nifti([mask], path))
    back = read_mask(path)
    np.testing.assert_array_equal(back.array, mask.array)
    assert back.same_grid(mask, tol_mm=1e-4)
    np.testing.assert_allclose(_world_points(back), _world_points(mask), atol=1e-4)


def test_seg_nrrd_fields(tmp_path):
    mask = _mask(np.eye(3))
    write_seg_nrrd([mask], tmp_path / "m.seg.nrrd", [LIVER])
    _, (segment,) = read_seg_nrrd(tmp_path / "m.seg.nrrd")
    assert segment["Name"] == "Liver" and segment["LabelValue"] == "1"
    assert [round(float(c) * 255) for c in segment["Color"].split()] == [221, 130, 101]
    assert "SCT^123037004^Anatomical Structure~SCT^10200004^Liver" in segment["Tags"]


def test_slicer_reads_the_seg_nrrd(tmp_path):
    slicer = pytest.importorskip("slicer")
    mask = _mask(OBLIQUE)
    write_seg_nrrd([mask], tmp_path / "m.seg.nrrd", [LIVER])
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "m.seg.nrrd"))
    assert storage.ReadData(node)
    seg = node.GetSegmentation()
    assert seg.GetNumberOfSegments() == 1
    segment = seg.GetNthSegment(0)
    assert segment.GetName() == "Liver"
    assert np.allclose(segment.GetColor(), LIVER.color, atol=1e-4)
    entry = segment.GetTerminology()
    assert "SCT^10200004^Liver" in entry
    # voxel count survives (Slicer keeps the labelmap; geometry is checked by the round-trip test)
    labelmap = segment.GetRepresentation("Binary labelmap")
    from vtk.util.numpy_support import vtk_to_numpy

    assert int(vtk_to_numpy(labelmap.GetPointData().GetScalars()).astype(bool).sum()) == int(mask.array.sum())


@pytest.mark.parametrize("direction", [np.eye(3), OBLIQUE, -np.eye(3)], ids=["identity", "oblique", "flipped"])
def test_reorientation_round_trip(direction):
    vol = _mask(direction)
    r = Reorientation(vol)
    canonical = r.forward(vol.array)
    np.testing.assert_array_equal(r.backward(canonical), vol.array)
    # in canonical order, i runs to patient left, j to posterior, k to superior
    spacing = r.spacing(vol)
    assert sorted(spacing) == sorted(vol.spacing_mm)
    if np.allclose(direction, np.eye(3)):
        np.testing.assert_array_equal(canonical, vol.array)


def test_write_all_is_all_or_nothing(tmp_path):
    def good(p):
        p.write_text("ok")

    def bad(p):
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_all({tmp_path / "a.json": good, tmp_path / "b.json": bad})
    assert list(tmp_path.iterdir()) == []
    write_all({tmp_path / "a.json": good})
    assert json.loads('"' + (tmp_path / "a.json").read_text() + '"') == "ok"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_dicom_seg_output_references_the_series_and_holds_the_mask(tmp_path):
    """--format dicom-seg on a DICOM series (the sample CT's pixels, with full UIDs): read back with highdicom."""
    hd = pytest.importorskip("highdicom")
    from dicom_factory import write_series
    from LiverSegUNetLib.cli import main
    from LiverSegUNetLib.io import read_volume
    from LiverSegUNetLib.io.segnrrd import read_seg_nrrd
    from LiverSegUNetLib.sample import sample_ct_path

    ct = read_volume(sample_ct_path())
    write_series(tmp_path / "ct", ct.array.astype(np.float32), spacing_ij=ct.spacing_mm[:2], slice_gap=ct.spacing_mm[2])
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "ct"), "-o", str(out), "--format", "seg.nrrd,dicom-seg", "-q"]) == 0
    source = read_volume(tmp_path / "ct")
    (mask,), _ = read_seg_nrrd(out / "ct.seg.nrrd")
    seg = hd.seg.segread(str(out / "ct.seg.dcm"))
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Liver"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.metadata["series_uid"]
    uids = [h.SOPInstanceUID for h in source.metadata["dicom_headers"]]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    assert pixels[..., 0].sum() > 0
    np.testing.assert_array_equal(pixels[..., 0], mask.array > 0)


@pytest.mark.parametrize(
    "kind, message", [("nrrd", "needs DICOM input"), ("sample", "which a DICOM-SEG must reference")]
)
def test_dicom_seg_is_refused_clearly_where_it_cannot_reference_the_input(tmp_path, capsys, kind, message):
    import SimpleITK as sitk
    from LiverSegUNetLib.cli import main
    from LiverSegUNetLib.io import read_volume
    from LiverSegUNetLib.io.images import sitk_from_volume
    from LiverSegUNetLib.sample import sample_ct_path

    source = sample_ct_path()
    if kind == "nrrd":
        source = tmp_path / "ct.nrrd"
        sitk.WriteImage(sitk_from_volume(read_volume(sample_ct_path())), str(source))
    out = tmp_path / "out"
    assert main(["segment", str(source), "-o", str(out), "--format", "dicom-seg", "-q"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []
