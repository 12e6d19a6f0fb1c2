"""Which extra 2D training slices show a held-out patient, found by their pixels.

The msd_liver_2d slices come from the Medical Segmentation Decathlon's liver task (LiTS data), and LiTS
includes the 20 patients of 3D-IRCADb-01: some of its cases *are* the patients this project holds out.
A held-out patient's own slices among the training samples would flatter its leave-one-out Dice, so a
run drops every extra case that shows one of its test patients (``train.py``); nothing but the pixels
says which cases those are (the case ids are LiTS's, not IRCADb's).

Two slices are the same picture when their thumbnails (HU clipped to 0..255, the msd slices' own storage
range, averaged down to ``THUMB`` x ``THUMB`` over the whole field of view) correlate above ``SAME`` under
one of the 8 flips and quarter turns (the msd slices were flipped or mirrored and transposed). The same CT
slice exported to 8-bit JPEG correlates above 0.999 with its source; on the shared data, slices of
different patients and neighbouring slices of one patient stay below 0.8.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

THUMB = 64
SAME = 0.98
#: Marks, in the reports, what was trained or scored with runs that may have seen their held-out patient's slices.
MARK = " †"


def thumbnails(hu: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(N, THUMB * THUMB)`` float16: each ``(H, W)`` slice of ``hu`` clipped to 0..255, area-averaged,
    centred and scaled to unit length (so a dot product is a correlation)."""
    x = torch.as_tensor(np.ascontiguousarray(hu, dtype=np.float32)).clamp(0, 255)
    small = torch.cat([F.interpolate(part[:, None], size=(THUMB, THUMB), mode="area") for part in x.split(32)])
    flat = small.reshape(x.shape[0], -1)
    flat = flat - flat.mean(1, keepdim=True)
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-6)).half()


def _turned(thumbs: torch.Tensor) -> torch.Tensor:
    """``(N, 8, D)``: every thumbnail under the 8 flips and quarter turns."""
    square = thumbs.float().reshape(-1, THUMB, THUMB)
    views = []
    for quarter in range(4):
        turned = torch.rot90(square, quarter, (1, 2))
        views += [turned, turned.flip(2)]
    return torch.stack(views, 1).reshape(square.shape[0], 8, -1)


def same_slices(thumbs: torch.Tensor, patient: torch.Tensor, threshold: float = SAME) -> torch.Tensor:
    """``(N,)`` bool: which of ``thumbs`` is the same picture as some slice of ``patient`` (both from
    :func:`thumbnails`)."""
    if thumbs.shape[0] == 0 or patient.shape[0] == 0:
        return torch.zeros(thumbs.shape[0], dtype=torch.bool)
    best = torch.einsum("nvd,sd->nvs", _turned(thumbs), patient.float()).flatten(1).amax(1)
    return best >= threshold


def cases_showing(case_of: list[str], thumbs: torch.Tensor, patients: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{case: patient}`` for every case (``case_of[n]`` is slice ``n``'s) with a slice that is the same
    picture as a slice of one of ``patients`` (name: its thumbnails)."""
    found = {}
    for name, patient in patients.items():
        for n in torch.nonzero(same_slices(thumbs, patient)).flatten().tolist():
            found.setdefault(case_of[n], name)
    return found


def saw_own_slices(provenance: dict) -> bool:
    """Whether a run (its card's provenance) trained on extra 2D slices before runs left out the cases that
    are its test patients (such a card has no ``extra_2d_left_out``): its held-out metrics may be flattered."""
    return bool(provenance.get("extra_2d_slices")) and "extra_2d_left_out" not in provenance
