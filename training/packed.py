"""Training slices packed into one file per patient, for a machine that cannot read the source data.

A GPU machine borrowed for a short time may have PyTorch but neither pydicom nor SimpleITK, and only a small
working tree travels to it. ``pack`` builds exactly what ``training.train`` holds in memory for a
patient (``PatientSlices``: the slices on the model grid, the per-structure labels, the contrast-free
version) or for the msd_liver_2d slices (``ExtraSlices``) and stores it as 8-bit tensors in the
safetensors layout, zlib-compressed (``<name>.slices``, 5 MB for a patient); with ``cache = "FOLDER"``
in a config (or ``--set cache=...``) the run reads those files instead of the data. The packed files
are derived from the training data: they stay out of the repository (the default folder
``training/cache/`` is ignored) like the data itself.

Images and labels are stored as ``round(255 * value)``: with the 0..255 HU window of the liver
recipes that is one level per HU (what the CT holds); with a wider window the step is wider than 1 HU.
The contrast-free slices are stored XOR the slices (zero where the contrast removal changed nothing,
so they compress to little). Each file also holds the slices' thumbnails (``overlap.thumbnails``), with
which a run leaves out the extra 2D cases that show one of its test patients.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import torch
from LiverSegUNetLib.preprocess import Plan
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

FORMAT = "liversegunet-slices/1"
SUFFIX = ".slices"
#: The plan fields that decide the packed slices exactly (``multiple``, the padding, only has to divide
#: the packed one; context and threshold only matter later).
GRID_FIELDS = ("hu_min", "hu_max", "spacing_mm")


def path_for(folder: Path, name: str) -> Path:
    """Where the slices of patient (or extra slice set) ``name`` are packed in ``folder``."""
    return Path(folder) / f"{name}{SUFFIX}"


def read_metadata(raw: bytes) -> dict:
    """The metadata of safetensors bytes (the header's ``__metadata__``)."""
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]).get("__metadata__", {})


def metadata_of(path: Path) -> dict:
    """A packed file's metadata, decompressing only its header."""
    stream = zlib.decompressobj()
    try:
        data = Path(path).read_bytes()
        head = stream.decompress(data, 8)
        (size,) = struct.unpack("<Q", head)
        return read_metadata(head + stream.decompress(stream.unconsumed_tail, size))
    except (zlib.error, struct.error, ValueError) as exc:
        raise SystemExit(f"{path}: not a packed-slices file ({exc})") from exc


def _read(path: Path) -> bytes:
    try:
        return zlib.decompress(Path(path).read_bytes())
    except zlib.error as exc:
        raise SystemExit(f"{path}: not a packed-slices file ({exc})") from exc


def _grid(plan: Plan) -> dict:
    return {k: float(getattr(plan, k)) for k in GRID_FIELDS}


def _to_bytes(x: torch.Tensor) -> torch.Tensor:
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8).contiguous()


def save(slices, path: Path, plan: Plan, keys: list[str]) -> Path:
    """Write ``slices`` (a ``PatientSlices`` or ``ExtraSlices``) to ``path`` atomically."""
    tensors = {
        "images": _to_bytes(slices.images),
        "labels": _to_bytes(slices.labels),
        "available": slices.available.to(torch.uint8).contiguous(),
        "thumbs": slices.thumbs.contiguous(),
    }
    if getattr(slices, "unenhanced", None) is not None:
        tensors["unenhanced_xor"] = _to_bytes(slices.unenhanced) ^ tensors["images"]
    metadata = {
        "format": FORMAT,
        "kind": type(slices).__name__,
        "name": slices.name,
        "grid": json.dumps(_grid(plan), sort_keys=True),
        "multiple": str(plan.multiple),
        "keys": json.dumps(list(keys)),
        "case_of": json.dumps(getattr(slices, "case_of", [])),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(zlib.compress(save_tensors(tensors, metadata=metadata), 6))
    os.replace(tmp, path)
    return path


def load(path: Path, plan: Plan, keys: list[str], unenhanced: bool = False):
    """The ``PatientSlices`` / ``ExtraSlices`` packed at ``path``, checked against the run's plan and structures
    (a file packed for another grid, other structures or without the contrast-free slices is refused)."""
    from training.train import ExtraSlices, PatientSlices

    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: no packed slices there; make them with python -m training.slot pack")
    raw = _read(path)
    meta = read_metadata(raw)
    if meta.get("format") != FORMAT:
        raise SystemExit(f"{path}: not a packed-slices file ({meta.get('format')!r}, expected {FORMAT!r})")
    tensors = load_tensors(raw)
    grid, their_keys = json.loads(meta["grid"]), json.loads(meta["keys"])
    if grid != _grid(plan) or int(meta["multiple"]) % plan.multiple:
        raise SystemExit(
            f"{path}: packed for the grid {grid} padded to a multiple of {meta['multiple']}, the run uses "
            f"{_grid(plan)} and a multiple of {plan.multiple}; pack again for this config"
        )
    if their_keys[: len(keys)] != list(keys):
        raise SystemExit(f"{path}: packed with structures {their_keys}, the run needs {list(keys)}; pack again")
    if "thumbs" not in tensors:
        raise SystemExit(f"{path}: packed without the slice thumbnails a run checks its test patients with; pack again")
    if unenhanced and "unenhanced_xor" not in tensors:
        raise SystemExit(f"{path}: packed without the contrast-free slices the run's augmentation needs")
    cls = {"PatientSlices": PatientSlices, "ExtraSlices": ExtraSlices}[meta["kind"]]
    slices = cls.__new__(cls)
    slices.name = meta["name"]
    slices.images = tensors["images"].half() / 255
    slices.labels = (tensors["labels"][:, : len(keys)].half() / 255).contiguous()
    slices.available = tensors["available"][: len(keys)].bool()
    plain = tensors.get("unenhanced_xor")
    slices.unenhanced = (plain ^ tensors["images"]).half() / 255 if plain is not None else None
    slices.unenhanced_varied = []  # one contrast-free version is packed (augment.unenhanced_varied = 0)
    slices.thumbs = tensors["thumbs"]
    if meta["kind"] == "ExtraSlices":
        slices.case_of = json.loads(meta["case_of"])
        slices.cases = sorted(set(slices.case_of))
    return slices
