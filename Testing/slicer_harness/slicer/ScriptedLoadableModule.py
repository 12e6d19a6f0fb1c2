"""Stand-ins for Slicer's ScriptedLoadableModule base classes, for running module Logic and Tests headless.

Only what the Qt application would otherwise provide is imitated: the module and widget bases
hold their parent, the Logic finds its parameter node in ``slicer.mrmlScene`` exactly as Slicer
does, and the Test base is a plain ``unittest.TestCase``.
"""

import logging
import unittest

import slicer


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""

    def getDefaultModuleDocumentationLink(self, docPage=None):
        return ""


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent
        self.moduleName = self.__class__.__name__[: -len("Widget")]

    def resourcePath(self, filename):
        raise RuntimeError("the module's widget needs the Slicer application")


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.parent = parent
        self.moduleName = self.__class__.__name__[: -len("Logic")] if self.__class__.__name__.endswith("Logic") else ""

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node:
            return node
        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag(self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        return slicer.mrmlScene.AddNode(node)


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, requestedDelay=None, msec=None):
        logging.info(message)
