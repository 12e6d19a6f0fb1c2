"""Volume in, one mask per structure out on exactly the input grid: the one pipeline the CLI, Slicer and
training share.

The steps, each a function below: the CT is checked (:func:`check_ct`) and turned to the canonical
axis order; the rectangle around the body is cut out (:mod:`.slicing`); the network runs slice by
slice on the model grid, first every ``PROBE_MM`` to find the liver's extent and then on the
slices that can hold it (:class:`ModelGridPrediction`); each structure is cleaned on the model grid
by its model card rule (:func:`clean_structures`) and only then resampled to the input grid
(:func:`to_input_grid`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import slicing
from .errors import Cancelled, InputError
from .measure import volume_ml
from .preprocess import (
    Reorientation,
    SliceGrid,
    along_slices,
    between_slices,
    from_model_grid,
    normalize,
    raise_soft_tissue,
    slice_steps,
    slices_at,
    to_model_grid,
    with_context,
)
from .runtime import NetworkRuntime, Runtime
from .terminology import Structure
from .volume import Volume, bounding_box

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


@dataclass
class Segmentation:
    """One uint8 0/1 mask per output structure on the input grid, and what it took to make them."""

    masks: list[Volume]
    structures: list[Structure]
    model_id: str
    device: str
    precision: str
    seconds: dict = field(default_factory=dict)
    #: How far the soft tissue was raised for a second pass because the liver first found was darker than the
    #: plan's ``liver_floor_hu`` (HU; 0: the network ran once, on the CT as it is).
    raised_hu: float = 0.0

    @property
    def mask(self) -> Volume:
        """The first structure's mask (the liver, for the liver models)."""
        return self.masks[0]

    @property
    def volume_ml(self) -> float:
        """The first structure's volume in millilitres."""
        return volume_ml(self.mask)

    def volumes_ml(self) -> dict[str, float]:
        """Every structure's volume in millilitres, by name."""
        return {s.name: volume_ml(m) for s, m in zip(self.structures, self.masks)}


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
    """Per-structure probabilities (x 255, uint8) of every slice of a body crop on the model grid,
    ``(structures, slices, rows, columns)``, filled batch by batch. With ``raise_hu`` (shift, liver HU) the network
    sees the crop's soft tissue raised by the shift (:func:`raise_soft_tissue`), slice by slice as it is read."""

    def __init__(
        self,
        hu_crop: np.ndarray,
        grid: SliceGrid,
        plan,
        network: NetworkRuntime,
        device: str,
        structures: int,
        raise_hu: tuple[float, float] | None = None,
        **run,
    ):
        self.hu, self.grid, self.plan, self.network, self.device = hu_crop, grid, plan, network, device
        self.batch_size, self.progress, self.cancel = run["batch_size"], run["progress"], run["cancel"]
        self.raise_hu = raise_hu
        self.stage = "inference" if raise_hu is None else "inference, raised"
        n = hu_crop.shape[0]
        height, width = grid.size
        self.probability = np.zeros((structures, n, height, width), dtype=np.uint8)
        self.handled = np.zeros(n, dtype=bool)  # slices predicted, or known to hold no liver
        self.level = int(round(plan.threshold * 255))  # the threshold on the uint8 scale
        self.views_done = 0  # directions finished; each is an equal share of the inference progress

    def report(self, fraction: float) -> None:
        """Report inference progress: ``fraction`` of the current direction done, after those finished."""
        if self.progress is not None:
            self.progress(self.stage, (self.views_done + fraction) / len(self.plan.views))

    def check_cancel(self) -> None:
        """Raise :class:`Cancelled` when the caller asked to stop."""
        if self.cancel is not None and self.cancel():
            raise Cancelled("segmentation cancelled")

    def prepare(self, hu_slices: np.ndarray):
        """Crop slices ``(N, H, W)`` to normalized model-grid slices (a float32 tensor), raised by ``raise_hu``."""
        import torch

        if self.raise_hu is not None:
            hu_slices = raise_soft_tissue(hu_slices, *self.raise_hu)
        return prepare_slices(torch.from_numpy(np.ascontiguousarray(hu_slices)), self.grid, self.plan)

    def found_median_hu(self, samples: int = 24) -> float | None:
        """The median HU, as read (before any shift), of the first structure's voxels at or above the threshold, on
        the model grid, over at most ``samples`` of the slices that hold some (None: nothing found)."""
        import torch

        _, n, height, width = self.probability.shape
        first = self.probability[0]
        holding = np.flatnonzero(first.reshape(n, -1).max(axis=1) >= self.level)
        if not len(holding):
            return None
        picked = holding[np.unique(np.linspace(0, len(holding) - 1, min(samples, len(holding))).round().astype(int))]
        hu = to_model_grid(torch.from_numpy(np.ascontiguousarray(self.hu[picked])).float(), self.grid)
        return float(np.median(hu[:, :height, :width].numpy()[first[picked] >= self.level]))

    def logits(self, x):
        """The network's probabilities for a batch of model-grid inputs ``(B, C, H, W)`` (float32, on the CPU)."""
        import torch

        memory_format = torch.channels_last if self.device == "cpu" else torch.contiguous_format
        with self.network.autocast:
            logits = self.network.run(x.to(self.device, dtype=self.network.dtype, memory_format=memory_format))
        return torch.sigmoid(logits.float()).cpu()

    def run(self, slices: np.ndarray) -> None:
        """The network on ``slices`` (indices into the crop), each with its neighbours as channels."""
        import torch

        _, n, height, width = self.probability.shape
        offsets = np.arange(-self.plan.context, self.plan.context + 1)
        for start in range(0, len(slices), self.batch_size):
            self.check_cancel()
            batch = slices[start : start + self.batch_size]
            with_neighbours = np.clip(batch[:, None] + offsets[None, :], 0, n - 1)  # (batch, channels)
            needed = np.unique(with_neighbours)  # each slice is resampled once, even when shared
            stack = self.prepare(self.hu[needed])
            x = stack[torch.from_numpy(np.searchsorted(needed, with_neighbours))]
            # the model grid is padded to a multiple of the network's stride: keep the grid's own size
            probability = self.logits(x)[:, :, :height, :width]
            self.probability[:, batch] = (probability * 255).round().to(torch.uint8).numpy().transpose(1, 0, 2, 3)
            self.handled[batch] = True
            self.report(float(self.handled.mean()))

    def isotropic(self, spacing_k_mm: float):
        """The crop on the model grid, its slices resampled along the body axis to ``plan.spacing_mm``:
        ``(slices, rows, columns)``, float32, what :meth:`other_view` slices across."""
        import torch

        _, n, height, width = self.probability.shape
        step = self.batch_size  # a flipped input is a view with negative strides: each batch is copied
        stack = torch.cat([self.prepare(self.hu[i : i + step]) for i in range(0, n, step)])[:, :height, :width]
        return along_slices(stack, slices_at(spacing_k_mm, n, self.plan.spacing_mm))

    def other_view(self, view: str, volume):
        """Probabilities ``(structures, slices, rows, columns)`` (float32 tensor, on the model grid) from the
        network run on ``coronal`` or ``sagittal`` slices of ``volume`` (:meth:`isotropic`), each slice with its
        neighbours as channels, the result resampled back to the axial slices."""
        import torch
        import torch.nn.functional as F

        structures, n = self.probability.shape[:2]
        across = volume.permute(1, 0, 2) if view == "coronal" else volume.permute(2, 0, 1)
        multiple = self.plan.multiple
        pad = (0, -across.shape[2] % multiple, 0, -across.shape[1] % multiple)
        out = torch.zeros((structures, *across.shape))
        for start in range(0, across.shape[0], self.batch_size):
            self.check_cancel()
            centers = torch.arange(start, min(start + self.batch_size, across.shape[0]))
            x = F.pad(with_context(across, centers, self.plan.context), pad)
            out[:, centers] = self.logits(x)[:, :, : across.shape[1], : across.shape[2]].transpose(0, 1)
            self.report(int(centers[-1] + 1) / across.shape[0])
        back = out.permute(0, 2, 1, 3) if view == "coronal" else out.permute(0, 2, 3, 1)
        return along_slices(back.transpose(0, 1), n).transpose(0, 1)

    def fuse_views(self, spacing_k_mm: float) -> None:
        """Average, into :attr:`probability`, the axial probabilities (when the plan's views hold axial, already
        run) with those of the plan's other views (:meth:`other_view`)."""
        views = self.plan.views
        total = self.probability.astype(np.float32) / 255 if "axial" in views else 0.0
        self.views_done = int("axial" in views)
        volume = self.isotropic(spacing_k_mm)  # resampled once for every direction
        for view in (v for v in views if v != "axial"):
            total = total + self.other_view(view, volume).numpy()
            self.views_done += 1
        self.probability[:] = np.round(np.clip(total / len(views), 0, 1) * 255).astype(np.uint8)
        self.handled[:] = True

    def run_where_the_liver_can_be(self, spacing_k_mm: float) -> int:
        """Probe every ``PROBE_MM``, then run only the slices that can hold the first structure's largest
        component (the liver); returns how many slices ran. Only for models whose other structures all
        lie inside the first (:func:`probe_applies`)."""
        n = self.probability.shape[1]
        stride = max(1, int(round(slicing.PROBE_MM / spacing_k_mm)))
        if stride == 1:
            self.run(np.arange(n))
            return n
        probes = slicing.probe_slices(n, stride)
        self.run(probes)
        positives = (self.probability[0, probes] >= self.level).reshape(len(probes), -1).sum(axis=1)
        span = slicing.liver_range(positives, probes, stride, n)
        todo = np.arange(n)
        if span is not None:  # else nothing found: run every slice, as without the probe
            first, last = span
            todo = np.arange(first, last + 1)
            self.probability[:, :first], self.probability[:, last + 1 :] = 0, 0  # probes outside the span
            self.handled[:first], self.handled[last + 1 :] = True, True
        todo = np.setdiff1d(todo, probes)
        self.run(todo)
        return len(probes) + len(todo)


