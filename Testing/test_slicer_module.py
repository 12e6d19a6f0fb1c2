"""The Slicer module's Logic and Test, headless against Slicer's real MRML and segmentation classes."""

from __future__ import annotations

import re

import numpy as np
import pytest
from patients import TEST_PATIENT

slicer = pytest.importorskip("slicer")
import headless  # noqa: E402

headless.start()
from LiverSegUNetLib.errors import InputError  # noqa: E402
from LiverSegUNetLib.metrics import dice  # noqa: E402
from LiverSegUNetLib.terminology import LIVER  # noqa: E402

import LiverSegUNet  # noqa: E402
from LiverSegUNet import RAS_FROM_LPS, LiverSegUNetLogic  # noqa: E402


class TestModuleSelfTest(LiverSegUNet.LiverSegUNetTest):
    """The module's own ScriptedLoadableModuleTest, as Slicer's ctest runs it."""


@pytest.fixture(scope="module")
def ct(patient):
    """The held-out patient, cropped to 48 slices through the liver to keep the suite fast."""
    full = patient(TEST_PATIENT).ct
    k0, k1 = 40, 88
    origin = full.ijk_to_lps() @ np.array([0, 0, k0, 1.0])
    from LiverSegUNetLib.volume import Volume

    return Volume(full.array[k0:k1].copy(), full.spacing_mm, origin[:3], full.direction), patient(TEST_PATIENT).mask(
        "liver"
    ).array[k0:k1]


@pytest.fixture()
def scene():
    slicer.mrmlScene.Clear()
    return slicer.mrmlScene


def add_volume(array, ijk_to_lps, name="CT"):
    node = slicer.util.addVolumeFromArray(np.ascontiguousarray(array), name=name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(RAS_FROM_LPS @ ijk_to_lps))
    return node


