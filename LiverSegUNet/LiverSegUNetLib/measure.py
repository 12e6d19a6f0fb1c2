"""What a clinician reads off a segmentation: each structure's volume, and for lesions their count,
sizes and share of the organ they lie in (the tumour burden)."""

from __future__ import annotations

import numpy as np

from .terminology import Structure
from .volume import Volume


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a 0/1 ``[k, j, i]`` mask: a label array (1..n, largest first) and n."""
    import SimpleITK as sitk

    if not mask.any():
        return np.zeros(mask.shape, np.uint32), 0
    image = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))
    labels = sitk.GetArrayFromImage(image)
    return labels, int(labels.max())


def volume_ml(mask: Volume) -> float:
    """The volume of a 0/1 mask in millilitres."""
    return float(np.count_nonzero(mask.array)) * mask.voxel_volume_ml


def lesion_volumes_ml(mask: Volume) -> list[float]:
    """Volume of each separate lesion (26-connected component) in ml, largest first."""
    labels, count = components(np.asarray(mask.array) > 0)
    counts = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return [float(c) * mask.voxel_volume_ml for c in counts]


def measurements(structures: list[Structure], masks: list[Volume]) -> list[dict]:
    """One row per structure: name, label value (its value in the NIfTI label map), volume in ml, found;
    for lesion structures also the lesion count, each lesion's volume, and the burden (lesion volume over
    the volume of the structure they lie inside)."""
    volumes = {s.name: volume_ml(m) for s, m in zip(structures, masks)}
    rows = []
    for value, (structure, mask) in enumerate(zip(structures, masks), start=1):
        ml = volumes[structure.name]
        row = {"name": structure.name, "label_value": value, "volume_ml": round(ml, 1), "found": ml > 0}
        if structure.lesions:
            sizes = lesion_volumes_ml(mask)
            host = volumes.get(structure.inside or "", 0.0)
            row["lesions"] = {
                "count": len(sizes),
                "volumes_ml": [round(v, 2) for v in sizes],
                "burden": round(ml / host, 4) if host > 0 else None,
            }
        rows.append(row)
    return rows


def describe(rows: list[dict]) -> str:
    """The measurements in one line: ``Liver 1520.3 ml; Liver tumours 3 lesions 12.1 ml (0.8% of Liver)``."""
    parts = []
    for row in rows:
        text = f"{row['name']} {row['volume_ml']:.1f} ml"
        lesions = row.get("lesions")
        if lesions is not None:
            plural = "s" if lesions["count"] != 1 else ""
            text = f"{row['name']} {lesions['count']} lesion{plural} {row['volume_ml']:.1f} ml"
            if lesions["burden"] is not None:
                text += f" ({100 * lesions['burden']:.1f}% burden)"
        parts.append(text)
    return "; ".join(parts)


def raised_note(raised_hu: float) -> str:
    """What a second pass with the soft tissue raised (:attr:`Segmentation.raised_hu`) means, in one line."""
    return (
        f"the liver first found looked unenhanced (no contrast or a fatty liver): the network ran again with the "
        f"soft tissue raised {raised_hu:.0f} HU"
    )
