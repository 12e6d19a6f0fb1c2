"""Clean a binary mask: keep the largest 3D connected component, fill holes slice by slice."""

from __future__ import annotations

import numpy as np


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a ``[k, j, i]`` binary mask (uint8 0/1)."""
    import SimpleITK as sitk

    if not mask.any():
        return mask.astype(np.uint8)
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))
    return (sitk.GetArrayViewFromImage(labels) == 1).astype(np.uint8)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill the holes (background not connected to the border) of each ``[k]`` slice."""
    import SimpleITK as sitk

    out = mask.astype(np.uint8).copy()
    for k in np.flatnonzero(out.reshape(out.shape[0], -1).any(axis=1)):
        filled = sitk.BinaryFillhole(sitk.GetImageFromArray(out[k]), fullyConnected=False, foregroundValue=1)
        out[k] = sitk.GetArrayViewFromImage(filled)
    return out


#: A part left by the opening is kept beside the largest when it has at least this share of its voxels.
KEEP_SHARE = 0.25


def cut_thin_bridges(mask: np.ndarray, radius: tuple[int, int, int], restore: tuple[int, int, int]) -> np.ndarray:
    """The largest component of ``mask`` (uint8 0/1, ``[k, j, i]``) with every part that hangs on it only
    by something thinner than the ball of ``radius`` voxels (i, j, k) removed.

    The mask is opened (eroded, then dilated) by that ball and the largest part of what is left is kept,
    with any other part at least ``KEEP_SHARE`` of its size (a lobe joined by a narrow neck is organ, not
    a leak); then the voxels of ``mask`` within ``restore`` voxels of them come back, so the organ's own
    thin rim (which the opening rounds off) is kept while a neighbouring organ reached through a narrow
    bridge is not.
    """
    import SimpleITK as sitk

    whole = largest_component(mask)
    if not any(radius) or not whole.any():
        return whole
    image = sitk.GetImageFromArray(whole)
    opened = sitk.BinaryMorphologicalOpening(image, [int(r) for r in radius], sitk.sitkBall, 0, 1)
    parts = sitk.RelabelComponent(sitk.ConnectedComponent(opened, True))  # label 1: the largest
    sizes = sitk.LabelShapeStatisticsImageFilter()
    sizes.Execute(parts)
    if not sizes.GetNumberOfLabels():  # everything was thinner than the ball: keep the component as it was
        return whole
    largest = sizes.GetNumberOfPixels(1)
    kept = [label for label in sizes.GetLabels() if sizes.GetNumberOfPixels(label) >= KEEP_SHARE * largest]
    core = np.isin(sitk.GetArrayViewFromImage(parts), kept).astype(np.uint8)
    if any(restore):
        grown = sitk.BinaryDilate(sitk.GetImageFromArray(core), [int(r) for r in restore], sitk.sitkBall, 0, 1)
        core = sitk.GetArrayFromImage(grown) & whole
    return core.astype(np.uint8)


def postprocess(mask: np.ndarray, radius=(0, 0, 0), restore=(0, 0, 0)) -> np.ndarray:
    """Largest component (without parts joined by thin bridges, when ``radius`` is set: :func:`cut_thin_bridges`),
    then hole filling: the product's default clean-up."""
    return fill_holes_per_slice(cut_thin_bridges(mask, radius, restore))