def probe_applies(structures: list[Structure]) -> bool:
    """True when the first structure is cleaned to its largest component and every other lies inside it:
    then slices beyond the first structure's extent cannot hold anything and the probe pass may skip them."""
    first = structures[0]
    return first.postprocess == "largest" and all(s.inside == first.name for s in structures[1:])


def opening_voxels(plan, spacing_k_mm: float) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The ball of ``plan.opening_mm`` and the one-pixel rim restored after it, in model-grid voxels (i, j, k):
    in-plane pixels are ``plan.spacing_mm``, slices ``spacing_k_mm`` apart."""
    if plan.opening_mm <= 0:
        return (0, 0, 0), (0, 0, 0)
    pixels = max(1, round(plan.opening_mm / plan.spacing_mm))
    slices = round(plan.opening_mm / spacing_k_mm)
    return (pixels, pixels, slices), (1, 1, round(plan.spacing_mm / spacing_k_mm))


def clean_structures(
    probability: np.ndarray, structures: list[Structure], level: int, plan=None, spacing_k_mm: float = 1.0
) -> None:
    """Each structure's card rule applied to its thresholded probabilities ``probability[s]``, in place,
    in card order (an ``inside:`` structure after the one it lies in). A ``largest`` structure is also cut
    from what hangs on it by thin bridges when the plan asks for it (``opening_mm``)."""
    names = [s.name for s in structures]
    radius, restore = opening_voxels(plan, spacing_k_mm) if plan is not None else ((0, 0, 0), (0, 0, 0))
    for index, structure in enumerate(structures):
        if structure.postprocess == "largest":
            clean_on_model_grid(probability[index], level, radius, restore)
        elif structure.inside is not None:
            probability[index][probability[names.index(structure.inside)] < level] = 0


def clean_on_model_grid(probability: np.ndarray, level: int, radius=(0, 0, 0), restore=(0, 0, 0)) -> None:
    """Postprocess (largest component, without thin bridges when ``radius`` is set, holes filled) the
    thresholded ``probability``, in place.

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
    kept = postprocess.postprocess(raw, radius, restore).astype(bool)
    inside[~kept] = 0
    inside[kept & ~raw] = 255


