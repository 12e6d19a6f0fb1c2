"""The one image type passed between readers, inference and writers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def bounding_box(array: np.ndarray, level=1) -> tuple[slice, ...] | None:
    """Per-axis slices of the smallest box holding every element ``>= level``, or None if there is none.

    Uses one reduction per axis, so no temporary as large as ``array`` is made.
    """
    box = []
    for axis in range(array.ndim):
        hit = np.flatnonzero(array.max(axis=tuple(a for a in range(array.ndim) if a != axis)) >= level)
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


@dataclass(frozen=True)
class Volume:
    """A 3D scalar image that never travels without its geometry.

    ``array`` is indexed ``[k, j, i]`` (slice, row, column), the order of SimpleITK's
    ``GetArrayFromImage`` and Slicer's ``arrayFromVolume``. Geometry is in patient LPS
    millimetres, as in DICOM and ITK: ``spacing_mm`` is ``(i, j, k)``, ``origin_lps`` is the
    centre of voxel ``[0, 0, 0]`` and the columns of ``direction`` are the unit vectors of the
    i, j and k axes.
    """

    array: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        object.__setattr__(self, "origin_lps", tuple(float(o) for o in self.origin_lps))
        object.__setattr__(self, "direction", np.asarray(self.direction, dtype=np.float64).reshape(3, 3))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape as ``(slices, rows, columns)``."""
        return tuple(self.array.shape)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping ``(i, j, k, 1)`` voxel indices to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction * np.asarray(self.spacing_mm)[None, :]
        m[:3, 3] = self.origin_lps
        return m

    def with_array(self, array: np.ndarray, **metadata) -> Volume:
        """The same geometry around another array of the same shape."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        return Volume(array, self.spacing_mm, self.origin_lps, self.direction, {**self.metadata, **metadata})

    def same_grid(self, other: Volume, tol_mm: float = 1e-3) -> bool:
        """True when both volumes sample exactly the same points in space."""
        return self.shape == other.shape and np.allclose(self.ijk_to_lps(), other.ijk_to_lps(), atol=tol_mm)
