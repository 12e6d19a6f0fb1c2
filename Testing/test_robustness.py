"""Robustness variants and augmentations on real patients: geometry kept in mm, masks aligned, HU where they belong."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from LiverSegUNetLib.volume import Volume
from LiverSegUNetLib.weights import DEFAULT_MODEL, model_files

from training import appearance

ROOT = Path(__file__).resolve().parents[1]


def _centroid_lps(mask: Volume) -> np.ndarray:
    k, j, i = np.nonzero(mask.array)
    return (mask.ijk_to_lps() @ np.array([i.mean(), j.mean(), k.mean(), 1.0]))[:3]


#: Every random change of ``train.augment`` switched off.
STILL = {"rotate_deg": 0.0, "scale_min": 1.0, "scale_max": 1.0, "shift": 0.0, "reverse_context": 0.0}
STILL |= {"contrast": 0.0, "brightness": 0.0, "noise": 0.0, "elastic": 0.0, "elastic_points": 5}


def _liver_slices(patient, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``copies`` of patient 1's slice with the most liver, as training samples it (3 channels, 0..255 window),
    and its liver mask."""
    from LiverSegUNetLib.preprocess import Plan

    from training import train

    plan = Plan(hu_min=0.0, hu_max=255.0, multiple=16)
    slices = train.PatientSlices(patient("3Dircadb1.1"), ["liver"], plan)
    k = int(np.argmax(slices.labels[:, 0].float().sum(dim=(1, 2))))
    both = slices.sample(k, 1)[None].repeat(copies, 1, 1, 1)
    return both[:, :3].contiguous(), both[:, 3:].contiguous()