def to_input_grid(
    prediction: ModelGridPrediction, crop: tuple[slice, slice], full_shape: tuple[int, int, int]
) -> list[np.ndarray]:
    """One uint8 0/1 mask per structure on the (canonical) input grid, resampled from the model grid
    batch by batch."""
    import torch

    rows, cols = crop
    n = full_shape[0]
    count = prediction.probability.shape[0]
    masks = []
    # Bilinear resampling of values k/255 can land a hair below level/255 where every neighbour is
    # exactly at the level; the tolerance keeps those voxels, as the model grid itself does (>= level).
    threshold = prediction.level / 255 - 1e-6
    with torch.inference_mode():
        for index, probability in enumerate(prediction.probability):
            out = np.zeros(full_shape, dtype=np.uint8)
            for start in range(0, n, prediction.batch_size):
                prediction.check_cancel()
                stop = min(n, start + prediction.batch_size)
                # bilinear weights are a convex combination: below the level everywhere stays below it
                if probability[start:stop].max(initial=0) >= prediction.level:
                    maps = torch.from_numpy(probability[start:stop]).float() / 255
                    out[start:stop, rows, cols] = (from_model_grid(maps, prediction.grid) >= threshold).numpy()
                if prediction.progress is not None:
                    prediction.progress("resample", (index * n + stop) / (count * n))
            masks.append(out)
    return masks


