"""Inference and postprocessing: bad volumes refused, cancel and progress honoured, orientation kept."""

from __future__ import annotations

import numpy as np
import pytest
from LiverSegUNetLib import metrics, slicing
from LiverSegUNetLib.errors import Cancelled, InputError
from LiverSegUNetLib.inference import opening_voxels, segment
from LiverSegUNetLib.postprocess import cut_thin_bridges, fill_holes_per_slice, largest_component
from LiverSegUNetLib.preprocess import (
    FULL_UNTIL_HU,
    MAX_SLICE_STEPS,
    RAMP_BELOW_LIVER_HU,
    UNTIL_HU,
    Plan,
    between_slices,
    raise_soft_tissue,
    slice_steps,
)
from LiverSegUNetLib.runtime import runtime_network
from LiverSegUNetLib.slicing import body_box, liver_range
from LiverSegUNetLib.volume import Volume
from patients import TEST_PATIENT


def test_largest_component_and_holes():
    m = np.zeros((5, 20, 20), np.uint8)
    m[1:4, 2:12, 2:12] = 1  # big blob with a hole in slice 2
    m[2, 6, 6] = 0
    m[1:3, 15:18, 15:18] = 1  # small blob
    big = largest_component(m)
    assert big[:, 15:18, 15:18].sum() == 0 and big[1:4, 2:12, 2:12].sum() == 3 * 100 - 1
    filled = fill_holes_per_slice(big)
    assert filled[2, 6, 6] == 1 and filled.sum() == 300
    # a notch open to the slice border is not a hole
    notch = np.zeros((1, 10, 10), np.uint8)
    notch[0, 2:8, 2:8] = 1
    notch[0, 4:6, 2:5] = 0
    assert fill_holes_per_slice(notch)[0, 4, 2] == 0


def test_thin_bridges_are_cut_and_the_organ_kept():
    m = np.zeros((30, 40, 60), np.uint8)
    m[5:25, 5:35, 5:30] = 1  # the organ: 20 x 30 x 25 voxels
    m[14:16, 19:21, 30:40] = 1  # a bridge 2 x 2 voxels thick, 10 long
    m[8:18, 12:26, 40:52] = 1  # a neighbour reached through it, itself thick (a tenth of the organ)
    m[0:2, 0:2, 0:2] = 1  # a stray speck
    cut = cut_thin_bridges(m, (3, 3, 3), (1, 1, 1))
    assert cut[:, :, 40:].sum() == 0  # the neighbour is gone
    assert cut[:, :, 32:40].sum() == 0  # and the bridge beyond the restored rim
    organ = m[5:25, 5:35, 5:30]
    assert cut[5:25, 5:35, 5:30].sum() >= 0.97 * organ.sum()  # only the box's corners rounded off
    assert cut[0:2, 0:2, 0:2].sum() == 0
    # off: the largest component as before; all thinner than the ball: the component is kept
    np.testing.assert_array_equal(cut_thin_bridges(m, (0, 0, 0), (0, 0, 0)), largest_component(m))
    # a second lobe as big as the first, joined by a narrow neck, is organ: both kept, the neck's middle not
    lobes = np.zeros((20, 30, 70), np.uint8)
    lobes[2:18, 2:28, 2:30] = lobes[2:18, 2:28, 40:68] = 1
    lobes[9:11, 14:16, 30:40] = 1
    both = cut_thin_bridges(lobes, (3, 3, 3), (1, 1, 1))
    assert both[:, :, 45:60].sum() > 0.9 * lobes[:, :, 45:60].sum() and both[:, :, 33:37].sum() == 0
    thin = np.zeros((10, 10, 40), np.uint8)
    thin[4:6, 4:6, 2:38] = 1
    np.testing.assert_array_equal(cut_thin_bridges(thin, (3, 3, 3), (1, 1, 1)), thin)


def test_opening_is_sized_in_millimetres_on_the_model_grid():
    plan = Plan(opening_mm=7.5)  # model-grid pixels of 1.5 mm
    assert opening_voxels(plan, 1.6) == ((5, 5, 5), (1, 1, 1))
    assert opening_voxels(plan, 5.0) == ((5, 5, 2), (1, 1, 0))  # thick slices: fewer of them
    assert opening_voxels(Plan(), 1.6) == ((0, 0, 0), (0, 0, 0))


