"""DICOM series reading on series the tests write themselves with pydicom."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import write_series
from LiverSegUNetLib.errors import InputError
from LiverSegUNetLib.io import read_volume


def _phantom(n=6, rows=20, cols=24) -> np.ndarray:
    k, j, i = np.meshgrid(np.arange(n), np.arange(rows), np.arange(cols), indexing="ij")
    return (k * 100 + j * 3 + i - 500).astype(np.float64)


def test_shuffled_names_sorted_by_position_with_rescale(tmp_path):
    hu = _phantom()
    write_series(tmp_path, hu, spacing_ij=(0.7, 0.9), slice_gap=2.5, intercept=-1024)
    vol = read_volume(tmp_path)
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, hu)
    assert vol.spacing_mm == pytest.approx((0.7, 0.9, 2.5))  # from positions, not SliceThickness
    assert vol.origin_lps == pytest.approx((-100, -120, 50))
    np.testing.assert_allclose(vol.direction, np.eye(3))


def test_fractional_slope_gives_float_hu(tmp_path):
    hu = _phantom() * 1.0
    write_series(tmp_path, hu, slope=0.5, intercept=-600.25)
    vol = read_volume(tmp_path)
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array, np.round((hu + 600.25) / 0.5) * 0.5 - 600.25, atol=1e-3)


def test_sorted_along_normal_for_a_tilted_reversed_series(tmp_path):
    hu = _phantom()
    # coronal-like orientation whose normal points to -y: positions decrease in y as k grows
    write_series(tmp_path, hu, row_dir=(1, 0, 0), col_dir=(0, 0, -1), slice_gap=3.0)
    vol = read_volume(tmp_path)
    normal = np.cross((1, 0, 0), (0, 0, -1))
    np.testing.assert_allclose(vol.direction[:, 2], normal)
    np.testing.assert_array_equal(vol.array, hu)
    # voxel (0,0,k) sits at origin + k * gap * normal
    lps = vol.ijk_to_lps() @ np.array([0, 0, 5, 1.0])
    np.testing.assert_allclose(lps[:3], np.array([-100, -120, 50]) + 15.0 * normal)


def test_missing_slice_is_an_error(tmp_path):
    paths = write_series(tmp_path, _phantom(n=8))
    paths[4].unlink()
    with pytest.raises(InputError, match="1 slice\\(s\\) missing"):
        read_volume(tmp_path)


def test_uneven_spacing_is_an_error(tmp_path):
    write_series(
        tmp_path / "a", _phantom(n=3), slice_gap=2.0, origin=(0, 0, 0), names=["a1", "a2", "a3"], series_uid="1.2.3"
    )
    write_series(
        tmp_path / "a", _phantom(n=2), slice_gap=2.0, origin=(0, 0, 7.0), names=["b1", "b2"], series_uid="1.2.3"
    )
    with pytest.raises(InputError, match="uneven slice spacing"):
        read_volume(tmp_path / "a")


def test_two_series_listed_then_selected(tmp_path):
    write_series(tmp_path, _phantom(n=4), series_uid="1.2.826.0.1.111", names=[f"a{k}" for k in range(4)])
    write_series(tmp_path, _phantom(n=5), series_uid="1.2.826.0.1.222", names=[f"b{k}" for k in range(5)])
    with pytest.raises(InputError) as info:
        read_volume(tmp_path)
    assert "1.2.826.0.1.111" in str(info.value) and "1.2.826.0.1.222" in str(info.value)
    assert read_volume(tmp_path, series_uid="1.2.826.0.1.222").shape == (5, 20, 24)
    with pytest.raises(InputError, match="not found"):
        read_volume(tmp_path, series_uid="9.9.9")


def test_mixed_sizes_is_an_error(tmp_path):
    write_series(tmp_path, _phantom(n=3), series_uid="1.2.5", names=["a", "b", "c"])
    write_series(tmp_path, _phantom(n=1, rows=10)[:, :, :], series_uid="1.2.5", origin=(-100, -120, 56), names=["d"])
    with pytest.raises(InputError, match="mixed sizes"):
        read_volume(tmp_path)


def test_truncated_file_is_a_clear_error(tmp_path):
    paths = write_series(tmp_path, _phantom(n=12))  # enough slices for the read-ahead threads
    data = paths[9].read_bytes()
    paths[9].write_bytes(data[: len(data) - 300])
    with pytest.raises(InputError, match="pixel data"):
        read_volume(tmp_path)


def test_rgb_series_is_refused(tmp_path):
    paths = write_series(tmp_path, _phantom(n=3))
    import pydicom

    for p in paths:
        ds = pydicom.dcmread(p)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = np.zeros((20, 24, 3), np.uint8).tobytes()
        ds.save_as(p)
    with pytest.raises(InputError, match="colour"):
        read_volume(tmp_path)


def test_single_slice_and_empty_folder_and_text(tmp_path):
    write_series(tmp_path / "one", _phantom(n=1))
    with pytest.raises(InputError, match="at least 2 slices"):
        read_volume(tmp_path / "one")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM image files"):
        read_volume(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="unsupported input"):
        read_volume(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "missing")