def ras_points(mask, volume_node):
    """RAS coordinates (rounded to 0.01 mm) of the voxels set in ``mask`` on ``volume_node``'s grid."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    k, j, i = np.nonzero(mask)
    pts = (slicer.util.arrayFromVTKMatrix(m) @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3].T
    return {tuple(p) for p in np.round(pts, 2)}


def test_orientation_flipped_and_permuted_give_the_same_physical_segment(scene, ct):
    volume, _ = ct
    logic = LiverSegUNetLogic()
    base = add_volume(volume.array, volume.ijk_to_lps(), "axial")
    seg = logic.newSegmentationNode(base)
    logic.process(base, seg, device="cpu")
    ref = ras_points(slicer.util.arrayFromSegmentBinaryLabelmap(seg, "Liver", base), base)
    assert len(ref) > 50_000
    shape_ijk = volume.shape[::-1]
    for name, perm, flips in [
        ("flipped", (0, 1, 2), (True, True, False)),
        ("permuted", (2, 0, 1), (False, True, True)),
    ]:
        m = np.zeros((4, 4))  # new ijk -> old ijk
        m[3, 3] = 1
        for a in range(3):
            m[perm[a], a] = -1 if flips[a] else 1
            m[perm[a], 3] = shape_ijk[perm[a]] - 1 if flips[a] else 0
        arr = np.transpose(volume.array, [2 - perm[2], 2 - perm[1], 2 - perm[0]])
        arr = np.flip(arr, [2 - a for a in range(3) if flips[a]])
        node = add_volume(arr, volume.ijk_to_lps() @ m, name)
        out = logic.newSegmentationNode(node)
        logic.process(node, out, device="cpu")
        got = ras_points(slicer.util.arrayFromSegmentBinaryLabelmap(out, "Liver", node), node)
        assert got == ref, name


def test_rerun_replaces_liver_and_keeps_user_segment(scene, ct):
    volume, expert = ct
    node = add_volume(volume.array, volume.ijk_to_lps())
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(node)
    user_id = seg.GetSegmentation().AddEmptySegment("tumour", "Tumour", [0.2, 0.9, 0.2])
    user_mask = np.zeros(volume.shape, np.uint8)
    user_mask[20:25, 200:230, 150:180] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(user_mask, seg, user_id, node)
    logic = LiverSegUNetLogic()
    first = logic.process(node, seg, device="cpu")
    second = logic.process(node, seg, device="cpu", postprocess=False)
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    names = sorted(segmentation.GetNthSegment(i).GetName() for i in range(2))
    assert names == ["Liver", "Tumour"]
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, user_id, node), user_mask)
    liver = slicer.util.arrayFromSegmentBinaryLabelmap(seg, "Liver", node)
    assert second["volume_ml"] == pytest.approx(liver.sum() * volume.voxel_volume_ml, abs=1)
    assert first["volume_ml"] != second["volume_ml"]  # the second run (no postprocessing) replaced the first
    assert dice(liver, expert) > 0.85


def test_cancel_leaves_the_segmentation_unchanged(scene, ct):
    volume, _ = ct
    node = add_volume(volume.array, volume.ijk_to_lps())
    seg = LiverSegUNetLogic().newSegmentationNode(node)
    seg.GetSegmentation().AddEmptySegment("keep", "Keep", [0, 0, 1])
    before = seg.GetMTime()
    assert LiverSegUNetLogic().process(node, seg, device="cpu", cancel=lambda: True) is None
    assert seg.GetSegmentation().GetNumberOfSegments() == 1
    assert seg.GetSegmentation().GetNthSegment(0).GetName() == "Keep"
    assert seg.GetMTime() == before


@pytest.mark.parametrize(
    "kind, message",
    [("constant", "constant"), ("2d", "not a 3D volume"), ("rgb", "3 components per voxel"), ("empty", "no voxels")],
)
def test_bad_volumes_clear_error_no_segment(scene, kind, message):
    if kind == "constant":
        node = slicer.util.addVolumeFromArray(np.full((6, 64, 64), 40, np.int16))
    elif kind == "2d":
        node = slicer.util.addVolumeFromArray(np.zeros((1, 64, 64), np.int16) + np.arange(64, dtype=np.int16))
    elif kind == "rgb":
        node = slicer.util.addVolumeFromArray(
            np.zeros((4, 64, 64, 3), np.uint8), nodeClassName="vtkMRMLVectorVolumeNode"
        )
    else:
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(InputError, match=message):
        LiverSegUNetLogic().process(node, seg, device="cpu")
    assert seg.GetSegmentation().GetNumberOfSegments() == 0


def test_saved_seg_nrrd_round_trips_through_slicer_storage(scene, ct, tmp_path):
    volume, _ = ct
    node = add_volume(volume.array, volume.ijk_to_lps())
    seg = LiverSegUNetLogic().newSegmentationNode(node)
    LiverSegUNetLogic().process(node, seg, device="cpu")
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, "Liver", node)
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "liver.seg.nrrd"))
    assert storage.WriteData(seg)
    back = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    reader = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(tmp_path / "liver.seg.nrrd"))
    assert reader.ReadData(back)
    segment = back.GetSegmentation().GetNthSegment(0)
    assert segment.GetName() == "Liver"
    np.testing.assert_allclose(segment.GetColor(), LIVER.color, atol=1e-4)
    assert segment.GetTerminology() == LIVER.terminology_entry()
    segment_id = back.GetSegmentation().GetNthSegmentID(0)
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(back, segment_id, node), mask)


def test_reference_geometry_and_subject_hierarchy(scene, ct):
    volume, _ = ct
    node = add_volume(volume.array, volume.ijk_to_lps())
    sh = slicer.mrmlScene.GetSubjectHierarchyNode()
    patient_item = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient")
    study_item = sh.CreateStudyItem(patient_item, "Study")
    sh.CreateItem(study_item, node)
    seg = LiverSegUNetLogic().newSegmentationNode(node)
    LiverSegUNetLogic().process(node, seg, device="cpu")
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study_item
    geometry = seg.GetSegmentation().GetConversionParameter("Reference image geometry")
    assert geometry  # set from the input volume, which DICOM-SEG export needs
    assert seg.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) == node


def test_parameter_node_defaults_and_saved_scene(scene, tmp_path):
    first = slicer.util.addVolumeFromArray(np.zeros((3, 16, 16), np.int16), name="first")
    slicer.util.addVolumeFromArray(np.zeros((3, 16, 16), np.int16), name="second")
    logic = LiverSegUNetLogic()
    p = logic.getParameterNode()
    logic.setDefaultParameters(p)
    assert p.GetNodeReference("InputVolume") == first
    assert p.GetParameter("Device") == "auto" and p.GetParameter("Postprocess") == "true"
    assert p.GetParameter("Structures") == "false"
    p.SetParameter("Device", "cpu")
    p.SetParameter("Postprocess", "false")
    slicer.mrmlScene.SetURL(str(tmp_path / "scene.mrml"))
    slicer.mrmlScene.Commit()
    slicer.mrmlScene.Clear()
    slicer.mrmlScene.SetURL(str(tmp_path / "scene.mrml"))
    slicer.mrmlScene.Import()
    restored = LiverSegUNetLogic().getParameterNode()
    assert restored.GetParameter("Device") == "cpu" and restored.GetParameter("Postprocess") == "false"
    assert restored.GetNodeReference("InputVolume").GetName() == "first"


def test_deleting_the_input_or_closing_the_scene_during_a_run_ends_cleanly(scene, ct):
    volume, _ = ct
    logic = LiverSegUNetLogic()
    node = add_volume(volume.array, volume.ijk_to_lps())
    seg = logic.newSegmentationNode(node)
    job = logic.startJob(node, seg, device="cpu")
    slicer.mrmlScene.RemoveNode(node)
    assert logic.finishJob(job) is None
    assert seg.GetSegmentation().GetNumberOfSegments() == 0
    node = add_volume(volume.array, volume.ijk_to_lps())
    seg = logic.newSegmentationNode(node)
    job = logic.startJob(node, seg, device="cpu")
    slicer.mrmlScene.Clear()
    assert logic.finishJob(job) is None


class _Dialogs:
    """Stand-ins for the confirmation dialog and pip, recording what the Logic asks for."""

    def __init__(self, answer):
        self.answer, self.asked, self.pip = answer, [], []

    def confirm(self, text, **kwargs):
        self.asked.append(text)
        return self.answer


@pytest.fixture()
def nothing_installed(monkeypatch):
    """A Slicer without torch and without one small package, with the PyTorch extension present."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    monkeypatch.setattr(LiverSegUNet, "PIP_REQUIREMENTS", (("liverseg_absent_pkg", "liverseg-absent-pkg>=1"),))
    calls = []

    class PyTorchUtilsLogic:
        def installTorch(self, **kwargs):
            calls.append(kwargs)
            return types.SimpleNamespace(__version__="2.5.1+cpu")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    return calls


