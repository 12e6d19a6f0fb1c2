"""The openly licensed sample CT that ships with the package (see ``sample_data/README.md``)."""

from __future__ import annotations

from pathlib import Path

SAMPLE_CT_DIR = Path(__file__).resolve().parent / "sample_data" / "totalseg_example_ct"
SAMPLE_NAME = "LiverSegUNet sample CT"
ATTRIBUTION = "Example CT from TotalSegmentator (Wasserthal et al., Radiology: AI 2023), Apache-2.0 / CC BY 4.0"


def sample_ct_path() -> Path:
    """Folder of the bundled sample DICOM series (20 contrast-enhanced abdominal slices)."""
    from .errors import InputError

    if not SAMPLE_CT_DIR.is_dir():
        raise InputError(
            f"the bundled sample CT is missing from {SAMPLE_CT_DIR}; reinstall LiverSegUNet (pip install -e .)"
        )
    return SAMPLE_CT_DIR
