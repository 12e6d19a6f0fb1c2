"""CT appearance changes, in Hounsfield units and millimetres: contrast removed or arterial, thick or thin slices,
low-dose noise, another pixel size (interpolated, or coarse and area-averaged), a sharp reconstruction kernel.

They build the robustness variants of a held-out patient (``robustness.py``) and, with random
strengths, the training augmentations (``train.py``).

The unenhanced mapping. Every 3D-IRCADb CT is portal-venous phase: liver about 100-120 HU,
spleen 115-120, portal vein and arteries 150-180, kidneys 170-200 (medians over the shared
patients' expert masks). Without contrast, published attenuation is: liver 50-65 HU, spleen
40-50, blood 35-45, renal cortex 30-35, with the liver brighter than the spleen and the vessels
darker than the liver. The mapping moves each labelled structure so that its median sits at
``UNENHANCED_HU`` and shrinks its spread around the median by ``STRUCTURE_CONTRAST`` (enhancement
also widens the spread: hypodense tumours at 60 HU in a 110 HU liver become about 25 HU in a 55 HU
one, as unenhanced metastases are). Enhanced tissue without a mask (bowel wall, pancreas, a
spleen or kidney without a mask) above ``SOFT_TISSUE_HU`` is pulled towards it by
``UNLABELLED_PULL``. Bone (its mask, or HU above ``BONE_HU`` where there is none), fat, air and
lung (below ``FAT_HU``, also inside a mask's border) are left alone. Shrinking values also shrinks
their noise, so white noise is added back to keep the image's noise level (``NOISE_HU`` before the
change).

The arterial mapping (:func:`arterial`) moves the same way to the late arterial phase: the liver darker (75 HU)
than the spleen (120) and the pancreas and bowel wall around it, bright arteries, unopacified hepatic veins.
"""

from __future__ import annotations

import math

import numpy as np
from LiverSegUNetLib.volume import Volume

#: Median unenhanced attenuation the structures are moved to (HU).
UNENHANCED_HU = {"liver": 55.0, "spleen": 45.0, "vessels": 40.0, "kidneys": 32.0}
#: 3D-IRCADb mask names of each structure; a later name wins where masks overlap (vessels inside the liver).
STRUCTURES = {
    "liver": ("liver",),
    "spleen": ("spleen",),
    "kidneys": ("leftkidney", "rightkidney"),
    "vessels": ("portalvein", "venoussystem", "artery", "aorta"),
}
#: Every 3D-IRCADb mask the mapping reads (bone is left unchanged; the rest are the structures above).
MASK_NAMES = (*(n for names in STRUCTURES.values() for n in names), "bone")
#: What those medians span between patients and scanners (HU): a normal liver 50-65, a fatty one down to about 35
#: (darker than the spleen, as steatosis shows without contrast), blood 33-47 with the haematocrit.
UNENHANCED_RANGE = {"liver": (35.0, 65.0), "spleen": (38.0, 52.0), "vessels": (33.0, 47.0), "kidneys": (26.0, 38.0)}
#: A darker unenhanced CT than ``UNENHANCED_HU``, for evaluation: the medians of an unenhanced abdominal CT from
#: another hospital (TotalSegmentator's ``example_ct_sm``, its own organ labels: liver 46, spleen 35 HU), the
#: low end of normal, as a mildly fatty liver shows. The standard mapping is the one most recipes train on; these
#: values are not, so they test whether a model learnt "the liver is the 55 HU organ" or the liver itself.
DARK_UNENHANCED_HU = {"liver": 45.0, "spleen": 36.0, "vessels": 36.0, "kidneys": 28.0}
STRUCTURE_CONTRAST = 0.6
SOFT_TISSUE_HU = 40.0
UNLABELLED_PULL = 0.3
BONE_HU = 300.0
FAT_HU = -30.0
NOISE_HU = 10.0
#: Extra noise of a low-dose scan: a quarter of the dose doubles the ~12 HU of a standard abdominal CT.
LOW_DOSE_NOISE_HU = 25.0


def structure_labels(
    shape, masks: dict[str, np.ndarray], structures: dict[str, tuple[str, ...]] = STRUCTURES
) -> tuple[np.ndarray, list[str]]:
    """A label map (0: none, n: the n-th structure of the returned list) from whichever 3D-IRCADb masks exist,
    grouped as ``structures`` says (:data:`STRUCTURES`, or :data:`ARTERIAL_STRUCTURES`)."""
    labels = np.zeros(shape, np.uint8)
    names = []
    for structure, mask_names in structures.items():
        present = [masks[n] for n in mask_names if n in masks]
        if present:
            names.append(structure)
            labels[np.logical_or.reduce([m > 0 for m in present])] = len(names)
    return labels, names