#: The most :func:`floor_shift_hu` raises the soft tissue by (HU): a liver darker than the floor by more is raised
#: this much (:func:`raise_soft_tissue` keeps the order of values below 100).
MAX_SHIFT_HU = 80.0


def network_pass(
    hu_crop: np.ndarray,
    grid: SliceGrid,
    model,
    network: NetworkRuntime,
    device: str,
    spacing_k_mm: float,
    *,
    postprocess: bool,
    raise_hu: tuple[float, float] | None = None,
    **run,
) -> tuple[ModelGridPrediction, int]:
    """The network on the crop, in the plan's directions, its soft tissue raised by ``raise_hu`` (the shift and the
    liver's HU, :func:`raise_soft_tissue`; None: as it is): the prediction and how many axial slices ran. With
    postprocessing on (and a model whose structures all lie inside the liver, :func:`probe_applies`) the axial
    direction probes first (``run_where_the_liver_can_be``)."""
    structures, views = model.structures, model.plan.views
    prediction = ModelGridPrediction(hu_crop, grid, model.plan, network, device, len(structures), raise_hu, **run)
    if "axial" not in views:
        ran = 0
    elif postprocess and probe_applies(structures):
        ran = prediction.run_where_the_liver_can_be(spacing_k_mm)
    else:
        ran = hu_crop.shape[0]
        prediction.run(np.arange(ran))
    if views != ("axial",):
        prediction.fuse_views(spacing_k_mm)
    return prediction, ran


