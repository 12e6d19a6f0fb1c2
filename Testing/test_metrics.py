"""Metrics against values worked out by hand, and per-lesion detection on constructed lesions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from LiverSegUNetLib import metrics


def _box(shape, lo, hi):
    m = np.zeros(shape, np.uint8)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
    return m


def test_overlap_metrics_by_hand():
    a = _box((4, 10, 10), (0, 0, 0), (1, 2, 5))  # 10 voxels
    b = _box((4, 10, 10), (0, 0, 3), (1, 2, 8))  # 10 voxels, 4 shared
    assert metrics.dice(a, b) == pytest.approx(2 * 4 / 20)
    assert metrics.voe(a, b) == pytest.approx(1 - 4 / 16)
    assert metrics.rvd(a, b) == 0
    assert metrics.rvd(_box((4, 10, 10), (0, 0, 0), (1, 3, 5)), b) == pytest.approx(0.5)
    empty = np.zeros_like(a)
    assert metrics.dice(empty, empty) == 1.0 and metrics.voe(empty, empty) == 0.0
    assert math.isnan(metrics.rvd(a, empty)) and math.isnan(metrics.hd95(a, empty, (1, 1, 1)))


def test_identical_masks_have_zero_distance():
    a = _box((8, 9, 10), (2, 2, 2), (6, 7, 8))
    assert metrics.assd(a, a, (0.7, 0.8, 2.5)) == 0.0
    assert metrics.hd95(a, a, (0.7, 0.8, 2.5)) == 0.0


def test_shift_along_i_uses_the_i_spacing():
    # two 1-voxel-thick sheets in the j-k plane, 3 voxels apart along i; spacing (i, j, k) = (2, 1, 5)
    a = np.zeros((5, 5, 12), np.uint8)
    b = np.zeros_like(a)
    a[:, :, 4] = 1
    b[:, :, 7] = 1
    assert metrics.assd(a, b, (2.0, 1.0, 5.0)) == pytest.approx(6.0)
    assert metrics.hd95(a, b, (2.0, 1.0, 5.0)) == pytest.approx(6.0)
    # along k instead: 3 voxels of 5 mm
    c, d = np.zeros((12, 5, 5), np.uint8), np.zeros((12, 5, 5), np.uint8)
    c[4], d[7] = 1, 1
    assert metrics.assd(c, d, (2.0, 1.0, 5.0)) == pytest.approx(15.0)


def test_asymmetric_distances_by_hand():
    # ref: one voxel at i=0; pred: voxels at i=0 and i=4 (spacing 1). pred->ref: [0, 4]; ref->pred: [0]
    ref = np.zeros((1, 1, 10), np.uint8)
    pred = np.zeros_like(ref)
    ref[0, 0, 0] = 1
    pred[0, 0, [0, 4]] = 1
    assert metrics.assd(pred, ref, (1, 1, 1)) == pytest.approx((2.0 + 0.0) / 2)
    assert metrics.hd95(pred, ref, (1, 1, 1)) == pytest.approx(np.percentile([0, 4], 95))
    assert metrics.surface(_box((5, 5, 5), (1, 1, 1), (4, 4, 4))).sum() == 27 - 1


def _blobs(shape, centres, radius=2):
    k, j, i = np.indices(shape)
    out = np.zeros(shape, bool)
    for c in centres:
        out |= (k - c[0]) ** 2 + (j - c[1]) ** 2 + (i - c[2]) ** 2 <= radius**2
    return out


def test_lesion_detection_on_constructed_masks():
    shape = (20, 40, 40)
    ref = _blobs(shape, [(5, 8, 8), (5, 30, 30), (14, 8, 8), (14, 8, 30), (14, 30, 20)])
    pred = _blobs(shape, [(5, 8, 8)])  # found
    pred[5, 28:33, 29] = pred[5, 28:33, 31] = True  # two pieces over one lesion: split
    pred[14, 8, 8:31] = True  # one piece over two lesions: merged
    pred |= _blobs(shape, [(10, 35, 5)], 1)  # touching nothing: false
    # the lesion at (14, 30, 20) is untouched: missed
    m = metrics.lesion_detection(pred.astype(np.uint8), ref.astype(np.uint8))
    assert m == {"reference": 5, "predicted": 5, "found": 4, "missed": 1, "false": 1, "split": 1, "merged": 1}
    empty = np.zeros(shape, np.uint8)
    assert metrics.lesion_detection(empty, empty) == dict.fromkeys(m, 0)
    assert metrics.lesion_detection(empty, ref.astype(np.uint8))["missed"] == 5
