"""Train a U-Net on 3D-IRCADb masks (liver or bone), validate on held-out patients, save the model.

    python -m training.train training/configs/liver_scratch.toml [--set key=value ...] [--out DIR] [--resume]
    torchrun --nproc_per_node 2 -m training.train CONFIG ...      (DistributedDataParallel, no code change)

Run from the repository root with the project installed (``pip install -e ".[training]"``).

A config file is one experiment (``extends`` another to inherit); ``--set epochs=5 --set
plan.spacing_mm=2.0`` overrides values. Each epoch logs the training loss and, on the test
patients' slices, loss, Dice and pixel accuracy; the end of the run evaluates the test patients in
3D on their original grid with the product's own inference and postprocessing and saves
``model.json`` + ``model.safetensors`` (install it as the bundled model with ``python -m training.export``);
with ``average_from``, the average of the weights over the last epochs, and the last weights in ``last/``.
A checkpoint is written every epoch; ``--resume`` continues from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from LiverSegUNetLib import metrics
from LiverSegUNetLib.inference import prepare_slices, segment
from LiverSegUNetLib.io.ircadb import IrcadbPatient, default_data_root
from LiverSegUNetLib.model import UNet2D
from LiverSegUNetLib.preprocess import (
    Plan,
    Reorientation,
    SliceGrid,
    along_slices,
    slices_at,
    to_model_grid,
    with_context,
)
from LiverSegUNetLib.runtime import autocast_for, resolve_device
from LiverSegUNetLib.system import machine
from LiverSegUNetLib.terminology import CATALOGUE
from LiverSegUNetLib.weights import LoadedModel, build_network, load_model, save_model
from tqdm import tqdm

from training import appearance, labels, overlap, packed

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("train")


# -- configuration ---------------------------------------------------------------------------


COMMON = ROOT / "training" / "configs" / "common.toml"


def load_config(path: Path, overrides: list[str] = ()) -> dict:
    """A TOML experiment (merged over the file it ``extends``) with ``key=value`` overrides applied, checked
    against ``common.toml``: an unknown key or a value of the wrong type is refused, naming the known keys."""
    cfg = _merged(Path(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        *parents, leaf = key.strip().split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        try:
            node[leaf] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError as exc:
            raise SystemExit(f"--set {item!r}: the value is not TOML ({exc}); quote strings: key='\"text\"'") from exc
    check_config(cfg, tomllib.loads(COMMON.read_text()))
    return cfg


def _merged(path: Path) -> dict:
    cfg = tomllib.loads(path.read_text())
    parent = cfg.pop("extends", None)
    if parent:
        base = _merged(path.parent / parent)
        for key, value in cfg.items():
            base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
        cfg = base
    return cfg


def check_config(cfg: dict, reference: dict, where: str = "") -> None:
    """Refuse keys that ``reference`` (common.toml) lacks and values of another type (an int may stand for a float)."""
    for key, value in cfg.items():
        name = f"{where}{key}"
        if key not in reference and not (where == "" and key == "name"):
            known = ", ".join(sorted([*reference, *([] if where else ["name"])]))
            raise SystemExit(f"unknown config key '{name}'; known keys{' in ' + where[:-1] if where else ''}: {known}")
        expected = type(reference[key]) if key in reference else str
        if isinstance(value, dict) and expected is dict:
            check_config(value, reference[key], f"{name}.")
        elif not (isinstance(value, expected) or (expected is float and type(value) is int)) or isinstance(
            value, bool
        ) is not (expected is bool):
            raise SystemExit(
                f"config key '{name}' must be {expected.__name__} (like {reference.get(key)!r}), got {value!r}"
            )


def plan_of(cfg: dict) -> Plan:
    """The preprocessing plan a config describes."""
    return Plan.from_dict({"multiple": 2 ** cfg["depth"], **cfg["plan"]})


def structure_keys(cfg: dict) -> list[str]:
    """The structures a run trains, one output channel each: ``organ`` first, then ``extra_structures``."""
    keys = [cfg["organ"], *cfg["extra_structures"]]
    labels.check_keys(keys)
    stray = set(cfg["augment"]["contrast_only"]) - set(keys)
    if stray:
        raise SystemExit(f"augment.contrast_only names {sorted(stray)}, which this run does not train ({keys})")
    return keys


# -- data ------------------------------------------------------------------------------------


class ContrastFree:
    """Contrast removed on the fly, each sample with unenhanced values of its own (``augment.unenhanced_fresh``).

    Holds which structure each model-grid pixel of a patient's slices belongs to (0: none, ``KEEP``: bone, fat or
    air, left alone) and each structure's enhanced median HU over the whole volume (over each case's slices where
    they come from many patients, as the extra 2D slices do: ``group``), so that :func:`appearance.unenhanced_hu`
    can map the few slices of one sample with a freshly drawn mapping (:func:`appearance.varied_mapping`). A run
    then sees the unenhanced range as a continuum rather than the few patients that ``augment.unenhanced_varied``
    precomputes (fixed per patient, the same in every run: the folds of three-patient leave-one-out saw no liver
    below 46 HU). ``noise_hu`` is the image noise the mapping puts back, as it is on the model grid
    (area-averaging to coarser pixels lowers white noise in proportion).
    """

    KEEP = 255

    def __init__(
        self,
        structures: np.ndarray,
        names: list[str],
        medians: list[dict],
        group: np.ndarray,
        plan: Plan,
        noise_hu: float,
    ):
        self.structures, self.names, self.medians = torch.from_numpy(structures), names, medians
        self.group = torch.from_numpy(group)
        self.plan, self.noise_hu = plan, noise_hu

    @classmethod
    def on_grid(
        cls,
        hu: np.ndarray,
        labels: np.ndarray,
        names: list[str],
        keep: np.ndarray,
        grid: SliceGrid,
        plan,
        pixel_mm: float,
        group: np.ndarray | None = None,
    ) -> ContrastFree:
        """From slices ``(N, H, W)`` of HU, their structure labels (:func:`appearance.structure_labels`) and the
        voxels to leave alone (bone), all on the slices' own grid of ``pixel_mm`` pixels; ``group``: which
        patient each slice shows, ``(N,)`` 0..G-1 (default: all one patient)."""
        keep = keep | (hu <= appearance.FAT_HU)
        group = np.zeros(hu.shape[0], np.int64) if group is None else np.asarray(group, np.int64)
        medians = [
            appearance.structure_medians(hu[group == g], labels[group == g], names, keep[group == g])
            for g in range(int(group.max()) + 1)
        ]
        codes = np.where(keep, cls.KEEP, labels).astype(np.float32)
        resized = F.interpolate(torch.from_numpy(codes)[:, None], size=grid.size, mode="nearest-exact")[:, 0]
        pad = (0, grid.padded[1] - grid.size[1], 0, grid.padded[0] - grid.size[0])
        structures = F.pad(resized, pad).to(torch.uint8).numpy()
        noise = appearance.NOISE_HU * min(1.0, pixel_mm / plan.spacing_mm)
        return cls(structures, names, medians, group, plan, noise)

    def keep_only(self, keep: torch.Tensor) -> None:
        """Drop the slices where ``keep`` (``(N,)`` bool) is false, as the images were."""
        self.structures, self.group = self.structures[keep], self.group[keep]

    def apply(self, x: torch.Tensor, index, rng: np.random.Generator, mapping: dict) -> torch.Tensor:
        """Normalized slices ``x`` (those at ``index`` of the patient's, any leading shape, all of one ``group``)
        without contrast, by the standard mapping or the one given (``targets``, ``contrast``, ``pull``)."""
        codes = self.structures[index].numpy()
        keep = codes == self.KEEP
        width = self.plan.hu_max - self.plan.hu_min
        hu = x.numpy() * width + self.plan.hu_min
        medians = self.medians[int(self.group[index].reshape(-1)[0])]
        out = appearance.unenhanced_hu(
            hu, np.where(keep, 0, codes), self.names, keep, rng, noise_hu=self.noise_hu, medians=medians, **mapping
        )
        return ((torch.from_numpy(out) - self.plan.hu_min) / width).clamp(0, 1)


class SliceSet:
    """What :func:`make_batch` samples from: slices and labels on the model grid, with their contrast-free
    versions (precomputed, or a :class:`ContrastFree` to map on the fly)."""

    images: torch.Tensor
    labels: torch.Tensor
    unenhanced: torch.Tensor | None = None
    unenhanced_varied: list
    contrast_free: ContrastFree | None = None
    arterial: list = []  # late-arterial versions of ``images`` (appearance.arterial_from_masks), each its own values

    def index(self, k: int, context: int, slab: int) -> torch.Tensor:
        """The slices that make sample ``k``'s channels, ``(channels, slab)``."""
        raise NotImplementedError

    def contrast_free_slices(self, index, version: int, mapping: dict | None, rng) -> torch.Tensor:
        """The contrast-free version of ``images[index]`` (float): mapped on the fly where the set holds a
        :class:`ContrastFree` (``mapping``: the sample's own, ``{}`` the standard one), else the precomputed
        version (``version`` 0: the standard mapping, > 0: one of the ``unenhanced_varied``)."""
        if self.contrast_free is not None:
            return self.contrast_free.apply(self.images[index].float(), index, rng, mapping or {})
        return (self.unenhanced_varied[version - 1] if version else self.unenhanced)[index].float()

    def sample(
        self,
        k: int,
        context: int,
        unenhanced: float = 0.0,
        slab: int = 1,
        version: int = 0,
        mapping: dict | None = None,
        rng: np.random.Generator | None = None,
        arterial: float = 0.0,
        arterial_version: int = 0,
    ) -> torch.Tensor:
        """``(2 * context + 1 + structures, H, W)``: slice ``k`` with its neighbours as channels (:meth:`index`;
        each the mean of its slab), then its labels. ``unenhanced`` (0..1) blends in the contrast-free slices
        (:meth:`contrast_free_slices`: ``version`` > 0 the varied ones, or ``mapping`` drawn for this sample,
        whose noise comes from ``rng``); ``arterial`` (0..1) the ``arterial_version``-th late-arterial ones."""
        index = self.index(k, context, slab)
        x = self.images[index].float().mean(1)
        if unenhanced > 0 and (self.unenhanced is not None or self.contrast_free is not None):
            x = (1 - unenhanced) * x + unenhanced * self.contrast_free_slices(index, version, mapping, rng).mean(1)
        if arterial > 0 and self.arterial:
            x = (1 - arterial) * x + arterial * self.arterial[arterial_version][index].float().mean(1)
        y = self.labels[index[index.shape[0] // 2]].float().mean(0)
        return torch.cat([x.expand(2 * context + 1, -1, -1), y])


class PatientSlices(SliceSet):
    """One patient's slices and per-structure labels ``(slices, structures, H, W)`` on the model grid, held
    in memory as float16, and which structures have a target (``available``; a missing one is all zeros).

    With ``unenhanced``, also the same slices without contrast enhancement (``appearance.unenhanced_hu``
    with the patient's organ masks), which training blends in with a random weight; with ``varied`` > 0,
    that many more contrast-free versions, each with its own random unenhanced values
    (``appearance.varied_mapping``), in ``unenhanced_varied``. With ``fresh``, none is precomputed: a
    :class:`ContrastFree` maps each sample with the values it is given. With ``arterial`` > 0, that many
    late-arterial versions, each with random values (``appearance.varied_arterial``), in ``arterial``.
    """

    def __init__(
        self,
        patient: IrcadbPatient,
        keys: list[str],
        plan: Plan,
        unenhanced: bool = False,
        varied: int = 0,
        fresh: bool = False,
        arterial: int = 0,
    ):
        ct = patient.ct
        masks = appearance.masks_of(patient) if unenhanced or arterial else {}
        reorient = Reorientation(ct)
        grid = SliceGrid.for_slices(ct.shape[1:], reorient.spacing(ct)[:2], plan)
        hu = torch.from_numpy(np.ascontiguousarray(reorient.forward(ct.array)))
        self.name = patient.name
        self.grid, self.spacing_k = grid, reorient.spacing(ct)[2]
        self.images = prepare_slices(hu, grid, plan).half()
        self.thumbs = overlap.thumbnails(ct.array)  # what an extra slice of this patient would look like
        found = labels.targets(patient, keys, masks)  # the masks the unenhanced mapping read are not read again
        self.available = torch.tensor([t is not None for t in found])
        self.labels = torch.zeros((self.images.shape[0], len(keys), *self.images.shape[1:]), dtype=torch.half)
        for index, target in enumerate(found):
            if target is not None:
                lab = torch.from_numpy(np.ascontiguousarray(reorient.forward(target)))
                self.labels[:, index] = to_model_grid(lab.float(), grid).half()
        self.unenhanced, self.unenhanced_varied = None, []
        if unenhanced and fresh:
            structure, names = appearance.structure_labels(ct.shape, masks)
            bone = masks["bone"] > 0 if "bone" in masks else ct.array > appearance.BONE_HU
            self.contrast_free = ContrastFree.on_grid(
                *(np.ascontiguousarray(reorient.forward(a)) for a in (ct.array, structure)),
                names,
                np.ascontiguousarray(reorient.forward(bone)),
                grid,
                plan,
                min(reorient.spacing(ct)[:2]),
            )
        elif unenhanced:
            rng = np.random.default_rng(sum(map(ord, patient.name)))
            mappings = [{}, *(appearance.varied_mapping(rng) for _ in range(varied))]
            for mapping in mappings:
                plain = appearance.unenhanced_from_masks(ct.array, masks, rng, **mapping)
                plain = prepare_slices(torch.from_numpy(np.ascontiguousarray(reorient.forward(plain))), grid, plan)
                self.unenhanced_varied.append(plain.half())
            self.unenhanced = self.unenhanced_varied.pop(0)
        rng = np.random.default_rng([sum(map(ord, patient.name)), 1])
        self.arterial = []
        for _ in range(arterial):
            phase = appearance.arterial_from_masks(ct.array, masks, rng, **appearance.varied_arterial(rng))
            phase = prepare_slices(torch.from_numpy(np.ascontiguousarray(reorient.forward(phase))), grid, plan)
            self.arterial.append(phase.half())

    def index(self, k: int, context: int, slab: int) -> torch.Tensor:
        """``(channels, slab)``: slice ``k`` and its neighbours, ``slab`` > 1 contiguous slices each, neighbours one
        slab apart, as a CT with thick slices shows them."""
        offsets = (torch.arange(-context, context + 1) * slab)[:, None] + (torch.arange(slab) - (slab - 1) // 2)[None]
        return (k + offsets).clamp(0, self.images.shape[0] - 1)


class ViewSlices(SliceSet):
    """A patient's slices in another direction than axial: ``coronal`` (one slice per row of the axial model
    grid, rows along the body axis) or ``sagittal`` (one per column). The patient's model-grid slices, labels and
    contrast-free versions are resampled along the body axis to the in-plane spacing (:func:`along_slices`), so
    pixels and neighbours are ``plan.spacing_mm`` apart in every direction, as inference slices such a view
    (``inference.ModelGridPrediction.other_view``). ``slab`` is ignored: a thick axial slice does not thicken
    these slices.
    """

    #: The axes of the resampled ``(K, H, W)`` volume (and ``(K, S, H, W)`` labels) in a view's slice order.
    ORDER = {"coronal": ((1, 0, 2), (2, 1, 0, 3)), "sagittal": ((2, 0, 1), (3, 1, 0, 2))}

    def __init__(self, base: PatientSlices, view: str, resampled: dict):
        image_order, label_order = self.ORDER[view]
        self.name, self.available, self.contrast_free = f"{base.name} {view}", base.available, None
        self.images = resampled["images"].permute(image_order)
        self.labels = resampled["labels"].permute(label_order)
        self.unenhanced = None if resampled["unenhanced"] is None else resampled["unenhanced"].permute(image_order)
        self.unenhanced_varied = [v.permute(image_order) for v in resampled["varied"]]
        self.count = base.grid.size[0 if view == "coronal" else 1]  # the slices beyond are the grid's padding

    @classmethod
    def of_patient(cls, base: PatientSlices, views, spacing_mm: float) -> list[ViewSlices]:
        """One set per view in ``views`` (not ``axial``), sharing one resampled volume."""
        count = slices_at(base.spacing_k, base.images.shape[0], spacing_mm)

        def resampled(stack):
            return along_slices(stack, count).half()

        volume = {
            "images": resampled(base.images),
            "labels": resampled(base.labels),
            "unenhanced": None if base.unenhanced is None else resampled(base.unenhanced),
            "varied": [resampled(v) for v in base.unenhanced_varied],
        }
        return [cls(base, view, volume) for view in views if view != "axial"]

    def index(self, k: int, context: int, slab: int) -> torch.Tensor:
        """``(channels, 1)``: slice ``k`` and its neighbours, one slice apart whatever ``slab`` says."""
        return (k + torch.arange(-context, context + 1)[:, None]).clamp(0, self.count - 1)


def _radiological(name: str, image: np.ndarray) -> np.ndarray:
    """An msd_liver_2d slice turned back to the radiological axial view (rows anterior to posterior,
    columns patient right to left): ``flipped_*`` were transposed and left-right flipped,
    ``mirrored_*`` transposed and up-down flipped."""
    if name.startswith("flipped_"):
        return image[:, ::-1].T
    if name.startswith("mirrored_"):
        return image[::-1, :].T
    raise SystemExit(f"unexpected msd_liver_2d file name {name!r} (expected flipped_* or mirrored_*)")


class ExtraSlices(SliceSet):
    """Liver slices of other patients (the ``msd_liver_2d`` layout): extra variety for training, never evaluation.

    Intensity is HU clipped to 0..255 stored as 8-bit JPEG, so it is read as HU and put through the
    plan's window (use a plan window of 0..255 to match the CT slices exactly). There is no spacing:
    ``pixel_mm`` says what to assume (256 pixels over a typical 350-400 mm field of view is about
    1.5 mm). Each slice has no neighbours, so its context channels repeat it.
    """

    def __init__(
        self,
        folder: Path,
        plan: Plan,
        pixel_mm: float,
        structures: int = 1,
        varied: int = 0,
        fresh: bool = False,
        arterial: int = 0,
    ):
        import SimpleITK as sitk

        files = sorted((folder / "images").glob("*.jpg"))
        if not files:
            raise SystemExit(f"no extra 2D slices found under {folder / 'images'}; fix extra_2d or leave it empty")
        images, labels = [], []
        for f in files:
            image = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
            mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "masks" / f.name)))
            images.append(_radiological(f.name, image[..., 0] if image.ndim == 3 else image))
            labels.append(_radiological(f.name, mask[..., 0] if mask.ndim == 3 else mask) > 127)
        hu = np.stack(images).astype(np.float32)
        liver = np.stack(labels)
        grid = SliceGrid.for_slices(hu.shape[1:], (pixel_mm, pixel_mm), plan)
        self.name = folder.name
        self.case_of = [f.name.split("_")[1] for f in files]
        self.cases = sorted(set(self.case_of))
        self.thumbs = overlap.thumbnails(hu)
        self.images = prepare_slices(torch.from_numpy(hu), grid, plan).half()
        self.labels = torch.zeros((hu.shape[0], structures, *self.images.shape[1:]), dtype=torch.half)
        self.labels[:, 0] = to_model_grid(torch.from_numpy(liver).float(), grid).half()
        self.available = torch.arange(structures) == 0  # the liver only
        # Contrast removed with the liver mask only; the 8-bit storage clips at 255 HU, so that is bone.
        rng = np.random.default_rng(0)
        self.unenhanced_varied = []
        if fresh:
            case = np.unique(self.case_of, return_inverse=True)[1]  # each case its own medians: phases differ
            self.contrast_free = ContrastFree.on_grid(
                hu, liver.astype(np.uint8), ["liver"], hu >= 250, grid, plan, pixel_mm, case
            )
        for mapping in [] if fresh else [{}, *(appearance.varied_mapping(rng) for _ in range(varied))]:
            plain = appearance.unenhanced_hu(hu, liver.astype(np.uint8), ["liver"], hu >= 250, rng, **mapping)
            self.unenhanced_varied.append(prepare_slices(torch.from_numpy(plain), grid, plan).half())
        self.unenhanced = self.unenhanced_varied.pop(0) if self.unenhanced_varied else None
        # The arterial phase with the liver mask only: the liver darker, everything else as stored.
        rng = np.random.default_rng(1)
        self.arterial = [
            prepare_slices(
                torch.from_numpy(
                    appearance.arterial_from_masks(hu, {"liver": liver, "bone": hu >= 250}, rng, **mapping)
                ),
                grid,
                plan,
            ).half()
            for mapping in (appearance.varied_arterial(rng) for _ in range(arterial))
        ]

    def index(self, k: int, context: int, slab: int) -> torch.Tensor:
        """``(1, 1)``: slice ``k`` alone, which :meth:`SliceSet.sample` repeats as its own neighbours (a single
        slice has no neighbours and no slab to average)."""
        return torch.tensor([[k]])

    def drop_cases(self, cases) -> int:
        """Remove every slice of ``cases``, in place; how many slices went."""
        dropped = set(cases)
        keep = torch.tensor([c not in dropped for c in self.case_of], dtype=torch.bool)
        for name in ("images", "labels", "unenhanced", "thumbs"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[keep])
        self.unenhanced_varied = [v[keep] for v in self.unenhanced_varied]
        self.arterial = [v[keep] for v in self.arterial]
        if self.contrast_free is not None:
            self.contrast_free.keep_only(keep)
        self.case_of = [c for c, k in zip(self.case_of, keep.tolist()) if k]
        self.cases = sorted(set(self.case_of))
        return int((~keep).sum())


def training_samples(train: list[PatientSlices], fraction: float, subset_seed: int) -> list[tuple[int, int]]:
    """(patient index, slice index) pairs; a ``fraction`` < 1 keeps a subset fixed by ``subset_seed``."""
    samples = [(p, k) for p, ps in enumerate(train) for k in range(ps.images.shape[0])]
    if fraction < 1:
        keep = np.random.default_rng(subset_seed).permutation(len(samples))[: max(1, round(len(samples) * fraction))]
        samples = [samples[i] for i in sorted(keep)]
    return samples


def other_view(sample: tuple[int, int], view_index: list[list[int]], train, share: float, rng) -> tuple[int, int]:
    """With probability ``share``, a random slice of one of the sample's patient's view sets (``view_index[p]``:
    their indices in ``train``) instead of the (axial) ``sample``."""
    if rng.uniform() >= share:
        return sample
    chosen = view_index[sample[0]][int(rng.integers(len(view_index[sample[0]])))]
    return chosen, int(rng.integers(train[chosen].count))


def crop_or_pad(x: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """Random ``size`` x ``size`` window of ``(..., H, W)``, zero-padded where the image is smaller."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        top, left = int(rng.integers(0, ph + 1)), int(rng.integers(0, pw + 1))
        x = F.pad(x, (left, pw - left, top, ph - top))
        h, w = x.shape[-2:]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return x[..., top : top + size, left : left + size]


def pulled_down(x: torch.Tensor, plan: Plan, hu: float, keep: float) -> torch.Tensor:
    """Window-normalized slices ``x`` with every value above ``hu`` moved towards it, ``keep`` (0..1) of its
    distance left: contrast removed without any mask, from every organ, vessel and bone alike. It reaches
    what the masks of :mod:`training.appearance` cannot: the spleen, kidneys and vessels of slices whose
    only mask is the liver's (the msd_liver_2d slices) and enhanced tissue no mask covers."""
    level = (hu - plan.hu_min) / (plan.hu_max - plan.hu_min)
    return torch.where(x > level, level + keep * (x - level), x)


def depth_inside(mask: torch.Tensor, most: int) -> torch.Tensor:
    """``(H, W)``: for each pixel of ``mask``, how many pixels (chessboard) it lies inside it, up to ``most``."""
    depth = torch.zeros(mask.shape)
    inner = mask.float()[None, None]
    for _ in range(most):
        if not inner.any():
            break
        depth += inner[0, 0]
        inner = -F.max_pool2d(-inner, 3, stride=1, padding=1)
    return depth


def soft_ellipse(shape, centre, a: float, b: float, rng: np.random.Generator) -> torch.Tensor:
    """``(H, W)`` weights of an ellipse on a grid of ``shape``, centred on pixel ``centre`` (row, column), of
    semi-axes ``a`` and ``b`` pixels turned by a random angle: 1 inside, fading to 0 over a random 5-30% of its
    radius at the rim (angle, then rim width, drawn from ``rng``). The shape of :func:`with_lesions`' lesions and
    :func:`with_masses`' masses."""
    turn = rng.uniform(0.0, math.pi)
    dy = torch.arange(shape[0], dtype=torch.float32)[:, None] - float(centre[0])
    dx = torch.arange(shape[1], dtype=torch.float32)[None, :] - float(centre[1])
    u = (dy * math.cos(turn) + dx * math.sin(turn)) / a
    v = (dx * math.cos(turn) - dy * math.sin(turn)) / b
    rim = rng.uniform(0.05, 0.3)  # share of the radius over which it fades into what lies around it
    return ((1 - torch.sqrt(u * u + v * v)) / rim).clamp(0, 1)


def with_lesions(x: torch.Tensor, liver: torch.Tensor, plan: Plan, rng: np.random.Generator, aug: dict) -> torch.Tensor:
    """Window-normalized slices ``x`` ``(C, H, W)`` with 1 to ``aug["lesion_count"]`` synthetic hypodense lesions
    painted inside the liver mask ``liver`` ``(H, W)`` (bool), which stays the target there: expert liver masks
    hold the tumours, cysts and metastases inside the liver, and a model that has seen few of them leaves them
    out (most of what the held-out patients' models miss without contrast is their tumours).

    Each lesion is an ellipse centred on a random liver pixel, of radius uniform in ``aug["lesion_mm"]`` (each
    axis 0.7-1.3 of it, turned at random), with a soft rim, at the liver's median value plus uniform
    ``aug["lesion_hu"]`` (HU, negative: darker), relative to the liver as it shows in this sample, enhanced or
    not, keeping half of the texture and noise beneath it (a flat, noise-free blob would be a cue real lesions
    do not give). Pixels outside the liver are never changed, so a lesion at the border is cut by the liver's own
    contour (a subcapsular lesion). With ``aug["lesion_margin_mm"]`` > 0, every lesion lies instead at least that
    far inside the liver (centre and size chosen so; a lesion that fits nowhere is left out): dark tissue with
    liver all around it is liver, while what is dark at the liver's border may be a neighbour. Every context
    channel gets the same lesion (it spans the few mm between them)."""
    centre = x[x.shape[0] // 2]
    if int(liver.sum()) < 16:
        return x
    level = float(centre[liver].median())
    inside = liver.float()
    margin = aug.get("lesion_margin_mm", 0.0) / plan.spacing_mm
    if margin > 0:  # deep enough to hold the largest lesion (an axis up to 1.3 x the radius) with its margin
        depth = depth_inside(liver, math.ceil(aug["lesion_mm"][1] / plan.spacing_mm * 1.3 + margin) + 1)
    out = x.clone()
    for _ in range(int(rng.integers(1, aug["lesion_count"] + 1))):
        radius = rng.uniform(*aug["lesion_mm"]) / plan.spacing_mm
        a, b = radius * rng.uniform(0.7, 1.3), radius * rng.uniform(0.7, 1.3)
        if margin > 0:  # the whole ellipse at least ``margin`` inside: shrink it to the deepest place if need be
            room = float(depth.max()) - margin
            if room < aug["lesion_mm"][0] / plan.spacing_mm:
                continue
            shrink = min(1.0, room / max(a, b))
            a, b = a * shrink, b * shrink
            rows, cols = torch.nonzero(depth >= min(max(a, b) + margin, float(depth.max())), as_tuple=True)
        else:
            rows, cols = torch.nonzero(liver, as_tuple=True)
        pick = int(rng.integers(len(rows)))
        alpha = soft_ellipse(liver.shape, (rows[pick], cols[pick]), a, b, rng) * inside
        value = level + rng.uniform(*aug["lesion_hu"]) / (plan.hu_max - plan.hu_min)
        out = out + alpha * (value + 0.5 * (out - level) - out)  # half the liver's texture and noise kept
    return out.clamp(0, 1)


def with_masses(x: torch.Tensor, labels: torch.Tensor, plan: Plan, rng: np.random.Generator, aug: dict) -> torch.Tensor:
    """Window-normalized slices ``x`` ``(C, H, W)`` with 1 to ``aug["mass_count"]`` synthetic hypodense masses
    painted *beside* the liver, outside every labelled structure (``labels`` ``(S, H, W)``, the liver first),
    which stays background there: the counterpart of :func:`with_lesions`. A network shown dark lesions inside
    the liver, or livers at unenhanced values, learns that dark tissue may be liver and then takes in a dark mass
    that touches the liver (a tumour, a cyst or a bowel loop beside it); shown both kinds, dark inside the
    liver's contour is liver and dark outside it is not, so the contour decides and the darkness does not.

    Each mass is an ellipse of radius uniform in ``aug["mass_mm"]`` (each axis 0.7-1.3 of it, turned at random)
    whose centre lies outside the liver, on soft tissue (10-200 HU, not lung, fat or bone), at most 0.8 of its
    shorter semi-axis from the liver in chessboard pixels (up to 1.13 of it in mm, along a diagonal), so that the
    mass nearly always reaches the liver and is cut by its contour. Its value is the liver's median as this sample
    shows it plus uniform ``aug["mass_hu"]`` (the lesions' range, so that the value cannot tell the two apart), or
    with ``aug["mass_absolute"]`` uniform ``mass_hu`` in HU whatever the liver shows (fluid beside the liver: the
    gallbladder, fluid-filled bowel, ascites, a neighbour's cyst, the same in any contrast phase). A soft rim, and
    the liver's own texture as smoothed noise (what lay beneath, fat or an organ's edges, is covered, not shown
    through). Every context channel gets the same mass."""
    liver = labels[0] > 0.5
    if int(liver.sum()) < 16:
        return x
    centre = x[x.shape[0] // 2]
    level = float(centre[liver].median())
    spread = float((centre[liver] - level).abs().median()) * 1.4826  # robust spread of the liver's values
    width = plan.hu_max - plan.hu_min
    soft = (centre > (10 - plan.hu_min) / width) & (centre < (200 - plan.hu_min) / width)
    free = ~(labels > 0.5).any(0)  # outside every labelled structure
    largest = aug["mass_mm"][1] / plan.spacing_mm
    apart = depth_inside(~liver, math.ceil(0.8 * largest * 1.3) + 1)  # pixels away from the liver (chessboard)
    out = x.clone()
    for _ in range(int(rng.integers(1, aug["mass_count"] + 1))):
        radius = rng.uniform(*aug["mass_mm"]) / plan.spacing_mm
        a, b = radius * rng.uniform(0.7, 1.3), radius * rng.uniform(0.7, 1.3)
        rows, cols = torch.nonzero(free & soft & (apart >= 1) & (apart <= 0.8 * min(a, b)), as_tuple=True)
        if len(rows) == 0:
            continue
        pick = int(rng.integers(len(rows)))
        alpha = soft_ellipse(liver.shape, (rows[pick], cols[pick]), a, b, rng) * free.float()
        drawn = rng.uniform(*aug["mass_hu"])
        value = (drawn - plan.hu_min) / width if aug.get("mass_absolute", False) else level + drawn / width
        grain = torch.from_numpy(rng.standard_normal((1, 1, *liver.shape)).astype(np.float32))
        grain = F.avg_pool2d(grain, 3, stride=1, padding=1, count_include_pad=False)[0, 0] * 3 * spread
        out = out + alpha * (value + grain - out)
    return out.clamp(0, 1)


def make_batch(
    train, batch, plan: Plan, crop: int, rng, aug: dict, contrast_only: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images ``(B, C, crop, crop)`` with neighbouring-slice channels, labels ``(B, S, crop, crop)`` and which
    labels exist ``(B, S)`` (a structure without an expert mask in that sample's patient is not a target).

    Per sample, with probability ``aug["unenhanced_p"]`` the contrast is removed by a random share
    (uniform ``aug["unenhanced_min"]``..1; one of the ``aug["unenhanced_varied"]`` + 1 contrast-free versions
    at random, where with ``aug["unenhanced_fresh"]`` each varied one is a mapping drawn for the sample), and
    with probability ``aug["thick_p"]`` the slices are averaged into slabs of one of ``aug["thick_slices"]``
    slices. Where more than half the contrast was removed, the structures flagged in ``contrast_only``
    (``(S,)`` bool) are no target for that sample. With probability ``aug["pull_p"]`` every value above
    ``aug["pull_hu"]`` is pulled towards it (:func:`pulled_down`), and with probability ``aug["lesion_p"]``
    synthetic lesions are painted inside the first structure's mask (the liver; :func:`with_lesions`), and with
    probability ``aug["mass_p"]`` synthetic masses beside it, outside every mask (:func:`with_masses`). A sample
    whose contrast was not removed is shown, with probability ``aug["arterial_p"]``, in the late arterial phase
    by a random share (uniform ``aug["arterial_min"]``..1) of one of its set's arterial versions.
    """
    xs, ys, available = [], [], []
    channels = 2 * plan.context + 1
    for p, k in batch:
        # drawn only when enabled, so a config without these augmentations sees the same random stream as before
        unenhanced = (
            float(rng.uniform(aug["unenhanced_min"], 1.0))
            if aug["unenhanced_p"] > 0 and rng.uniform() < aug["unenhanced_p"]
            else 0.0
        )
        slab = int(rng.choice(aug["thick_slices"])) if aug["thick_p"] > 0 and rng.uniform() < aug["thick_p"] else 1
        varied = aug.get("unenhanced_varied", 0)
        version = int(rng.integers(varied + 1)) if unenhanced > 0 and varied > 0 else 0
        # unenhanced_fresh: a varied version is a new random unenhanced patient, drawn for this sample
        mapping = appearance.varied_mapping(rng) if version and aug.get("unenhanced_fresh", False) else {}
        arterial, arterial_version = 0.0, 0
        if aug.get("arterial_p", 0.0) > 0 and unenhanced == 0 and rng.uniform() < aug["arterial_p"]:
            arterial = float(rng.uniform(aug["arterial_min"], 1.0))
            arterial_version = int(rng.integers(max(1, len(train[p].arterial))))
        sample = train[p].sample(k, plan.context, unenhanced, slab, version, mapping, rng, arterial, arterial_version)
        both = crop_or_pad(sample, crop, rng)
        if aug.get("pull_p", 0.0) > 0 and rng.uniform() < aug["pull_p"]:
            both[:channels] = pulled_down(both[:channels], plan, aug["pull_hu"], rng.uniform(aug["pull_min"], 1.0))
        if aug.get("lesion_p", 0.0) > 0 and rng.uniform() < aug["lesion_p"]:  # drawn only when enabled
            both[:channels] = with_lesions(both[:channels], both[channels] > 0.5, plan, rng, aug)
        if aug.get("mass_p", 0.0) > 0 and rng.uniform() < aug["mass_p"]:  # drawn only when enabled
            both[:channels] = with_masses(both[:channels], both[channels:], plan, rng, aug)
        xs.append(both[:channels])
        ys.append(both[channels:])
        if contrast_only is not None and unenhanced > 0.5:
            available.append(train[p].available & ~contrast_only)
        else:
            available.append(train[p].available)
    return torch.stack(xs).float(), torch.stack(ys).float(), torch.stack(available)


def elastic_field(n: int, size, strength: float, points: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, H, W, 2)`` smooth random displacements for ``F.grid_sample`` (in its -1..1 coordinates):
    independent normal offsets of standard deviation ``strength`` on a ``points`` x ``points`` lattice
    over the crop, interpolated bicubically, so organs bend and bulge as they differ between patients
    while neighbouring pixels move together (the U-Net paper's elastic deformation)."""
    coarse = torch.randn((n, 2, points, points), generator=gen) * strength
    return F.interpolate(coarse, size=tuple(size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def coarser(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Images ``(N, C, H, W)`` as a CT with ``factor`` times larger pixels shows them once the product has
    resampled it to the model grid: area-averaged down (antialiased, so no detail finer than the coarse
    pixel survives and nothing aliases), then linearly back up to ``H`` x ``W``."""
    h, w = x.shape[-2:]
    small = (max(2, round(h / factor)), max(2, round(w / factor)))
    down = F.interpolate(x, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False)


def augment(
    x: torch.Tensor, y: torch.Tensor, aug: dict, gen: torch.Generator, pixel_mm: float = 1.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotation, scale (with ``aug["aspect"]`` > 0 also the body's width-to-height ratio, changed by a
    factor log-uniform in 1 / (1 + aspect) .. 1 + aspect), shift and elastic deformation (same for image and
    label), then, with probability ``aug["coarse_p"]``, coarse pixels (uniform ``aug["coarse_mm"]`` in mm on the
    ``pixel_mm`` model grid, image only: :func:`coarser`), then contrast, brightness and noise, then, with
    probability ``aug["gamma_p"]``, a gamma curve on the windowed values (exponent log-uniform in ``aug["gamma"]``):
    the order of the values and the window's ends stay, the soft tissue between moves up or down together, its
    contrasts stretched on one side and squeezed on the other, as another scanner, protocol or phase shows them."""
    n = x.shape[0]

    def uniform(lo, hi, shape=(n,)):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    angle = uniform(-1, 1) * math.radians(aug["rotate_deg"])
    scale = uniform(aug["scale_min"], aug["scale_max"])
    shift = uniform(-aug["shift"], aug["shift"], (n, 2))
    across, down = scale, scale  # how much wider and taller the patient looks
    if aug.get("aspect", 0.0) > 0:  # drawn only when enabled: configs without it keep their random stream
        ratio = torch.exp(uniform(-1, 1) * math.log1p(aug["aspect"]))
        across, down = scale * ratio.sqrt(), scale / ratio.sqrt()
    cos, sin = torch.cos(angle), torch.sin(angle)
    top = torch.stack([cos / across, -sin / down, shift[:, 0]], 1)
    theta = torch.stack([top, torch.stack([sin / across, cos / down, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if aug["elastic"] > 0:  # drawn only when enabled: configs without it keep their random stream
        grid = grid + elastic_field(n, x.shape[-2:], aug["elastic"], aug["elastic_points"], gen)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if aug.get("coarse_p", 0.0) > 0:  # drawn only when enabled: configs without it keep their random stream
        chosen = torch.rand(n, generator=gen) < aug["coarse_p"]
        mm = uniform(*aug["coarse_mm"])
        for i in torch.nonzero(chosen).flatten().tolist():
            if mm[i] > pixel_mm:
                x[i : i + 1] = coarser(x[i : i + 1], float(mm[i]) / pixel_mm)
    flip = torch.rand(n, generator=gen) < aug["reverse_context"]
    x[flip] = x[flip].flip(1)
    contrast = uniform(1 - aug["contrast"], 1 + aug["contrast"]).view(n, 1, 1, 1)
    brightness = uniform(-aug["brightness"], aug["brightness"]).view(n, 1, 1, 1)
    noise = uniform(0, aug["noise"]).view(n, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    x = ((x - 0.5) * contrast + 0.5 + brightness + noise).clamp(0, 1)
    if aug.get("gamma_p", 0.0) > 0:  # drawn only when enabled: configs without it keep their random stream
        chosen = (torch.rand(n, generator=gen) < aug["gamma_p"]).view(n, 1, 1, 1)
        low, high = (math.log(g) for g in aug["gamma"])
        gamma = torch.exp(uniform(low, high)).view(n, 1, 1, 1)
        x = torch.where(chosen, x.pow(gamma), x)
    return x, y


# -- model -----------------------------------------------------------------------------------


def initial_network(cfg: dict, plan: Plan) -> UNet2D:
    """The network a run starts from: fresh, or initialised from ``init_from``; the encoder frozen if asked.

    A source with other output structures (a liver model starting a multi-structure run) gives every
    weight but the output layer, and the output channels of the structures both have, by name.
    """
    keys = structure_keys(cfg)
    architecture = {"name": "UNet2D", "in_channels": plan.in_channels, "out_channels": len(keys)}
    size = {"base": cfg["base"], "depth": cfg["depth"], **({"max_width": cfg["max_width"]} if cfg["max_width"] else {})}
    net = build_network({**architecture, **size})
    if cfg["init_from"]:
        source = load_model(ROOT / cfg["init_from"] if not Path(cfg["init_from"]).is_absolute() else cfg["init_from"])
        names = [CATALOGUE[k].name for k in keys]
        theirs = [s.name for s in source.structures]
        state = source.network.state_dict()
        if theirs != names:
            head = {k: state.pop(k) for k in [k for k in state if k.startswith("head.")]}
            with torch.no_grad():
                for mine, name in enumerate(names):
                    if name in theirs:
                        net.head.weight[mine] = head["head.weight"][theirs.index(name)]
                        net.head.bias[mine] = head["head.bias"][theirs.index(name)]
            state.update({k: v for k, v in net.state_dict().items() if k.startswith("head.")})
        net.load_state_dict(state)
    if cfg["freeze_encoder"]:
        for p in net.encoder_parameters():
            p.requires_grad_(False)
    return net


def set_train_mode(net: UNet2D, cfg: dict) -> None:
    """Training mode, except a frozen encoder, whose batch-norm statistics must not move either."""
    net.train()
    if cfg["freeze_encoder"]:
        net.encoder.eval()
        net.bottleneck.eval()


def train_step(
    net, opt, sched, batch, autocast, device: str, extra_weight: float = 1.0, dice_per_sample: bool = False
) -> float:
    """One optimizer step on a batch ``(images, labels, available)``; returns the loss."""
    x, y, available = (t.to(device) for t in batch)
    with autocast:
        logits = net(x.contiguous(memory_format=torch.channels_last) if device == "cpu" else x)
    loss = dice_bce_loss(logits.float(), y, available, extra_weight, dice_per_sample)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    available: torch.Tensor | None = None,
    extra_weight: float = 1.0,
    per_sample: bool = False,
) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice over the batch, for ``(B, S, H, W)`` logits.

    Only labels that exist count (``available``, ``(B, S)``; all by default): a sample whose patient has no
    mask for a structure adds nothing to that structure's loss, neither cross-entropy nor Dice. The
    loss is the cross-entropy over every counted pixel, plus 1 - Dice of the first structure, plus
    ``extra_weight`` times the mean 1 - Dice of the other structures present in the batch.

    ``per_sample``: a structure's Dice is the mean of each sample's own, over the samples that hold some of it
    (the others add only their cross-entropy), so a crop with a sliver of liver (the dome, a lobe's tip) weighs as
    much as one full of it; over the batch, a sliver weighs by its pixels.
    """
    if available is None:
        available = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    weight = available[:, :, None, None].to(logits.dtype).expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum") / weight.sum().clamp(min=1)
    prob = torch.sigmoid(logits) * weight
    dims = (2, 3) if per_sample else (0, 2, 3)
    inter = (prob * target).sum(dims)
    soft_dice = (2 * inter + 1) / (prob.sum(dims) + (target * weight).sum(dims) + 1)
    present = available.any(0)
    if per_sample:  # (B, S): averaged over the samples holding the structure
        holding = (available & (target.sum((2, 3)) > 0)).to(logits.dtype)
        soft_dice = torch.where(holding.sum(0) > 0, (soft_dice * holding).sum(0) / holding.sum(0).clamp(min=1), 1.0)
    loss = bce + (1 - soft_dice[0]) * present[0]
    if logits.shape[1] > 1 and present[1:].any():
        loss = loss + extra_weight * (1 - soft_dice[1:][present[1:]]).mean()
    return loss


@torch.inference_mode()
def validate(net, patients: list[PatientSlices], plan: Plan, device: str, batch: int = 32) -> dict:
    """Loss, Dice and pixel accuracy over the test patients' whole slices on the model grid (no postprocessing)."""
    net.eval()
    autocast, _ = autocast_for(device)
    inter = pred_sum = ref_sum = correct = total = 0.0
    losses = []
    for ps in patients:
        n = ps.images.shape[0]
        for start in range(0, n, batch):
            idx = torch.arange(start, min(n, start + batch))
            x = with_context(ps.images, idx, plan.context).float().to(device)
            y = ps.labels[idx][:, :1].float().to(device)  # the first structure (the liver)
            with autocast:
                logits = net(x)
            logits = logits.float()[:, :1]
            losses.append(float(dice_bce_loss(logits, y)) * len(idx))
            pred, ref = logits > 0, y >= 0.5
            inter += float((pred & ref).sum())
            pred_sum += float(pred.sum())
            ref_sum += float(ref.sum())
            correct += float((pred == ref).sum())
            total += ref.numel()
    count = sum(ps.images.shape[0] for ps in patients)
    return {"loss": sum(losses) / count, "dice": 2 * inter / max(1.0, pred_sum + ref_sum), "accuracy": correct / total}


def evaluate(model: LoadedModel, patients: list[IrcadbPatient], keys: list[str], device: str) -> dict[str, dict]:
    """3D metrics per test patient on the original grid, after the product's postprocessing: the first
    structure's at the top level; with more structures, ``structures`` holds each one the patient has a
    mask for (Dice, volumes; lesion detection for lesion structures)."""
    out = {}
    for patient in patients:
        seg = segment(patient.ct, model, device=device)
        refs = labels.targets(patient, keys)
        ct = patient.ct
        m = metrics.all_metrics(seg.mask.array, refs[0], ct.spacing_mm)
        m["accuracy"] = float(np.mean(seg.mask.array == refs[0]))
        if len(keys) > 1:
            m["structures"] = {
                key: metrics.structure_metrics(pred.array, ref, ct.voxel_volume_ml, CATALOGUE[key].lesions)
                for key, pred, ref in zip(keys, seg.masks, refs)
                if ref is not None
            }
        out[patient.name] = m
    return out


class WeightAverage:
    """Stochastic weight averaging (Izmailov et al., 2018): the mean of the network's parameters at the end
    of the epochs from ``start`` on. The average of the weights along the end of the trajectory lies in a
    wider, flatter region of the loss than the last weights, and a flat region is what keeps holding when
    the input shifts (another hospital, another contrast phase: Cha et al., 2021, SWAD). Batch-norm
    statistics are not averaged: they are measured again for the averaged weights
    (:func:`measure_batch_norm`)."""

    def __init__(self, net: UNet2D, start: int):
        self.start = start
        self.sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in net.named_parameters()}
        self.count = 0

    @torch.no_grad()
    def add(self, net: UNet2D, epoch: int) -> None:
        if epoch >= self.start:
            for n, p in net.named_parameters():
                self.sums[n] += p.detach().float()
            self.count += 1

    @torch.no_grad()
    def apply(self, net: UNet2D) -> None:
        """Put the averaged weights into ``net``."""
        if not self.count:
            raise ValueError(f"no epoch from {self.start} on was averaged")
        for n, p in net.named_parameters():
            p.copy_((self.sums[n] / self.count).to(p.dtype))


def averaging_start(cfg: dict) -> int:
    """The first epoch whose weights enter the average (``average_from`` share of the epochs done); 0: off."""
    share = cfg["average_from"]
    if not share:
        return 0
    if not 0 < share < 1:
        raise SystemExit(f"average_from is {share}; give a share of the epochs between 0 and 1 (0: off)")
    return int(cfg["epochs"] * share) + 1


@torch.no_grad()
def measure_batch_norm(net: UNet2D, batches, autocast, device: str) -> int:
    """Batch-norm statistics measured afresh on ``batches`` of training images (their plain mean over all of
    them), for weights that were never trained as they are (an average); layers that do not train (a frozen
    encoder) keep theirs. Returns how many layers were measured."""
    norms = [
        m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d) and all(p.requires_grad for p in m.parameters())
    ]
    momenta = [m.momentum for m in norms]
    net.eval()  # every other layer as at inference
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative mean
        m.train()
    for x in batches:
        x = x.to(device)
        with autocast:
            net(x.contiguous(memory_format=torch.channels_last) if device == "cpu" else x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    net.eval()
    return len(norms)


def save_run_model(net, out: Path, cfg: dict, keys: list[str], plan: Plan, test, device: str, provenance: dict) -> dict:
    """Evaluate ``net`` on the test patients in 3D (:func:`evaluate`), save it as ``out/model.json`` with
    ``provenance`` and those metrics (``held_out_metrics``); returns the metrics."""
    net.eval()
    structures = [CATALOGUE[k] for k in keys]
    card = {
        "model_id": cfg["name"],
        "architecture": {"out_channels": len(keys)},
        "structures": [s.to_card() for s in structures],
    }
    final = evaluate(LoadedModel(net, plan, card, out), test, keys, device) if test else {}
    for name, m in final.items():
        log.info("%s 3D: %s", name, json.dumps(m))
    rest = {k: v for k, v in provenance.items() if k != "command"}
    saved = save_model(
        net,
        plan,
        out / "model",
        model_id=f"{cfg['organ']}-unet2d-{cfg['name']}",
        structures=structures,
        provenance={**rest, "held_out_metrics": final, "command": provenance["command"]},
    )
    log.info("saved %s", saved)
    return final


# -- checkpoints (safetensors + JSON; nothing is pickled) -------------------------------------


def save_checkpoint(
    path: Path, net, opt, sched, epoch: int, history: list, rng, gen, average: WeightAverage | None = None
) -> None:
    """Model, optimizer moments, scheduler step, RNG states, history and weight average after ``epoch``."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in net.state_dict().items()}
    params = [p for group in opt.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{key}"] = value.detach().reshape(value.shape).contiguous()
    tensors["rng.torch"] = gen.get_state()
    if average is not None and average.count:
        tensors.update({f"average.{k}": v.contiguous() for k, v in average.sums.items()})
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path.with_suffix(".safetensors"))
    meta = {
        "epoch": epoch,
        "scheduler": sched.state_dict(),
        "history": history,
        "rng_numpy": rng.bit_generator.state,
        "average_count": average.count if average is not None else 0,
    }
    path.with_suffix(".json").write_text(json.dumps(meta))


def load_checkpoint(path: Path, net, opt, sched, rng, gen, average: WeightAverage | None = None) -> tuple[int, list]:
    """Restore what :func:`save_checkpoint` wrote; returns (last epoch, history)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path.with_suffix(".safetensors")))
    meta = json.loads(path.with_suffix(".json").read_text())
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = [p for group in opt.param_groups for p in group["params"]]
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            opt.state[params[int(i)]][name] = value
    sched.load_state_dict(meta["scheduler"])
    rng.bit_generator.state = meta["rng_numpy"]
    gen.set_state(tensors["rng.torch"])
    if average is not None and meta.get("average_count"):
        average.sums = {k[8:]: v for k, v in tensors.items() if k.startswith("average.")}
        average.count = meta["average_count"]
    return meta["epoch"], meta["history"]


def _relative(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (commands stay portable)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def git_commit() -> str:
    """The current commit of this repository, or 'unknown'."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def state_digest(net) -> str:
    """sha256 over all weights and buffers (to compare replicas)."""
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# -- the run ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument(
        "--data", type=Path, default=None, help="folder holding 3Dircadb1/ (default: $LIVERSEG_DATA or ../shared/data)"
    )
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: training/runs/<name>)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.set)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg["device"])
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    rank = dist.get_rank() if world > 1 else 0
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    out = args.out or ROOT / "training" / "runs" / cfg["name"]
    out.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler()] + ([logging.FileHandler(out / "train.log")] if rank == 0 else [])
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s", handlers=handlers
    )
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])  # same on every rank: the epoch's sample order
    gen = torch.Generator().manual_seed(cfg["seed"] + rank)  # per rank: augmentation
    plan = plan_of(cfg)
    data_root = (args.data or default_data_root()) / "3Dircadb1"

    t0 = time.perf_counter()
    unenhanced = cfg["augment"]["unenhanced_p"] > 0
    keys = structure_keys(cfg)
    contrast_only = torch.tensor([k in cfg["augment"]["contrast_only"] for k in keys])
    leaked = set(cfg["train_patients"]) & set(cfg["test_patients"])
    if leaked:
        raise SystemExit(f"patients {sorted(leaked)} are both in training and test; refusing to run")
    cache = Path(cfg["cache"]) if cfg["cache"] else None  # packed slices (training/packed.py) instead of the data
    varied = cfg["augment"]["unenhanced_varied"] if unenhanced else 0
    fresh = unenhanced and cfg["augment"]["unenhanced_fresh"]
    if cache is not None and (varied or fresh):
        raise SystemExit(
            "packed slices hold one contrast-free version; set augment.unenhanced_varied = 0 and "
            "augment.unenhanced_fresh = false, or cache = ''"
        )
    arterial = cfg["augment"]["arterial_versions"] if cfg["augment"]["arterial_p"] > 0 else 0
    if cfg["augment"]["arterial_p"] > 0 and arterial < 1:
        raise SystemExit(f"augment.arterial_p needs augment.arterial_versions >= 1, got {arterial}")
    gamma = cfg["augment"]["gamma"]
    if cfg["augment"]["gamma_p"] > 0 and not (len(gamma) == 2 and 0 < min(gamma) <= max(gamma)):
        raise SystemExit(f"augment.gamma must be [low, high] with 0 < low <= high (1: no change), got {gamma}")
    if arterial and (cache is not None or cfg["augment"]["view_p"] > 0):
        raise SystemExit(
            "augment.arterial_p takes late-arterial versions made from the patients' own volumes and axial slices: "
            "not with cache or augment.view_p; set augment.arterial_p = 0 or leave those out"
        )
    view_p, views = cfg["augment"]["view_p"], [v for v in plan.views if v != "axial"]
    if view_p > 0 and (not views or cache is not None or fresh):
        raise SystemExit(
            "augment.view_p takes samples from plan.views other than axial (none given), from the patients' own "
            "volumes: not with cache or augment.unenhanced_fresh"
        )
    if cache is None:
        patients = {n: IrcadbPatient(data_root / n) for n in cfg["train_patients"] + cfg["test_patients"]}
        train = [
            PatientSlices(patients[n], keys, plan, unenhanced, varied, fresh, arterial) for n in cfg["train_patients"]
        ]
        test = [patients[n] for n in cfg["test_patients"]]
        test_slices = [PatientSlices(p, keys[:1], plan) for p in test] if cfg["validate"] and rank == 0 else []
    else:  # no 3D evaluation: the original grids are not packed; the per-epoch validation on the model grid is
        train = [packed.load(packed.path_for(cache, n), plan, keys, unenhanced) for n in cfg["train_patients"]]
        test = []
        validate_on = cfg["test_patients"] if cfg["validate"] and rank == 0 else []
        test_slices = [packed.load(packed.path_for(cache, n), plan, keys[:1]) for n in validate_on]
    samples = training_samples(train, cfg["samples_fraction"], cfg["subset_seed"])
    view_sets = [ViewSlices.of_patient(p, views, plan.spacing_mm) for p in train] if view_p > 0 else []
    extra, left_out = None, {}
    per_batch = cfg["batch_size"]  # CT slices per batch; the rest of the batch comes from the extra slices
    if cfg["extra_2d"]:
        if keys[0] != "liver":
            raise SystemExit(f"extra_2d holds liver slices; the first structure is {keys[0]!r}")
        extra = (
            ExtraSlices(
                (args.data or default_data_root()) / cfg["extra_2d"],
                plan,
                cfg["extra_2d_pixel_mm"],
                len(keys),
                varied,
                fresh,
                arterial,
            )
            if cache is None
            else packed.load(packed.path_for(cache, cfg["extra_2d"]), plan, keys, True)
        )
        per_batch = max(1, cfg["batch_size"] - round(cfg["batch_size"] * cfg["extra_2d_share"]))
        if cfg["test_patients"]:  # LiTS holds 3D-IRCADb-01: a test patient's own slices must not train
            held_out = (
                {p.name: overlap.thumbnails(p.ct.array) for p in test}
                if cache is None
                else {n: packed.load(packed.path_for(cache, n), plan, keys[:1]).thumbs for n in cfg["test_patients"]}
            )
            left_out = overlap.cases_showing(extra.case_of, extra.thumbs, held_out)
            removed = extra.drop_cases(left_out)
            log.info("extra 2D cases showing a test patient, left out: %s (%d slices)", left_out, removed)
        train.append(extra)
        extra_index = len(train) - 1
        log.info(
            "extra 2D slices: %d from %d other patients (%s), %d of every %d batch samples",
            extra.images.shape[0],
            len(extra.cases),
            cfg["extra_2d"],
            cfg["batch_size"] - per_batch,
            cfg["batch_size"],
        )
    view_index = []  # per CT patient, the indices in ``train`` of its view sets
    for sets in view_sets:
        view_index.append(list(range(len(train), len(train) + len(sets))))
        train += sets
    if view_sets:
        log.info(
            "%.0f%% of the CT samples from the %s views (%s slices per patient)",
            100 * view_p,
            " and ".join(views),
            ", ".join("/".join(str(v.count) for v in sets) for sets in view_sets),
        )
    if arterial:
        log.info(
            "late arterial phase for %.0f%% of the samples whose contrast is kept (arterial versions per set: %d)",
            100 * cfg["augment"]["arterial_p"],
            arterial,
        )
    log.info(
        "%s: %d training slices of %s from %s, test %s, %d process(es) on %s (data %.1f s)",
        cfg["name"],
        len(samples),
        ", ".join(keys),
        cfg["train_patients"],
        cfg["test_patients"],
        world,
        device,
        time.perf_counter() - t0,
    )

    net = initial_network(cfg, plan).to(device)
    if device == "cpu":
        net = net.to(memory_format=torch.channels_last)
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps_per_epoch = max(1, len(samples) // (per_batch * world))  # an epoch: every CT sample once
    total = steps_per_epoch * cfg["epochs"]
    warm = max(1, steps_per_epoch * cfg["warmup_epochs"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )
    ddp = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    autocast, precision = autocast_for(device)
    checkpoint = out / "checkpoint"
    start_epoch, history = 0, []
    average = WeightAverage(net, averaging_start(cfg)) if cfg["average_from"] else None
    if args.resume and checkpoint.with_suffix(".json").exists():
        start_epoch, history = load_checkpoint(checkpoint, net, opt, sched, rng, gen, average)
        log.info("resumed after epoch %d", start_epoch)
    t_train = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)

    def next_batch(step: int, mine) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The augmented batch of this rank's ``step``-th group of samples (of the order ``mine``)."""
        batch = [samples[i] for i in mine[step * per_batch : (step + 1) * per_batch]]
        if view_sets:  # drawn only when enabled, so a config without views sees the same random stream as before
            batch = [other_view(sample, view_index, train, view_p, rng) for sample in batch]
        if extra is not None:  # drawn for every rank from the shared generator, each rank takes its row
            picks = rng.integers(0, extra.images.shape[0], (world, cfg["batch_size"] - per_batch))[rank]
            batch += [(extra_index, int(k)) for k in picks]
        x, y, available = make_batch(train, batch, plan, cfg["crop"], rng, cfg["augment"], contrast_only)
        x, y = augment(x, y, cfg["augment"], gen, plan.spacing_mm)
        return x, y, available

    def provenance_of(more: dict) -> dict:
        """What the saved model's card says of how it was made (its held-out metrics are added on saving)."""
        return {
            "data": "3D-IRCADb-01, IRCAD France"
            + ("; Medical Segmentation Decathlon Task03 Liver (LiTS), CC BY-SA 4.0" if extra is not None else ""),
            "organ": cfg["organ"],
            "structures": keys,
            "train_patients": cfg["train_patients"],
            "test_patients": cfg["test_patients"],
            "training_slices": len(samples),
            "extra_2d_slices": 0 if extra is None else int(extra.images.shape[0]),
            "extra_2d_left_out": left_out,
            "config": cfg,
            "commit": git_commit(),
            "precision": precision,
            "processes": world,
            "device": device,
            "train_seconds": round(history[-1]["seconds"], 1),
            "machine": machine(),
            **more,
            "command": " ".join(
                ["python -m training.train", _relative(args.config), *[f"--set '{s}'" for s in args.set]]
            ),
        }

    for epoch in range(start_epoch + 1, cfg["epochs"] + 1):
        set_train_mode(net, cfg)
        order = rng.permutation(len(samples))
        mine = order[rank::world]
        losses = []
        steps = tqdm(range(steps_per_epoch), f"epoch {epoch}", leave=False, disable=None if rank == 0 else True)
        for step in steps:
            x, y, available = next_batch(step, mine)
            losses.append(
                train_step(
                    ddp, opt, sched, (x, y, available), autocast, device, cfg["extra_weight"], cfg["dice_per_sample"]
                )
            )
        if world > 1:  # batch-norm statistics are per process; keep rank 0's everywhere, as it is saved
            for buffer in net.buffers():
                dist.broadcast(buffer, 0)
        if average is not None:
            average.add(net, epoch)
        row = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "lr": sched.get_last_lr()[0],
            "seconds": time.perf_counter() - t_train,
        }
        if test_slices:
            row["val"] = validate(net, test_slices, plan, device)
        history.append(row)
        if rank == 0 and epoch in cfg["snapshots"]:  # weights on the way, to see when a held-out score is made
            save_run_model(net, out / f"epoch{epoch}", cfg, keys, plan, test, device, provenance_of({}))
        if rank == 0:
            log.info(
                "epoch %d/%d loss %.4f %s %.0f s",
                epoch,
                cfg["epochs"],
                row["loss"],
                {k: round(v, 4) for k, v in row.get("val", {}).items()},
                row["seconds"],
            )
            save_checkpoint(checkpoint, net, opt, sched, epoch, history, rng, gen, average)
            (out / "history.json").write_text(json.dumps(history, indent=1))

    last_metrics = None
    if average is not None:  # the last weights are kept beside the average, to compare the two
        if rank == 0:
            last_metrics = save_run_model(net, out / "last", cfg, keys, plan, test, device, provenance_of({}))
        average.apply(net)
        order = rng.permutation(len(samples))[rank::world]  # one more epoch of training batches, not trained on
        measured = measure_batch_norm(
            net,
            (next_batch(s, order)[0] for s in range(steps_per_epoch)),
            autocast,
            device,
        )
        if world > 1:
            for buffer in net.buffers():
                dist.broadcast(buffer, 0)
        log.info(
            "averaged the weights of %d epochs from epoch %d on; %d batch-norm layers measured again",
            average.count,
            average.start,
            measured,
        )
    if world > 1:
        (out / f"rank{rank}.sha256").write_text(state_digest(net))
        dist.barrier()
    if rank == 0:
        save_run_model(
            net,
            out,
            cfg,
            keys,
            plan,
            test,
            device,
            provenance_of({"held_out_metrics_last_weights": last_metrics} if last_metrics is not None else {}),
        )
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
