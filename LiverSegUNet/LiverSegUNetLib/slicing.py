"""Which part of a CT the network looks at: the rectangle around the body, and the slices that can hold the liver."""

from __future__ import annotations

import numpy as np

from .volume import bounding_box

#: HU above which a voxel counts as body (or table) when cropping away the air around the patient.
BODY_HU = -300
#: Margin kept around the body, in mm.
BODY_MARGIN_MM = 10.0
#: Distance between the slices of the first pass that finds the liver's extent along the body axis.
PROBE_MM = 8.0


def body_box(hu: np.ndarray, spacing_ij_mm: tuple[float, float]) -> tuple[slice, slice]:
    """Rows and columns of the smallest rectangle that holds the body in every slice, with a margin.

    The air around the patient is a third to a half of a typical CT slice; the network need not see
    it. The box is the bounding box of the largest connected region of the through-plane maximum
    above ``BODY_HU`` (so a separate table or a stray bright pixel does not widen it). Where nothing
    reaches that level (not HU), the whole slice is kept.
    """
    import SimpleITK as sitk

    projection = (hu.max(axis=0) > BODY_HU).astype(np.uint8)
    whole = (slice(0, hu.shape[1]), slice(0, hu.shape[2]))
    if not projection.any():
        return whole
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(projection), True))
    rows, cols = bounding_box(sitk.GetArrayViewFromImage(labels) == 1)
    mr = int(np.ceil(BODY_MARGIN_MM / spacing_ij_mm[1]))
    mc = int(np.ceil(BODY_MARGIN_MM / spacing_ij_mm[0]))
    r0, r1 = max(0, rows.start - mr), min(hu.shape[1], rows.stop + mr)
    c0, c1 = max(0, cols.start - mc), min(hu.shape[2], cols.stop + mc)
    if r1 - r0 < 16 or c1 - c0 < 16:
        return whole
    return slice(int(r0), int(r1)), slice(int(c0), int(c1))


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient's body in a canonical ``[k, j, i]`` HU array: the largest 3D region above ``BODY_HU``
    (not the table, not a stray bright pixel in the air), holes filled slice by slice (so the lungs and
    bowel gas inside count as body). Predictions outside it cannot be anatomy."""
    import SimpleITK as sitk

    from .postprocess import fill_holes_per_slice

    above = sitk.GetImageFromArray((hu > BODY_HU).astype(np.uint8))
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(above, True))
    return fill_holes_per_slice(sitk.GetArrayViewFromImage(labels) == 1).astype(bool)


def probe_slices(n: int, stride: int) -> np.ndarray:
    """Every ``stride``-th slice index of ``n``, and the last one: the first pass that finds the liver's extent."""
    return np.unique(np.r_[np.arange(0, n, stride), n - 1])


def liver_range(positive: np.ndarray, probes: np.ndarray, stride: int, n: int) -> tuple[int, int] | None:
    """Slices ``lo..hi`` that can hold the liver's component, from per-probe positive pixel counts.

    The run of consecutive positive probes with the most positive pixels is the liver; it can reach
    ``stride - 1`` slices past its outer probes and no further, because the next probe is empty. A
    component beyond an empty slice is disconnected from it in 3D, so largest-component
    postprocessing would drop it anyway. None when no probe is positive.
    """
    best, best_sum, run_start, run_sum = None, 0, None, 0
    for i, count in enumerate(list(positive) + [0]):
        if count > 0:
            run_start = i if run_start is None else run_start
            run_sum += int(count)
            continue
        if run_start is not None and run_sum > best_sum:
            best, best_sum = (run_start, i - 1), run_sum
        run_start, run_sum = None, 0
    if best is None:
        return None
    return max(0, int(probes[best[0]]) - stride + 1), min(n - 1, int(probes[best[1]]) + stride - 1)
