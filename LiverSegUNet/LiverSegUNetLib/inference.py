"""Volume in, liver mask out on exactly the input grid: the one pipeline the CLI, Slicer and training share.

The steps, each a function below: the CT is checked (:func:`check_ct`) and turned to the canonical
axis order; the rectangle around the body is cut out (:mod:`.slicing`); the network runs slice by
slice on the model grid, first every ``PROBE_MM`` to find the liver's extent and then on the
slices that can hold it (:class:`ModelGridPrediction`); the liver is cleaned on the model grid
(:func:`clean_on_model_grid`) and only then resampled to the input grid (:func:`to_input_grid`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import slicing
from .errors import Cancelled, InputError
from .preprocess import Reorientation, SliceGrid, from_model_grid, normalize, to_model_grid
from .runtime import NetworkRuntime, Runtime
from .volume import Volume, bounding_box

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


@dataclass
class Segmentation:
    """A predicted mask (uint8 0/1 on the input grid) and what it took to make it."""

    mask: Volume
    model_id: str
    device: str
    precision: str
    seconds: dict = field(default_factory=dict)

    @property
    def volume_ml(self) -> float:
        """Segmented volume in millilitres."""
        return float(np.count_nonzero(self.mask.array)) * self.mask.voxel_volume_ml


#: A CT in Hounsfield units has air (about -1000 HU) around or inside the body; this much is enough.
AIR_HU = -500.0
#: Fewer distinct values than this (in a sample of the voxels) is a label map or mask, not a CT.
MIN_DISTINCT_VALUES = 32


def check_ct(volume: Volume) -> None:
    """Refuse volumes that cannot be a CT in Hounsfield units: wrong dimensionality, too small, non-finite,
    constant, 8-bit, label-valued, or without any air."""
    a = volume.array
    if a.ndim != 3:
        raise InputError(f"image has {a.ndim} dimensions {a.shape}; expected a 3D CT volume")
    if min(a.shape) < 2 or a.shape[1] < 16 or a.shape[2] < 16:
        raise InputError(f"image of shape {a.shape} is too small for a CT volume")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise InputError("image contains NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if hi - lo < 1:
        raise InputError(f"image is constant ({lo:g} everywhere); nothing to segment")
    not_ct = "; give the CT itself, in Hounsfield units (a label map, mask or exported picture cannot be segmented)"
    if a.dtype in (np.uint8, np.int8, np.bool_):
        raise InputError(f"image is {a.dtype.name} with values {lo:g}..{hi:g}, not a CT{not_ct}")
    distinct = np.unique(a[:: max(1, a.shape[0] // 16), ::4, ::4]).size
    if distinct < MIN_DISTINCT_VALUES:
        raise InputError(f"image has only {distinct} distinct values ({lo:g}..{hi:g}): a label map, not a CT{not_ct}")
    if lo > AIR_HU:
        raise InputError(
            f"image has no air: its lowest value is {lo:g}, a CT in Hounsfield units has air near -1000{not_ct}"
        )


def prepare_slices(hu, grid: SliceGrid, plan):
    """HU slices ``(N, H, W)`` to normalized model-grid slices ``(N, Hp, Wp)``."""
    return to_model_grid(normalize(hu, plan), grid)


class ModelGridPrediction:
    """Liver probabilities (x 255, uint8) of every slice of a body crop, on the model grid, filled batch by batch."""

    def __init__(self, hu_crop: np.ndarray, grid: SliceGrid, plan, network: NetworkRuntime, device: str, **run):
        self.hu, self.grid, self.plan, self.network, self.device = hu_crop, grid, plan, network, device
        self.batch_size, self.progress, self.cancel = run["batch_size"], run["progress"], run["cancel"]
        n = hu_crop.shape[0]
        height, width = grid.size
        self.probability = np.zeros((n, height, width), dtype=np.uint8)
        self.handled = np.zeros(n, dtype=bool)  # slices predicted, or known to hold no liver
        self.level = int(round(plan.threshold * 255))  # the threshold on the uint8 scale

    def check_cancel(self) -> None:
        """Raise :class:`Cancelled` when the caller asked to stop."""
        if self.cancel is not None and self.cancel():
            raise Cancelled("segmentation cancelled")

    def run(self, slices: np.ndarray) -> None:
        """The network on ``slices`` (indices into the crop), each with its neighbours as channels."""
        import torch

        n, height, width = self.probability.shape
        offsets = np.arange(-self.plan.context, self.plan.context + 1)
        memory_format = torch.channels_last if self.device == "cpu" else torch.contiguous_format
        for start in range(0, len(slices), self.batch_size):
            self.check_cancel()
            batch = slices[start : start + self.batch_size]
            with_neighbours = np.clip(batch[:, None] + offsets[None, :], 0, n - 1)  # (batch, channels)
            needed = np.unique(with_neighbours)  # each slice is resampled once, even when shared
            stack = prepare_slices(torch.from_numpy(self.hu[needed]), self.grid, self.plan)
            x = stack[torch.from_numpy(np.searchsorted(needed, with_neighbours))]
            with self.network.autocast:
                logits = self.network.run(x.to(self.device, dtype=self.network.dtype, memory_format=memory_format))
            # the model grid is padded to a multiple of the network's stride: keep the grid's own size
            probability = torch.sigmoid(logits.float()[:, 0, :height, :width]).cpu()
            self.probability[batch] = (probability * 255).round().to(torch.uint8).numpy()
            self.handled[batch] = True
            if self.progress is not None:
                self.progress("inference", float(self.handled.mean()))

    def run_where_the_liver_can_be(self, spacing_k_mm: float) -> int:
        """Probe every ``PROBE_MM``, then run only the slices that can hold the liver's component; slices run."""
        n = self.probability.shape[0]
        stride = max(1, int(round(slicing.PROBE_MM / spacing_k_mm)))
        if stride == 1:
            self.run(np.arange(n))
            return n
        probes = slicing.probe_slices(n, stride)
        self.run(probes)
        positives = (self.probability[probes] >= self.level).reshape(len(probes), -1).sum(axis=1)
        span = slicing.liver_range(positives, probes, stride, n)
        todo = np.arange(n)
        if span is not None:  # else nothing found: run every slice, as without the probe
            first, last = span
            todo = np.arange(first, last + 1)
            self.probability[:first], self.probability[last + 1 :] = 0, 0  # probes outside the span
            self.handled[:first], self.handled[last + 1 :] = True, True
        todo = np.setdiff1d(todo, probes)
        self.run(todo)
        return len(probes) + len(todo)


