"""How the network runs: the device, the precision, and the network prepared for inference."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from .errors import InputError


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


#: ``(network, device) -> NetworkRuntime``: how the network is made ready to run (default: runtime_network).
Runtime = Callable[[object, str], NetworkRuntime]