def unenhanced_hu(
    hu: np.ndarray,
    labels: np.ndarray,
    names: list[str],
    bone: np.ndarray | None,
    rng: np.random.Generator,
    targets: dict[str, float] = UNENHANCED_HU,
    contrast: float | dict[str, float] = STRUCTURE_CONTRAST,
    pull: float = UNLABELLED_PULL,
    noise_hu: float = NOISE_HU,
    medians: dict[str, float] | None = None,
) -> np.ndarray:
    """``hu`` (any shape) as it would look without intravenous contrast (float32 HU); see the module docstring.
    ``medians``: each structure's enhanced median (:func:`structure_medians`) when ``hu`` is part of a volume
    (a few slices of it); by default they are measured on ``hu``. Another phase is the same move with its own
    ``targets``, per-structure ``contrast`` (a dict; 1 where a structure is not named) and ``pull``
    (:func:`arterial_from_masks`)."""
    out = hu.astype(np.float32, copy=True)
    scale = np.ones(hu.shape, np.float32)
    keep = hu > BONE_HU if bone is None else bone > 0
    if medians is None:
        medians = structure_medians(hu, labels, names, keep)
    for index, name in enumerate(names, start=1):
        inside = (labels == index) & (hu > FAT_HU) & ~keep  # fat, air or bone at a mask's border stay
        if name not in medians or not inside.any():
            continue
        spread = contrast.get(name, 1.0) if isinstance(contrast, dict) else contrast
        out[inside] = targets[name] + spread * (out[inside] - medians[name])
        scale[inside] = spread
    other = (labels == 0) & ~keep & (hu > SOFT_TISSUE_HU)
    out[other] = SOFT_TISSUE_HU + pull * (out[other] - SOFT_TISSUE_HU)
    scale[other] = pull
    if noise_hu > 0:
        changed = scale < 1
        lost = noise_hu * np.sqrt(1 - scale[changed] ** 2)
        out[changed] += lost * rng.standard_normal(int(changed.sum()), dtype=np.float32)
    return out


def structure_medians(hu: np.ndarray, labels: np.ndarray, names: list[str], keep: np.ndarray) -> dict[str, float]:
    """The enhanced median HU of each labelled structure (fat, air and the ``keep`` voxels, bone, left out), those
    present in ``labels``."""
    medians = {}
    for index, name in enumerate(names, start=1):
        inside = (labels == index) & (hu > FAT_HU) & ~keep
        if inside.any():
            medians[name] = float(np.median(hu[inside]))
    return medians


def varied_mapping(rng: np.random.Generator) -> dict:
    """Keyword arguments of :func:`unenhanced_hu` for one random unenhanced patient: each structure's median drawn
    from ``UNENHANCED_RANGE``, the spread kept 0.45-0.75 and the unlabelled tissue's pull 0.15-0.45."""
    targets = {name: float(rng.uniform(*span)) for name, span in UNENHANCED_RANGE.items()}
    return {"targets": targets, "contrast": float(rng.uniform(0.45, 0.75)), "pull": float(rng.uniform(0.15, 0.45))}


#: The late arterial phase (about 35 s after the injection; the phase every multiphase liver CT has beside the
#: portal-venous one all 3D-IRCADb patients show) tells the vessels apart, so its structures split them: the
#: arteries (aorta included) at their brightest, the portal vein filling, the hepatic veins and vena cava not yet.
ARTERIAL_STRUCTURES = {
    "liver": ("liver",),
    "spleen": ("spleen",),
    "kidneys": ("leftkidney", "rightkidney"),
    "arteries": ("artery", "aorta"),
    "portal": ("portalvein",),
    "veins": ("venoussystem",),
}
#: Median late-arterial attenuation the structures are moved to (HU): aorta about 300 (the 250+ HU an arterial
#: protocol aims at), liver 75 (its arterial supply is a quarter of its blood: some 20 HU over unenhanced, where
#: the portal-venous phase adds 50-60), spleen 120 (brighter than the liver, unlike the portal-venous phase),
#: renal cortex 190, portal vein 140 (filling), hepatic veins and vena cava 60 (unopacified: darker than the
#: liver). Tissue without a mask (pancreas, bowel wall, a spleen or kidney without a mask) is left as it is:
#: it enhances about as much in both phases.
ARTERIAL_HU = {"liver": 75.0, "spleen": 120.0, "kidneys": 190.0, "arteries": 300.0, "portal": 140.0, "veins": 60.0}
#: What those medians span between patients, injections and timings (HU), for training (:func:`varied_arterial`).
ARTERIAL_RANGE = {
    "liver": (60.0, 90.0),
    "spleen": (95.0, 145.0),
    "kidneys": (140.0, 230.0),
    "arteries": (220.0, 380.0),
    "portal": (100.0, 180.0),
    "veins": (40.0, 80.0),
}
#: The liver's spread around its median shrinks with its enhancement (hypodense tumours stay darker than it, by
#: less); every other structure keeps its spread.
ARTERIAL_LIVER_CONTRAST = 0.75


