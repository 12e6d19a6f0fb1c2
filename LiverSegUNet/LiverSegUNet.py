"""LiverSegUNet: one-click liver segmentation of a CT volume in 3D Slicer, with a bundled U-Net.

Slicer glue only: the pipeline lives in ``LiverSegUNetLib`` (shared with the ``liverseg`` command
line). Qt, torch and the core are imported where they are used, so the module loads fast and its
Logic and Test also run without the Slicer application.
"""

import logging
import os
import threading
import time

import numpy as np
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

#: ijk_to_ras = RAS_FROM_LPS @ ijk_to_lps (and back): the core works in LPS, Slicer in RAS.
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
DEVICES = ("auto", "cpu", "cuda")
LIVER_SEGMENT_ID = "Liver"


class LiverSegUNet(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Liver Seg UNet")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LiverSegUNet contributors"]
        self.parent.helpText = _(
            "Segments the liver of an abdominal CT volume in one click with a bundled 2D U-Net "
            "(runs on the CPU in seconds, on a GPU when present). The result is a segment named "
            "'Liver' with SNOMED CT terminology in the chosen segmentation."
        )
        self.parent.acknowledgementText = _(
            "Model trained on 3D-IRCADb-01 (IRCAD France); weights for non-commercial research use only. "
            "Not a medical device."
        )


# ---------------------------------------------------------------------------------------------
# Widget: thin; everything it does is a Logic call. The model runs in a worker thread, MRML is
# only touched from the main thread (on a timer), so the GUI stays responsive.
# ---------------------------------------------------------------------------------------------


class LiverSegUNetWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self._job = None
        self._timer = None
        self._observations = []
        self._updating = False

    def setup(self):
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LiverSegUNet.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LiverSegUNetLogic()
        for device in DEVICES:
            self.ui.deviceComboBox.addItem(device)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.postprocessCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.show3DButton.connect("clicked(bool)", self.onShow3DButton)
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._poll)
        self._observations = [
            slicer.mrmlScene.AddObserver(slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose),
            slicer.mrmlScene.AddObserver(slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose),
            slicer.mrmlScene.AddObserver(slicer.mrmlScene.NodeAboutToBeRemovedEvent, self.onNodeAboutToBeRemoved),
        ]
        self.initializeParameterNode()

    def cleanup(self):
        self._cancelJob()
        for tag in self._observations:
            slicer.mrmlScene.RemoveObserver(tag)
        self._observations = []

    def enter(self):
        self.initializeParameterNode()

    def onSceneStartClose(self, caller, event):
        self._cancelJob()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAboutToBeRemoved(self, caller, event, node):
        if self._job and node in (self._job.inputVolume, self._job.outputSegmentation):
            self._cancelJob()

    def initializeParameterNode(self):
        parameterNode = self.logic.getParameterNode()
        self.logic.setDefaultParameters(parameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self):
        p = self.logic.getParameterNode()
        self._updating = True
        try:
            self.ui.inputVolumeSelector.setCurrentNode(p.GetNodeReference("InputVolume"))
            self.ui.outputSegmentationSelector.setCurrentNode(p.GetNodeReference("OutputSegmentation"))
            self.ui.deviceComboBox.setCurrentText(p.GetParameter("Device"))
            self.ui.postprocessCheckBox.setChecked(p.GetParameter("Postprocess") == "true")
        finally:
            self._updating = False
        self._updateButtons()

    def updateParameterNodeFromGUI(self, *args):
        if self._updating:
            return
        p = self.logic.getParameterNode()
        wasModified = p.StartModify()
        inputNode = self.ui.inputVolumeSelector.currentNode()
        outputNode = self.ui.outputSegmentationSelector.currentNode()
        p.SetNodeReferenceID("InputVolume", inputNode.GetID() if inputNode else None)
        p.SetNodeReferenceID("OutputSegmentation", outputNode.GetID() if outputNode else None)
        p.SetParameter("Device", self.ui.deviceComboBox.currentText)
        p.SetParameter("Postprocess", "true" if self.ui.postprocessCheckBox.checked else "false")
        p.EndModify(wasModified)
        self._updateButtons()

    def _updateButtons(self):
        running = self._job is not None
        hasInput = self.ui.inputVolumeSelector.currentNode() is not None
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = running or hasInput
        self.ui.show3DButton.enabled = not running and self.ui.outputSegmentationSelector.currentNode() is not None
        for widget in (
            self.ui.inputVolumeSelector,
            self.ui.outputSegmentationSelector,
            self.ui.deviceComboBox,
            self.ui.postprocessCheckBox,
        ):
            widget.enabled = not running

    def onApplyButton(self):
        if self._job:
            self._job.cancel.set()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        try:
            if not self.logic.ensureDependencies(askConfirmation=True):
                return
            p = self.logic.getParameterNode()
            inputVolume = p.GetNodeReference("InputVolume")
            outputSegmentation = p.GetNodeReference("OutputSegmentation")  # None: created with the result
            self._job = self.logic.startJob(
                inputVolume, outputSegmentation, p.GetParameter("Device"), p.GetParameter("Postprocess") == "true"
            )
        except Exception as exc:
            self._showError(exc)
            return
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Starting...")
        self._updateButtons()
        self._timer.start()

    def _poll(self):
        job = self._job
        stage, fraction = job.progress
        self.ui.progressBar.value = int(100 * fraction)
        self.ui.progressBar.format = f"{stage} %p%"
        if job.thread.is_alive():
            return
        self._timer.stop()
        self._job = None
        try:
            stats = self.logic.finishJob(job)
        except Exception as exc:
            self._showError(exc)
        else:
            if stats is None:
                self.ui.statusLabel.text = _("Cancelled; the segmentation was not changed.")
            else:
                self.ui.outputSegmentationSelector.setCurrentNode(job.outputSegmentation)
                self.ui.statusLabel.text = _("Liver: {ml:.1f} ml in {s:.1f} s").format(
                    ml=stats["volume_ml"], s=stats["seconds"]
                )
        self._updateButtons()

    def _cancelJob(self):
        if self._job:
            self._job.cancel.set()
            self._job.thread.join()
            self._job = None
            if self._timer:
                self._timer.stop()

    def _showError(self, exc):
        logging.exception("LiverSegUNet failed")
        self.ui.statusLabel.text = _("Failed: {error}").format(error=exc)
        slicer.util.errorDisplay(str(exc), windowTitle=_("Liver segmentation failed"))

    def onShow3DButton(self):
        node = self.ui.outputSegmentationSelector.currentNode()
        if node:
            node.CreateClosedSurfaceRepresentation()


