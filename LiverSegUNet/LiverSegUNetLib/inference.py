"""Volume in, liver mask out on exactly the input grid: the one pipeline the CLI, Slicer and training share."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .errors import Cancelled, InputError
from .preprocess import Reorientation, SliceGrid, from_model_grid, normalize, to_model_grid
from .volume import Volume, bounding_box

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
#: ``(network, device) -> NetworkRuntime``: how the network is made ready to run (default: runtime_network).
Runtime = Callable[[object, str], "NetworkRuntime"]


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


def resolve_device(device: str = "auto") -> str:
    """``auto`` becomes ``cuda`` when a GPU is usable, else ``cpu``; others are checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device in ("gpu", "cuda") or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"device '{device}' requested but no CUDA GPU is available; choose the device cpu or auto")
        return "cuda" if device == "gpu" else device
    if device != "cpu":
        raise InputError(f"unknown device '{device}'; use auto, cpu or cuda")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), so autocast pays off."""
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_for(device: str):
    """The autocast context for inference or training on ``device``, and its precision name."""
    import contextlib

    import torch

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16), "bf16"
    if cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16), "bf16"
    return contextlib.nullcontext(), "fp32"


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


def fold_batch_norm(network):
    """An eval-mode copy of ``network`` with every BatchNorm2d folded into the Conv2d before it."""
    import copy

    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(network).eval()
    for seq in net.modules():
        if isinstance(seq, nn.Sequential):
            for i in range(len(seq) - 1):
                if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                    seq[i], seq[i + 1] = fuse_conv_bn_eval(seq[i], seq[i + 1]), nn.Identity()
    return net


class NetworkRuntime(NamedTuple):
    """The network as inference runs it: a callable on a batch, the batch's dtype, the autocast context to
    run it in, and the name of the precision that results (reported in summaries)."""

    run: Callable
    dtype: object
    autocast: object
    precision: str


def runtime_network(network, device: str) -> NetworkRuntime:
    """``network`` prepared for inference on ``device``; the one place the inference precision is decided.

    Batch norm is folded into the preceding convolutions (18 fewer passes over the activations);
    on CPUs that compute bfloat16 natively the weights are stored in bfloat16 (no per-call casts)
    and laid out channels-last.
    """
    import contextlib

    import torch

    net = fold_batch_norm(network).to(device)
    if device == "cpu":
        net.to(memory_format=torch.channels_last)
        if cpu_has_bf16():
            return NetworkRuntime(net.to(torch.bfloat16), torch.bfloat16, contextlib.nullcontext(), "bf16")
    autocast, precision = autocast_for(device)
    return NetworkRuntime(net, torch.float32, autocast, precision)


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


def predict_canonical(
    hu: np.ndarray,
    spacing_mm: tuple[float, float, float],
    model,
    device: str,
    batch_size: int = 16,
    postprocess: bool = True,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    seconds: dict | None = None,
    network: NetworkRuntime | None = None,
) -> np.ndarray:
    """uint8 mask for a canonical ``[k, j, i]`` HU array with ``(i, j, k)`` spacing in mm.

    Only the rectangle around the body is resampled to the model grid. With postprocessing on, a
    first pass every ``PROBE_MM`` finds the liver's extent along k and only slices that can hold its
    component run (:func:`liver_range`: the result is the same as running every slice). The
    probabilities stay on the (smaller) model grid as uint8; postprocessing runs there too, and the
    full-resolution mask is built batch by batch, so memory beyond the input and output arrays stays
    small. ``network`` is the model's network as it runs (default: :func:`runtime_network`).
    """
    import torch

    from . import postprocess as post

    seconds = {} if seconds is None else seconds
    plan = model.plan
    full_shape = hu.shape
    t = time.perf_counter()
    rows, cols = body_box(hu, spacing_mm[:2])
    hu = hu[:, rows, cols]
    grid = SliceGrid.for_slices(hu.shape[1:], spacing_mm[:2], plan)
    n, c = hu.shape[0], plan.context
    h, w = grid.size
    low = np.zeros((n, h, w), dtype=np.uint8)  # probability x 255 on the model grid
    level = int(round(plan.threshold * 255))
    net, dtype, autocast, _ = network or runtime_network(model.network, device)
    channels_last = torch.channels_last if device == "cpu" else torch.contiguous_format
    done = np.zeros(n, dtype=bool)

    def check_cancel():
        if cancel is not None and cancel():
            raise Cancelled("segmentation cancelled")

    def run(indices: np.ndarray) -> None:
        """Network on slices ``indices`` (with their neighbours as channels), into ``low``."""
        offsets = np.arange(-c, c + 1)
        for b in range(0, len(indices), batch_size):
            check_cancel()
            idx = indices[b : b + batch_size]
            wanted = np.clip(idx[:, None] + offsets[None, :], 0, n - 1)
            needed = np.unique(wanted)
            stack = prepare_slices(torch.from_numpy(hu[needed]), grid, plan)
            x = stack[torch.from_numpy(np.searchsorted(needed, wanted))]
            with autocast:
                logits = net(x.to(device, dtype=dtype, memory_format=channels_last))
            prob = torch.sigmoid(logits.float()[:, 0, :h, :w]).cpu()
            low[idx] = (prob * 255).round().to(torch.uint8).numpy()
            done[idx] = True
            if progress is not None:
                progress("inference", float(done.mean()))

    stride = max(1, int(round(PROBE_MM / spacing_mm[2])))
    probes, todo = np.empty(0, dtype=int), np.arange(n)
    with torch.inference_mode():
        if postprocess and stride > 1:
            probes = np.unique(np.r_[np.arange(0, n, stride), n - 1])
            run(probes)
            span = liver_range((low[probes] >= level).reshape(len(probes), -1).sum(axis=1), probes, stride, n)
            if span is not None:  # else nothing found: run every slice, as without the probe
                todo = np.arange(span[0], span[1] + 1)
                low[: span[0]], low[span[1] + 1 :] = 0, 0  # probes outside the span
                done[: span[0]], done[span[1] + 1 :] = True, True  # skipped slices count as handled
            todo = np.setdiff1d(todo, probes)
        run(todo)
    log.info(
        "network ran on %d of %d slices, %dx%d of %dx%d pixels each",
        len(probes) + len(todo),
        n,
        *hu.shape[1:],
        *full_shape[1:],
    )
    seconds["inference"] = time.perf_counter() - t
    check_cancel()
    if postprocess:
        if progress is not None:
            progress("postprocess", 0.0)
        t = time.perf_counter()
        box = bounding_box(low, level)
        if box is None:
            low[:] = 0
        else:  # only the box around what the network found: memory scales with the liver, not the volume
            k, j, i = box
            low[: k.start], low[k.stop :] = 0, 0
            low[k, : j.start], low[k, j.stop :], low[k, :, : i.start], low[k, :, i.stop :] = 0, 0, 0, 0
            sub = low[box]
            raw = sub >= level
            kept = post.postprocess(raw).astype(bool)
            sub[~kept] = 0  # dropped components
            sub[kept & ~raw] = 255  # filled holes
        seconds["postprocess"] = time.perf_counter() - t
        if progress is not None:
            progress("postprocess", 1.0)
    t = time.perf_counter()
    out = np.zeros(full_shape, dtype=np.uint8)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            check_cancel()
            stop = min(n, start + batch_size)
            maps = torch.from_numpy(low[start:stop]).float() / 255
            out[start:stop, rows, cols] = (from_model_grid(maps, grid) >= level / 255 - 1e-6).numpy()
            if progress is not None:
                progress("resample", stop / n)
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
        canonical, spacing, model, device, batch_size, postprocess, progress, cancel, seconds, network
    )
    result = np.ascontiguousarray(reorient.backward(mask))
    return Segmentation(volume.with_array(result), model.model_id, device, network.precision, seconds)
