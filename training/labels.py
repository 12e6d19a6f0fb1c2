"""Training targets from 3D-IRCADb masks: which expert masks make each structure of the catalogue.

A structure's target is the union of its masks. A structure that lies inside another (liver tumours
inside the liver) takes only the masks that lie mostly inside that one, cut to it: every
``livertumorNN`` of patients 1 and 17 lies inside the liver, while patient 7's ``tumor`` lies
outside it (0.03% of its voxels inside), so patient 7 has no liver tumour. A patient without any of
a structure's masks has no target for it: training must not read that as "absent" (:func:`targets`
says which exist).
"""

from __future__ import annotations

import re

import numpy as np
from LiverSegUNetLib.terminology import CATALOGUE

#: 3D-IRCADb mask names (regular expressions) of each catalogue structure.
IRCADB_MASKS = {
    "liver": (r"liver",),
    "liver_tumours": (r"livertumor\d*", r"tumor"),
    "portal_vein": (r"portalvein",),
    "venous_system": (r"venoussystem",),
    "arteries": (r"artery",),
    "spleen": (r"spleen",),
    "kidneys": (r"leftkidney", r"rightkidney"),
    "lungs": (r"leftlung", r"rightlung"),
    "bone": (r"bone",),
}


#: Share of a mask that must lie inside the host structure for it to count as that structure's part.
MOSTLY = 0.5


def check_keys(keys: list[str]) -> None:
    """Refuse structure keys the catalogue or the 3D-IRCADb mapping does not know, and repeats."""
    unknown = [k for k in keys if k not in CATALOGUE or k not in IRCADB_MASKS]
    if unknown or len(set(keys)) != len(keys):
        raise SystemExit(
            f"structures {keys}: {'unknown ' + str(unknown) if unknown else 'a structure is listed twice'}; "
            f"known: {', '.join(k for k in CATALOGUE if k in IRCADB_MASKS)}"
        )


def mask_names(organs: list[str], key: str) -> list[str]:
    """The patient's mask names (``organs``) that make structure ``key``."""
    return [o for o in organs if any(re.fullmatch(p, o) for p in IRCADB_MASKS[key])]


def targets(patient, keys: list[str], known: dict[str, np.ndarray] | None = None) -> list[np.ndarray | None]:
    """For each structure key, its uint8 0/1 target on the CT grid, or None when the patient has no mask for it.

    Each expert mask is read once; ``known`` holds masks already read (``appearance.masks_of``), by name.
    """
    cache = dict(known or {})

    def read(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = patient.mask(name).array
        return cache[name] > 0

    out = []
    for key in keys:
        names = mask_names(patient.organs, key)
        if not names:
            out.append(None)
            continue
        masks = [read(n) for n in names]
        if CATALOGUE[key].inside is not None:
            host_key = next(k for k, s in CATALOGUE.items() if s.name == CATALOGUE[key].inside)
            host_names = mask_names(patient.organs, host_key)
            if host_names:
                host = np.logical_or.reduce([read(n) for n in host_names])
                masks = [m & host for m in masks if np.count_nonzero(m & host) >= MOSTLY * np.count_nonzero(m)]
        target = np.logical_or.reduce(masks) if masks else np.zeros(patient.ct.shape, bool)
        out.append(target.astype(np.uint8))
    return out