def clean_on_model_grid(probability: np.ndarray, level: int) -> None:
    """Postprocess (largest component, holes filled) the thresholded ``probability``, in place.

    Works only inside the box around what the network found, so memory scales with the liver and
    not with the volume: voxels outside the box are zeroed, dropped components set to 0 and filled
    holes to 255.
    """
    from . import postprocess

    box = bounding_box(probability, level)
    if box is None:
        probability[:] = 0
        return
    ks, js, is_ = box  # slices along k (slice), j (row), i (column)
    probability[: ks.start], probability[ks.stop :] = 0, 0
    probability[ks, : js.start], probability[ks, js.stop :] = 0, 0
    probability[ks, :, : is_.start], probability[ks, :, is_.stop :] = 0, 0
    inside = probability[box]  # a view: writing to it writes to ``probability``
    raw = inside >= level
    kept = postprocess.postprocess(raw).astype(bool)
    inside[~kept] = 0
    inside[kept & ~raw] = 255


def to_input_grid(
    prediction: ModelGridPrediction, crop: tuple[slice, slice], full_shape: tuple[int, int, int]
) -> np.ndarray:
    """The uint8 0/1 mask on the (canonical) input grid, resampled from the model grid batch by batch."""
    import torch

    rows, cols = crop
    n = full_shape[0]
    out = np.zeros(full_shape, dtype=np.uint8)
    # Bilinear resampling of values k/255 can land a hair below level/255 where every neighbour is
    # exactly at the level; the tolerance keeps those voxels, as the model grid itself does (>= level).
    threshold = prediction.level / 255 - 1e-6
    with torch.inference_mode():
        for start in range(0, n, prediction.batch_size):
            prediction.check_cancel()
            stop = min(n, start + prediction.batch_size)
            maps = torch.from_numpy(prediction.probability[start:stop]).float() / 255
            out[start:stop, rows, cols] = (from_model_grid(maps, prediction.grid) >= threshold).numpy()
            if prediction.progress is not None:
                prediction.progress("resample", stop / n)
    return out


