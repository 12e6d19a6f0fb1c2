"""Draw the extension icon (a stylised liver, no image data involved): python Resources/make_icon.py."""

from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
# outline of a stylised liver in a 0..1 square (x to the right, y down), clockwise
OUTLINE = [
    (0.06, 0.42),
    (0.14, 0.24),
    (0.32, 0.16),
    (0.58, 0.16),
    (0.80, 0.20),
    (0.95, 0.27),
    (0.93, 0.36),
    (0.78, 0.44),
    (0.62, 0.56),
    (0.48, 0.72),
    (0.34, 0.84),
    (0.22, 0.84),
    (0.12, 0.74),
    (0.07, 0.60),
]


def inside(px: np.ndarray, py: np.ndarray, poly) -> np.ndarray:
    """Even-odd point-in-polygon test on pixel-centre grids."""
    hit = np.zeros(px.shape, bool)
    for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1]):
        crosses = (y0 > py) != (y1 > py)
        xcross = x0 + (py - y0) * (x1 - x0) / np.where(y1 == y0, 1e-9, y1 - y0)
        hit ^= crosses & (px < xcross)
    return hit


def icon(size: int = 128, supersample: int = 4) -> np.ndarray:
    """RGBA uint8 icon: liver-coloured silhouette with a darker rim on a transparent background."""
    n = size * supersample
    py, px = (np.mgrid[0:n, 0:n] + 0.5) / n
    body = inside(px, py, OUTLINE)
    shrunk = [(0.5 + (x - 0.5) * 0.88, 0.5 + (y - 0.5) * 0.88 - 0.01) for x, y in OUTLINE]
    core = inside(px, py, shrunk)
    rgba = np.zeros((n, n, 4), np.float32)
    rgba[body] = (150, 75, 55, 255)
    rgba[core] = (221, 130, 101, 255)
    shine = core & (((px - 0.38) / 0.2) ** 2 + ((py - 0.32) / 0.08) ** 2 < 1)
    rgba[shine] = (240, 175, 150, 255)
    return rgba.reshape(size, supersample, size, supersample, 4).mean(axis=(1, 3)).round().astype(np.uint8)


if __name__ == "__main__":
    image = icon()
    for path in (
        HERE / "Icons" / "LiverSegUNet.png",
        HERE.parent / "LiverSegUNet" / "Resources" / "Icons" / "LiverSegUNet.png",
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(image, isVector=True), str(path))
        print(path)