# ---------------------------------------------------------------------------------------------
# Logic: usable from the Python console, from tests, and by the widget.
# ---------------------------------------------------------------------------------------------


class SegmentationJob:
    """A segmentation running in a worker thread: the inputs, progress, cancel flag and outcome."""

    def __init__(self, inputVolume, outputSegmentation, volume, device, postprocess):
        self.inputVolume = inputVolume
        self.outputSegmentation = outputSegmentation
        self.volume = volume
        self.device = device
        self.postprocess = postprocess
        self.cancel = threading.Event()
        self.progress = ("waiting", 0.0)
        self.result = None
        self.error = None
        self.started = time.perf_counter()
        self.thread = None


class LiverSegUNetLogic(ScriptedLoadableModuleLogic):
    """Segment the liver of a scalar volume node into a segmentation node, through LiverSegUNetLib."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._models = {}

    # -- parameters -------------------------------------------------------------------------
    def setDefaultParameters(self, parameterNode):
        """Fill missing parameters: first scalar volume as input, device auto, postprocessing on."""
        if not parameterNode.GetParameter("Device"):
            parameterNode.SetParameter("Device", "auto")
        if not parameterNode.GetParameter("Postprocess"):
            parameterNode.SetParameter("Postprocess", "true")
        if not parameterNode.GetNodeReference("InputVolume"):
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                parameterNode.SetNodeReferenceID("InputVolume", first.GetID())

    # -- dependencies -----------------------------------------------------------------------
    def ensureDependencies(self, askConfirmation=True):
        """Make torch (through the PyTorch extension) and small packages importable; False if declined."""
        try:
            import torch  # noqa: F401
        except ImportError:
            try:
                import PyTorchUtils
            except ImportError as exc:
                raise RuntimeError(
                    _("This module needs the PyTorch extension: install it from the Extensions Manager.")
                ) from exc
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation) is None:
                return False
        missing = []
        for module, package in (("safetensors", "safetensors"), ("pydicom", "pydicom")):
            try:
                __import__(module)
            except ImportError:
                missing.append(package)
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("LiverSegUNet needs these Python packages: {packages}. Install them now?").format(
                    packages=", ".join(missing)
                )
            ):
                return False
            slicer.util.pip_install(missing)
        return True

    def model(self, device):
        """The bundled model on ``device``, loaded (and checksum-verified) once."""
        from LiverSegUNetLib.weights import load_model

        if device not in self._models:
            self._models[device] = load_model(device=device)
        return self._models[device]

    # -- geometry ---------------------------------------------------------------------------
    @staticmethod
    def volumeFromNode(volumeNode):
        """The node's voxels and IJK-to-RAS geometry as a LiverSegUNetLib Volume (LPS), refusing non-CT input."""
        from LiverSegUNetLib.errors import InputError
        from LiverSegUNetLib.volume import Volume

        if volumeNode is None:
            raise InputError(_("Select an input CT volume."))
        if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(
                _("'{name}' is not a scalar CT volume (colour, vector or label volumes cannot be segmented).").format(
                    name=volumeNode.GetName()
                )
            )
        image = volumeNode.GetImageData()
        if image is None or image.GetNumberOfPoints() == 0:
            raise InputError(_("'{name}' has no voxels.").format(name=volumeNode.GetName()))
        if image.GetNumberOfScalarComponents() != 1:
            raise InputError(
                _("'{name}' has {n} components per voxel; a CT volume has one.").format(
                    name=volumeNode.GetName(), n=image.GetNumberOfScalarComponents()
                )
            )
        array = slicer.util.arrayFromVolume(volumeNode)
        if array.ndim != 3 or min(array.shape) < 2:
            raise InputError(
                _("'{name}' is not a 3D volume (shape {shape}).").format(name=volumeNode.GetName(), shape=array.shape)
            )
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        ijkToLps = RAS_FROM_LPS @ slicer.util.arrayFromVTKMatrix(ijkToRas)
        spacing = np.linalg.norm(ijkToLps[:3, :3], axis=0)
        return Volume(
            array.copy(), spacing, ijkToLps[:3, 3], ijkToLps[:3, :3] / spacing, {"node": volumeNode.GetName()}
        )

    # -- running ----------------------------------------------------------------------------
    def startJob(self, inputVolume, outputSegmentation=None, device="auto", postprocess=True):
        """Copy the input and start segmenting in a worker thread; call ``finishJob`` when it ends.

        Without ``outputSegmentation``, ``finishJob`` creates one for the result.
        """
        from LiverSegUNetLib.inference import check_ct, resolve_device

        volume = self.volumeFromNode(inputVolume)
        check_ct(volume)
        device = resolve_device(device)
        model = self.model(device)
        job = SegmentationJob(inputVolume, outputSegmentation, volume, device, postprocess)

        def work():
            from LiverSegUNetLib.inference import segment

            try:
                job.result = segment(
                    job.volume,
                    model,
                    device=device,
                    postprocess=postprocess,
                    progress=lambda stage, fraction: setattr(job, "progress", (stage, fraction)),
                    cancel=job.cancel.is_set,
                )
            except Exception as exc:  # handed to the main thread by finishJob
                job.error = exc

        job.thread = threading.Thread(target=work, name="LiverSegUNet", daemon=True)
        job.thread.start()
        return job

    def finishJob(self, job):
        """In the main thread: write the finished job's mask into its segmentation; None if cancelled."""
        from LiverSegUNetLib.errors import Cancelled

        job.thread.join()
        if isinstance(job.error, Cancelled) or job.cancel.is_set():
            return None
        if job.error is not None:
            raise job.error
        if (
            slicer.mrmlScene.IsClosing()
            or job.inputVolume.GetScene() is None
            or (job.outputSegmentation is not None and job.outputSegmentation.GetScene() is None)
        ):
            return None
        if job.outputSegmentation is None:  # created only now, so a failed or cancelled run adds no node
            job.outputSegmentation = self.newSegmentationNode(job.inputVolume)
        self.writeLiverSegment(job.outputSegmentation, job.inputVolume, job.result.mask.array)
        return {
            "volume_ml": job.result.volume_ml,
            "seconds": time.perf_counter() - job.started,
            "device": job.result.device,
            "precision": job.result.precision,
            "model_id": job.result.model_id,
        }

    def process(
        self, inputVolume, outputSegmentation=None, device="auto", postprocess=True, progress=None, cancel=None
    ):
        """Segment synchronously (console and tests); returns the stats dict, or None if cancelled."""
        job = self.startJob(inputVolume, outputSegmentation, device, postprocess)
        while job.thread.is_alive():
            job.thread.join(0.05)
            if progress:
                progress(*job.progress)
            if cancel and cancel():
                job.cancel.set()
        return self.finishJob(job)

    def newSegmentationNode(self, inputVolume):
        """An empty segmentation node named after the input volume."""
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{inputVolume.GetName()} liver")
        node.CreateDefaultDisplayNodes()
        return node

    # -- writing the result -----------------------------------------------------------------
    def writeLiverSegment(self, segmentationNode, referenceVolume, mask):
        """Put ``mask`` (``[k, j, i]`` on the reference volume's grid) in the 'Liver' segment, replacing it if present.

        Other segments are left untouched; if writing fails, a segment added here is removed again.
        """
        from LiverSegUNetLib.terminology import LIVER

        segmentation = segmentationNode.GetSegmentation()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
        segmentId = segmentation.GetSegmentIdBySegmentName(LIVER.name) or (
            LIVER_SEGMENT_ID if segmentation.GetSegment(LIVER_SEGMENT_ID) else ""
        )
        added = not segmentId
        if added:
            segmentId = segmentation.AddEmptySegment(LIVER_SEGMENT_ID, LIVER.name, list(LIVER.color))
        try:
            slicer.util.updateSegmentBinaryLabelmapFromArray(
                mask.astype(np.uint8), segmentationNode, segmentId, referenceVolume
            )
        except Exception:
            if added:
                segmentation.RemoveSegment(segmentId)
            raise
        segment = segmentation.GetSegment(segmentId)
        segment.SetName(LIVER.name)
        segment.SetNameAutoGenerated(False)
        segment.SetColor(*LIVER.color)
        segment.SetColorAutoGenerated(False)
        segment.SetTerminology(LIVER.terminology_entry())
        self.placeUnderStudy(segmentationNode, referenceVolume)
        return segmentId

    @staticmethod
    def placeUnderStudy(segmentationNode, referenceVolume):
        """Put the segmentation beside its input volume in the subject hierarchy (under the same study)."""
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        if shNode is None:
            return
        volumeItem = shNode.GetItemByDataNode(referenceVolume)
        if not volumeItem:
            return
        parent = shNode.GetItemParent(volumeItem)
        segItem = shNode.GetItemByDataNode(segmentationNode) or shNode.CreateItem(parent, segmentationNode)
        shNode.SetItemParent(segItem, parent)