def floor_shift_hu(prediction: ModelGridPrediction, floor_hu: float) -> tuple[float, float] | None:
    """How far to raise the soft tissue for a second pass, and the liver's HU it is raised from (None: no second
    pass): the gap between ``floor_hu`` (the plan's ``liver_floor_hu``; 0 is off) and the median HU of the liver
    found, up to :data:`MAX_SHIFT_HU`."""
    if floor_hu <= 0:
        return None
    median = prediction.found_median_hu()
    if median is None or median >= floor_hu:
        return None
    return min(floor_hu - median, MAX_SHIFT_HU), median


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
    notes: dict | None = None,
) -> list[np.ndarray]:
    """uint8 masks, one per structure of ``model``, for a canonical ``[k, j, i]`` HU array with ``(i, j, k)``
    spacing in mm.

    Only the rectangle around the body is resampled to the model grid. With postprocessing on (and a
    model whose structures all lie inside the liver, :func:`probe_applies`), a first pass every
    ``PROBE_MM`` finds the liver's extent along k and only slices that can hold its component run
    (:func:`slicing.liver_range`: the result is the same as running every slice). The
    probabilities stay on the (smaller) model grid as uint8; postprocessing runs there too, and the
    full-resolution mask is built batch by batch, so memory beyond the input and output arrays stays
    small. A plan whose ``views`` hold more than ``axial`` also runs the network across the volume
    (:meth:`ModelGridPrediction.fuse_views`) and averages the directions' probabilities before postprocessing.
    A plan with a ``liver_floor_hu`` runs the network a second time, the soft tissue raised, when the liver first
    found is darker than that (:func:`floor_shift_hu`); the second pass is the result, and ``notes["raised_hu"]``
    says by how much (0 without a second pass). A plan with a ``slice_mm`` runs a CT whose slices lie farther apart
    on slices interpolated between them (:func:`between_slices`) and cleans up there, then keeps the CT's own
    slices.
    """
    import torch

    seconds = {} if seconds is None else seconds
    notes = {} if notes is None else notes
    t = time.perf_counter()
    crop = slicing.body_box(hu, spacing_mm[:2])
    steps = slice_steps(spacing_mm[2], model.plan.slice_mm)
    hu_crop = between_slices(hu[:, crop[0], crop[1]], steps)
    spacing_k = spacing_mm[2] / steps  # the slices the network reads and the clean-up works on
    grid = SliceGrid.for_slices(hu_crop.shape[1:], spacing_mm[:2], model.plan)
    structures = model.structures
    args = (hu_crop, grid, model, network, device, spacing_k)
    run = {"postprocess": postprocess, "batch_size": batch_size, "progress": progress, "cancel": cancel}
    with torch.inference_mode():
        prediction, ran = network_pass(*args, **run)
        raise_hu = floor_shift_hu(prediction, model.plan.liver_floor_hu)
        notes["raised_hu"] = 0.0 if raise_hu is None else raise_hu[0]
        if raise_hu is not None:
            log.info(
                "the liver found lies at %.0f HU: soft tissue raised by %.0f HU, network run again", *raise_hu[::-1]
            )
            prediction, again = network_pass(*args, raise_hu=raise_hu, **run)
            ran += again
    log.info(
        "network ran on %d of %d axial slices (%d per slice of the CT), %dx%d of %dx%d pixels each; views %s",
        ran,
        hu_crop.shape[0],
        steps,
        *hu_crop.shape[1:],
        *hu.shape[1:],
        "+".join(model.plan.views),
    )
    seconds["inference"] = time.perf_counter() - t
    prediction.check_cancel()
    if postprocess:
        if progress is not None:
            progress("postprocess", 0.0)
        t = time.perf_counter()
        clean_structures(prediction.probability, structures, prediction.level, model.plan, spacing_k)
        seconds["postprocess"] = time.perf_counter() - t
        if progress is not None:
            progress("postprocess", 1.0)
    t = time.perf_counter()
    if steps > 1:  # back to the CT's own slices: those the interpolated ones were made between
        prediction.probability = np.ascontiguousarray(prediction.probability[:, ::steps])
    masks = to_input_grid(prediction, crop, hu.shape)
    keep_all = [i for i, s in enumerate(structures) if s.postprocess == "all"]
    if postprocess and keep_all:  # structures of many pieces: every piece inside the body, none in the air
        body = slicing.body_mask(hu)
        for index in keep_all:
            masks[index] &= body
    seconds["resample"] = time.perf_counter() - t
    return masks


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
    checked: bool = False,
) -> Segmentation:
    """Segment every structure of the model (the liver, for the bundled one) in a CT volume; the masks lie
    on exactly the input's grid.

    ``runtime(network, device) -> (callable, input dtype, autocast context)`` replaces the default
    torch runtime (:func:`runtime_network`), e.g. to compare another inference engine. ``checked``: the
    caller already refused unusable input with :func:`check_ct` (the Slicer Logic does, in the main thread,
    before its worker starts), so it is not checked twice.
    """
    from .runtime import resolve_device, runtime_network
    from .weights import load_model

    if not checked:
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
    notes = {}
    masks = predict_canonical(
        canonical, spacing, model, device, network, batch_size, postprocess, progress, cancel, seconds, notes
    )
    masks = [volume.with_array(np.ascontiguousarray(reorient.backward(m))) for m in masks]
    raised = float(notes.get("raised_hu", 0.0))
    return Segmentation(masks, model.structures, model.model_id, device, network.precision, seconds, raised)
