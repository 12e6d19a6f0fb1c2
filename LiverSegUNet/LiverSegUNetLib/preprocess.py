"""From a CT Volume to the model's input grid and back: reorientation, HU window, in-plane resampling."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .volume import Volume

#: The directions a network can slice a volume in (:attr:`Plan.views`).
VIEWS = ("axial", "coronal", "sagittal")


@dataclass(frozen=True)
class Plan:
    """Everything inference must do to an image before and after the network, stored with the weights."""

    hu_min: float = -200.0
    hu_max: float = 300.0
    spacing_mm: float = 1.5  #: in-plane pixel size of the model grid
    context: int = 1  #: neighbouring slices on each side fed as extra channels (2.5D)
    multiple: int = 16  #: model-grid sizes are padded to a multiple of this (2**depth)
    threshold: float = 0.5
    #: Radius of the ball (mm) that opens a largest-component structure before its largest component is
    #: kept: parts joined to it only through something thinner than twice this are cut off (0: off).
    opening_mm: float = 0.0
    #: Directions the network slices the volume in, their probabilities averaged: ``axial`` (slices along the
    #: body axis, on their own spacing), ``coronal`` and ``sagittal`` (the volume resampled to ``spacing_mm``
    #: in every direction first, so neighbours are ``spacing_mm`` apart). A network trained on those views
    #: sees a structure's extent along the body axis, which axial slices show only across neighbours.
    views: tuple[str, ...] = ("axial",)
    #: A floor for the liver's attenuation (HU; 0: off). When the median HU of what the network first finds of
    #: the first structure lies below it (a CT without contrast, a fatty liver), the soft tissue is raised by
    #: the difference (:func:`raise_soft_tissue`) and the network runs again on that: a model that has seen
    #: mostly contrast-enhanced livers then meets a dark one at the values it knows best.
    liver_floor_hu: float = 0.0
    #: The farthest apart (mm) the axial slices the network reads may lie (0: as the CT has them). A CT with
    #: thicker slices is run on slices interpolated between its own (:func:`between_slices`, a whole number of
    #: steps per slice, :func:`slice_steps`), so that each slice's neighbours lie about as far away as in the
    #: thin-slice CTs the network learnt from; its own slices take the probabilities found there.
    slice_mm: float = 0.0

    def __post_init__(self):
        if not 0 <= self.liver_floor_hu < FULL_UNTIL_HU:
            raise ValueError(f"liver_floor_hu {self.liver_floor_hu}: give 0 (off) up to below {FULL_UNTIL_HU:g} HU")
        if not (self.slice_mm == 0 or MIN_SLICE_MM <= self.slice_mm):
            raise ValueError(
                f"slice_mm {self.slice_mm}: give 0 (off) or a slice distance of {MIN_SLICE_MM:g} mm or more"
            )

    @property
    def in_channels(self) -> int:
        """Number of input channels: the slice and its neighbours."""
        return 2 * self.context + 1

    def to_dict(self) -> dict:
        """Plain values for JSON."""
        values = asdict(self)
        values["views"] = list(self.views)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> Plan:
        """Build from JSON values, refusing unknown keys."""
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        views = tuple(values.get("views", VIEWS[:1]))
        if not views or len(set(views)) != len(views) or set(views) - set(VIEWS):
            raise ValueError(f"views {list(views)}: give one or more of {list(VIEWS)}, each once")
        return cls(**{**values, "views": views})


#: The smallest ``Plan.slice_mm`` (mm), and the most slices interpolated per slice of the CT: a 10 mm CT at a
#: 1.6 mm ``slice_mm`` is run on 6 slices per slice; thicker ones on 8, the network time of a thin-slice CT.
MIN_SLICE_MM = 0.5
MAX_SLICE_STEPS = 8


def slice_steps(spacing_mm: float, slice_mm: float) -> int:
    """How many slices :func:`between_slices` makes of each of a CT's whose slices are ``spacing_mm`` apart, for
    a plan's ``slice_mm`` (1: the CT's own slices): the whole number of steps that brings the distance nearest to
    ``slice_mm``, at most :data:`MAX_SLICE_STEPS`."""
    if slice_mm <= 0:
        return 1
    return int(min(MAX_SLICE_STEPS, max(1, round(spacing_mm / slice_mm))))


def between_slices(array: np.ndarray, steps: int) -> np.ndarray:
    """``(N, H, W)`` slices with ``steps - 1`` slices linearly interpolated between each two: ``(N - 1) * steps + 1``
    slices, slice ``k`` of ``array`` at ``k * steps`` (unchanged); the input's dtype (integers rounded)."""
    if steps == 1 or array.shape[0] < 2:
        return array
    n = array.shape[0]
    out = np.empty(((n - 1) * steps + 1, *array.shape[1:]), dtype=array.dtype)
    out[::steps] = array
    rounded = np.issubdtype(array.dtype, np.integer)
    for step in range(1, steps):
        w = step / steps
        for k in range(n - 1):  # slice by slice: no float copy of the whole volume
            mixed = (1 - w) * array[k].astype(np.float32) + w * array[k + 1].astype(np.float32)
            out[k * steps + step] = np.round(mixed) if rounded else mixed
    return out


