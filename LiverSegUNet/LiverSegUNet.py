"""LiverSegUNet: one-click liver segmentation of a CT volume in 3D Slicer, with a bundled U-Net.

Slicer glue only: the pipeline lives in ``LiverSegUNetLib`` (shared with the ``liverseg`` command
line). Qt, torch and the core are imported where they are used, so the module loads fast and its
Logic, job monitor and Test also run without the Slicer application.

Requires Slicer 5.4 or later (``slicer.i18n``) and the PyTorch extension.
"""

import logging
import os
import re
import threading
import time

import numpy as np
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

#: ijk_to_ras = RAS_FROM_LPS @ ijk_to_lps (and back): the core works in LPS, Slicer in RAS.
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
DEVICES = ("auto", "cpu", "cuda")
#: Oldest PyTorch the core runs on (the package's own requirement is torch>=2.1,<3).
TORCH_MINIMUM = (2, 1)
#: Small packages the core imports besides torch and numpy (pydicom ships with Slicer; checked anyway);
#: pillow decodes JPEG 2000 DICOM such as the bundled sample CT.
PIP_REQUIREMENTS = (("safetensors", "safetensors>=0.4"), ("pydicom", "pydicom>=2.4"), ("PIL", "pillow>=10"))


class LiverSegUNet(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Liver Seg UNet")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LiverSegUNet contributors"]
        self.parent.helpText = _(
            "Segments the liver of an abdominal CT volume in one click with a bundled 2D U-Net "
            "(runs on the CPU in seconds, on a GPU when present). The result is a segment named "
            "'Liver' with SNOMED CT terminology in the chosen segmentation. The weights are bundled; "
            "on first use the module asks before installing PyTorch (through the PyTorch extension) "
            "and the small packages it needs. 'Load sample CT' loads a bundled openly licensed CT to try it on."
        )
        self.parent.acknowledgementText = _(
            "Model trained on 3D-IRCADb-01 (IRCAD France, CC BY-NC-ND 4.0) and on slices of the Medical "
            "Segmentation Decathlon Task03 Liver (LiTS, CC BY-SA 4.0); weights for non-commercial research "
            "use only. Sample CT: example CT from TotalSegmentator (Wasserthal et al., Radiology: AI 2023), "
            "Apache-2.0 / CC BY 4.0. Not a medical device."
        )


# ---------------------------------------------------------------------------------------------
# Widget: thin; everything it does is a Logic or JobMonitor call. The model runs in a worker
# thread; a timer calls JobMonitor.tick(), which waits for the worker with the GIL released.
# ---------------------------------------------------------------------------------------------

#: Timer interval between monitor ticks; each tick itself waits up to JobMonitor.WAIT_S for the worker.
TICK_INTERVAL_MS = 10


class LiverSegUNetWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self._monitor = None
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
        self.ui.structuresCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.accurateCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSampleButton)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.show3DButton.connect("clicked(bool)", self.onShow3DButton)
        self._timer = qt.QTimer()
        self._timer.setInterval(TICK_INTERVAL_MS)
        self._timer.connect("timeout()", self.onTimerTick)
        self._observations = [
            slicer.mrmlScene.AddObserver(slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose),
            slicer.mrmlScene.AddObserver(slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose),
            slicer.mrmlScene.AddObserver(slicer.mrmlScene.NodeAboutToBeRemovedEvent, self.onNodeAboutToBeRemoved),
        ]
        self.initializeParameterNode()

    def cleanup(self):
        self._abandonJob()
        for tag in self._observations:
            slicer.mrmlScene.RemoveObserver(tag)
        self._observations = []

    def enter(self):
        self.initializeParameterNode()

    def onSceneStartClose(self, caller, event):
        self._abandonJob()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAboutToBeRemoved(self, caller, event, node):
        if self._monitor and node in (self._monitor.job.inputVolume, self._monitor.job.outputSegmentation):
            self._abandonJob()

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
            self.ui.structuresCheckBox.setChecked(p.GetParameter("Structures") == "true")
            self.ui.accurateCheckBox.setChecked(p.GetParameter("Accurate") == "true")
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
        p.SetParameter("Structures", "true" if self.ui.structuresCheckBox.checked else "false")
        p.SetParameter("Accurate", "true" if self.ui.accurateCheckBox.checked else "false")
        p.EndModify(wasModified)
        self._updateButtons()

    def _updateButtons(self):
        running = self._monitor is not None
        hasInput = self.ui.inputVolumeSelector.currentNode() is not None
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = running or hasInput
        self.ui.show3DButton.enabled = not running and self.ui.outputSegmentationSelector.currentNode() is not None
        for widget in (
            self.ui.inputVolumeSelector,
            self.ui.outputSegmentationSelector,
            self.ui.deviceComboBox,
            self.ui.postprocessCheckBox,
            self.ui.loadSampleButton,
        ):
            widget.enabled = not running
        self.ui.structuresCheckBox.enabled = not running and self.logic.structuresModelPath() is not None
        self.ui.accurateCheckBox.enabled = (
            not running and not self.ui.structuresCheckBox.checked and self.logic.accurateModelPath() is not None
        )

    def onLoadSampleButton(self):
        with slicer.util.tryWithErrorDisplay(_("Could not load the sample CT."), waitCursor=True):
            if not self.logic.ensureDependencies(askConfirmation=True):  # what Apply will need, asked once
                return
            node = self.logic.loadSampleVolume()
            slicer.util.setSliceViewerLayers(background=node, fit=True)
            self.ui.inputVolumeSelector.setCurrentNode(node)

    def onApplyButton(self):
        if self._monitor:
            self._monitor.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        with slicer.util.tryWithErrorDisplay(_("Liver segmentation failed."), waitCursor=True):
            missing = self.logic.missingDependencies()
            if not self.logic.ensureDependencies(askConfirmation=True, missing=missing):
                self.ui.statusLabel.text = _(
                    "Not run: the module needs {packages}. Click Apply again to install them."
                ).format(packages=", ".join(missing))
                return
            p = self.logic.getParameterNode()
            job = self.logic.startJob(
                p.GetNodeReference("InputVolume"),
                p.GetNodeReference("OutputSegmentation"),  # None: created with the result
                p.GetParameter("Device"),
                p.GetParameter("Postprocess") == "true",
                self.logic.modelPathFor(p),
            )
        self._monitor = JobMonitor(self.logic, job)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Starting...")
        self._updateButtons()
        self._timer.start()

    def onTimerTick(self):
        monitor = self._monitor
        finished = monitor.tick()
        stage, fraction = monitor.job.progress
        self.ui.progressBar.value = int(100 * fraction)
        self.ui.progressBar.format = f"{stage} %p%"
        if not finished:
            return
        self._timer.stop()
        self._monitor = None
        self._updateButtons()
        self.ui.statusLabel.text = monitor.statusText()
        if monitor.stats is not None:
            self.ui.outputSegmentationSelector.setCurrentNode(monitor.job.outputSegmentation)
        with slicer.util.tryWithErrorDisplay(_("Liver segmentation failed.")):
            if monitor.error is not None:
                raise monitor.error

    def _abandonJob(self):
        """Stop a running job without writing its result (scene closing, input removed, module closed)."""
        if self._monitor:
            self._monitor.abandon()
            self._monitor = None
            if self._timer:
                self._timer.stop()

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


class JobMonitor:
    """Drives a running SegmentationJob from the main thread, one ``tick()`` per timer event.

    In the Slicer application the main thread holds the GIL while Qt's event loop idles (PythonQt
    does not release it around the loop), so a worker thread only runs while the main thread is in
    Python code that releases the GIL. Each tick therefore waits for the worker in
    ``thread.join(WAIT_S)``, which releases it: the model runs at full speed during the wait, and
    the GUI gets control back at least every ``WAIT_S`` seconds to repaint and take clicks. (A
    subprocess would also free the GUI, but pays interpreter start, torch import and model load,
    1-2 s, on every click, and a copy of the volume through a file.)
    """

    WAIT_S = 0.05

    def __init__(self, logic, job):
        self.logic = logic
        self.job = job
        self.finished = False
        self.stats = None
        self.error = None

    def tick(self):
        """Let the worker run for up to ``WAIT_S``; when it has ended, write the result. True once finished."""
        if self.finished:
            return True
        self.job.thread.join(self.WAIT_S)
        if self.job.thread.is_alive():
            return False
        self.finished = True
        try:
            self.stats = self.logic.finishJob(self.job)
        except Exception as exc:  # shown by the caller
            self.error = exc
        return True

    def cancel(self):
        """Ask the worker to stop at its next batch; the segmentation is left as it was."""
        self.job.cancel.set()

    def abandon(self):
        """Cancel and wait for the worker, writing nothing."""
        self.job.cancel.set()
        self.job.thread.join()
        self.finished = True

    def statusText(self):
        """The panel's result line for a finished job."""
        if self.error is not None:
            return _("Failed: {error}").format(error=self.error)
        if self.stats is None:
            return _("Cancelled; the segmentation was not changed.")
        if self.stats["volume_ml"] == 0:
            return _("No liver found: is it an abdominal CT that covers the liver? The Liver segment is empty.")
        from LiverSegUNetLib.measure import describe, raised_note

        if len(self.stats["structures"]) > 1:
            text = _("{measurements}; in {s:.1f} s").format(
                measurements=describe(self.stats["structures"]), s=self.stats["seconds"]
            )
        else:
            text = _("Liver: {ml:.1f} ml in {s:.1f} s").format(ml=self.stats["volume_ml"], s=self.stats["seconds"])
        return f"{text}; {raised_note(self.stats['raised_hu'])}" if self.stats.get("raised_hu") else text