# ---------------------------------------------------------------------------------------------
# Test: runs in Slicer (ctest, Reload and Test) and headless under pytest (Testing/).
# ---------------------------------------------------------------------------------------------


class LiverSegUNetTest(ScriptedLoadableModuleTest):
    """Segments a real 3D-IRCADb patient loaded as a volume node and checks the result against the expert mask."""

    PATIENT = "3Dircadb1.17"

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_real_patient()

    def _patient(self):
        from LiverSegUNetLib.io.ircadb import IrcadbPatient, default_data_root

        folder = default_data_root() / "3Dircadb1" / self.PATIENT
        if not folder.is_dir():
            message = (
                f"3D-IRCADb-01 patient {self.PATIENT} not found at {folder}: download 3D-IRCADb-01 from IRCAD "
                "and set LIVERSEG_DATA to the folder holding 3Dircadb1/"
            )
            if os.environ.get("CI", "").lower() == "true":
                self.fail(message)
            self.skipTest(message)
        return IrcadbPatient(folder)

    def test_segment_real_patient(self):
        from LiverSegUNetLib.metrics import dice
        from LiverSegUNetLib.terminology import LIVER

        patient = self._patient()
        ct = patient.ct
        self.delayDisplay(f"Loading {patient.name} as a volume node")
        volumeNode = slicer.util.addVolumeFromArray(ct.array, name=patient.name)
        ijkToRas = RAS_FROM_LPS @ ct.ijk_to_lps()
        volumeNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRas))
        logic = LiverSegUNetLogic()
        segmentationNode = logic.newSegmentationNode(volumeNode)
        self.delayDisplay("Segmenting")
        stats = logic.process(volumeNode, segmentationNode, device="cpu")
        self.assertIsNotNone(stats)
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 1)
        segmentId = segmentation.GetSegmentIdBySegmentName("Liver")
        segment = segmentation.GetSegment(segmentId)
        self.assertEqual(segment.GetName(), "Liver")
        np.testing.assert_allclose(segment.GetColor(), LIVER.color, atol=1e-6)
        self.assertIn("SCT^10200004^Liver", segment.GetTerminology())
        self.assertIn("SCT^123037004^Anatomical Structure", segment.GetTerminology())
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        self.assertEqual(mask.shape, ct.shape)
        score = dice(mask, patient.mask("liver").array)
        self.delayDisplay(f"Dice against the expert mask: {score:.4f}")
        self.assertGreaterEqual(score, 0.85)
        self.assertAlmostEqual(stats["volume_ml"], mask.sum() * ct.voxel_volume_ml, delta=1.0)
        self.delayDisplay("Test passed")
