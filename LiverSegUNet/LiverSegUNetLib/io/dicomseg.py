"""DICOM-SEG output (the format PACS and research archives take), written with highdicom."""

from __future__ import annotations

import os

import numpy as np

from .. import __version__
from ..errors import InputError
from ..terminology import Structure
from ..volume import Volume

#: Patient and study attributes a DICOM-SEG copies from its source: type 2, so empty where the source lacks them.
TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
#: What a DICOM Segmentation needs of its source series to reference it.
REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


def check_dicom_seg_source(ct: Volume, what: str) -> None:
    """Refuse, before any work, a CT that DICOM-SEG output cannot reference (not DICOM, or UIDs missing)."""
    headers = ct.metadata.get("dicom_headers")
    if not headers:
        raise InputError(f"{what}: --format dicom-seg needs DICOM input (a DICOM series folder); this is not DICOM")
    missing = [tag for tag in REQUIRED if not str(headers[0].get(tag, "") or "")]
    if missing:
        raise InputError(
            f"{what}: the DICOM series has no {', '.join(missing)}, which a DICOM-SEG must reference; "
            "use --format seg.nrrd or nifti for this series"
        )


def write_dicom_seg(
    masks: list[Volume], ct: Volume, path: str | os.PathLike, structures: list[Structure], model_id: str
) -> None:
    """Write ``masks`` (on ``ct``'s grid, one per structure) as a binary DICOM Segmentation, one segment per
    structure, that references ``ct``'s DICOM series."""
    import copy

    check_dicom_seg_source(ct, str(path))
    headers = [copy.copy(h) for h in ct.metadata["dicom_headers"]]
    for header in headers:
        for keyword in TYPE2:
            if keyword not in header:
                setattr(header, keyword, "")
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError as exc:
        raise InputError(
            "DICOM-SEG output needs the highdicom package: pip install highdicom (or liversegunet[dicom-seg])"
        ) from exc

    def concept(code):
        return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)

    algorithm = hd.AlgorithmIdentificationSequence(
        name="LiverSegUNet", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=structure.name,
            segmented_property_category=concept(structure.category),
            segmented_property_type=concept(structure.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*structure.color_rgb),
        )
        for number, structure in enumerate(structures, start=1)
    ]
    # frames in the headers' (k) order; one binary plane per segment on the last axis
    pixels = np.stack([np.asarray(m.array) > 0 for m in masks], axis=-1)
    seg = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=pixels if len(masks) > 1 else pixels[..., 0],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="LiverSegUNet",
        manufacturer_model_name=model_id,
        software_versions=__version__,
        device_serial_number="none",
        series_description=f"{', '.join(s.name for s in structures)} (LiverSegUNet)"[:64],
        omit_empty_frames=False,
    )
    seg.save_as(str(path))