def predict_canonical(
    hu: np.ndarray,
    spacing_mm: tuple[float, float, float],
    model,
    device: str,
    network: NetworkRuntime,
    batch_size: int = 16,
    postprocess: bool = True,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    seconds: dict | None = None,
) -> np.ndarray:
    """uint8 mask for a canonical ``[k, j, i]`` HU array with ``(i, j, k)`` spacing in mm.

    Only the rectangle around the body is resampled to the model grid. With postprocessing on, a
    first pass every ``PROBE_MM`` finds the liver's extent along k and only slices that can hold its
    component run (:func:`slicing.liver_range`: the result is the same as running every slice). The
    probabilities stay on the (smaller) model grid as uint8; postprocessing runs there too, and the
    full-resolution mask is built batch by batch, so memory beyond the input and output arrays stays
    small.
    """
    import torch

    seconds = {} if seconds is None else seconds
    t = time.perf_counter()
    crop = slicing.body_box(hu, spacing_mm[:2])
    hu_crop = hu[:, crop[0], crop[1]]
    grid = SliceGrid.for_slices(hu_crop.shape[1:], spacing_mm[:2], model.plan)
    prediction = ModelGridPrediction(
        hu_crop, grid, model.plan, network, device, batch_size=batch_size, progress=progress, cancel=cancel
    )
    with torch.inference_mode():
        if postprocess:
            ran = prediction.run_where_the_liver_can_be(spacing_mm[2])
        else:
            prediction.run(np.arange(hu.shape[0]))
            ran = hu.shape[0]
    log.info(
        "network ran on %d of %d slices, %dx%d of %dx%d pixels each",
        ran,
        hu.shape[0],
        *hu_crop.shape[1:],
        *hu.shape[1:],
    )
    seconds["inference"] = time.perf_counter() - t
    prediction.check_cancel()
    if postprocess:
        if progress is not None:
            progress("postprocess", 0.0)
        t = time.perf_counter()
        clean_on_model_grid(prediction.probability, prediction.level)
        seconds["postprocess"] = time.perf_counter() - t
        if progress is not None:
            progress("postprocess", 1.0)
    t = time.perf_counter()
    out = to_input_grid(prediction, crop, hu.shape)
    seconds["resample"] = time.perf_counter() - t
    return out


def segment(
    volume: Volume,
    model=None,
    *,
    device: str = "auto",
    postprocess: bool = True,
    batch_size: int = 16,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    runtime: Runtime | None = None,
) -> Segmentation:
    """Segment the liver of a CT volume; the mask lies on exactly the input's grid.

    ``runtime(network, device) -> (callable, input dtype, autocast context)`` replaces the default
    torch runtime (:func:`runtime_network`), e.g. to compare another inference engine.
    """
    from .runtime import resolve_device, runtime_network
    from .weights import load_model

    check_ct(volume)
    device = resolve_device(device)
    seconds = {}
    if model is None:
        t = time.perf_counter()
        model = load_model(device=device)
        seconds["model_load"] = time.perf_counter() - t
    else:
        model.network.to(device)
    reorient = Reorientation(volume)
    canonical = reorient.forward(volume.array)
    spacing = reorient.spacing(volume)
    network = (runtime or runtime_network)(model.network, device)
    mask = predict_canonical(
        canonical, spacing, model, device, network, batch_size, postprocess, progress, cancel, seconds
    )
    result = np.ascontiguousarray(reorient.backward(mask))
    return Segmentation(volume.with_array(result), model.model_id, device, network.precision, seconds)
