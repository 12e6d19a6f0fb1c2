"""A PNG contact sheet of axial slices with the mask outlined, written with SimpleITK only."""

from __future__ import annotations

import os

import numpy as np

from .preprocess import Reorientation
from .volume import Volume


def _outline(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    edge = m[1:-1, 1:-1] & ~inner
    thick = np.pad(edge, 1)
    return edge | thick[:-2, 1:-1] | thick[2:, 1:-1] | thick[1:-1, :-2] | thick[1:-1, 2:]


def preview_image(
    ct: Volume, mask: Volume, color_rgb=(221, 130, 101), tiles: int = 6, columns: int = 3, window_hu=(-200.0, 300.0)
) -> np.ndarray:
    """RGB uint8 ``(rows, cols, 3)`` montage of ``tiles`` axial slices through the mask, outlined."""
    reorient = Reorientation(ct)
    image, labels = reorient.forward(ct.array), reorient.forward(mask.array)
    with_mask = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    lo, hi = (with_mask[0], with_mask[-1]) if with_mask.size else (0, image.shape[0] - 1)
    picks = np.linspace(lo, hi, tiles + 2)[1:-1].round().astype(int)[::-1]  # cranial first
    sheet = []
    for k in picks:
        grey = (np.clip(image[k].astype(np.float32), *window_hu) - window_hu[0]) / (window_hu[1] - window_hu[0]) * 255
        rgb = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
        rgb[_outline(labels[k])] = color_rgb
        sheet.append(rgb)
    rows = [np.concatenate(sheet[r : r + columns], axis=1) for r in range(0, len(sheet), columns)]
    return np.concatenate(rows, axis=0)


def write_png(rgb: np.ndarray, path: str | os.PathLike) -> None:
    """Write an RGB uint8 array as PNG."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(rgb), isVector=True), str(path))