def checkTorchVersion(version):
    """Refuse a PyTorch older than ``TORCH_MINIMUM`` with what to do about it."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or tuple(int(v) for v in match.groups()) < TORCH_MINIMUM:
        minimum = ".".join(str(v) for v in TORCH_MINIMUM)
        raise RuntimeError(
            _(
                "PyTorch {version} is installed, but Liver Seg UNet needs {minimum} or newer. In the PyTorch Utils "
                "module uninstall it, restart Slicer, and click Apply again to install a current version."
            ).format(version=version, minimum=minimum)
        )


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
        if not parameterNode.GetParameter("Structures"):
            parameterNode.SetParameter("Structures", "false")
        if not parameterNode.GetParameter("Accurate"):
            parameterNode.SetParameter("Accurate", "false")
        if not parameterNode.GetNodeReference("InputVolume"):
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                parameterNode.SetNodeReferenceID("InputVolume", first.GetID())

    # -- dependencies -----------------------------------------------------------------------
    def missingDependencies(self):
        """What must be installed before the model can run ([] when ready); refuses a too old PyTorch."""
        import importlib.util

        missing = []
        try:
            import torch
        except ImportError:
            missing.append("PyTorch")
        else:
            checkTorchVersion(torch.__version__)
        missing += [requirement for module, requirement in PIP_REQUIREMENTS if importlib.util.find_spec(module) is None]
        return missing

    def ensureDependencies(self, askConfirmation=True, missing=None):
        """Install what is missing after one confirmation; False if the user declined.

        PyTorch comes from the PyTorch extension (PyTorchUtils picks the CPU or CUDA build), never
        from a bare pip install; the small packages come from pip. ``missing`` is
        :meth:`missingDependencies` when the caller already has it.
        """
        missing = self.missingDependencies() if missing is None else missing
        if not missing:
            return True
        needTorch = "PyTorch" in missing
        if needTorch:
            try:
                import PyTorchUtils
            except ImportError as exc:
                raise RuntimeError(
                    _(
                        "This module needs the PyTorch extension: install it from the Extensions Manager, "
                        "restart Slicer and click Apply again."
                    )
                ) from exc
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _(
                "Liver Seg UNet needs {packages} on first use. Download and install now? "
                "(PyTorch is installed by the PyTorch extension, about 200 MB for the CPU build and more "
                "for CUDA; this can take several minutes.)"
            ).format(packages=", ".join(missing)),
            windowTitle=_("Install dependencies"),
        ):
            logging.info("LiverSegUNet: installation of %s declined", ", ".join(missing))
            return False
        if needTorch:
            minimum = ".".join(str(v) for v in TORCH_MINIMUM)
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=f">={minimum}"
            )
            if torch is None:
                raise RuntimeError(_("PyTorch could not be installed; the Python console log says why."))
            checkTorchVersion(torch.__version__)
        packages = [requirement for requirement in missing if requirement != "PyTorch"]
        if packages:
            slicer.util.pip_install(packages)
        return True

    @staticmethod
    def structuresModelPath():
        """The bundled multi-structure model card, or None when this version bundles none."""
        from LiverSegUNetLib.weights import STRUCTURES_MODEL

        return STRUCTURES_MODEL if STRUCTURES_MODEL.is_file() else None

    @staticmethod
    def accurateModelPath():
        """The bundled accurate liver model card (an ensemble of networks), or None when this version bundles none."""
        from LiverSegUNetLib.weights import ACCURATE_MODEL

        return ACCURATE_MODEL if ACCURATE_MODEL.is_file() else None

    def modelPathFor(self, parameterNode):
        """The model card the parameters ask for: the multi-structure model when Structures is on, else the
        accurate liver model when Accurate is on, else None (the bundled liver model). A model this version
        does not bundle falls back to the liver model, as the panel disables its box."""
        if parameterNode.GetParameter("Structures") == "true" and self.structuresModelPath():
            return self.structuresModelPath()
        if parameterNode.GetParameter("Accurate") == "true" and self.accurateModelPath():
            return self.accurateModelPath()
        return None

    def model(self, device, modelPath=None):
        """A model on ``device`` (the bundled liver model, or the card at ``modelPath``), loaded and
        checksum-verified once."""
        from LiverSegUNetLib.weights import load_model

        key = (str(modelPath or ""), device)
        if key not in self._models:
            self._models[key] = load_model(modelPath, device=device)
        return self._models[key]

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

    @staticmethod
    def volumeNodeFromVolume(volume, name):
        """A new scalar volume node holding a LiverSegUNetLib Volume (voxels copied, geometry in RAS)."""
        return slicer.util.addVolumeFromArray(
            np.ascontiguousarray(volume.array), RAS_FROM_LPS @ volume.ijk_to_lps(), name=name
        )

    def loadSampleVolume(self):
        """Load the bundled sample CT (20 contrast-enhanced abdominal slices) as a new volume node."""
        from LiverSegUNetLib.io import read_volume
        from LiverSegUNetLib.sample import SAMPLE_NAME, sample_ct_path

        node = self.volumeNodeFromVolume(
            read_volume(sample_ct_path()), slicer.mrmlScene.GenerateUniqueName(SAMPLE_NAME)
        )
        displayNode = node.GetDisplayNode()
        if displayNode is not None:  # abdomen window
            displayNode.SetAutoWindowLevel(False)
            displayNode.SetWindowLevel(400, 40)
        return node

    # -- running ----------------------------------------------------------------------------
    def startJob(self, inputVolume, outputSegmentation=None, device="auto", postprocess=True, modelPath=None):
        """Copy the input and start segmenting in a worker thread; call ``finishJob`` when it ends.

        Without ``outputSegmentation``, ``finishJob`` creates one for the result. ``modelPath``: a model
        card to use instead of the bundled liver model; its structures become the segments.
        """
        from LiverSegUNetLib.inference import check_ct
        from LiverSegUNetLib.runtime import resolve_device

        volume = self.volumeFromNode(inputVolume)
        check_ct(volume)  # refused here, in the main thread, before a worker starts
        device = resolve_device(device)
        model = self.model(device, modelPath)
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
                    checked=True,  # by check_ct above
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
        result = job.result
        self.writeSegments(job.outputSegmentation, job.inputVolume, result.structures, [m.array for m in result.masks])
        from LiverSegUNetLib.measure import measurements

        return {
            "volume_ml": result.volume_ml,
            "structures": measurements(result.structures, result.masks),
            "seconds": time.perf_counter() - job.started,
            "device": job.result.device,
            "precision": job.result.precision,
            "model_id": job.result.model_id,
            "raised_hu": job.result.raised_hu,
        }

    def process(
        self,
        inputVolume,
        outputSegmentation=None,
        device="auto",
        postprocess=True,
        progress=None,
        cancel=None,
        modelPath=None,
    ):
        """Segment synchronously (console and tests) through the same JobMonitor the Apply button drives.

        Returns the stats dict, or None if cancelled; ``progress(stage, fraction)`` is called each tick.
        """
        monitor = JobMonitor(self, self.startJob(inputVolume, outputSegmentation, device, postprocess, modelPath))
        while not monitor.tick():
            if progress:
                progress(*monitor.job.progress)
            if cancel and cancel():
                monitor.cancel()
        if monitor.error is not None:
            raise monitor.error
        return monitor.stats

    def newSegmentationNode(self, inputVolume):
        """An empty segmentation node named after the input volume."""
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{inputVolume.GetName()} liver")
        node.CreateDefaultDisplayNodes()
        return node

    # -- writing the result -----------------------------------------------------------------
    def writeSegments(self, segmentationNode, referenceVolume, structures, masks):
        """One segment per structure (``masks`` ``[k, j, i]`` on the reference volume's grid), all or nothing.

        The rule for existing segments: a segment whose name is a produced structure's name (ignoring
        case, as Slicer compares names) is that structure's segment and is replaced; every other segment
        is left untouched. Two segments with one such name make the run refuse before anything changes.
        If writing fails, added segments are removed and replaced ones restored. Returns the segment IDs.
        """
        from LiverSegUNetLib.errors import InputError

        segmentation = segmentationNode.GetSegmentation()
        existing = {}
        for structure in structures:
            ids = [
                segmentation.GetNthSegmentID(i)
                for i in range(segmentation.GetNumberOfSegments())
                if (segmentation.GetNthSegment(i).GetName() or "").lower() == structure.name.lower()
            ]
            if len(ids) > 1:
                raise InputError(
                    _(
                        "'{node}' has {n} segments named '{name}'; rename or delete all but one, so the result "
                        "replaces the right one."
                    ).format(node=segmentationNode.GetName(), n=len(ids), name=structure.name)
                )
            existing[structure.name] = ids[0] if ids else ""
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
        added, backups, written = [], {}, []
        try:
            for structure, mask in zip(structures, masks):
                segmentId = existing[structure.name]
                if segmentId:
                    backups[segmentId] = slicer.vtkSegment()
                    backups[segmentId].DeepCopy(segmentation.GetSegment(segmentId))
                else:
                    segmentId = segmentation.AddEmptySegment(
                        segmentation.GenerateUniqueSegmentID(structure.name), structure.name, list(structure.color)
                    )
                    added.append(segmentId)
                slicer.util.updateSegmentBinaryLabelmapFromArray(
                    np.asarray(mask, dtype=np.uint8), segmentationNode, segmentId, referenceVolume
                )
                segment = segmentation.GetSegment(segmentId)
                segment.SetName(structure.name)
                segment.SetNameAutoGenerated(False)
                segment.SetColor(*structure.color)
                segment.SetColorAutoGenerated(False)
                segment.SetTerminology(structure.terminology_entry())
                written.append(segmentId)
        except Exception:
            for segmentId in added:
                segmentation.RemoveSegment(segmentId)
            for segmentId, backup in backups.items():
                segmentation.GetSegment(segmentId).DeepCopy(backup)
            raise
        self.placeUnderStudy(segmentationNode, referenceVolume)
        return written

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
    """Segments the bundled sample CT (everywhere) and a real 3D-IRCADb patient (when its data is present)."""

    PATIENT = "3Dircadb1.17"

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """What Slicer's Reload and Test runs: the sample CT always; the 3D-IRCADb patient if present."""
        self.setUp()
        self.test_segment_sample_ct()
        self.setUp()
        self.test_structures_on_sample_ct()
        self.setUp()
        self.test_accurate_on_sample_ct()
        if self._patientFolder().is_dir() or os.environ.get("CI", "").lower() == "true":
            self.setUp()
            self.test_segment_real_patient()
        else:
            self.delayDisplay(f"Skipped the 3D-IRCADb test: {self._missingPatientMessage()}")

    def _patientFolder(self):
        from LiverSegUNetLib.io.ircadb import default_data_root

        return default_data_root() / "3Dircadb1" / self.PATIENT

    def _missingPatientMessage(self):
        return (
            f"3D-IRCADb-01 patient {self.PATIENT} not found at {self._patientFolder()}: download 3D-IRCADb-01 from "
            "IRCAD and set LIVERSEG_DATA to the folder holding 3Dircadb1/"
        )

    def _assertLiverSegment(self, segmentationNode):
        from LiverSegUNetLib.terminology import LIVER

        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 1)
        segmentId = segmentation.GetSegmentIdBySegmentName("Liver")
        segment = segmentation.GetSegment(segmentId)
        self.assertEqual(segment.GetName(), "Liver")
        np.testing.assert_allclose(segment.GetColor(), LIVER.color, atol=1e-6)
        self.assertIn("SCT^10200004^Liver", segment.GetTerminology())
        self.assertIn("SCT^123037004^Anatomical Structure", segment.GetTerminology())
        return segmentId

    def test_segment_sample_ct(self):
        """The bundled sample CT: a liver in every slice, on the patient's right, of a plausible size."""
        logic = LiverSegUNetLogic()
        self.delayDisplay("Loading the sample CT")
        volumeNode = logic.loadSampleVolume()
        self.delayDisplay("Segmenting")
        stats = logic.process(volumeNode, device="cpu")
        self.assertIsNotNone(stats)
        segmentationNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
        segmentId = self._assertLiverSegment(segmentationNode)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        ct = slicer.util.arrayFromVolume(volumeNode)
        self.assertEqual(mask.shape, ct.shape)
        self.assertTrue(mask.any(axis=(1, 2)).all(), "the liver is in every slice of the sample")
        # 40 mm slab of the upper abdomen: hundreds of ml (665 ml with the bundled model), not a speck or the body
        self.assertTrue(300 < stats["volume_ml"] < 1000, stats["volume_ml"])
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        ijkToRas = slicer.util.arrayFromVTKMatrix(ijkToRas)

        def centreRas(selection):
            k, j, i = np.nonzero(selection)
            return (ijkToRas @ np.array([i.mean(), j.mean(), k.mean(), 1.0]))[:3]

        liver, body = centreRas(mask), centreRas(ct > -300)
        self.assertGreater(liver[0], body[0] + 30, "the liver lies on the patient's right (+R in RAS)")
        liverHu = ct[mask > 0]
        self.assertTrue(40 < np.median(liverHu) < 200, "contrast-enhanced liver tissue, not fat, air or bone")
        self.delayDisplay(f"Sample CT: liver {stats['volume_ml']:.1f} ml")

    def test_structures_on_sample_ct(self):
        """With the bundled multi-structure model: one coded segment per card structure, the liver first."""
        from LiverSegUNetLib.weights import read_card

        logic = LiverSegUNetLogic()
        modelPath = logic.structuresModelPath()
        if modelPath is None:
            self.delayDisplay("No multi-structure model bundled: nothing to test")
            return
        structures = read_card(modelPath)["structures"]
        volumeNode = logic.loadSampleVolume()
        stats = logic.process(volumeNode, device="cpu", modelPath=modelPath)
        segmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode").GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(structures))
        for entry in structures:
            segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(entry["name"]))
            self.assertIn("~{}^{}^{}~".format(*entry["type"]), segment.GetTerminology())
            np.testing.assert_allclose(segment.GetColor(), np.array(entry["color"]) / 255.0, atol=1e-6)
        self.assertEqual([row["name"] for row in stats["structures"]], [e["name"] for e in structures])
        self.assertTrue(300 < stats["volume_ml"] < 1000, stats["volume_ml"])
        self.delayDisplay(f"Sample CT, structures: {stats['structures']}")

    def test_accurate_on_sample_ct(self):
        """With the bundled accurate model (an ensemble): one liver segment, close to the default model's."""
        logic = LiverSegUNetLogic()
        modelPath = logic.accurateModelPath()
        if modelPath is None:
            self.delayDisplay("No accurate model bundled: nothing to test")
            return
        volumeNode = logic.loadSampleVolume()
        default = logic.process(volumeNode, logic.newSegmentationNode(volumeNode), device="cpu")
        segmentationNode = logic.newSegmentationNode(volumeNode)
        stats = logic.process(volumeNode, segmentationNode, device="cpu", modelPath=modelPath)
        self._assertLiverSegment(segmentationNode)
        self.assertNotEqual(stats["model_id"], default["model_id"])
        self.assertAlmostEqual(stats["volume_ml"], default["volume_ml"], delta=0.1 * default["volume_ml"])
        self.delayDisplay(f"Sample CT, accurate model: liver {stats['volume_ml']:.1f} ml")

    def test_segment_real_patient(self):
        from LiverSegUNetLib.io.ircadb import IrcadbPatient
        from LiverSegUNetLib.metrics import dice

        if not self._patientFolder().is_dir():
            if os.environ.get("CI", "").lower() == "true":
                self.fail(self._missingPatientMessage())
            self.skipTest(self._missingPatientMessage())
        patient = IrcadbPatient(self._patientFolder())
        ct = patient.ct
        self.delayDisplay(f"Loading {patient.name} as a volume node")
        logic = LiverSegUNetLogic()
        volumeNode = logic.volumeNodeFromVolume(ct, patient.name)
        segmentationNode = logic.newSegmentationNode(volumeNode)
        self.delayDisplay("Segmenting")
        stats = logic.process(volumeNode, segmentationNode, device="cpu")
        self.assertIsNotNone(stats)
        segmentId = self._assertLiverSegment(segmentationNode)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        self.assertEqual(mask.shape, ct.shape)
        score = dice(mask, patient.mask("liver").array)
        self.delayDisplay(f"Dice against the expert mask: {score:.4f}")
        self.assertGreaterEqual(score, 0.85)
        self.assertAlmostEqual(stats["volume_ml"], mask.sum() * ct.voxel_volume_ml, delta=1.0)
        self.delayDisplay("Test passed")
