"""Structures a model segments: name, colour, SNOMED CT codes and how each is cleaned up.

A model card lists its output structures (one per network channel) in this form; everything
downstream (postprocessing, writers, summary, preview, Slicer) reads that list, so a new structure
is a card entry and a trained channel, not a code change. :data:`CATALOGUE` holds the entries the
training pipeline writes into cards.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import WeightsError

#: How a structure's thresholded mask is cleaned up (``postprocess`` in a card):
#: ``largest``: the largest 3D connected component, holes filled slice by slice (an organ);
#: ``all``: every component inside the body outline (vessels, bone, paired organs: made of many pieces);
#: ``inside:<Name>``: every component, restricted to the named structure's mask (tumours in the liver).
POSTPROCESS = ("largest", "all", "inside:<Name>")


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
    """One output structure: how it is named, coloured, coded, cleaned up and measured."""

    name: str
    color_rgb: tuple[int, int, int]
    category: Code
    type: Code
    postprocess: str = "largest"
    lesions: bool = False  # measured as lesions: count, and volume share of the structure it lies inside

    @property
    def color(self) -> tuple[float, float, float]:
        """Colour as 0..1 floats, as Slicer stores it."""
        return tuple(c / 255.0 for c in self.color_rgb)

    @property
    def inside(self) -> str | None:
        """The structure this one is restricted to (``inside:<Name>``), or None."""
        return self.postprocess[len("inside:") :] if self.postprocess.startswith("inside:") else None

    def terminology_entry(self) -> str:
        """Slicer's ``TerminologyEntry`` tag value for this structure."""
        return (
            f"Segmentation category and type - 3D Slicer General Anatomy list~{self.category.slicer()}~"
            f"{self.type.slicer()}~^^~Anatomic codes - DICOM master list~^^~^^"
        )

    def to_card(self) -> dict:
        """The structure as a model card's ``structures`` entry."""
        entry = {
            "name": self.name,
            "color": list(self.color_rgb),
            "category": [self.category.scheme, self.category.value, self.category.meaning],
            "type": [self.type.scheme, self.type.value, self.type.meaning],
            "postprocess": self.postprocess,
        }
        if self.lesions:
            entry["lesions"] = True
        return entry

    @classmethod
    def from_card(cls, entry: dict, where: str) -> Structure:
        """A structure from a card entry; a missing or malformed field raises :class:`WeightsError` naming it."""
        if not isinstance(entry, dict):
            raise WeightsError(
                f"{where}: a structure must be an object with name, color, category, type; got {entry!r}"
            )
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise WeightsError(f"{where}: a structure has no name")
        where = f"{where}: structure '{name}'"
        color = entry.get("color")
        if not (isinstance(color, list) and len(color) == 3 and all(type(c) is int and 0 <= c <= 255 for c in color)):
            raise WeightsError(f"{where} needs a colour as three integers 0..255, got {color!r}")
        codes = []
        for key in ("category", "type"):
            code = entry.get(key)
            if not (isinstance(code, list) and len(code) == 3 and all(isinstance(c, str) and c for c in code)):
                raise WeightsError(f"{where} needs a {key} code as [scheme, value, meaning] (SNOMED CT), got {code!r}")
            codes.append(Code(*code))
        postprocess = entry.get("postprocess", "largest")
        if postprocess not in ("largest", "all") and not (
            isinstance(postprocess, str) and postprocess.startswith("inside:") and len(postprocess) > 7
        ):
            raise WeightsError(f"{where}: postprocess {postprocess!r} is none of {', '.join(POSTPROCESS)}")
        unknown = set(entry) - {"name", "color", "category", "type", "postprocess", "lesions"}
        if unknown:
            raise WeightsError(f"{where}: unknown field(s) {sorted(unknown)}")
        return cls(name, tuple(color), *codes, postprocess=postprocess, lesions=bool(entry.get("lesions", False)))


def structures_from_card(entries, channels: int, where: str) -> list[Structure]:
    """The card's structure list, checked: one per network output channel, unique names, and every
    ``inside:`` naming an earlier structure (it is cleaned up first)."""
    if not isinstance(entries, list) or not entries:
        raise WeightsError(f"{where}: 'structures' must be a non-empty list")
    structures = [Structure.from_card(e, where) for e in entries]
    if len(structures) != channels:
        raise WeightsError(
            f"{where}: the card lists {len(structures)} structure(s) but the network has {channels} output channel(s)"
        )
    seen: list[str] = []
    for s in structures:
        if s.name.lower() in (n.lower() for n in seen):
            raise WeightsError(f"{where}: two structures are named '{s.name}'")
        if s.inside is not None and s.inside not in seen:
            raise WeightsError(f"{where}: structure '{s.name}' is inside '{s.inside}', which is not listed before it")
        seen.append(s.name)
    return structures


ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
ALTERED_STRUCTURE = Code("SCT", "49755003", "Morphologically Altered Structure")
LIVER = Structure("Liver", (221, 130, 101), ANATOMICAL_STRUCTURE, Code("SCT", "10200004", "Liver"))

#: Every structure the training pipeline knows, by its config key.
CATALOGUE = {
    "liver": LIVER,
    "liver_tumours": Structure(
        "Liver tumours", (255, 214, 0), ALTERED_STRUCTURE, Code("SCT", "108369006", "Neoplasm"), "inside:Liver", True
    ),
    "portal_vein": Structure(
        "Portal vein", (0, 151, 206), ANATOMICAL_STRUCTURE, Code("SCT", "32764006", "Portal vein"), "all"
    ),
    "venous_system": Structure(
        "Hepatic veins and vena cava", (0, 70, 160), ANATOMICAL_STRUCTURE, Code("SCT", "29092000", "Vein"), "all"
    ),
    "arteries": Structure("Arteries", (216, 101, 79), ANATOMICAL_STRUCTURE, Code("SCT", "51114001", "Artery"), "all"),
    "spleen": Structure("Spleen", (157, 108, 162), ANATOMICAL_STRUCTURE, Code("SCT", "78961009", "Spleen")),
    "kidneys": Structure("Kidneys", (185, 102, 83), ANATOMICAL_STRUCTURE, Code("SCT", "64033007", "Kidney"), "all"),
    "lungs": Structure("Lungs", (197, 165, 145), ANATOMICAL_STRUCTURE, Code("SCT", "39607008", "Lung"), "all"),
    "bone": Structure("Bone", (241, 214, 145), ANATOMICAL_STRUCTURE, Code("SCT", "272673000", "Bone"), "all"),
}
