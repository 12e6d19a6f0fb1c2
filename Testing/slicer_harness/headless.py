"""A real MRML scene with Slicer's own module logics, without the Slicer application.

``start()`` builds the scene, the application logic and the colors, volumes, segmentations and
subject-hierarchy logics, and exposes them where module code looks for them
(``slicer.mrmlScene``, ``slicer.modules.<name>.logic()``, ``slicer.app``), so ``slicer.util``'s
array helpers and the module's Logic run unchanged.
"""

from __future__ import annotations

import sys
import tempfile
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULE_DIR = HERE.parents[1] / "LiverSegUNet"


class _App:
    """What module code asks of ``slicer.app`` outside the GUI."""

    def __init__(self, app_logic):
        self._app_logic = app_logic
        self.temporaryPath = tempfile.gettempdir()
        self.commandOptions = types.SimpleNamespace(noMainWindow=True)

    def applicationLogic(self):
        return self._app_logic

    def processEvents(self, *args):
        pass


def start():
    """Set up (once) and return the ``slicer`` module with a working headless scene."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    import slicer

    if getattr(slicer, "_liverseg_headless", False):
        return slicer
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    modules = types.SimpleNamespace()
    for name, cls in (
        ("colors", slicer.vtkSlicerColorLogic),
        ("subjecthierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
        ("volumes", slicer.vtkSlicerVolumesLogic),
        ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
    ):
        logic = cls()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(name.capitalize() if name != "subjecthierarchy" else "SubjectHierarchy", logic)
        setattr(modules, name, types.SimpleNamespace(logic=(lambda logic=logic: logic)))
    slicer.mrmlScene = scene
    slicer.app = _App(app_logic)
    slicer.modules = modules
    slicer._liverseg_headless = True
    return slicer