def arterial_from_masks(
    hu: np.ndarray,
    masks: dict[str, np.ndarray],
    rng: np.random.Generator,
    targets: dict[str, float] = ARTERIAL_HU,
    liver_contrast: float = ARTERIAL_LIVER_CONTRAST,
) -> np.ndarray:
    """``hu`` (portal-venous phase) as the late arterial phase would show it (float32 HU): each structure of
    :data:`ARTERIAL_STRUCTURES` that has a mask moved to its ``targets`` median (:func:`unenhanced_hu`'s move),
    the liver's spread shrunk by ``liver_contrast`` (noise added back), tissue without a mask, bone, fat and air
    unchanged."""
    labels, names = structure_labels(hu.shape, masks, ARTERIAL_STRUCTURES)
    return unenhanced_hu(
        hu, labels, names, masks.get("bone"), rng, targets=targets, contrast={"liver": liver_contrast}, pull=1.0
    )


def varied_arterial(rng: np.random.Generator) -> dict:
    """Keyword arguments of :func:`arterial_from_masks` for one random arterial phase: each median drawn from
    :data:`ARTERIAL_RANGE`, the liver's spread kept 0.6-0.9."""
    targets = {name: float(rng.uniform(*span)) for name, span in ARTERIAL_RANGE.items()}
    return {"targets": targets, "liver_contrast": float(rng.uniform(0.6, 0.9))}


def arterial(ct: Volume, masks: dict[str, np.ndarray], rng: np.random.Generator, **mapping) -> Volume:
    """The portal-venous CT as its late arterial phase would look, from its HU and the expert masks it has."""
    out = arterial_from_masks(ct.array, masks, rng, **mapping)
    return ct.with_array(np.clip(np.round(out), -1024, 3071).astype(np.int16), appearance="arterial")


def masks_of(patient) -> dict[str, np.ndarray]:
    """The expert masks of a 3D-IRCADb patient that the unenhanced mapping reads, those it has."""
    return {name: patient.mask(name).array for name in MASK_NAMES if name in patient.organs}


def unenhanced_from_masks(
    hu: np.ndarray, masks: dict[str, np.ndarray], rng: np.random.Generator, **mapping
) -> np.ndarray:
    """:func:`unenhanced_hu` with the structures taken from 3D-IRCADb masks (float32 HU); ``mapping``: other
    targets, contrast or pull (:func:`varied_mapping`)."""
    labels, names = structure_labels(hu.shape, masks)
    return unenhanced_hu(hu, labels, names, masks.get("bone"), rng, **mapping)


def unenhanced(ct: Volume, masks: dict[str, np.ndarray], rng: np.random.Generator, **mapping) -> Volume:
    """The CT without contrast enhancement, from its HU and the expert masks it has (see the module docstring);
    ``mapping``: other targets, contrast or pull than the standard ones."""
    out = unenhanced_from_masks(ct.array, masks, rng, **mapping)
    return ct.with_array(np.clip(np.round(out), -1024, 3071).astype(np.int16), appearance="unenhanced")


def slab_weights(n: int, spacing_mm: float, thickness_mm: float) -> tuple[np.ndarray, float]:
    """``(n_new, n)`` weights averaging contiguous slices into slabs of ``thickness_mm``, and the offset (mm)
    of the first slab's centre from the first slice's centre. Each weight is the overlap of an old
    slice (``spacing_mm`` thick) with a slab, over the slab's thickness."""
    n_new = int(math.floor(n * spacing_mm / thickness_mm + 1e-6))
    if n_new < 2:
        raise ValueError(f"{n} slices of {spacing_mm} mm do not make two {thickness_mm} mm slabs")
    low = -spacing_mm / 2 + np.arange(n_new) * thickness_mm  # slab lower edges, relative to slice 0's centre
    old_low = np.arange(n) * spacing_mm - spacing_mm / 2
    overlap = np.minimum(low[:, None] + thickness_mm, old_low[None, :] + spacing_mm) - np.maximum(
        low[:, None], old_low[None, :]
    )
    return np.clip(overlap, 0, None) / thickness_mm, float(low[0] + thickness_mm / 2)


