"""Fuzz the DICOM, 3D-IRCADb zip and image-file readers: every input must give a Volume or a LiverSegError.

    python Testing/fuzz_readers.py --cases 5000        # the dedicated fuzz run
    (pytest runs the same properties with fewer cases, in Testing/test_reliability.py)

Cases: truncated and bit-flipped files, absurd or missing tags (sizes, spacing, orientation,
rescale), NaN/inf values, non-CT modalities, zips with path-traversal names or members that claim
gigabytes, random bytes under image-file names. A failure is any other exception, or a file
written anywhere.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import struct
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_factory import write_series  # noqa: E402
from LiverSegUNetLib.errors import LiverSegError  # noqa: E402
from LiverSegUNetLib.inference import check_ct  # noqa: E402
from LiverSegUNetLib.io import read_volume  # noqa: E402
from LiverSegUNetLib.io.ircadb import IrcadbPatient  # noqa: E402

WEIRD_NUMBERS = [0, -1, -0.5, 1e-30, 1e30, math.nan, math.inf, -math.inf, 65535, 2**31 - 1]
TAG_EDITS = {
    "PixelSpacing": st.lists(st.sampled_from(WEIRD_NUMBERS + [0.7]), min_size=0, max_size=3),
    "ImagePositionPatient": st.lists(st.sampled_from(WEIRD_NUMBERS + [0.0]), min_size=0, max_size=4),
    "ImageOrientationPatient": st.lists(st.sampled_from([0.0, 1.0, -1.0, math.nan, 1e9]), min_size=0, max_size=7),
    "Rows": st.sampled_from([0, 1, 7, 65535]),
    "Columns": st.sampled_from([0, 1, 7, 65535]),
    "RescaleSlope": st.sampled_from(WEIRD_NUMBERS),
    "RescaleIntercept": st.sampled_from(WEIRD_NUMBERS),
    "SamplesPerPixel": st.sampled_from([0, 3, 4]),
    "BitsAllocated": st.sampled_from([1, 8, 12, 32, 64]),
    "Modality": st.sampled_from(["MR", "PT", "US", "", "CT"]),
    "PixelData": st.binary(max_size=64),
}


def _slices(folder: Path) -> list[Path]:
    hu = (np.arange(3 * 16 * 16).reshape(3, 16, 16) % 300 - 100).astype(float)
    return write_series(folder, hu, names=["a", "b", "c"])


def _must_be_clean(call) -> None:
    """Run ``call``: a Volume (that check_ct accepts or refuses with LiverSegError) or a LiverSegError."""
    try:
        volume = call()
    except LiverSegError:
        return
    try:
        check_ct(volume)
    except LiverSegError:
        pass


def _snapshot(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def check_dicom(edits: dict, which: list[int], truncate: float | None, flips: list[tuple[float, int]]) -> None:
    """One DICOM case: tag edits on some slices, optional truncation and byte flips of the first one."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "series"
        paths = _slices(folder)
        for k in which:
            ds = pydicom.dcmread(paths[k])
            for tag, value in edits.items():
                try:
                    setattr(ds, tag, value)
                except (ValueError, TypeError, OverflowError, struct.error):
                    continue
            try:
                ds.save_as(paths[k])
            except (ValueError, TypeError, OverflowError, struct.error):
                continue  # pydicom refuses to write it: not a file anyone could hand us
        data = bytearray(paths[0].read_bytes())
        for where, value in flips:
            data[int(where * (len(data) - 1))] = value
        if truncate is not None:
            data = data[: int(truncate * len(data))]
        paths[0].write_bytes(bytes(data))
        before = _snapshot(Path(tmp))
        _must_be_clean(lambda: read_volume(folder))
        _must_be_clean(lambda: read_volume(folder, allow_non_ct=True))
        assert _snapshot(Path(tmp)) == before


def _claim_size(data: bytes, size: int) -> bytes:
    """Patch every central-directory entry to claim ``size`` uncompressed bytes."""
    out = bytearray(data)
    at = out.find(b"PK\x01\x02")
    while at != -1:
        out[at + 24 : at + 28] = struct.pack("<I", size)
        at = out.find(b"PK\x01\x02", at + 4)
    return bytes(out)


def check_zip(names: list[str], claim: int | None, garbage: bool) -> None:
    """One 3D-IRCADb zip case: odd member names, size claims, or a damaged archive."""
    with tempfile.TemporaryDirectory() as tmp:
        patient = Path(tmp) / "3Dircadb1.99"
        patient.mkdir()
        slices = _slices(Path(tmp) / "src")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            for i, name in enumerate(names):
                z.writestr(name, slices[i % len(slices)].read_bytes())
        data = buffer.getvalue()
        if claim is not None:
            data = _claim_size(data, claim)
        if garbage:
            data = data[: len(data) // 2]
        (patient / "PATIENT_DICOM.zip").write_bytes(data)
        before = _snapshot(Path(tmp))
        cwd_before = set(os.listdir("."))
        _must_be_clean(lambda: IrcadbPatient(patient).ct)
        assert _snapshot(Path(tmp)) == before and set(os.listdir(".")) == cwd_before


def check_image_bytes(suffix: str, data: bytes) -> None:
    """Random bytes under an image-file name."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x{suffix}"
        path.write_bytes(data)
        _must_be_clean(lambda: read_volume(path))


MEMBER_NAMES = st.lists(
    st.sampled_from(
        [
            "PATIENT_DICOM/image_0",
            "PATIENT_DICOM/image_1",
            "PATIENT_DICOM/image_2",
            "PATIENT_DICOM/../../evil",
            "../evil",
            "/etc/passwd",
            "PATIENT_DICOM/sub/image_3",
            "PATIENT_DICOM/",
            "PATIENT_DICOM/.hidden",
        ]
    ),
    min_size=0,
    max_size=6,
    unique=True,
)


def properties(max_examples: int, derandomize: bool = False):
    """The three fuzz properties, each run for ``max_examples`` cases (a fixed set when ``derandomize``)."""
    common = settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=derandomize,
        database=None,
        suppress_health_check=list(HealthCheck),
    )

    @common
    @given(
        st.dictionaries(st.sampled_from(sorted(TAG_EDITS)), st.nothing(), max_size=0).flatmap(
            lambda _: st.fixed_dictionaries({}, optional=TAG_EDITS)
        ),
        st.lists(st.integers(0, 2), min_size=0, max_size=3, unique=True),
        st.one_of(st.none(), st.floats(0, 1)),
        st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=4),
    )
    def dicom(edits, which, truncate, flips):
        check_dicom(edits, which, truncate, flips)

    @common
    @given(MEMBER_NAMES, st.one_of(st.none(), st.sampled_from([0, 1, 2**31, 2**32 - 1])), st.booleans())
    def zips(names, claim, garbage):
        check_zip(names, claim, garbage)

    @common
    @given(st.sampled_from([".nrrd", ".nii", ".nii.gz", ".mha", ".nhdr"]), st.binary(max_size=512))
    def images(suffix, data):
        check_image_bytes(suffix, data)

    return {"dicom": dicom, "zip": zips, "image": images}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=5000, help="cases per reader family (default 5000)")
    args = parser.parse_args(argv)
    for name, prop in properties(args.cases).items():
        prop()
        print(f"{name}: {args.cases} cases, no crash, no stray file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
