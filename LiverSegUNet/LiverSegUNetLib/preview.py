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
    ct: Volume, masks: list[Volume], structures, tiles: int = 6, columns: int = 3, window_hu=(-200.0, 300.0)
) -> np.ndarray:
    """RGB uint8 ``(rows, cols, 3)`` montage of ``tiles`` axial slices through the first mask, every
    structure outlined in its colour, with a legend below when there is more than one structure."""
    reorient = Reorientation(ct)
    image = reorient.forward(ct.array)
    all_labels = [reorient.forward(m.array) for m in masks]
    labels = all_labels[0]
    with_mask = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    lo, hi = (with_mask[0], with_mask[-1]) if with_mask.size else (0, image.shape[0] - 1)
    picks = np.linspace(lo, hi, tiles + 2)[1:-1].round().astype(int)[::-1]  # cranial first
    sheet = []
    for k in picks:
        grey = (np.clip(image[k].astype(np.float32), *window_hu) - window_hu[0]) / (window_hu[1] - window_hu[0]) * 255
        rgb = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
        for structure, lab in zip(structures, all_labels):
            rgb[_outline(lab[k])] = structure.color_rgb
        sheet.append(rgb)
    rows = [np.concatenate(sheet[r : r + columns], axis=1) for r in range(0, len(sheet), columns)]
    montage = np.concatenate(rows, axis=0)
    if len(structures) > 1:
        montage = np.concatenate([montage, legend(structures, montage.shape[1])], axis=0)
    return montage


def legend(structures, width: int) -> np.ndarray:
    """An RGB strip naming each structure beside a swatch of its colour."""
    from PIL import Image, ImageDraw

    row_height, per_row = 18, max(1, width // 220)
    lines = -(-len(structures) // per_row)
    strip = Image.new("RGB", (width, row_height * lines + 4), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    for index, structure in enumerate(structures):
        x, y = 6 + (index % per_row) * (width // per_row), 3 + (index // per_row) * row_height
        draw.rectangle([x, y + 2, x + 12, y + 14], fill=tuple(structure.color_rgb))
        draw.text((x + 18, y + 2), structure.name, fill=(255, 255, 255))
    return np.asarray(strip, dtype=np.uint8)


def write_png(rgb: np.ndarray, path: str | os.PathLike) -> None:
    """Write an RGB uint8 array as PNG."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(rgb), isVector=True), str(path))
