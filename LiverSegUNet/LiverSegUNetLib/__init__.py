"""LiverSegUNet core: CT in, liver segmentation out; no Slicer or Qt needed."""

__version__ = "0.1.0"