@pytest.mark.parametrize("answer", [True, False])
def test_first_use_asks_once_then_installs_torch_with_a_version_floor(nothing_installed, monkeypatch, answer):
    dialogs = _Dialogs(answer)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", dialogs.confirm, raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", dialogs.pip.append, raising=False)
    logic = LiverSegUNetLogic()
    assert logic.missingDependencies() == ["PyTorch", "liverseg-absent-pkg>=1"]
    assert logic.ensureDependencies(askConfirmation=True) is answer
    assert len(dialogs.asked) == 1 and "PyTorch, liverseg-absent-pkg>=1" in dialogs.asked[0]
    if answer:
        assert nothing_installed == [{"askConfirmation": False, "torchVersionRequirement": ">=2.1"}]
        assert dialogs.pip == [["liverseg-absent-pkg>=1"]]
    else:
        assert nothing_installed == [] and dialogs.pip == []


def test_without_the_pytorch_extension_the_error_says_to_install_it(nothing_installed, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    dialogs = _Dialogs(True)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", dialogs.confirm, raising=False)
    with pytest.raises(RuntimeError, match="PyTorch extension.*Extensions Manager"):
        LiverSegUNetLogic().ensureDependencies()
    assert dialogs.asked == []


@pytest.mark.parametrize(
    "version, ok", [("1.13.1+cu117", False), ("2.0.1", False), ("2.1.0", True), ("2.13.0+cpu", True)]
)
def test_an_old_torch_is_refused_with_what_to_do(monkeypatch, version, ok):
    import torch

    monkeypatch.setattr(torch, "__version__", version)
    if ok:
        assert LiverSegUNetLogic().missingDependencies() == []
    else:
        with pytest.raises(RuntimeError, match=rf"PyTorch {re.escape(version)} is installed.*2\.1 or newer.*uninstall"):
            LiverSegUNetLogic().missingDependencies()


def test_reload_and_test_passes_without_the_3dircadb_data(monkeypatch, tmp_path):
    """Slicer's Reload and Test calls runTest(): without the patients it runs the sample CT test and passes."""
    monkeypatch.setenv("LIVERSEG_DATA", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    test = LiverSegUNet.LiverSegUNetTest()
    ran = []
    monkeypatch.setattr(test, "test_segment_sample_ct", lambda: ran.append("sample"))
    monkeypatch.setattr(test, "test_structures_on_sample_ct", lambda: ran.append("structures"))
    monkeypatch.setattr(test, "test_accurate_on_sample_ct", lambda: ran.append("accurate"))
    monkeypatch.setattr(test, "test_segment_real_patient", lambda: ran.append("patient"))
    test.runTest()
    assert ran == ["sample", "structures", "accurate"]
    monkeypatch.setenv("CI", "true")
    test.runTest()
    assert ran[3:] == ["sample", "structures", "accurate", "patient"]  # under CI the patient test runs too


def test_load_sample_ct_gives_a_ct_volume_node_with_its_dicom_geometry(scene):
    from LiverSegUNetLib.io import read_volume
    from LiverSegUNetLib.sample import sample_ct_path

    node = LiverSegUNetLogic().loadSampleVolume()
    volume = read_volume(sample_ct_path())
    assert node.GetName() == "LiverSegUNet sample CT"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), volume.array)
    assert node.GetSpacing() == pytest.approx(tuple(volume.spacing_mm))
    back = LiverSegUNetLogic.volumeFromNode(node)
    np.testing.assert_allclose(back.ijk_to_lps(), volume.ijk_to_lps(), atol=1e-6)