def _still_and_off(x: torch.Tensor, y: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``train.augment`` of ``x``, ``y`` with every change off (:data:`STILL`), checked to equal the same with
    ``key`` set to 0: an augmentation switched off leaves the random stream, and so every image, as before."""
    from training import train

    plain_x, plain_y = train.augment(x.clone(), y.clone(), STILL, torch.Generator().manual_seed(0))
    off_x, off_y = train.augment(x.clone(), y.clone(), {**STILL, key: 0.0}, torch.Generator().manual_seed(0))
    torch.testing.assert_close(off_x, plain_x)
    torch.testing.assert_close(off_y, plain_y)
    return plain_x, plain_y


def test_slab_average_is_the_overlap_weighted_mean():
    stack = np.arange(10, dtype=np.int16)[:, None, None] * np.ones((1, 4, 4), np.int16) * 10
    volume = Volume(stack, (1.0, 1.0, 1.0))
    thick = appearance.thick_slices(volume, 2.5)
    # slab 0 covers [-0.5, 2.0): slices 0, 1 fully and half of slice 2 -> (0 + 10 + 0.5 * 20) / 2.5 = 8
    assert thick.shape == (4, 4, 4) and thick.spacing_mm == (1.0, 1.0, 2.5)
    # slab 1 covers [2.0, 4.5): half of slice 2, slices 3 and 4 -> (0.5 * 20 + 30 + 40) / 2.5 = 32
    assert thick.array[0, 0, 0] == 8 and thick.array[1, 0, 0] == 32
    assert thick.origin_lps[2] == pytest.approx(0.75)  # centre of [-0.5, 2.0)


@pytest.mark.parametrize("mm", [3.0, 5.0])
def test_thick_slices_keep_the_liver_in_place(patient, mm):
    p = patient("3Dircadb1.17")
    liver = p.mask("liver")
    thick = appearance.thick_slices(liver, mm, is_mask=True)
    ct = appearance.thick_slices(p.ct, mm)
    assert ct.same_grid(thick) and ct.spacing_mm[2] == mm
    assert thick.shape[0] * mm <= liver.shape[0] * liver.spacing_mm[2] + 1e-6
    ml = liver.array.sum() * liver.voxel_volume_ml
    assert thick.array.sum() * thick.voxel_volume_ml == pytest.approx(ml, rel=0.03)
    assert np.linalg.norm(_centroid_lps(thick) - _centroid_lps(liver)) < 1.0
    # averaging, not dropping: the thick CT's liver mean equals the thin CT's, its noise is lower
    thin_hu = p.ct.array[liver.array > 0]
    thick_hu = ct.array[thick.array > 0]
    assert abs(float(np.median(thick_hu)) - float(np.median(thin_hu))) < 5
    assert thick_hu.std() < thin_hu.std()


def test_thin_slices_keep_the_liver_in_place_and_carry_more_noise(patient):
    p = patient("3Dircadb1.17")
    liver = p.mask("liver")
    thin = appearance.thin_slices(liver, 0.8, is_mask=True)
    ct = appearance.thin_slices(p.ct, 0.8, np.random.default_rng(0))
    assert ct.same_grid(thin) and ct.spacing_mm == (*liver.spacing_mm[:2], 0.8)
    # the same stretch of the body, first slice centre to last: twice the slices less one
    assert thin.shape[0] == 2 * liver.shape[0] - 1 and np.allclose(thin.origin_lps, liver.origin_lps)
    ml = liver.array.sum() * liver.voxel_volume_ml
    assert thin.array.sum() * thin.voxel_volume_ml == pytest.approx(ml, rel=0.02)
    assert np.linalg.norm(_centroid_lps(thin) - _centroid_lps(liver)) < 0.5
    # every second thin slice lies on an acquired one: without the noise it is that slice
    quiet = appearance.thin_slices(p.ct, 0.8)
    np.testing.assert_array_equal(quiet.array[::2], p.ct.array)
    # thinner slices are noisier: 1.6 -> 0.8 mm doubles the noise variance, so the standard noise is added once
    added = (ct.array.astype(np.float32) - quiet.array)[thin.array > 0]
    assert abs(float(added.std()) - appearance.STANDARD_NOISE_HU) < 1.0 and abs(float(added.mean())) < 0.5
    assert _neighbour_difference_hu(ct, thin) > _neighbour_difference_hu(quiet, thin)
    with pytest.raises(ValueError, match="thinner"):
        appearance.thin_slices(p.ct, 2.0)


def test_in_plane_pixels_keep_the_field_of_view_and_the_liver(patient):
    p = patient("3Dircadb1.17")
    liver = p.mask("liver")
    coarse = appearance.in_plane_pixels(liver, 1.0, is_mask=True)
    assert coarse.spacing_mm[:2] == (1.0, 1.0) and coarse.shape[0] == liver.shape[0]
    for axis in (1, 2):  # field of view within one new pixel
        assert abs(coarse.shape[axis] * 1.0 - liver.shape[axis] * liver.spacing_mm[2 - axis]) <= 1.0
    ml = liver.array.sum() * liver.voxel_volume_ml
    assert coarse.array.sum() * coarse.voxel_volume_ml == pytest.approx(ml, rel=0.02)
    assert np.linalg.norm(_centroid_lps(coarse) - _centroid_lps(liver)) < 0.5


def _neighbour_difference_hu(ct: Volume, mask: Volume) -> float:
    """Std of the difference between horizontally neighbouring pixels well inside ``mask``: image noise and fine
    detail, which a coarse reconstruction averages away and an interpolation keeps."""
    a, m = ct.array.astype(np.float32), mask.array > 0
    inner = m[:, 1:-1, 1:-1] & m[:, :-2, 1:-1] & m[:, 2:, 1:-1] & m[:, 1:-1, :-2] & m[:, 1:-1, 2:]
    return float((a[:, 1:-1, 2:] - a[:, 1:-1, 1:-1])[inner].std())


def test_coarse_pixels_average_the_detail_away_and_keep_the_liver(patient):
    p = patient("3Dircadb1.17")
    liver, ct = p.mask("liver"), p.ct
    coarse, coarse_liver = appearance.coarse_pixels(ct, 3.0), appearance.coarse_pixels(liver, 3.0, is_mask=True)
    assert coarse.same_grid(coarse_liver) and coarse.spacing_mm[:2] == (3.0, 3.0) and coarse.shape[0] == ct.shape[0]
    assert coarse.array.dtype == ct.array.dtype
    for axis in (1, 2):  # field of view within one new pixel
        assert abs(coarse.shape[axis] * 3.0 - ct.shape[axis] * ct.spacing_mm[2 - axis]) <= 3.0
    ml = liver.array.sum() * liver.voxel_volume_ml
    assert coarse_liver.array.sum() * coarse_liver.voxel_volume_ml == pytest.approx(ml, rel=0.02)
    assert np.linalg.norm(_centroid_lps(coarse_liver) - _centroid_lps(liver)) < 1.0
    thin_hu = float(np.median(ct.array[liver.array > 0]))
    assert abs(float(np.median(coarse.array[coarse_liver.array > 0])) - thin_hu) < 5
    # area-averaged, unlike plain interpolation onto the same grid, which keeps the thin pixels' noise
    interpolated = appearance.in_plane_pixels(ct, 3.0)
    assert interpolated.same_grid(coarse)
    averaged = _neighbour_difference_hu(coarse, coarse_liver)
    kept = _neighbour_difference_hu(interpolated, coarse_liver)
    assert averaged < 0.75 * kept, (averaged, kept)
    with pytest.raises(ValueError, match="larger than the volume's"):
        appearance.coarse_pixels(ct, 0.5)


def test_coarse_pixel_augmentation_blurs_the_image_not_the_mask(patient):
    from training import train

    x, y = _liver_slices(patient, 4)
    still = STILL
    plain_x, plain_y = _still_and_off(x, y, "coarse_p")
    aug = {**still, "coarse_p": 1.0, "coarse_mm": [3.0, 3.0]}
    blurred_x, blurred_y = train.augment(x.clone(), y.clone(), aug, torch.Generator().manual_seed(0), 1.5)
    torch.testing.assert_close(blurred_y, plain_y)  # the mask stays where the liver is
    detail = float((plain_x[..., 1:] - plain_x[..., :-1]).abs().mean())
    left = float((blurred_x[..., 1:] - blurred_x[..., :-1]).abs().mean())
    assert left < 0.7 * detail, (left, detail)
    liver = plain_y[:, 0] > 0.5
    assert abs(float(blurred_x[:, 1][liver].mean() - plain_x[:, 1][liver].mean())) < 0.01  # HU level kept
    # coarser() of a flat image is the same flat image; a 1.5 mm target on the 1.5 mm grid leaves the image alone
    flat = torch.full((1, 3, 64, 64), 0.4)
    torch.testing.assert_close(train.coarser(flat, 2.0), flat)
    same_x, _ = train.augment(x.clone(), y.clone(), {**aug, "coarse_mm": [1.5, 1.5]}, torch.Generator().manual_seed(0))
    torch.testing.assert_close(same_x, plain_x)


def test_unenhanced_moves_enhanced_organs_and_leaves_air_fat_and_bone(patient):
    p = patient("3Dircadb1.1")  # has liver, spleen, kidneys, vessels and bone masks
    masks = appearance.masks_of(p)
    ct = p.ct.array
    plain = appearance.unenhanced(p.ct, masks, np.random.default_rng(0)).array
    median = {n: float(np.median(plain[masks[n] > 0])) for n in ("liver", "spleen", "portalvein", "rightkidney")}
    assert 50 <= median["liver"] <= 60 and 40 <= median["spleen"] <= 50
    vessels = np.logical_or.reduce([masks[n] > 0 for n in ("portalvein", "venoussystem", "artery")])
    assert 35 <= float(np.median(plain[vessels])) <= 45
    assert median["portalvein"] <= 50 < median["liver"]  # vessels darker than the liver, as without contrast
    assert 25 <= median["rightkidney"] <= 40
    for untouched in (ct < -900, (ct > -150) & (ct < -50), masks["bone"] > 0):
        np.testing.assert_array_equal(plain[untouched], ct[untouched])
    noise = plain[masks["liver"] > 0].std()
    assert 0.5 * ct[masks["liver"] > 0].std() < noise  # the noise added back keeps the texture


def test_dark_unenhanced_condition_sits_below_the_training_mapping(patient):
    from training import robustness

    p = patient("3Dircadb1.1")
    masks = appearance.masks_of(p)
    (_, standard, _), (_, dark, liver) = robustness.variants(p, ["unenhanced", "unenhanced_dark"])
    inside = liver.array > 0
    median = {n: float(np.median(dark.array[masks[n] > 0])) for n in ("liver", "spleen")}
    assert 40 <= median["liver"] <= 50 and 31 <= median["spleen"] <= 41  # appearance.DARK_UNENHANCED_HU
    assert median["spleen"] < median["liver"] < float(np.median(standard.array[inside])) - 5
    np.testing.assert_array_equal(dark.array[p.ct.array < -900], p.ct.array[p.ct.array < -900])


def test_varied_unenhanced_versions_span_fatty_to_normal_livers(patient):
    from LiverSegUNetLib.preprocess import Plan

    from training import train

    rng = np.random.default_rng(3)
    drawn = [appearance.varied_mapping(rng) for _ in range(200)]
    livers = np.array([m["targets"]["liver"] for m in drawn])
    assert 35 <= livers.min() < 40 and 60 < livers.max() <= 65  # fatty to normal
    assert any(m["targets"]["liver"] < m["targets"]["spleen"] for m in drawn)  # a fatty liver is darker
    assert all(0.45 <= m["contrast"] <= 0.75 and 0.15 <= m["pull"] <= 0.45 for m in drawn)
    plan = Plan(hu_min=0.0, hu_max=255.0, multiple=16)
    slices = train.PatientSlices(patient("3Dircadb1.17"), ["liver"], plan, unenhanced=True, varied=3)
    liver = slices.labels[:, 0] > 0.5
    versions = [slices.unenhanced, *slices.unenhanced_varied]
    medians = [float(v[liver].float().median()) * 255 for v in versions]
    assert len(medians) == 4 and medians[0] == pytest.approx(55, abs=3)  # the fixed mapping comes first
    assert all(33 <= m <= 67 for m in medians) and max(medians) - min(medians) > 3
    k = int(np.argmax(liver.sum(dim=(1, 2))))
    for version, median in enumerate(medians):
        x = slices.sample(k, 1, unenhanced=1.0, version=version)
        assert float(x[1][x[-1] > 0.5].median()) * 255 == pytest.approx(median, abs=6)
    aug = {"unenhanced_p": 1.0, "unenhanced_min": 1.0, "thick_p": 0.0, "thick_slices": [2], "unenhanced_varied": 3}
    xs, ys, _ = train.make_batch([slices], [(0, k)] * 24, plan, 512, np.random.default_rng(0), aug)
    seen = {round(float(xs[i, 1][ys[i, 0] > 0.5].median()) * 255) for i in range(24)}
    assert len(seen) >= 3  # the batch draws from the versions


def test_arterial_phase_darkens_the_liver_below_the_spleen_and_leaves_the_rest(patient):
    p = patient("3Dircadb1.1")  # has liver, spleen, kidneys, the three vessel masks and bone
    masks = appearance.masks_of(p)
    ct = p.ct.array
    from training import robustness

    (_, phase, liver) = next(robustness.variants(p, ["arterial"]))
    out = phase.array
    assert phase.same_grid(p.ct) and np.array_equal(liver.array, masks["liver"])

    def median(name):
        inside = (masks[name] > 0) & (ct > appearance.FAT_HU) & (masks["bone"] == 0)
        return float(np.median(out[inside]))

    assert median("liver") == pytest.approx(75, abs=2)  # appearance.ARTERIAL_HU, from about 112
    assert median("spleen") == pytest.approx(120, abs=2) and median("artery") == pytest.approx(300, abs=2)
    assert median("portalvein") == pytest.approx(140, abs=2) and median("venoussystem") == pytest.approx(60, abs=2)
    assert median("venoussystem") < median("liver") < median("spleen") < median("portalvein") < median("artery")
    tumours = np.logical_or.reduce([p.mask(n).array > 0 for n in p.organs if n.startswith("livertumor")])
    inside = (masks["liver"] > 0) & ~tumours
    assert float(np.median(out[tumours & (masks["liver"] > 0)])) < float(np.median(out[inside])) - 10  # still darker
    labelled = np.logical_or.reduce([m > 0 for n, m in masks.items() if n != "bone"])
    for untouched in (ct < -900, (ct > -150) & (ct < -50), masks["bone"] > 0, ~labelled):
        np.testing.assert_array_equal(out[untouched], ct[untouched])  # air, fat, bone, unlabelled tissue


def test_arterial_training_versions_vary_and_blend_in_for_samples_with_contrast(patient, msd_root):
    from LiverSegUNetLib.preprocess import Plan

    from training import train

    rng = np.random.default_rng(5)
    drawn = [appearance.varied_arterial(rng) for _ in range(200)]
    livers = np.array([m["targets"]["liver"] for m in drawn])
    assert 60 <= livers.min() < 65 and 85 < livers.max() <= 90
    assert all(m["targets"]["liver"] < m["targets"]["spleen"] < m["targets"]["arteries"] for m in drawn)
    assert np.mean([m["targets"]["veins"] < m["targets"]["liver"] for m in drawn]) > 0.75  # mostly unopacified
    plan = Plan(hu_min=0.0, hu_max=255.0, multiple=16)
    slices = train.PatientSlices(patient("3Dircadb1.7"), ["liver"], plan, unenhanced=True, arterial=2)
    liver = slices.labels[:, 0] > 0.5
    native = float(slices.images[liver].float().median()) * 255
    medians = [float(v[liver].float().median()) * 255 for v in slices.arterial]
    assert len(medians) == 2 and native > 110 and all(57 <= m <= 93 for m in medians)
    assert abs(medians[0] - medians[1]) > 1  # each version its own values
    k = int(np.argmax(liver.sum(dim=(1, 2))))
    x = slices.sample(k, 1, arterial=1.0, arterial_version=1)
    assert float(x[1][x[-1] > 0.5].median()) * 255 == pytest.approx(medians[1], abs=6)
    half = slices.sample(k, 1, arterial=0.5, arterial_version=1)
    torch.testing.assert_close(half[:-1], (slices.sample(k, 1)[:-1] + x[:-1]) / 2, atol=1e-3, rtol=0)

    aug = {"unenhanced_p": 0.5, "unenhanced_min": 1.0, "thick_p": 0.0, "thick_slices": [2]}
    aug |= {"arterial_p": 1.0, "arterial_min": 1.0}
    xs, ys, _ = train.make_batch([slices], [(0, k)] * 40, plan, 512, np.random.default_rng(0), aug)
    seen = np.array([float(xs[i, 1][ys[i, 0] > 0.5].median()) * 255 for i in range(40)])
    # contrast removed (about 55 HU) or arterial (one of the versions), never both, never the plain CT
    assert all(abs(m - 55) < 6 or min(abs(m - a) for a in medians) < 6 for m in seen)
    assert (seen < 62).any() and (seen > 62).any() and (seen < native - 20).all()

    extra = train.ExtraSlices(msd_root, plan, 1.5, arterial=1)
    mask = extra.labels[:, 0] > 0.5
    before, after = extra.images.float(), extra.arterial[0].float()
    assert float(after[mask].median()) < float(before[mask].median()) - 0.05  # the liver darker
    away = extra.labels[:, 0] == 0  # no liver anywhere under the pixel
    np.testing.assert_array_equal(after[away].numpy(), before[away].numpy())  # nothing else changes
    extra.drop_cases(extra.cases[:1])
    assert extra.arterial[0].shape == extra.images.shape


def test_fresh_unenhanced_samples_cover_the_range_and_match_the_precomputed_mapping(patient):
    """``unenhanced_fresh``: each contrast-free sample is mapped on the fly. The standard mapping lands where the
    precomputed one does; a mapping drawn for a sample puts the liver at its own target, so a batch spans the
    fatty-to-normal range instead of a patient's three fixed versions; bone, air and the labels are untouched."""
    from LiverSegUNetLib.preprocess import Plan

    from training import train

    plan = Plan(hu_min=0.0, hu_max=255.0, multiple=16)
    kept = train.PatientSlices(patient("3Dircadb1.17"), ["liver"], plan, unenhanced=True, varied=0)
    fresh = train.PatientSlices(patient("3Dircadb1.17"), ["liver"], plan, unenhanced=True, varied=3, fresh=True)
    assert fresh.unenhanced is None and fresh.unenhanced_varied == []  # nothing precomputed
    assert fresh.contrast_free.structures.shape == fresh.images.shape
    liver = fresh.labels[:, 0] > 0.5
    k = int(np.argmax(liver.sum(dim=(1, 2))))
    rng = np.random.default_rng(0)

    def liver_hu(x):
        return float(x[1][x[-1] > 0.5].median()) * 255

    standard = fresh.sample(k, 1, unenhanced=1.0, mapping={}, rng=rng)
    assert liver_hu(standard) == pytest.approx(liver_hu(kept.sample(k, 1, unenhanced=1.0)), abs=2)
    assert liver_hu(standard) == pytest.approx(appearance.UNENHANCED_HU["liver"], abs=3)
    torch.testing.assert_close(standard[3:], fresh.sample(k, 1)[3:])  # the labels stay
    enhanced = fresh.sample(k, 1)
    bone = fresh.contrast_free.structures[k] == train.ContrastFree.KEEP
    air = enhanced[1] == 0
    for target in (36.0, 64.0):
        mapping = {**appearance.varied_mapping(rng), "targets": {**appearance.UNENHANCED_HU, "liver": target}}
        x = fresh.sample(k, 1, unenhanced=1.0, version=1, mapping=mapping, rng=rng)
        assert liver_hu(x) == pytest.approx(target, abs=3)
        torch.testing.assert_close(x[1][bone | air], enhanced[1][bone | air])
    aug = {"unenhanced_p": 1.0, "unenhanced_min": 1.0, "thick_p": 0.0, "thick_slices": [2]}
    aug |= {"unenhanced_varied": 3, "unenhanced_fresh": True}
    xs, ys, _ = train.make_batch([fresh], [(0, k)] * 32, plan, 512, np.random.default_rng(0), aug)
    seen = sorted(float(xs[i, 1][ys[i, 0] > 0.5].median()) * 255 for i in range(32))
    assert seen[0] < 42 and seen[-1] > 58  # fatty and normal livers in one batch
    assert len({round(v) for v in seen}) >= 12  # not a few fixed versions


def test_low_dose_adds_the_stated_noise_reproducibly(patient):
    ct = patient("3Dircadb1.17").ct
    a = appearance.low_dose(ct, np.random.default_rng(1))
    b = appearance.low_dose(ct, np.random.default_rng(1))
    np.testing.assert_array_equal(a.array, b.array)
    inside = (ct.array > -900) & (ct.array < 1000)
    diff = a.array[inside].astype(np.float32) - ct.array[inside]
    assert abs(diff.mean()) < 1 and diff.std() == pytest.approx(appearance.LOW_DOSE_NOISE_HU, rel=0.08)


def test_sharp_kernel_raises_fine_detail_in_plane_and_keeps_levels_and_geometry(patient):
    """The sharp-kernel variant keeps every organ's level and the grid, triples the pixel-scale noise inside
    the liver and never mixes slices."""
    p = patient("3Dircadb1.17")
    ct, liver = p.ct, appearance.masks_of(p)["liver"].astype(bool)
    sharp = appearance.sharp_kernel(ct)
    assert sharp.shape == ct.shape and sharp.spacing_mm == ct.spacing_mm
    np.testing.assert_allclose(sharp.origin_lps, ct.origin_lps)

    def fine(a):  # each pixel minus the mean of its 3x3 neighbourhood, inside the liver away from its border
        a = a.astype(np.float32)
        local = sum(np.roll(a, (i, j), (1, 2)) for i in (-1, 0, 1) for j in (-1, 0, 1)) / 9
        return (a - local)[liver & np.roll(liver, 8, 1) & np.roll(liver, -8, 1) & np.roll(liver, 8, 2)]

    assert abs(float(np.median(sharp.array[liver])) - float(np.median(ct.array[liver]))) <= 2
    assert 2.5 < fine(sharp.array).std() / fine(ct.array).std() < 3.5
    one = Volume(np.zeros((5, 32, 32), np.int16), (0.7, 0.7, 1.6))
    one.array[2, 16, 16] = 1000
    spread = appearance.sharp_kernel(one).array
    assert spread[2, 16, 16] > 1000 and spread[2, 16, 17] < 0  # overshoot and a dark rim, as sharp kernels show
    assert not spread[[0, 1, 3, 4]].any()  # in plane only
    flat = Volume(np.full((3, 16, 16), 60, np.int16), (0.7, 0.7, 1.6))
    np.testing.assert_array_equal(appearance.sharp_kernel(flat).array, flat.array)


def test_training_samples_blend_the_unenhanced_slices_and_average_slabs(patient):
    from LiverSegUNetLib.preprocess import Plan

    from training import train

    plan = Plan(hu_min=0.0, hu_max=255.0, multiple=16)
    slices = train.PatientSlices(patient("3Dircadb1.7"), ["liver"], plan, unenhanced=True)
    k = int(np.argmax(slices.labels[:, 0].float().sum(dim=(1, 2))))  # the slice with the most liver
    native, plain = slices.sample(k, 1), slices.sample(k, 1, unenhanced=1.0)
    half = slices.sample(k, 1, unenhanced=0.5)
    liver = native[-1] > 0.5
    assert plain[1][liver].mean() < native[1][liver].mean() - 0.1  # ~115 HU -> ~55 HU in the 0..255 window
    torch.testing.assert_close(half[:-1], (native[:-1] + plain[:-1]) / 2, atol=1e-3, rtol=0)
    slab = slices.sample(k, 1, slab=3)
    images = slices.images.float()
    torch.testing.assert_close(slab[1], images[k - 1 : k + 2].mean(0))  # centre channel: slices k-1..k+1
    torch.testing.assert_close(slab[0], images[k - 4 : k - 1].mean(0))  # neighbour: one slab (3 slices) away
    assert 0 <= float(slab[-1].min()) and float(slab[-1].max()) <= 1


def test_coronal_and_sagittal_slices_keep_the_liver_in_mm_and_its_contrast_free_version(patient):
    """``train.ViewSlices``: slices across the patient's volume, resampled to 1.5 mm in every direction. The liver
    spans as many mm along the body axis in them as over the axial slices (1.6 mm apart), its label lies on the
    image's liver in the native and the contrast-free version alike, and neither the grid's padding nor a slab
    becomes a slice."""
    from LiverSegUNetLib.preprocess import Plan

    from training import train

    plan = Plan(hu_min=0.0, hu_max=255.0, multiple=16)
    base = train.PatientSlices(patient("3Dircadb1.17"), ["liver"], plan, unenhanced=True, varied=1)
    sets = train.ViewSlices.of_patient(base, ["axial", "coronal", "sagittal"], plan.spacing_mm)
    assert [s.name for s in sets] == ["3Dircadb1.17 coronal", "3Dircadb1.17 sagittal"]
    assert tuple(s.count for s in sets) == base.grid.size and base.grid.size != base.grid.padded
    axial = torch.nonzero((base.labels[:, 0] > 0.5).flatten(1).any(1)).flatten()
    axial_mm = (axial[-1] - axial[0] + 1) * base.spacing_k
    for view in sets:
        rows = torch.nonzero((view.labels[:, 0] > 0.5).any(0).any(1)).flatten()  # along the body axis
        assert abs((rows[-1] - rows[0] + 1) * plan.spacing_mm - axial_mm) <= 2 * base.spacing_k
        k = int(view.labels[: view.count, 0].float().sum(dim=(1, 2)).argmax())
        native, plain = view.sample(k, 1), view.sample(k, 1, unenhanced=1.0)
        varied = view.sample(k, 1, unenhanced=1.0, version=1)
        liver = native[-1] > 0.5
        assert liver.sum() > 500 and 0.35 < float(native[1][liver].median()) < 0.7  # enhanced, 90-180 HU
        assert float(plain[1][liver].median()) < float(native[1][liver].median()) - 0.1  # ~55 HU
        assert not torch.equal(varied[1], plain[1])  # the varied version is sliced as well
        torch.testing.assert_close(view.sample(k, 1, slab=3), native)  # slabs thicken axial slices only
        last = view.sample(view.count - 1, 1)
        torch.testing.assert_close(last[2], last[1])  # the neighbour past the last slice repeats it, not padding
    rng = np.random.default_rng(0)
    assert train.other_view((0, 5), [[3, 4]], [base, None, None, *sets], 0.0, rng) == (0, 5)
    drawn = [train.other_view((0, 5), [[2, 3]], [base, None, *sets], 1.0, rng) for _ in range(40)]
    assert {p for p, _ in drawn} == {2, 3} and all(0 <= k < sets[p - 2].count for p, k in drawn)


def test_the_mask_free_pull_lowers_enhanced_tissue_and_leaves_fat_and_air(patient):
    from LiverSegUNetLib.preprocess import Plan

    from training import train

    plan = Plan(hu_min=0.0, hu_max=255.0, multiple=16)  # the shipped window: 0..1 is 0..255 HU
    slices = train.PatientSlices(patient("3Dircadb1.1"), ["liver"], plan)
    k = int(np.argmax(slices.labels[:, 0].float().sum(dim=(1, 2))))
    native = slices.sample(k, 1)
    x, liver = native[:3], native[-1] > 0.5
    pulled = train.pulled_down(x, plan, 40.0, 0.5)
    hu = lambda t: float(t[1][liver].mean()) * 255  # noqa: E731
    assert hu(x) > 90 and hu(pulled) == pytest.approx(40 + 0.5 * (hu(x) - 40), abs=2)  # the enhanced liver halfway down
    low = x <= 40 / 255  # fat, air, water: left as they were
    assert low.float().mean() > 0.3 and torch.equal(pulled[low], x[low])
    assert torch.all(pulled[~low] < x[~low]) and torch.all(pulled[~low] > 40 / 255)  # order kept, none below 40 HU
    aug = {"unenhanced_p": 0.0, "thick_p": 0.0, "thick_slices": [2], "pull_p": 1.0, "pull_hu": 40.0, "pull_min": 0.2}
    batch = [(0, k)] * 40
    xs, ys, _ = train.make_batch([slices], batch, plan, 512, np.random.default_rng(0), aug)
    inside = ys[:, 0] > 0.5
    means = torch.stack([xs[i, 1][inside[i]].mean() for i in range(len(batch))]) * 255
    assert float(means.max()) < hu(x) and float(means.min()) > 40 and float(means.std()) > 5  # random, all lowered
    aug["pull_p"] = 0.0
    xs, ys, _ = train.make_batch([slices], batch, plan, 512, np.random.default_rng(0), aug)
    assert float(xs[0, 1][ys[0, 0] > 0.5].mean()) * 255 == pytest.approx(hu(x), abs=0.5)


def _painted_in_a_batch(slices, k: int, plan, aug: dict, switch: str):
    """Sample ``k`` drawn by ``make_batch`` with the painting augmentation ``switch`` (``lesion_p`` or ``mass_p``)
    off and on. Off, the images and random stream are those of a config without it; on, the labels are unchanged.
    Returns the pixels the painting moved and the labels."""
    from training import train

    base = {"unenhanced_p": 0.0, "thick_p": 0.0, "thick_slices": [2], **aug}

    def batch(p: float):
        return train.make_batch([slices], [(0, k)], plan, 512, np.random.default_rng(0), {**base, switch: p})

    plain_x, plain_y, _ = train.make_batch([slices], [(0, k)], plan, 512, np.random.default_rng(0), base)
    torch.testing.assert_close(batch(0.0)[0], plain_x)  # switched off: the random stream and images of before
    painted_x, painted_y, _ = batch(1.0)
    torch.testing.assert_close(painted_y, plain_y)
    return (painted_x != plain_x).any(1)[0], plain_y


def test_synthetic_lesions_darken_the_liver_inside_its_mask_and_nothing_else(patient):
    from LiverSegUNetLib.preprocess import Plan

    from training import train

    plan = Plan(hu_min=0.0, hu_max=255.0, multiple=16)
    slices = train.PatientSlices(patient("3Dircadb1.7"), ["liver"], plan)  # a liver without tumours of its own
    k = int(np.argmax(slices.labels[:, 0].float().sum(dim=(1, 2))))
    native = slices.sample(k, 1)
    x, liver = native[:3], native[-1] > 0.5
    aug = {"lesion_count": 3, "lesion_mm": [8.0, 20.0], "lesion_hu": [-60.0, -60.0]}
    painted = train.with_lesions(x, liver, plan, np.random.default_rng(0), aug)
    changed = (painted != x).any(0)
    assert torch.equal(painted[:, ~liver], x[:, ~liver])  # nothing outside the liver moves
    area = float(changed.sum()) * plan.spacing_mm**2
    assert 100 < area < 3 * math.pi * 20.0**2 * 1.3**2, area  # one to three lesions of 8-20 mm radius
    level = float(x[1][liver].median()) * 255
    core = painted[1][changed] * 255
    assert float(core.min()) < level - 40 and float(core.mean()) < level - 15  # darker than the liver around it
    assert torch.equal(painted[0] != x[0], changed) and torch.equal(painted[2] != x[2], changed)  # every channel
    # with a margin, every lesion keeps liver all around it: nothing changes within 5 mm of the liver's border
    depth = train.depth_inside(liver, 40)
    assert float(depth.max()) > 20  # the deepest point of this liver: over 30 mm inside
    for seed in range(5):
        inner = train.with_lesions(x, liver, plan, np.random.default_rng(seed), {**aug, "lesion_margin_mm": 5.0})
        moved = (inner != x).any(0)
        assert moved.sum() > 50 and float(depth[moved].min()) >= 3  # 3 pixels of 1.5 mm: nothing in the rim
    # in a batch: the labels stay as they were (a lesion inside the liver is liver), the image changes only there
    moved, plain_y = _painted_in_a_batch(slices, k, plan, aug, "lesion_p")
    assert moved.any() and not (moved & (plain_y[0, 0] <= 0.5)).any()


def test_synthetic_masses_darken_tissue_beside_the_liver_and_never_a_labelled_structure(patient):
    from LiverSegUNetLib.preprocess import Plan

    from training import train

    plan = Plan(hu_min=0.0, hu_max=255.0, multiple=16)
    slices = train.PatientSlices(patient("3Dircadb1.1"), ["liver", "spleen"], plan)
    k = int(np.argmax(slices.labels[:, 0].float().sum(dim=(1, 2)) * slices.labels[:, 1].float().sum(dim=(1, 2))))
    native = slices.sample(k, 1)
    x, labels = native[:3], native[3:]
    liver, labelled = labels[0] > 0.5, (labels > 0.5).any(0)
    assert (labels[1] > 0.5).sum() > 100  # a slice showing the spleen too: masses must stay off it
    aug = {"mass_count": 2, "mass_mm": [8.0, 35.0], "mass_hu": [-60.0, -60.0]}
    level = float(x[1][liver].median()) * 255
    ring = train.depth_inside(~liver, 2) == 1  # the pixels just outside the liver's contour
    for seed in range(6):
        painted = train.with_masses(x, labels, plan, np.random.default_rng(seed), aug)
        changed = (painted != x).any(0)
        assert torch.equal(painted[:, labelled], x[:, labelled])  # no labelled structure moves, the liver least
        assert (changed & ring).sum() > 5  # the masses reach the liver's contour
        area = float(changed.sum()) * plan.spacing_mm**2
        assert 100 < area < 2 * math.pi * 35.0**2 * 1.3**2, area  # one or two masses of 8-35 mm radius
        core = painted[1][changed & (painted[1] < x[1])] * 255
        assert float(core.median()) == pytest.approx(level - 60, abs=20)  # at the value asked, below the liver
        assert torch.equal(painted[0] != x[0], changed) and torch.equal(painted[2] != x[2], changed)
    # absolute values: fluid beside the liver stays fluid whatever the liver shows
    fluid = train.with_masses(
        x, labels, plan, np.random.default_rng(0), {**aug, "mass_hu": [20.0, 20.0], "mass_absolute": True}
    )
    moved = (fluid != x).any(0)
    assert float((fluid[1][moved & (fluid[1] < x[1])] * 255).median()) == pytest.approx(20, abs=10)
    # no liver in the slice: nothing to stand beside, nothing painted
    empty = torch.zeros_like(labels)
    torch.testing.assert_close(train.with_masses(x, empty, plan, np.random.default_rng(0), aug), x)
    # in a batch: the labels are those of before (a mass is background), the image changes only outside them
    moved, plain_y = _painted_in_a_batch(slices, k, plan, aug, "mass_p")
    assert moved.any() and not (moved & (plain_y[0] > 0.5).any(0)).any()


def test_elastic_deformation_bends_image_and_mask_together(patient):
    from training import train

    x, y = _liver_slices(patient, 4)
    still = STILL
    same_x, same_y = train.augment(x.clone(), y.clone(), {**still, "elastic": 0.0}, torch.Generator().manual_seed(0))
    torch.testing.assert_close(same_y, y, atol=1e-4, rtol=0)  # no deformation: the identity
    bent_x, bent_y = train.augment(x.clone(), y.clone(), {**still, "elastic": 0.05}, torch.Generator().manual_seed(0))
    liver = y[0, 0] > 0.5
    changed = [float(((bent_y[i, 0] > 0.5) ^ liver).float().sum() / liver.sum()) for i in range(4)]
    assert all(0.02 < c < 0.6 for c in changed), changed  # the liver moves, but stays a liver-sized region
    assert len({round(c, 4) for c in changed}) == 4  # each sample gets its own field
    # the mask follows the image: a resampled image of the liver keeps its liver HU inside the bent mask
    for i in range(4):
        inside = bent_y[i, 0] > 0.9
        ref = x[0, 1][liver].mean()
        assert abs(float(bent_x[i, 1][inside].mean() - ref)) < 0.03
    field = train.elastic_field(2, (192, 192), 0.05, 5, torch.Generator().manual_seed(1))
    assert field.shape == (2, 192, 192, 2)
    step = (field[:, 1:] - field[:, :-1]).abs().max()
    assert float(step) < 0.05 * float(field.abs().max())  # smooth: neighbouring pixels move together


def test_aspect_ratio_stretches_image_and_mask_alike(patient):
    from training import train

    x, y = _liver_slices(patient, 8)
    still = STILL
    _still_and_off(x, y, "aspect")

    def shape(mask):  # (width / height of the liver's bounding box, its area in pixels)
        rows, cols = np.nonzero(mask.numpy() > 0.5)
        return (np.ptp(cols) + 1) / (np.ptp(rows) + 1), int(rows.size)

    ratio0, area0 = shape(y[0, 0])
    aug = {**still, "aspect": 0.2}
    bent_x, bent_y = train.augment(x.clone(), y.clone(), aug, torch.Generator().manual_seed(0))
    changes = []
    for i in range(8):
        ratio, area = shape(bent_y[i, 0])
        changes.append(ratio / ratio0)
        assert abs(area / area0 - 1) < 0.03  # the area is kept: only the proportions change
        inside = bent_y[i, 0] > 0.9  # the image follows the mask: liver HU inside the stretched mask
        assert abs(float(bent_x[i, 1][inside].mean() - x[0, 1][y[0, 0] > 0.5].mean())) < 0.03
    assert all(1 / 1.25 < c < 1.25 for c in changes), changes  # within the configured 1/1.2 .. 1.2 (and pixels)
    assert min(changes) < 0.95 and max(changes) > 1.05, changes  # both wider and taller bodies are drawn


def test_gamma_curve_moves_the_soft_tissue_and_keeps_the_window_ends_and_the_mask(patient):
    from training import train

    x, y = _liver_slices(patient, 4)
    plain_x, plain_y = _still_and_off(x, y, "gamma_p")
    liver = plain_y[:, 0] > 0.5
    level = {}
    for gamma in (0.7, 1.5):
        aug = {**STILL, "gamma_p": 1.0, "gamma": [gamma, gamma]}
        curved_x, curved_y = train.augment(x.clone(), y.clone(), aug, torch.Generator().manual_seed(0))
        torch.testing.assert_close(curved_y, plain_y)  # the mask stays where the liver is
        torch.testing.assert_close(curved_x, plain_x.pow(gamma))
        assert torch.equal(curved_x == 0, plain_x == 0) and torch.equal(curved_x == 1, plain_x == 1)  # fat, bone
        level[gamma] = float(curved_x[:, 1][liver].median()) * 255  # the window is 0..255 HU
    enhanced = float(plain_x[:, 1][liver].median()) * 255
    assert 90 < enhanced < 140 and level[0.7] > enhanced + 20 and level[1.5] < enhanced - 30, (enhanced, level)
    # the order of the values is kept: a darker pixel stays darker
    order = plain_x[0, 1].flatten().argsort()
    curved = train.augment(x.clone(), y.clone(), {**STILL, "gamma_p": 1.0, "gamma": [1.5, 1.5]}, torch.Generator())[0]
    assert bool((curved[0, 1].flatten()[order].diff() >= 0).all())
    # with gamma_p < 1 some samples are curved and the rest are as before, each curved by its own exponent
    aug = {**STILL, "gamma_p": 0.5, "gamma": [0.7, 1.5]}
    some_x, _ = train.augment(x.repeat(4, 1, 1, 1), y.repeat(4, 1, 1, 1), aug, torch.Generator().manual_seed(3))
    same = [torch.equal(some_x[i], plain_x[0]) for i in range(16)]
    assert 0 < sum(same) < 16, same
    exponents = {
        round(float(some_x[i, 1][liver[0]].median().log() / plain_x[0, 1][liver[0]].median().log()), 3)
        for i in range(16)
        if not same[i]
    }
    assert len(exponents) == 16 - sum(same) and all(0.69 < g < 1.51 for g in exponents), exponents


def test_unenhanced_share_is_drawn_from_the_configured_range():
    from training import train

    class Sample:
        available = torch.ones(1, dtype=torch.bool)

        def sample(self, k, context, unenhanced=0.0, slab=1, version=0, mapping=None, rng=None, *arterial):
            return torch.full((2 * context + 2, 4, 4), unenhanced)

    from LiverSegUNetLib.preprocess import Plan

    plan = Plan(hu_min=0.0, hu_max=255.0, multiple=16)
    aug = {"unenhanced_p": 1.0, "unenhanced_min": 0.6, "thick_p": 0.0, "thick_slices": [2]}
    x, _, _ = train.make_batch([Sample()], [(0, 0)] * 200, plan, 4, np.random.default_rng(0), aug)
    shares = x[:, 0, 0, 0]
    assert float(shares.min()) >= 0.6 and float(shares.max()) <= 1.0 and float(shares.std()) > 0.05


def _robustness(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m training.robustness ARGS`` from the repository root."""
    cmd = [sys.executable, "-m", "training.robustness", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_robustness_refuses_an_output_folder_that_does_not_exist_before_scoring(tmp_path):
    out = tmp_path / "missing" / "robustness.json"
    proc = _robustness("--model", str(DEFAULT_MODEL), "--conditions", "native", "-o", str(out), timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and str(out.parent) in proc.stderr
    assert not out.parent.exists()


def test_robustness_command_end_to_end(ircadb_root, tmp_path):
    """One patient, one condition, the bundled model: the command's JSON and table."""
    out = tmp_path / "robustness.json"
    proc = _robustness(
        "--model", str(DEFAULT_MODEL), "--patients", "3Dircadb1.17", "--conditions", "thick_5mm",
        "--data", str(ircadb_root.parent), "-o", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    dice = result["results"][json.loads(DEFAULT_MODEL.read_text())["model_id"]]["thick_5mm"]["3Dircadb1.17"]
    assert 0.8 < dice <= 1
    table = out.with_suffix(".md").read_text()
    assert "| thick_5mm |" in table and "not held out" in table


def test_explain_names_the_expert_structures_on_the_patients_own_grid(ircadb_root, patient):
    """``--explain`` runs end to end; its map of the expert's other structures holds each mask but the liver and
    the body, by the expert's own names, and is dropped for a variant on another grid."""
    from training import robustness

    p = patient("3Dircadb1.7")
    label_map, names = robustness.expert_map(p)
    assert "tumor" in names and "spleen" in names and not {"liver", "skin"} & set(names)
    tumor = p.mask("tumor").array > 0
    labelled = label_map == names.index("tumor") + 1
    assert not (labelled & ~tumor).any()  # only inside its mask; the masks drawn after it may take a little of it
    assert np.count_nonzero(labelled) > 0.9 * np.count_nonzero(tumor)
    thick = appearance.thick_slices(p.ct, 5.0)
    assert robustness._on_grid(None, (label_map, names), p.ct, thick) == (None, None)
    assert robustness._on_grid(None, (label_map, names), p.ct, p.ct)[1][0] is label_map
    proc = _robustness(
        "--model", str(DEFAULT_MODEL), "--patients", "3Dircadb1.17", "--conditions", "native", "--explain",
        "--data", str(ircadb_root.parent),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if "3Dircadb1.17 native: Dice" in x)
    assert "reference median" in line and "% in its tumours of " in line


def test_test_time_augmentations_average_views_of_the_same_slices(patient):
    """Flip TTA is mirror-symmetric; scale TTA keeps the slice's pixels (any size, not only multiples of the
    network's), agrees with the plain network on the liver, and with the zoom 1 alone is the plain network."""
    from LiverSegUNetLib.inference import prepare_slices
    from LiverSegUNetLib.preprocess import Reorientation, SliceGrid
    from LiverSegUNetLib.runtime import runtime_network
    from LiverSegUNetLib.weights import load_model

    from training import robustness

    model = load_model(DEFAULT_MODEL, device="cpu")
    ct = patient("3Dircadb1.1").ct
    reorient = Reorientation(ct)
    grid = SliceGrid.for_slices(ct.shape[1:], reorient.spacing(ct)[:2], model.plan)
    slices = prepare_slices(torch.from_numpy(np.ascontiguousarray(reorient.forward(ct.array[60:63]))), grid, model.plan)
    x = slices[None, :, 8:-8, 4:-4]  # 3 slices as channels, sides no longer multiples of 32
    assert x.shape[-2] % 32 and x.shape[-1] % 32
    plain = runtime_network(model.network, "cpu")
    with torch.inference_mode(), plain.autocast:
        x = x.to(plain.dtype)
        padded = torch.nn.functional.pad(x, (0, -x.shape[-1] % 32, 0, -x.shape[-2] % 32))  # as inference pads
        reference = plain.run(padded)[..., : x.shape[-2], : x.shape[-1]].float()
        alone = robustness.scale_tta(model.network, "cpu", scales=(1.0,)).run(x).float()
        zoomed = robustness.scale_tta(model.network, "cpu").run(x).float()
        flipped = robustness.flip_tta(model.network, "cpu")
        mirror = flipped.run(padded).float()
        mirror_of_mirror = flipped.run(padded.flip(-1)).float().flip(-1)
    torch.testing.assert_close(alone, reference)
    assert zoomed.shape == reference.shape and not torch.equal(zoomed, reference)
    liver, averaged = reference > 0, zoomed > 0
    assert liver.sum() > 1000  # a slice through the liver
    assert 2 * (liver & averaged).sum() / (liver.sum() + averaged.sum()) > 0.95
    torch.testing.assert_close(mirror, mirror_of_mirror, atol=0.05, rtol=0)


def test_robustness_scores_fold_ensembles(ircadb_root, tmp_path):
    """``--ensemble A+B`` builds each fold's ensemble; the bundled model twice scores as the model alone. A
    model with a fold run that trained on its held-out patient's own extra slices is marked, also after a
    merge."""
    import shutil

    fold = tmp_path / "runs" / "3Dircadb1.17"
    card = json.loads(DEFAULT_MODEL.read_text())
    trained = {k: v for k, v in card["provenance"].items() if k != "extra_2d_left_out"}
    card["provenance"] = {**trained, "test_patients": ["3Dircadb1.17"], "extra_2d_slices": 638}
    for experiment in ("a", "b"):
        (fold / experiment).mkdir(parents=True)
        for f in model_files(DEFAULT_MODEL)[1:]:  # the weights the card runs (and an ensemble card it shares them with)
            shutil.copy(f, fold / experiment / f.name)
        left_out = {"extra_2d_left_out": {"10067": "3Dircadb1.17"}} if experiment == "a" else {}
        (fold / experiment / "model.json").write_text(json.dumps({**card, "provenance": card["provenance"] | left_out}))
    out = tmp_path / "robustness.json"
    common = ["--conditions", "thick_5mm", "--data", str(ircadb_root.parent)]
    args = ["--runs", str(tmp_path / "runs"), "--experiments", "a", "--ensemble", "a+b", *common, "-o", str(out)]
    proc = _robustness(*args)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"a", "ensemble:a+b"}
    single, pair = results["a"]["thick_5mm"]["3Dircadb1.17"], results["ensemble:a+b"]["thick_5mm"]["3Dircadb1.17"]
    assert 0.8 < single and pair == pytest.approx(single, abs=0.002)
    proc = _robustness(*args[:2], "--experiments", "b", *common, "-o", str(out), "--merge")
    assert proc.returncode == 0, proc.stderr
    merged = json.loads(out.read_text())
    assert set(merged["results"]) == {"a", "ensemble:a+b", "b"} and merged["clean"] == ["a"]
    table = out.with_suffix(".md").read_text()
    assert "**a**\n" in table and "**b** †\n" in table and "**ensemble:a+b** †\n" in table
    assert "† Scored with fold models trained before runs left out" in table
    # a model scored on another condition keeps its earlier one; the others stay as they were
    other = ["--conditions", "native", "--data", str(ircadb_root.parent)]
    proc = _robustness(*args[:2], "--experiments", "a", *other, "-o", str(out), "--merge")
    assert proc.returncode == 0, proc.stderr
    again = json.loads(out.read_text())
    assert again["conditions"] == ["native", "thick_5mm"] and set(again["results"]["a"]) == {"native", "thick_5mm"}
    assert again["results"]["a"]["thick_5mm"] == merged["results"]["a"]["thick_5mm"]
    assert again["results"]["b"] == merged["results"]["b"] and again["clean"] == ["a"]
    assert again["results"]["a"]["native"]["3Dircadb1.17"] > 0.8
    b_table = out.with_suffix(".md").read_text().split("**b** †\n", 1)[1].split("**", 1)[0]
    assert "| thick_5mm |" in b_table and "| native |" not in b_table
    proc = _robustness("--runs", str(tmp_path / "runs"), "--ensemble", "a+c", *common)
    assert proc.returncode != 0 and "no fold" in proc.stderr and "'c'" in proc.stderr


def test_robustness_scores_other_thresholds(ircadb_root, tmp_path):
    """``--thresholds`` scores the model once per threshold (``id@t``); a wider threshold gives another mask,
    and a threshold outside 0..1 is refused before anything runs; ``--openings`` likewise per cut radius,
    ``--views`` per set of directions, ``--floors`` per liver floor and ``--slices`` per slice distance."""
    out = tmp_path / "robustness.json"
    common = ["--model", str(DEFAULT_MODEL), "--patients", "3Dircadb1.17", "--conditions", "native"]
    common += ["--data", str(ircadb_root.parent)]
    proc = _robustness(*common, "--thresholds", "0.02,0.5", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    model_id = json.loads(DEFAULT_MODEL.read_text())["model_id"]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {f"{model_id}@0.02", f"{model_id}@0.5"}
    low, card = (results[f"{model_id}@{t}"]["native"]["3Dircadb1.17"] for t in ("0.02", "0.5"))
    assert 0.85 < card <= 1 and low < card - 0.005  # almost every doubtful pixel kept: more false positives
    proc = _robustness(*common, "--thresholds", "0.5,1.5", timeout=60)
    assert proc.returncode != 0 and "strictly between 0 and 1" in proc.stderr
    # the same for the clean-up's thin-bridge cut: once per radius, 0 being the largest component alone
    proc = _robustness(*common, "--openings", "0,7.5", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results) == {f"{model_id}@open0", f"{model_id}@open7.5"}
    assert all(0.85 < r["native"]["3Dircadb1.17"] <= 1 for r in results.values())
    proc = _robustness(*common, "--openings", "-1", timeout=60)
    assert proc.returncode != 0 and "radii must be 0 or more" in proc.stderr
    # and per set of directions the network runs in: the card's own (axial) scores as the card does
    proc = _robustness(*common, "--views", "axial,axial+coronal", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results) == {f"{model_id}@views=axial", f"{model_id}@views=axial+coronal"}
    assert results[f"{model_id}@views=axial"]["native"]["3Dircadb1.17"] == card
    proc = _robustness(*common, "--views", "axial+oblique", timeout=60)
    assert proc.returncode != 0 and "joined by +" in proc.stderr
    # and per liver floor: off scores as the card does; patient 17's enhanced liver (about 110 HU) lies above a
    # 90 HU floor, so that floor changes nothing, while one above it runs again raised and scores otherwise
    proc = _robustness(*common, "--floors", "0,90,140", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results) == {f"{model_id}@floor={f}" for f in (0, 90, 140)}
    off, below, above = (results[f"{model_id}@floor={f}"]["native"]["3Dircadb1.17"] for f in (0, 90, 140))
    assert off == below == card and above != card
    proc = _robustness(*common, "--floors", "90,150", timeout=60)
    assert proc.returncode != 0 and "liver floors in HU" in proc.stderr
    # and per slice distance, with each floor: patient 17's own 1.6 mm slices are read as they are at 1.6 mm
    proc = _robustness(*common, "--floors", "0", "--slices", "0,1.6", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results) == {f"{model_id}@floor=0@slices={s}" for s in ("0", "1.6")}
    assert {r["native"]["3Dircadb1.17"] for r in results.values()} == {card}
    proc = _robustness(*common, "--slices", "1.6,0.1", timeout=60)
    assert proc.returncode != 0 and "slice distances in mm" in proc.stderr


def test_slab_errors_count_what_was_missed_and_added_where():
    """Two 2-slice slabs at 1 mm: the first misses half its liver, the second adds a block outside it."""
    from training.errors import render, slab_rows

    reference = np.zeros((4, 8, 8), bool)
    reference[:, 2:6, 2:6] = True  # 16 voxels a slice
    found = reference.copy()
    found[0:2, 2:6, 2:4] = False  # 8 missed in slices 0 and 1 each
    found[3, 0:2, 0:4] = True  # 8 added in slice 3
    hu = np.full(reference.shape, 100, np.int16)
    hu[0:2, 2:6, 2:4] = 55  # the missed tissue
    rows = slab_rows(reference, found, hu, spacing_k_mm=1.0, voxel_ml=0.5, slab_mm=2.0)
    assert [r["slices"] for r in rows] == [(0, 1), (2, 3)]
    first, second = rows
    assert (first["liver_ml"], first["missed_ml"], first["added_ml"]) == (16.0, 8.0, 0.0)
    assert first["missed_hu"] == 55 and first["dice"] == pytest.approx(2 * 16 / (16 + 32))
    assert (second["missed_ml"], second["added_ml"], second["missed_hu"]) == (0.0, 4.0, None)
    assert second["dice"] == pytest.approx(2 * 32 / (40 + 32))
    assert render(rows).splitlines()[-1] == "| all | 32.0 | 8.0 | 4.0 | | |"
    # slices without liver in either are not listed; a slab is at least one slice
    reference[2:], found[2:] = False, False
    assert [r["slices"] for r in slab_rows(reference, found, hu, 1.0, 0.5, 0.1)] == [(0, 0), (1, 1)]
    with pytest.raises(ValueError, match="shapes differ"):
        slab_rows(reference, found[1:], hu, 1.0, 0.5, 2.0)


def test_errors_command_on_a_real_patient(ircadb_root):
    """The bundled model on patient 17: the table's total liver is the expert mask's volume, and the command
    says the patient was one the model trained on."""
    proc = subprocess.run(
        [sys.executable, "-m", "training.errors", "--patient", "3Dircadb1.17", "--slab-mm", "16",
         "--data", str(ircadb_root.parent)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "a training patient: not held out" in proc.stdout
    total = next(line for line in proc.stdout.splitlines() if line.startswith("| all |"))
    assert float(total.split("|")[2]) == pytest.approx(1860.6, abs=0.2)  # patient 17's liver mask, in ml
    dice = float(proc.stdout.split("Dice ")[1].split()[0])
    assert 0.85 < dice <= 1
    bad = subprocess.run(
        [sys.executable, "-m", "training.errors", "--patient", "3Dircadb1.99", "--data", str(ircadb_root.parent)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert bad.returncode == 2 and "no patient folder" in bad.stderr


def test_errors_say_what_was_missed_and_added_and_how_bright_it_is():
    from training.robustness import errors

    hu = np.full((1, 4, 10), 100.0)
    hu[0, :, 8:] = 30.0  # a darker part of the liver: the part this segmentation misses
    hu[0, 3, :] = 45.0  # tissue beside it
    reference = np.zeros(hu.shape, np.uint8)
    reference[0, :3, :] = 1  # 30 voxels
    mask = reference.copy()
    mask[0, :3, 8:] = 0  # 6 missed, at 30 HU
    mask[0, 3, :3] = 1  # 3 added, at 45 HU
    expected = "reference median 100 HU, missed 20.0% at median 30 HU, added 10.0% at median 45 HU"
    assert errors(mask, reference, hu) == expected
    assert errors(reference, reference, hu) == "reference median 100 HU, missed 0.0%, added 0.0%"
    tumours = np.zeros(hu.shape, np.uint8)
    tumours[0, :3, 7:] = 1  # 9 voxels (30%) of the liver; 6 of them (20%) missed
    with_tumours = errors(mask, reference, hu, tumours)
    assert with_tumours == expected.replace("30 HU,", "30 HU (20.0% in its tumours of 30.0%),")
    beside = np.zeros(hu.shape, np.uint8)
    beside[0, 3, :2] = 2  # 2 of the 3 added voxels (6.7%) in the expert's second structure
    beside[0, 3, 2:] = 1  # 1 (3.3%) in the first, the rest of that row outside the segmentation
    told = errors(mask, reference, hu, beside=(beside, ["spleen", "tumor"]))
    assert told == expected + " (6.7% in its tumor, 3.3% in its spleen)"
    beside[0, 3, 2] = 0  # in no expert structure: only the tumour is named
    told = errors(mask, reference, hu, beside=(beside, ["spleen", "tumor"]))
    assert told == expected + " (6.7% in its tumor)"
