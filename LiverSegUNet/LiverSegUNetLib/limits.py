"""Resource limits: how much memory a volume may take before it is refused rather than read."""

from __future__ import annotations

import os

from .errors import InputError


def memory_budget_bytes() -> int:
    """Bytes a case may use: ``$LIVERSEG_MEMORY_MB``, else half of the machine's physical memory."""
    env = os.environ.get("LIVERSEG_MEMORY_MB")
    if env:
        return int(float(env) * 2**20)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def check_volume_size(shape: tuple[int, ...], bytes_per_voxel: int, what: str) -> None:
    """Refuse a volume whose input array plus output mask would not fit the memory budget."""
    voxels = 1
    for n in shape:
        if n <= 0:
            raise InputError(f"{what}: image size {tuple(shape)} has an empty dimension")
        voxels *= int(n)
    need = voxels * (bytes_per_voxel + 1)
    budget = memory_budget_bytes()
    if need > budget:
        raise InputError(
            f"{what}: a {'x'.join(map(str, shape))} volume needs about {need / 2**20:.0f} MB, over the memory budget "
            f"of {budget / 2**20:.0f} MB; crop or downsample it, or raise LIVERSEG_MEMORY_MB"
        )
