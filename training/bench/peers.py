"""The compute of the peers' pipelines, with untrained weights, for ``python -m training.bench`` (needs ``monai``).

Settings come from the peers' own inference code:
- SlicerMONAIAuto3DSeg (``auto3dseg_segresnet_inference.py``; Auto3DSeg segresnet template): SegResNetDS,
  init_filters 32, blocks_down (1, 2, 2, 4, 4), dsdepth 4, instance norm; foreground crop (margin 10),
  resampling to the model spacing (3 mm for the "quick" models; 1.5 mm assumed for the full ones),
  sliding window roi (224, 224, 144), overlap 0.625, Gaussian blending, sw_batch_size 1, no TTA;
  the 23-structure abdominal model is assumed (24 output channels).
- TotalSegmentator (``map_tasks_config.py``, ``nnunet.py``): nnU-Net 3d_fullres, 5 networks (tasks
  291-295) at 1.5 mm, or one (task 297) at 3 mm with ``--fast``; tile step 0.5, Gaussian weighting,
  no mirroring. Network: nnU-Net's default plain U-Net (6 stages, 32-64-128-256-320-320 features,
  3x3x3 kernels, instance norm, leaky ReLU) with a 128^3 patch (the shipped plans are not public).
"""

from __future__ import annotations

import time

import numpy as np

SEGRESNET = {"roi": (224, 224, 144), "overlap": 0.625, "out_channels": 24}
NNUNET = {"roi": (128, 128, 128), "overlap": 0.5, "out_channels": 26, "features": (32, 64, 128, 256, 320, 320)}
#: nnU-Net at 1.5 mm has many tiles and 5 networks: time this many tiles, extrapolate the rest.
MEASURED_TILES = 3


def _network(kind: str):
    if kind == "segresnet":
        from monai.networks.nets import SegResNetDS

        return SegResNetDS(
            spatial_dims=3,
            init_filters=32,
            in_channels=1,
            out_channels=SEGRESNET["out_channels"],
            blocks_down=(1, 2, 2, 4, 4),
            dsdepth=4,
            norm="INSTANCE",
        )
    from monai.networks.nets import DynUNet

    n = len(NNUNET["features"])
    return DynUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=NNUNET["out_channels"],
        kernel_size=[3] * n,
        strides=[1] + [2] * (n - 1),
        upsample_kernel_size=[2] * (n - 1),
        filters=NNUNET["features"],
        norm_name="instance",
        act_name=("leakyrelu", {"negative_slope": 0.01}),
        deep_supervision=False,
    )


def _foreground_box(hu: np.ndarray, margin: int = 10) -> tuple[slice, ...]:
    body = hu > -500
    box = []
    for axis in range(3):
        hit = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        lo, hi = (hit[0], hit[-1] + 1) if hit.size else (0, hu.shape[axis])
        box.append(slice(max(0, lo - margin), min(hu.shape[axis], hi + margin)))
    return tuple(box)


def run(peer: dict, ct) -> dict:
    """Resample, sliding-window inference, argmax and resample back, as the peer does; returns counts and timings."""
    import torch
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    kind, spacing = peer["kind"], peer["spacing_mm"]
    settings = SEGRESNET if kind == "segresnet" else NNUNET
    networks = 5 if kind == "nnunet" and spacing < 2 else 1
    box = _foreground_box(ct.array) if kind == "segresnet" else (slice(None),) * 3
    hu = torch.from_numpy(ct.array[box].astype(np.float32))
    sk, sj, si = ct.spacing_mm[2], ct.spacing_mm[1], ct.spacing_mm[0]
    size = [max(1, round(n * s / spacing)) for n, s in zip(hu.shape, (sk, sj, si))]
    x = F.interpolate(hu[None, None], size=size, mode="trilinear", align_corners=False)
    x = (x - x.mean()) / (x.std() + 1e-6)
    x = x.permute(0, 1, 4, 3, 2).contiguous()  # (N, C, i, j, k): MONAI's spatial order
    net = _network(kind).eval()
    calls, net_seconds = 0, 0.0
    limit = MEASURED_TILES if networks > 1 else None

    def predictor(window):
        nonlocal calls, net_seconds
        calls += 1
        if limit is not None and calls > limit:
            return torch.zeros((window.shape[0], settings["out_channels"], *window.shape[2:]))
        t = time.perf_counter()
        out = net(window)
        net_seconds += time.perf_counter() - t
        return out

    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_inference(
            x, settings["roi"], 1, predictor, overlap=settings["overlap"], mode="gaussian"
        )
        labels = logits.argmax(1, keepdim=True).float()
        back = F.interpolate(labels.permute(0, 1, 4, 3, 2), size=tuple(hu.shape), mode="nearest")
    wall = time.perf_counter() - t0
    measured = min(calls, limit) if limit else calls
    per_tile = net_seconds / max(1, measured)
    one_network = wall - net_seconds + per_tile * calls
    total = one_network * networks
    return {
        "peer_seconds": total,
        "tiles_per_network": calls,
        "networks": networks,
        "model_grid": size,
        "measured_tiles": measured,
        "extrapolated": measured < calls * networks,
        "output_voxels": int(back.numel()),
    }