def test_cutting_bridges_only_removes_on_a_real_patient(patient, bundled_model):
    """With the cut the mask is a subset of the one without; on a real liver it costs (almost) nothing."""
    import dataclasses

    p = patient(TEST_PATIENT)
    on = dataclasses.replace(bundled_model, plan=dataclasses.replace(bundled_model.plan, opening_mm=7.5))
    off = dataclasses.replace(bundled_model, plan=dataclasses.replace(bundled_model.plan, opening_mm=0.0))
    with_cut = segment(p.ct, on, device="cpu").mask.array
    without = segment(p.ct, off, device="cpu").mask.array
    truth = p.mask("liver").array
    assert with_cut.sum() > 0.9 * without.sum() and not (with_cut & ~without.astype(bool)).any()
    assert metrics.dice(with_cut, truth) >= metrics.dice(without, truth) - 0.01


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((4, 64, 64), np.int16), "constant"),
        (np.full((4, 64, 64), np.nan, np.float32), "NaN"),
        (np.zeros((1, 4, 64), np.int16), "too small"),
    ],
)
def test_bad_volumes_refused(bundled_model, array, message):
    with pytest.raises(InputError, match=message):
        segment(Volume(array, (1, 1, 1)), bundled_model, device="cpu")


def _crop(vol: Volume, k0: int, k1: int) -> Volume:
    origin = vol.ijk_to_lps() @ np.array([0, 0, k0, 1.0])
    return Volume(vol.array[k0:k1], vol.spacing_mm, origin[:3], vol.direction)