def test_accurate_parameter_picks_the_bundled_ensemble(scene, monkeypatch, tmp_path):
    """The Accurate parameter selects the accurate model (the self-test runs it on the sample CT); Structures
    wins over it; a version without the accurate model falls back to the liver model."""
    from LiverSegUNetLib import weights

    logic = LiverSegUNetLogic()
    p = logic.getParameterNode()
    logic.setDefaultParameters(p)
    assert p.GetParameter("Accurate") == "false" and logic.modelPathFor(p) is None
    p.SetParameter("Accurate", "true")
    assert logic.modelPathFor(p) == weights.ACCURATE_MODEL
    p.SetParameter("Structures", "true")  # the panel disables Accurate while Structures is ticked
    assert logic.modelPathFor(p) == weights.STRUCTURES_MODEL
    p.SetParameter("Structures", "false")
    monkeypatch.setattr(weights, "ACCURATE_MODEL", tmp_path / "absent.json")
    assert logic.accurateModelPath() is None and logic.modelPathFor(p) is None


def test_a_liver_darker_than_the_cards_floor_is_raised_and_the_panel_says_so(scene, ct, tmp_path):
    """A card whose liver floor lies above this enhanced liver (median about 100 HU) makes the run go again with
    the soft tissue raised: the stats say by how much and the panel's result line says why; the bundled card, whose
    floor (60 HU) lies below this liver, runs once and says nothing of it."""
    import dataclasses

    from LiverSegUNetLib.weights import card_structures, load_model, save_model

    from LiverSegUNet import JobMonitor

    bundled = load_model(device="cpu")
    card = save_model(
        bundled.network,
        dataclasses.replace(bundled.plan, liver_floor_hu=140.0),
        tmp_path / "floor.json",
        model_id="floor-140",
        structures=card_structures(bundled.card),
        provenance={},
        dtype=bundled.card.get("weights_dtype", "float16"),
    )
    volume, expert = ct
    node = add_volume(volume.array, volume.ijk_to_lps())
    logic = LiverSegUNetLogic()
    texts = {}
    for name, path in (("floor", card), ("bundled", None)):
        monitor = JobMonitor(logic, logic.startJob(node, device="cpu", modelPath=path))
        while not monitor.tick():
            pass
        assert monitor.error is None, monitor.error
        texts[name] = (monitor.stats, monitor.statusText())
    (stats, text), (plain, plain_text) = texts["floor"], texts["bundled"]
    assert 25 < stats["raised_hu"] < 55 and "raised" in text and f"raised {stats['raised_hu']:.0f} HU" in text
    assert plain["raised_hu"] == 0 and "raised" not in plain_text and plain_text.startswith("Liver: ")
    assert stats["volume_ml"] > 0.5 * plain["volume_ml"]  # the raised CT still gives this liver