def thick_slices(volume: Volume, thickness_mm: float, is_mask: bool = False) -> Volume:
    """The volume re-sliced into contiguous slabs of ``thickness_mm`` by averaging (partial volume), in place in mm.

    A mask is averaged too and kept where at least half of the slab is inside it.
    """
    weights, first_mm = slab_weights(volume.shape[0], volume.spacing_mm[2], thickness_mm)
    flat = volume.array.reshape(volume.shape[0], -1)
    out = np.empty((weights.shape[0], flat.shape[1]), np.float32)
    for row, w in enumerate(weights):
        used = np.flatnonzero(w)
        out[row] = w[used] @ flat[used].astype(np.float32)
    out = out.reshape(weights.shape[0], *volume.shape[1:])
    array = (out >= 0.5).astype(np.uint8) if is_mask else np.round(out).astype(volume.array.dtype)
    origin = np.asarray(volume.origin_lps) + volume.direction[:, 2] * first_mm
    spacing = (*volume.spacing_mm[:2], thickness_mm)
    return Volume(array, spacing, origin, volume.direction, {**volume.metadata, "slab_mm": thickness_mm})


def _resampled(volume: Volume, spacing, size, origin, is_mask: bool, **metadata) -> Volume:
    """``volume`` linearly resampled onto ``size`` (i, j, k) voxels of ``spacing`` mm from ``origin`` (LPS mm),
    its direction kept; a mask is kept where the interpolated value is at least one half."""
    import SimpleITK as sitk
    from LiverSegUNetLib.io.images import sitk_from_volume

    image = sitk_from_volume(volume.with_array(volume.array.astype(np.float32)))
    resampled = sitk.Resample(
        image,
        [int(n) for n in size],
        sitk.Transform(),
        sitk.sitkLinear,
        np.asarray(origin, float).tolist(),
        np.asarray(spacing, float).tolist(),
        volume.direction.ravel().tolist(),
    )
    out = sitk.GetArrayFromImage(resampled)
    array = (out >= 0.5).astype(np.uint8) if is_mask else np.round(out).astype(volume.array.dtype)
    return Volume(array, tuple(float(x) for x in spacing), origin, volume.direction, {**volume.metadata, **metadata})


def in_plane_pixels(volume: Volume, pixel_mm: float, is_mask: bool = False) -> Volume:
    """The volume resampled to ``pixel_mm`` square pixels over the same field of view (slices unchanged)."""
    old = np.asarray(volume.spacing_mm)
    spacing = np.array([pixel_mm, pixel_mm, old[2]])
    size = [max(2, round(volume.shape[2 - a] * old[a] / spacing[a])) for a in range(3)]
    # keep the field of view's edges: the first voxel centre moves by half the change of pixel size
    origin = np.asarray(volume.origin_lps) + volume.direction @ ((spacing - old) / 2 * np.array([1, 1, 0]))
    return _resampled(volume, spacing, size, origin, is_mask, pixel_mm=pixel_mm)


#: Noise of a standard abdominal CT at its slice thickness (HU); thinner slices carry more (see :func:`thin_slices`).
STANDARD_NOISE_HU = 12.0


def thin_slices(
    volume: Volume, slice_mm: float, rng: np.random.Generator | None = None, is_mask: bool = False
) -> Volume:
    """The volume as a thinner-slice reconstruction shows it: slices ``slice_mm`` apart from the first slice's
    centre to the last's (interpolated linearly between the acquired ones), and, for a CT (``rng`` given), the
    noise a thinner slice carries: quantum noise grows as one over the square root of the slice thickness, so
    correlated noise is added to bring :data:`STANDARD_NOISE_HU` at the old thickness to its value at the new one.

    Interpolation cannot add the detail along the body axis that a real thin reconstruction holds; what it
    reproduces is what matters to a 2.5D network: neighbouring slices closer together than in training."""
    old = float(volume.spacing_mm[2])
    if not 0 < slice_mm < old:
        raise ValueError(f"thin slices must be thinner than the volume's ({old:.2f} mm), got {slice_mm} mm")
    count = int(np.floor((volume.shape[0] - 1) * old / slice_mm + 1e-6)) + 1
    spacing = (*volume.spacing_mm[:2], slice_mm)
    size = (volume.shape[2], volume.shape[1], count)
    out = _resampled(volume, spacing, size, volume.origin_lps, is_mask, slice_mm=slice_mm)
    if is_mask or rng is None:
        return out
    extra = STANDARD_NOISE_HU * math.sqrt(old / slice_mm - 1)
    noisy = out.array.astype(np.float32) + correlated_noise(out.shape, extra, rng)
    return out.with_array(np.clip(np.round(noisy), -1024, 3071).astype(np.int16))


