"""NRRD / NIfTI / other ITK-readable files to and from Volume, through SimpleITK."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..limits import check_volume_size
from ..volume import Volume

#: File name endings read with SimpleITK.
IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name ends in a format read through SimpleITK."""
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def volume_from_sitk(image, what: str) -> Volume:
    """Convert a SimpleITK image to a Volume, refusing anything but a 3D single-channel image."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{what}: {image.GetNumberOfComponentsPerPixel()}-component (colour/vector) image; "
            "expected a single-channel CT"
        )
    if image.GetDimension() != 3:
        raise InputError(f"{what}: a {image.GetDimension()}D image; expected a 3D CT volume")
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)
    if array.shape[0] < 2:
        raise InputError(f"{what}: only {array.shape[0]} slice; a 3D CT volume needs at least 2 slices")
    if array.dtype not in (np.int16, np.uint8, np.float32):
        array = array.astype(np.float32)
    spacing = image.GetSpacing()
    if min(spacing) <= 0 or not np.all(np.isfinite(spacing)):
        raise InputError(f"{what}: voxel spacing {spacing} is not positive")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return Volume(array, spacing, image.GetOrigin(), direction, {"source_files": [what]})


def read_image(path: str | os.PathLike) -> Volume:
    """Read a 3D NRRD / NIfTI / MetaImage file."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        bytes_per_voxel = max(1, min(8, reader.GetNumberOfComponents() * 4))
        check_volume_size(reader.GetSize()[::-1], bytes_per_voxel, str(path))
        image = reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise InputError(f"{path}: not a readable image file ({first.strip()})") from exc
    return volume_from_sitk(image, str(path))


def sitk_from_volume(volume: Volume):
    """A SimpleITK image with the Volume's array and geometry."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.spacing_mm)
    image.SetOrigin(volume.origin_lps)
    image.SetDirection(volume.direction.ravel().tolist())
    return image