def test_cancel_and_progress(patient, bundled_model):
    ct = _crop(patient(TEST_PATIENT).ct, 40, 80)
    seen = []
    with pytest.raises(Cancelled):
        segment(
            ct,
            bundled_model,
            device="cpu",
            batch_size=8,
            progress=lambda s, f: seen.append((s, f)),
            cancel=lambda: len(seen) >= 2,
        )
    assert [stage for stage, _ in seen] == ["inference", "inference"]  # cancel is checked before every batch
    assert 0 < seen[0][1] < seen[1][1] < 1
    seen.clear()
    segment(ct, bundled_model, device="cpu", batch_size=8, progress=lambda s, f: seen.append((s, f)))
    fractions = [f for s, f in seen if s == "inference"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert ("postprocess", 1.0) in seen and seen[-1] == ("resample", 1.0)


def _transform(vol: Volume, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> Volume:
    """The same physical image stored with ijk axes permuted (new axis a = old axis perm[a]) and flipped."""
    shape_ijk = vol.shape[::-1]
    m = np.zeros((4, 4))  # new ijk -> old ijk
    m[3, 3] = 1
    for a in range(3):
        old = perm[a]
        if flips[a]:
            m[old, a], m[old, 3] = -1, shape_ijk[old] - 1
        else:
            m[old, a] = 1
    affine = vol.ijk_to_lps() @ m
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    arr = np.transpose(vol.array, [2 - perm[2], 2 - perm[1], 2 - perm[0]])
    arr = np.flip(arr, [2 - a for a in range(3) if flips[a]]) if any(flips) else arr
    return Volume(np.ascontiguousarray(arr), spacing, affine[:3, 3], affine[:3, :3] / spacing)


def test_orientation_does_not_change_the_physical_result(patient, bundled_model):
    ct = _crop(patient(TEST_PATIENT).ct, 30, 90)
    ref = segment(ct, bundled_model, device="cpu").mask
    assert ref.array.sum() > 10_000
    for perm, flips in [
        ((0, 1, 2), (True, False, True)),
        ((1, 0, 2), (False, True, False)),
        ((2, 0, 1), (True, True, False)),
    ]:
        moved = _transform(ct, perm, flips)
        assert moved.shape != ct.shape or flips != (False, False, False)
        out = segment(moved, bundled_model, device="cpu").mask
        assert out.same_grid(moved)
        # map the result back: its voxels, placed in LPS, must be the reference's voxels
        k, j, i = np.nonzero(out.array)
        world = (out.ijk_to_lps() @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3]
        ijk = np.linalg.solve(ref.ijk_to_lps(), np.vstack([world, np.ones(world.shape[1])]))[:3].round().astype(int)
        remapped = np.zeros_like(ref.array)
        remapped[ijk[2], ijk[1], ijk[0]] = 1
        assert metrics.dice(remapped, ref.array) == 1.0, (perm, flips)


def test_liver_range_takes_the_heaviest_run_of_positive_probes():
    probes = np.array([0, 5, 10, 15, 20, 25, 29])
    # two runs: probes 5..10 (weak) and 20..25 (strong); the range reaches stride - 1 past the run
    assert liver_range(np.array([0, 3, 2, 0, 50, 40, 0]), probes, 5, 30) == (16, 29)
    assert liver_range(np.array([9, 0, 0, 0, 0, 0, 0]), probes, 5, 30) == (0, 4)
    assert liver_range(np.zeros(7, int), probes, 5, 30) is None


def test_probe_pass_gives_the_same_mask_as_every_slice(patient, bundled_model, monkeypatch):
    """Skipping slices outside the liver's extent must not change the postprocessed result."""
    ct = _crop(patient("3Dircadb1.1").ct, 0, 70)  # the liver starts at slice 27: the probe pass skips slices
    ran = []  # slices through the network, per run

    def counting(network, device):
        real = runtime_network(network, device)
        return real._replace(run=lambda x: ran.append(len(x)) or real.run(x))

    probed = segment(ct, bundled_model, device="cpu", runtime=counting).mask.array
    probed_slices, ran[:] = sum(ran), []
    monkeypatch.setattr(slicing, "PROBE_MM", 0.0)  # stride 1: every slice runs
    every = segment(ct, bundled_model, device="cpu", runtime=counting).mask.array
    assert probed.any() and sum(ran) == 70
    # slices 0-9 lie 17 or more slices (27 mm) from the liver: apart from the probes 0 and 5, they are skipped
    # (a model may see a few liver pixels a stride or two beyond the expert's first slice; the range then grows)
    assert probed_slices <= 70 - 8
    np.testing.assert_array_equal(probed, every)


def test_body_box_holds_the_liver_and_drops_air(patient):
    p = patient(TEST_PATIENT)
    ct, liver = p.ct, p.mask("liver").array
    rows, cols = body_box(ct.array, ct.spacing_mm[:2])
    assert liver[:, rows, cols].sum() == liver.sum()
    assert (rows.stop - rows.start) * (cols.stop - cols.start) < 0.9 * ct.shape[1] * ct.shape[2]
    # nothing reaches soft-tissue HU (not a CT in HU): the whole slice is kept
    whole = body_box(np.full((3, 40, 50), -900, np.int16), (1.0, 1.0))
    assert whole == (slice(0, 40), slice(0, 50))


def test_runtime_network_matches_the_trained_network(bundled_model, sample_ct):
    import torch
    from LiverSegUNetLib.preprocess import normalize

    # three slices of the real sample CT at about the model's pixel size (0.78 mm x 2), in the model's window
    hu = torch.from_numpy(sample_ct.array[9:12].astype(np.float32))[:, ::2, ::2][None]
    x = normalize(hu, bundled_model.plan)
    assert x.shape[1] == bundled_model.plan.in_channels
    with torch.inference_mode():
        reference = torch.sigmoid(bundled_model.network(x))
        net, dtype, autocast, precision = runtime_network(bundled_model.network, "cpu")
        with autocast:
            fast = torch.sigmoid(net(x.to(dtype)).float())
    assert precision == ("bf16" if dtype == torch.bfloat16 else "fp32")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # folded away
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bundled_model.network.modules())  # original intact
    difference = (fast - reference).abs()
    assert float(difference.max()) < 0.05 and float(difference.mean()) < 2e-3, difference.max()
    assert float(((fast > 0.5) != (reference > 0.5)).float().mean()) < 1e-3  # the same liver, pixel for pixel
    assert 0.02 < float((reference > 0.5).float().mean()) < 0.5  # and there is a liver in these slices


def _reads_its_input(network, device, level: float = 0.7):
    """A runtime whose "network" marks where its centre channel is brighter than ``level`` of the HU window: a
    segmentation is then the bright voxels of the input, in whichever direction it was sliced."""
    import contextlib

    import torch
    from LiverSegUNetLib.runtime import NetworkRuntime

    def run(x):
        centre = x[:, x.shape[1] // 2 : x.shape[1] // 2 + 1].float()
        return (centre - level) * 60

    return NetworkRuntime(run, torch.float32, contextlib.nullcontext(), "fp32")


@pytest.mark.parametrize(
    "views, perm, flips",
    [
        (("coronal",), (0, 1, 2), (False, False, False)),
        (("sagittal",), (0, 1, 2), (True, False, True)),
        (("axial", "coronal", "sagittal"), (2, 0, 1), (True, True, False)),
    ],
    ids=["coronal", "sagittal", "all"],
)
def test_other_views_slice_across_and_come_back_on_the_input_grid(patient, bundled_model, views, perm, flips):
    """A network that reads its input back segments the liver of a CT whose only bright voxels are the expert's
    liver, on the patient's own anisotropic grid (0.74 mm pixels, 1.6 mm slices), stored in another axis order or
    flipped, in every direction: a view transposed, flipped or resampled wrongly on the way across or back would
    put the liver elsewhere."""
    import dataclasses

    p = patient(TEST_PATIENT)
    liver = p.mask("liver").array > 0
    body = p.ct.array > -300
    hu = np.where(body, 0, -1000).astype(np.int16)
    hu[liver] = 250  # 0.9 of the -200..300 window; the rest of the body 0.4
    ct = _transform(p.ct.with_array(hu), perm, flips)
    liver = _transform(p.mask("liver"), perm, flips).array > 0
    model = dataclasses.replace(bundled_model, plan=dataclasses.replace(bundled_model.plan, views=views))
    seen = []
    progress = seen.append
    # checked: three values make a label map to check_ct, which refuses such input before any network runs
    seg = segment(ct, model, device="cpu", runtime=_reads_its_input, progress=lambda *a: progress(a), checked=True)
    assert metrics.dice(seg.mask.array, liver) > 0.97
    fractions = [f for stage, f in seen if stage == "inference"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # one progress bar over every direction


def test_views_are_checked_and_old_cards_run_axial():
    assert Plan.from_dict({}).views == ("axial",)  # cards from before views slice axially, as they were trained
    plan = Plan.from_dict({"views": ["axial", "coronal"]})
    assert plan.views == ("axial", "coronal") and plan.to_dict()["views"] == ["axial", "coronal"]
    for bad in (["axial", "axial"], ["oblique"], []):
        with pytest.raises(ValueError, match="views"):
            Plan.from_dict({"views": bad})


def test_raising_soft_tissue_moves_organs_and_leaves_air_fat_water_and_bone(patient):
    """On a real CT, raised from its liver's median: the liver's brighter half goes up by exactly the shift, the
    darker tissue less the darker it is (a hypodense mass ends further below the liver than before), air, fat, water
    and bone keep their values, and the mapping keeps the order of every value; a shift that would not is refused."""
    p = patient(TEST_PATIENT)
    hu = p.ct.array
    liver = p.mask("liver").array > 0
    median = float(np.median(hu[liver]))
    raised = raise_soft_tissue(hu, 40.0, median)
    full = liver & (hu >= median) & (hu <= FULL_UNTIL_HU)
    assert full.sum() > 0.4 * liver.sum()
    np.testing.assert_allclose(raised[full], hu[full] + 40.0)
    darker = median - RAMP_BELOW_LIVER_HU / 2  # half-way down the ramp: raised by half the shift
    np.testing.assert_allclose(raise_soft_tissue(np.float32([darker]), 40.0, median), [darker + 20.0])
    unchanged = (hu <= median - RAMP_BELOW_LIVER_HU) | (hu >= UNTIL_HU)  # air, lung, fat, water; bone, contrast
    assert unchanged.mean() > 0.5
    np.testing.assert_array_equal(raised[unchanged], hu[unchanged].astype(np.float32))
    values = np.arange(-1024, 3000, 0.5, dtype=np.float32)
    for shift in (0.0, 20.0, 99.0):
        assert np.all(np.diff(raise_soft_tissue(values, shift, 45.0)) > 0), shift
    for bad in (-1.0, 100.0):
        with pytest.raises(ValueError, match="shift"):
            raise_soft_tissue(values, bad, 45.0)
    with pytest.raises(ValueError, match="liver at"):
        raise_soft_tissue(values, 10.0, FULL_UNTIL_HU)


@pytest.mark.parametrize("floor, raised", [(0.0, False), (110.0, False), (145.0, True)])
def test_a_liver_darker_than_the_floor_is_run_again_raised(patient, bundled_model, floor, raised):
    """A network that reads its input back (it marks values above 0.45 of the 0..255 HU window, 114.75 HU) on a CT
    whose liver is 120 HU in its upper half and 105 HU in its lower half finds the upper half only. With a liver
    floor above what it found (120 HU) the soft tissue is raised by the difference (the lower half, 15 HU below the
    liver found, by 5/8 of it) and the second pass finds the whole liver; with the floor off, or below 120 HU, the
    network runs once and the lower half stays unfound."""
    import dataclasses
    import functools

    p = patient(TEST_PATIENT)
    liver = p.mask("liver").array > 0
    body = p.ct.array > -300
    hu = np.where(body, 0, -1000).astype(np.int16)
    ks = np.flatnonzero(liver.any(axis=(1, 2)))
    middle = int(np.median(ks))
    upper = liver.copy()
    upper[:middle] = False  # k points up: the slices from the middle of the liver to its dome
    hu[liver] = 105
    hu[upper] = 120
    model = dataclasses.replace(bundled_model, plan=dataclasses.replace(bundled_model.plan, liver_floor_hu=floor))
    assert (model.plan.hu_min, model.plan.hu_max) == (0.0, 255.0)
    seen = []
    progress = seen.append
    ct = p.ct.with_array(hu)
    runtime = functools.partial(_reads_its_input, level=0.45)
    seg = segment(ct, model, device="cpu", runtime=runtime, progress=lambda *a: progress(a), checked=True)
    stages = {stage for stage, _ in seen}
    assert ("inference, raised" in stages) == raised
    # the found upper half is 120 HU (its rim a little darker on the model grid): raised by about 25 HU, or not at all
    assert (23 < seg.raised_hu <= 26) if raised else seg.raised_hu == 0
    if raised:
        assert metrics.dice(seg.mask.array, liver) > 0.97
        fractions = [f for stage, f in seen if stage == "inference, raised"]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
    else:
        assert metrics.dice(seg.mask.array, upper) > 0.95 and not (seg.mask.array & (liver & ~upper)).any()


def test_old_cards_have_no_liver_floor_and_a_floor_is_checked():
    assert Plan.from_dict({}).liver_floor_hu == 0.0  # cards from before the floor run once, as they were scored
    assert Plan.from_dict({"liver_floor_hu": 90}).to_dict()["liver_floor_hu"] == 90
    for bad in (-10, FULL_UNTIL_HU, 300):  # a liver at the floor must still lie below the fully raised range
        with pytest.raises(ValueError, match="liver_floor_hu"):
            Plan.from_dict({"liver_floor_hu": bad})


def test_slices_are_interpolated_between_a_ct_s_own():
    """``between_slices`` keeps each slice at ``k * steps`` and puts linear blends between (integers rounded, the
    dtype kept); ``slice_steps`` picks the whole number of steps nearest the plan's distance, capped; the plan
    refuses a distance no CT has."""
    a = np.array([[[0]], [[90]], [[-30]]], dtype=np.int16)
    out = between_slices(a, 3)
    assert out.dtype == np.int16 and out[:, 0, 0].tolist() == [0, 30, 60, 90, 50, 10, -30]
    np.testing.assert_array_equal(out[::3], a)
    assert between_slices(a, 1) is a and between_slices(a[:1], 4).shape == (1, 1, 1)
    np.testing.assert_allclose(between_slices(np.float32([[[0]], [[1]]]), 4)[:, 0, 0], [0, 0.25, 0.5, 0.75, 1])
    assert [slice_steps(mm, 1.6) for mm in (0.8, 1.6, 2.5, 3.0, 5.0, 8.0)] == [1, 1, 2, 2, 3, 5]
    assert slice_steps(5.0, 0.0) == 1 and slice_steps(50.0, 1.6) == MAX_SLICE_STEPS
    assert Plan.from_dict({}).slice_mm == 0.0  # cards from before read the CT's own slices, as they were scored
    for bad in (-1.0, 0.2):
        with pytest.raises(ValueError, match="slice_mm"):
            Plan.from_dict({"slice_mm": bad})


def test_thick_slices_are_read_between_and_the_result_kept_on_their_own(patient, bundled_model):
    """A CT of 5 mm slices (patient 17 averaged into 5 mm slabs, its liver the only bright tissue) under a plan
    reading slices 1.6 mm apart: the network reads three slices per slice of the CT, and the mask on the CT's own
    slices is exactly what it finds there when it reads only those (a network that reads its centre channel back)."""
    import dataclasses

    from training.appearance import thick_slices

    p = patient(TEST_PATIENT)
    liver = thick_slices(p.ct.with_array((p.mask("liver").array > 0).astype(np.uint8)), 5.0, is_mask=True)
    hu = np.where(thick_slices(p.ct, 5.0).array > -300, 0, -1000).astype(np.int16)
    hu[liver.array > 0] = 120
    ct = liver.with_array(hu)
    n = ct.shape[0]
    masks, read = {}, {}
    for slice_mm in (0.0, 1.6):
        model = dataclasses.replace(bundled_model, plan=dataclasses.replace(bundled_model.plan, slice_mm=slice_mm))
        sizes = []

        def counting(network, device, sizes=sizes):
            inner = _reads_its_input(network, device, level=0.45)
            return inner._replace(run=lambda x: sizes.append(x.shape[0]) or inner.run(x))

        seg = segment(ct, model, device="cpu", runtime=counting, postprocess=False, checked=True)
        masks[slice_mm], read[slice_mm] = seg.mask.array, sum(sizes)
        assert seg.mask.shape == ct.shape and seg.mask.spacing_mm == ct.spacing_mm
    assert read == {0.0: n, 1.6: (n - 1) * 3 + 1}
    assert metrics.dice(masks[0.0], liver.array) > 0.95
    np.testing.assert_array_equal(masks[1.6], masks[0.0])