def coarse_pixels(volume: Volume, pixel_mm: float, is_mask: bool = False) -> Volume:
    """The volume as a series reconstructed at ``pixel_mm`` square pixels shows it: each slice low-pass
    filtered so that nothing finer than the new pixel survives, then resampled by :func:`in_plane_pixels`
    (which alone interpolates between the old pixels and would keep their sharpness, and alias, at pixels
    several times larger). The filter is a Gaussian of standard deviation (new - old pixel) / 2 in mm per
    axis, the anti-aliasing width image libraries use when shrinking (scikit-image's ``resize``); a mask is
    filtered the same way and kept where at least half of it lies inside."""
    import SimpleITK as sitk
    from LiverSegUNetLib.io.images import sitk_from_volume

    old = np.asarray(volume.spacing_mm[:2], dtype=float)
    if pixel_mm <= old.max():
        raise ValueError(f"coarse pixels must be larger than the volume's ({old.max():.2f} mm), got {pixel_mm} mm")
    sigma = (pixel_mm - old) / 2
    image = sitk_from_volume(volume.with_array(volume.array.astype(np.float32)))
    smooth = sitk.DiscreteGaussian(image, [*(sigma**2).tolist(), 0.0], 64, 0.01, True)
    filtered = volume.with_array(sitk.GetArrayFromImage(smooth))
    out = in_plane_pixels(filtered, pixel_mm, is_mask=is_mask)
    if is_mask:
        return out
    return out.with_array(np.round(out.array).astype(volume.array.dtype))


def correlated_noise(shape, sigma_hu: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with CT-like in-plane texture (white noise blurred over about a pixel), std ``sigma_hu``."""
    white = rng.standard_normal(shape, dtype=np.float32)
    kernel = np.array([0.25, 0.5, 0.25], np.float32)
    blurred = white
    for axis in (-1, -2):
        blurred = kernel[0] * np.roll(blurred, 1, axis) + kernel[1] * blurred + kernel[2] * np.roll(blurred, -1, axis)
    return blurred * (sigma_hu / float(blurred.std()))


def low_dose(ct: Volume, rng: np.random.Generator, sigma_hu: float = LOW_DOSE_NOISE_HU) -> Volume:
    """The CT with the extra noise of a low-dose acquisition."""
    noisy = ct.array.astype(np.float32) + correlated_noise(ct.shape, sigma_hu, rng)
    return ct.with_array(np.clip(np.round(noisy), -1024, 3071).astype(np.int16), appearance="low_dose")


#: A sharp reconstruction kernel (the "bone" or "lung" kernels some sites also use for the abdomen, or a
#: chest-abdomen series read with its lung kernel), approximated by in-plane unsharp masking of the soft-kernel
#: image: ``ct + SHARP_AMOUNT * (ct - blur)``, the blur a Gaussian of ``SHARP_SIGMA_MM``. It raises the fine
#: detail (noise texture, edges) the soft kernel suppressed: on the shared patients it multiplies the noise
#: inside the liver by about 3 and puts bright and dark rims on organ borders, as sharp kernels do.
SHARP_SIGMA_MM = 0.8
SHARP_AMOUNT = 2.0


def sharp_kernel(ct: Volume, sigma_mm: float = SHARP_SIGMA_MM, amount: float = SHARP_AMOUNT) -> Volume:
    """The CT as a sharper reconstruction kernel would show it (in plane only; slices and geometry unchanged)."""
    import SimpleITK as sitk
    from LiverSegUNetLib.io.images import sitk_from_volume

    image = sitk_from_volume(ct.with_array(ct.array.astype(np.float32)))
    blurred = sitk.GetArrayFromImage(sitk.DiscreteGaussian(image, [sigma_mm**2, sigma_mm**2, 0.0], 32, 0.01, True))
    original = ct.array.astype(np.float32)
    sharp = original + amount * (original - blurred)
    return ct.with_array(np.clip(np.round(sharp), -1024, 3071).astype(np.int16), appearance="sharp_kernel")
