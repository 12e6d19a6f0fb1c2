"""Segmentation metrics in physical units: Dice, VOE, RVD, ASSD and HD95 (mm, from the voxel spacing).

Arrays are ``[k, j, i]`` binary masks on the same grid; ``spacing_mm`` is ``(i, j, k)``.
Surface distances follow MedPy's definitions: a surface voxel is a foreground voxel with a
background face neighbour (outside the array counts as background); ASSD is the mean of the two
directed mean distances, HD95 the larger of the two directed 95th percentiles.
"""

from __future__ import annotations

import math

import numpy as np

from .volume import bounding_box


def _counts(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    p, r = pred.astype(bool), ref.astype(bool)
    if p.shape != r.shape:
        raise ValueError(f"masks differ in shape: {p.shape} vs {r.shape}")
    return int(np.count_nonzero(p & r)), int(np.count_nonzero(p)), int(np.count_nonzero(r))


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """2|A∩B| / (|A|+|B|); 1.0 when both are empty."""
    inter, a, b = _counts(pred, ref)
    return 1.0 if a + b == 0 else 2.0 * inter / (a + b)


def voe(pred: np.ndarray, ref: np.ndarray) -> float:
    """Volumetric overlap error 1 - |A∩B| / |A∪B|; 0.0 when both are empty."""
    inter, a, b = _counts(pred, ref)
    union = a + b - inter
    return 0.0 if union == 0 else 1.0 - inter / union


def rvd(pred: np.ndarray, ref: np.ndarray) -> float:
    """Relative volume difference (|A| - |B|) / |B|, signed; NaN for an empty reference."""
    _, a, b = _counts(pred, ref)
    return math.nan if b == 0 else (a - b) / b


def surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with at least one background face neighbour."""
    m = np.pad(mask.astype(bool), 1)
    core = m[1:-1, 1:-1, 1:-1]
    interior = core.copy()
    for axis in range(3):
        for shift in (-1, 1):
            interior &= np.roll(m, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return core & ~interior


def _directed(from_surface: np.ndarray, to_surface: np.ndarray, spacing_mm) -> np.ndarray:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(to_surface.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing_mm))
    dist = sitk.GetArrayFromImage(
        sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    )
    return np.maximum(dist[from_surface], 0.0)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing_mm) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``pred`` to ``ref``'s surface, and the reverse."""
    p, r = pred.astype(bool), ref.astype(bool)
    if p.shape != r.shape:
        raise ValueError(f"masks differ in shape: {p.shape} vs {r.shape}")
    both = p | r
    if not p.any() or not r.any():
        return np.array([]), np.array([])
    # one voxel of margin, so surfaces at the box's edge are still surfaces
    box = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in bounding_box(both))
    sp, sr = surface(p[box]), surface(r[box])
    return _directed(sp, sr, spacing_mm), _directed(sr, sp, spacing_mm)


def assd(pred: np.ndarray, ref: np.ndarray, spacing_mm) -> float:
    """Average symmetric surface distance in mm; NaN if either mask is empty."""
    a, b = surface_distances(pred, ref, spacing_mm)
    return math.nan if a.size == 0 else float((a.mean() + b.mean()) / 2)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing_mm) -> float:
    """95th-percentile Hausdorff distance in mm; NaN if either mask is empty."""
    a, b = surface_distances(pred, ref, spacing_mm)
    return math.nan if a.size == 0 else float(max(np.percentile(a, 95), np.percentile(b, 95)))


def all_metrics(pred: np.ndarray, ref: np.ndarray, spacing_mm) -> dict[str, float]:
    """Dice, VOE, RVD, ASSD (mm), HD95 (mm) and volumes (voxels) in one pass over the surfaces."""
    a, b = surface_distances(pred, ref, spacing_mm)
    empty = a.size == 0
    return {
        "dice": dice(pred, ref),
        "voe": voe(pred, ref),
        "rvd": rvd(pred, ref),
        "assd_mm": math.nan if empty else float((a.mean() + b.mean()) / 2),
        "hd95_mm": math.nan if empty else float(max(np.percentile(a, 95), np.percentile(b, 95))),
    }


def lesion_detection(pred: np.ndarray, ref: np.ndarray) -> dict[str, int]:
    """Per-lesion detection between two 0/1 masks, lesions being 26-connected components.

    A reference lesion is *found* when any predicted lesion touches it (overlap of one voxel or more),
    else *missed*; a predicted lesion touching no reference lesion is *false*. A reference lesion
    touched by several predicted ones counts once as found and once as *split*; a predicted lesion
    touching several reference ones makes each found and counts once as *merged*.
    """
    from .measure import components

    ref_labels, n_ref = components(ref > 0)
    pred_labels, n_pred = components(pred > 0)
    both = (ref_labels > 0) & (pred_labels > 0)
    pairs = np.unique(np.stack([ref_labels[both], pred_labels[both]]), axis=1) if both.any() else np.zeros((2, 0), int)
    per_ref = np.bincount(pairs[0], minlength=n_ref + 1)[1:]
    per_pred = np.bincount(pairs[1], minlength=n_pred + 1)[1:]
    return {
        "reference": n_ref,
        "predicted": n_pred,
        "found": int(np.count_nonzero(per_ref)),
        "missed": int(np.count_nonzero(per_ref == 0)),
        "false": int(np.count_nonzero(per_pred == 0)),
        "split": int(np.count_nonzero(per_ref > 1)),
        "merged": int(np.count_nonzero(per_pred > 1)),
    }


def structure_metrics(pred: np.ndarray, ref: np.ndarray, voxel_ml: float, lesions: bool = False) -> dict:
    """Dice, predicted and reference volume (ml) and relative volume error of one structure; for lesion
    structures also :func:`lesion_detection`."""
    pred_ml, ref_ml = float(np.count_nonzero(pred)) * voxel_ml, float(np.count_nonzero(ref)) * voxel_ml
    out = {
        "dice": dice(pred, ref),
        "pred_ml": round(pred_ml, 2),
        "ref_ml": round(ref_ml, 2),
        "volume_error": (pred_ml - ref_ml) / ref_ml if ref_ml > 0 else math.nan,
    }
    if lesions:
        out["lesions"] = lesion_detection(pred, ref)
    return out