class Reorientation:
    """The axis permutation and flips that bring a volume to axial LPS order, and back.

    In the canonical array ``[k, j, i]`` the i axis points to the patient's left, j to posterior
    and k to superior (the nearest such axes for oblique volumes), so slices look like the
    radiological axial view the model was trained on.
    """

    def __init__(self, volume: Volume):
        d = volume.direction
        axis_of = [int(np.argmax(np.abs(d[:, a]))) for a in range(3)]  # LPS axis each ijk axis follows
        if sorted(axis_of) != [0, 1, 2]:
            raise InputError(f"volume direction {d.tolist()} has no unambiguous axial orientation")
        self.source_for = [axis_of.index(lps) for lps in range(3)]  # ijk axis along L, P, S
        self.flip = [bool(d[lps, self.source_for[lps]] < 0) for lps in range(3)]
        self.source_shape = volume.shape

    def forward(self, array: np.ndarray) -> np.ndarray:
        """Source array ``[k, j, i]`` to canonical order (a view where possible)."""
        out = np.transpose(array, [2 - self.source_for[2], 2 - self.source_for[1], 2 - self.source_for[0]])
        flips = tuple(ax for ax, lps in zip((0, 1, 2), (2, 1, 0)) if self.flip[lps])
        return np.flip(out, flips) if flips else out

    def backward(self, array: np.ndarray) -> np.ndarray:
        """Canonical array back to the source volume's order."""
        flips = tuple(ax for ax, lps in zip((0, 1, 2), (2, 1, 0)) if self.flip[lps])
        out = np.flip(array, flips) if flips else array
        inverse = np.argsort([2 - self.source_for[2], 2 - self.source_for[1], 2 - self.source_for[0]])
        return np.transpose(out, inverse)

    def spacing(self, volume: Volume) -> tuple[float, float, float]:
        """Canonical ``(i, j, k)`` spacing in mm."""
        return tuple(volume.spacing_mm[self.source_for[lps]] for lps in range(3))


