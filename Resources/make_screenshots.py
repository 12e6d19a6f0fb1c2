"""Draw the screenshots in Resources/Screenshots/ from a real run on the bundled sample CT.

    python Resources/make_screenshots.py            # needs matplotlib (pip install -e ".[test]")

The sample CT (TotalSegmentator example, Apache-2.0 / CC BY 4.0) is segmented with the bundled
model through the same ``segment()`` the command line and the Slicer module call; the pictures show
what a user sees in Slicer: axial, coronal and sagittal slices with the liver outlined (abdomen
window) and the liver surface in 3D (VTK, off-screen) beside the spine and ribs for orientation.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LIVER_RGB = (221 / 255, 130 / 255, 101 / 255)
BONE_HU = 250


def bones(hu: np.ndarray) -> np.ndarray:
    """Bone inside the patient's body: the table and clothing are outside the largest body component."""
    import SimpleITK as sitk

    body = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray((hu > -300).astype(np.uint8))))
    return (hu > BONE_HU) & (sitk.GetArrayFromImage(body) == 1)


def render_3d(ct, mask, size=(900, 900)) -> np.ndarray:
    """RGB image of the liver surface (and a translucent bone surface) from the front, slightly above."""
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

    def image(array, dtype):
        array = np.pad(array, 1)  # closes the surfaces where the slab ends
        data = vtk.vtkImageData()
        data.SetDimensions(*array.shape[::-1])  # (i, j, k)
        data.SetSpacing(*ct.spacing_mm)
        data.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(array, dtype).ravel(), deep=True))
        return data

    def surface(data, level, color, opacity, smooth):
        edges = vtk.vtkFlyingEdges3D()
        edges.SetInputData(data)
        edges.SetValue(0, level)
        smoother = vtk.vtkWindowedSincPolyDataFilter()
        smoother.SetInputConnection(edges.GetOutputPort())
        smoother.SetNumberOfIterations(smooth)
        smoother.SetPassBand(0.05)
        smoother.NormalizeCoordinatesOn()
        normals = vtk.vtkPolyDataNormals()
        normals.SetInputConnection(smoother.GetOutputPort())
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputConnection(normals.GetOutputPort())
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*color)
        actor.GetProperty().SetOpacity(opacity)
        actor.GetProperty().SetSpecular(0.2)
        return actor

    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.09, 0.09, 0.12)
    renderer.AddActor(surface(image(bones(ct.array), np.float32), 0.5, (0.93, 0.91, 0.84), 0.35, 10))
    renderer.AddActor(surface(image(mask, np.float32), 0.5, LIVER_RGB, 1.0, 20))
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    window.AddRenderer(renderer)
    # Image axes are LPS: x to the patient's left, y posterior, z superior. Look from the front
    # (anterior, -y) and a little above, so the patient's right is on the viewer's left as in Slicer.
    camera = renderer.GetActiveCamera()
    camera.SetFocalPoint(0, 0, 0)
    camera.SetPosition(0, -1, 0)
    camera.SetViewUp(0, 0, 1)
    camera.Elevation(25)
    renderer.ResetCamera()
    camera.Zoom(1.1)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    out = grab.GetOutput()
    width, height, _ = out.GetDimensions()
    rgb = vtk_to_numpy(out.GetPointData().GetScalars()).reshape(height, width, -1)[..., :3]
    return rgb[::-1]  # VTK rows start at the bottom


def draw(ct, mask, volume_ml: float, seconds: float, attribution: str, out_dir: Path) -> list[Path]:
    """Write the slice panel and the 3D view; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = np.clip((ct.array.astype(np.float32) + 160) / 400, 0, 1)  # abdomen window: level 40, width 400
    sk, sj, si = np.asarray(ct.spacing_mm)[::-1]
    k, j, i = (int(round(c)) for c in np.argwhere(mask).mean(axis=0))
    views = [
        ("Axial", window[k], mask[k], si / sj),
        ("Coronal", window[::-1, j, :], mask[::-1, j, :], sk / si),  # superior at the top
        ("Sagittal", window[::-1, :, i], mask[::-1, :, i], sk / sj),
    ]
    three_d = render_3d(ct, mask)
    written = []

    fig = plt.figure(figsize=(16, 9), dpi=100, facecolor="black")
    grid = fig.add_gridspec(3, 2, width_ratios=[1, 1], height_ratios=[5, 1.3, 1.3], wspace=0.03, hspace=0.12)
    for (title, gray, seg, aspect), cell in zip(views, [grid[0, 0], grid[1, 0], grid[2, 0]]):
        ax = fig.add_subplot(cell)
        ax.imshow(gray, cmap="gray", vmin=0, vmax=1, aspect=1 / aspect if title == "Axial" else aspect)
        ax.contour(seg, levels=[0.5], colors=[LIVER_RGB], linewidths=1.6)
        ax.set_title(title, color="white", fontsize=11, loc="left")
        ax.axis("off")
    ax = fig.add_subplot(grid[:, 1])
    ax.imshow(three_d)
    ax.set_title("3D", color="white", fontsize=11, loc="left")
    ax.axis("off")
    fig.suptitle(
        f"Liver Seg UNet on the bundled sample CT: Liver {volume_ml:.1f} ml in {seconds:.1f} s (CPU)",
        color="white",
        fontsize=15,
    )
    fig.text(0.5, 0.01, attribution, color="#aaaaaa", ha="center", fontsize=9)
    written.append(_save(fig, out_dir / "sample_ct_liver.png"))
    plt.close(fig)

    fig = plt.figure(figsize=(8, 8), dpi=100, facecolor="black")
    ax = fig.add_axes([0, 0.04, 1, 0.96])
    ax.imshow(three_d)
    ax.axis("off")
    fig.text(0.5, 0.015, attribution, color="#aaaaaa", ha="center", fontsize=8)
    written.append(_save(fig, out_dir / "sample_ct_liver_3d.png"))
    plt.close(fig)
    return written


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor=fig.get_facecolor(), metadata={"Software": None})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=HERE / "Screenshots", help="folder for the PNG files")
    args = parser.parse_args(argv)

    import time

    from LiverSegUNetLib.inference import segment
    from LiverSegUNetLib.io import read_volume
    from LiverSegUNetLib.sample import ATTRIBUTION, sample_ct_path

    t = time.perf_counter()
    ct = read_volume(sample_ct_path())
    result = segment(ct, device="cpu")
    seconds = time.perf_counter() - t
    for path in draw(ct, result.mask.array, result.volume_ml, seconds, ATTRIBUTION, args.output):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
