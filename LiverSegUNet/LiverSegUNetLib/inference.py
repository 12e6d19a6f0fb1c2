"""Volume in, liver mask out on exactly the input grid: the one pipeline the CLI, Slicer and training share."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import Cancelled, InputError
from .preprocess import Reorientation, SliceGrid, from_model_grid, normalize, to_model_grid, with_context
from .volume import Volume

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


def resolve_device(device: str = "auto") -> str:
    """``auto`` becomes ``cuda`` when a GPU is usable, else ``cpu``; others are checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device in ("gpu", "cuda") or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"device '{device}' requested but no CUDA GPU is available; use --device cpu")
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


def check_ct(volume: Volume) -> None:
    """Refuse volumes that cannot be a CT: wrong dimensionality, too small, non-finite or constant."""
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


def prepare_slices(hu, grid: SliceGrid, plan):
    """HU slices ``(N, H, W)`` to normalized model-grid slices ``(N, Hp, Wp)``."""
    return to_model_grid(normalize(hu, plan), grid)


def predict_canonical(
    hu: np.ndarray,
    spacing_ij_mm: tuple[float, float],
    model,
    device: str,
    batch_size: int = 16,
    postprocess: bool = True,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    seconds: dict | None = None,
) -> np.ndarray:
    """uint8 mask for a canonical ``[k, j, i]`` HU array.

    The network runs batch by batch and its probabilities stay on the (smaller) model grid as
    uint8; postprocessing runs there too, and only the final mask is built at full resolution,
    again batch by batch, so memory beyond the input and output arrays stays small.
    """
    import torch

    from . import postprocess as post

    plan, net = model.plan, model.network
    grid = SliceGrid.for_slices(hu.shape[1:], spacing_ij_mm, plan)
    n, c = hu.shape[0], plan.context
    h, w = grid.size
    low = np.empty((n, h, w), dtype=np.uint8)  # probability x 255 on the model grid
    autocast, _ = autocast_for(device)
    channels_last = torch.channels_last if device == "cpu" else torch.contiguous_format
    seconds = {} if seconds is None else seconds

    def check_cancel():
        if cancel is not None and cancel():
            raise Cancelled("segmentation cancelled")

    t = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            check_cancel()
            stop = min(n, start + batch_size)
            lo, hi = max(0, start - c), min(n, stop + c)
            stack = prepare_slices(torch.from_numpy(np.ascontiguousarray(hu[lo:hi])), grid, plan)
            x = with_context(stack, torch.arange(start - lo, stop - lo), c).to(device, memory_format=channels_last)
            with autocast:
                logits = net(x)
            prob = torch.sigmoid(logits.float()[:, 0, :h, :w]).cpu()
            low[start:stop] = (prob * 255).round().to(torch.uint8).numpy()
            if progress is not None:
                progress("inference", stop / n)
    seconds["inference"] = time.perf_counter() - t
    check_cancel()
    level = int(round(plan.threshold * 255))
    if postprocess:
        if progress is not None:
            progress("postprocess", 0.0)
        t = time.perf_counter()
        raw = low >= level
        kept = post.postprocess(raw).astype(bool)
        low[~kept] = 0  # dropped components
        low[kept & ~raw] = 255  # filled holes
        seconds["postprocess"] = time.perf_counter() - t
        if progress is not None:
            progress("postprocess", 1.0)
    t = time.perf_counter()
    out = np.zeros(hu.shape, dtype=np.uint8)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            check_cancel()
            stop = min(n, start + batch_size)
            maps = torch.from_numpy(low[start:stop]).float() / 255
            out[start:stop] = (from_model_grid(maps, grid) >= level / 255 - 1e-6).numpy()
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
) -> Segmentation:
    """Segment the liver of a CT volume; the mask lies on exactly the input's grid."""
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
    mask = predict_canonical(canonical, spacing[:2], model, device, batch_size, postprocess, progress, cancel, seconds)
    result = np.ascontiguousarray(reorient.backward(mask))
    _, precision = autocast_for(device)
    return Segmentation(volume.with_array(result), model.model_id, device, precision, seconds)