@dataclass(frozen=True)
class SliceGrid:
    """How one slice of ``in_shape`` pixels maps to the model grid: resized, then zero-padded."""

    in_shape: tuple[int, int]
    size: tuple[int, int]
    padded: tuple[int, int]

    @classmethod
    def for_slices(cls, in_shape: tuple[int, int], spacing_ij_mm: tuple[float, float], plan: Plan) -> SliceGrid:
        """The grid for slices of ``in_shape`` (rows, columns) with (column, row) spacing in mm."""
        rows, cols = in_shape
        size = (
            max(1, round(rows * spacing_ij_mm[1] / plan.spacing_mm)),
            max(1, round(cols * spacing_ij_mm[0] / plan.spacing_mm)),
        )
        m = plan.multiple
        return cls((rows, cols), size, (-(-size[0] // m) * m, -(-size[1] // m) * m))


def normalize(hu: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Clip to the HU window and scale it to 0..1."""
    return (hu.float().clamp(plan.hu_min, plan.hu_max) - plan.hu_min) / (plan.hu_max - plan.hu_min)


#: :func:`raise_soft_tissue` raises values from the liver's own up to ``FULL_UNTIL_HU`` by the full amount, tapering
#: linearly to nothing ``RAMP_BELOW_LIVER_HU`` below the liver's value (so what is darker than the liver, a
#: hypodense mass, fluid, fat, stays darker than it by more, as contrast shows it) and at ``UNTIL_HU`` (bone and
#: contrast-filled structures above stay).
RAMP_BELOW_LIVER_HU = 40.0
FULL_UNTIL_HU = 150.0
UNTIL_HU = 250.0


def raise_soft_tissue(hu: np.ndarray, shift_hu: float, liver_hu: float) -> np.ndarray:
    """``hu`` (float32) with the soft tissue from ``liver_hu`` up raised by ``shift_hu`` >= 0, less below it
    (:data:`RAMP_BELOW_LIVER_HU`) and towards bone (:data:`UNTIL_HU`); air, fat, water and bone unchanged. For a
    shift below ``UNTIL_HU - FULL_UNTIL_HU`` (100 HU) the mapping keeps the order of the values."""
    if not 0 <= shift_hu < UNTIL_HU - FULL_UNTIL_HU:
        raise ValueError(f"shift {shift_hu} HU: give 0 up to {UNTIL_HU - FULL_UNTIL_HU:g}")
    if not liver_hu < FULL_UNTIL_HU:
        raise ValueError(f"liver at {liver_hu} HU: a liver to raise lies below {FULL_UNTIL_HU:g} HU")
    h = np.asarray(hu, dtype=np.float32)
    low = liver_hu - RAMP_BELOW_LIVER_HU
    weight = np.clip((h - low) / RAMP_BELOW_LIVER_HU, 0, 1) * np.clip((UNTIL_HU - h) / (UNTIL_HU - FULL_UNTIL_HU), 0, 1)
    return h + np.float32(shift_hu) * weight


def to_model_grid(slices: torch.Tensor, grid: SliceGrid) -> torch.Tensor:
    """Resample ``(N, H, W)`` slices onto the model grid ``(N, Hp, Wp)``, zero-padded bottom/right."""
    x = F.interpolate(slices.float()[:, None], size=grid.size, mode="bilinear", align_corners=False, antialias=True)
    pad = (0, grid.padded[1] - grid.size[1], 0, grid.padded[0] - grid.size[0])
    return F.pad(x, pad)[:, 0]


def from_model_grid(maps: torch.Tensor, grid: SliceGrid) -> torch.Tensor:
    """Inverse of :func:`to_model_grid` for ``(N, Hp, Wp)`` maps: crop the padding, resize back."""
    x = maps[:, None, : grid.size[0], : grid.size[1]].float()
    return F.interpolate(x, size=grid.in_shape, mode="bilinear", align_corners=False)[:, 0]


def slices_at(spacing_k_mm: float, count: int, spacing_mm: float) -> int:
    """How many slices ``spacing_mm`` apart span ``count`` slices ``spacing_k_mm`` apart."""
    return max(1, round(count * spacing_k_mm / spacing_mm))


def along_slices(stack: torch.Tensor, count: int) -> torch.Tensor:
    """``(K, ...)`` slices resampled linearly to ``count`` slices over the same extent (slice centres at
    ``(k + 0.5) * K / count - 0.5``, as ``F.interpolate`` without ``align_corners``), in float32."""
    flat = stack.reshape(stack.shape[0], -1).float().T[None]  # (1, pixels, K)
    out = F.interpolate(flat, size=count, mode="linear", align_corners=False)[0].T
    return out.reshape(count, *stack.shape[1:])


def with_context(stack: torch.Tensor, centers: torch.Tensor, context: int) -> torch.Tensor:
    """Channels ``k-context .. k+context`` for each centre slice ``k`` of ``stack`` (edges repeated)."""
    offsets = torch.arange(-context, context + 1)
    index = (centers[:, None] + offsets[None, :]).clamp(0, stack.shape[0] - 1)
    return stack[index]
