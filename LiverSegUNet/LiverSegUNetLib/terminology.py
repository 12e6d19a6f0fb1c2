"""Standard names, colours and SNOMED CT codes of the structures this package segments."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Code:
    """A coded concept: scheme designator, code value, meaning."""

    scheme: str
    value: str
    meaning: str

    def slicer(self) -> str:
        """Slicer's ``scheme^value^meaning`` form."""
        return f"{self.scheme}^{self.value}^{self.meaning}"


@dataclass(frozen=True)
class Structure:
    """How one structure is named, coloured and coded in a segmentation."""

    name: str
    color_rgb: tuple[int, int, int]
    category: Code
    type: Code
    region: Code | None = None

    @property
    def color(self) -> tuple[float, float, float]:
        """Colour as 0..1 floats, as Slicer stores it."""
        return tuple(c / 255.0 for c in self.color_rgb)

    def terminology_entry(self) -> str:
        """Slicer's ``TerminologyEntry`` tag value for this structure."""
        region = self.region.slicer() if self.region else "^^"
        return (
            f"Segmentation category and type - 3D Slicer General Anatomy list~{self.category.slicer()}~"
            f"{self.type.slicer()}~^^~Anatomic codes - DICOM master list~{region}~^^"
        )


ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
LIVER = Structure("Liver", (221, 130, 101), ANATOMICAL_STRUCTURE, Code("SCT", "10200004", "Liver"))
BONE = Structure("Bone", (241, 214, 145), ANATOMICAL_STRUCTURE, Code("SCT", "272673000", "Bone"))
STRUCTURES = {"liver": LIVER, "bone": BONE}
