"""Extension packaging: CMake lists match the files, the catalog entry matches the project, the .ui has every widget."""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "LiverSegUNet"


def _cmake_set(text: str, name: str) -> list[str]:
    match = re.search(rf"set\({name}\s+(.*?)\)", text, re.S)
    assert match, name
    return match.group(1).split()


def _cmake_globs(text: str) -> dict[str, set[str]]:
    """``file(GLOB VAR RELATIVE ${CMAKE_CURRENT_SOURCE_DIR} pattern)`` lines, expanded as CMake would."""
    globs = {}
    for var, pattern in re.findall(r"file\(GLOB (\w+) RELATIVE \$\{CMAKE_CURRENT_SOURCE_DIR\} (\S+)\)", text):
        pattern = pattern.replace("${MODULE_NAME}", "LiverSegUNet")
        globs[var] = {str(p.relative_to(MODULE)) for p in MODULE.glob(pattern) if p.is_file()}
    return globs


def test_module_cmake_lists_every_script_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text()
    globs = _cmake_globs(text)
    listed = {s.replace("${MODULE_NAME}", "LiverSegUNet") for s in _cmake_set(text, "MODULE_PYTHON_SCRIPTS")}
    resources = set()
    for token in _cmake_set(text, "MODULE_PYTHON_RESOURCES"):
        variable = re.fullmatch(r"\$\{(\w+)\}", token)
        resources |= globs[variable.group(1)] if variable else {token.replace("${MODULE_NAME}", "LiverSegUNet")}
    assert len(globs["MODULE_SAMPLE_CT"]) == 20
    on_disk = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    assert listed == on_disk
    for r in resources:
        assert (MODULE / r).is_file(), r
    shipped = {str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*") if p.is_file()}
    for data in ("models", "sample_data"):
        shipped |= {str(p.relative_to(MODULE)) for p in (MODULE / "LiverSegUNetLib" / data).rglob("*") if p.is_file()}
    assert shipped == resources
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_extension_cmake_metadata_and_catalog_entry():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(LiverSegUNet\)", text, re.M)
    fields = dict(re.findall(r'set\((EXTENSION_\w+)\s+"?(.*?)"?\)\n', text))
    for key in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_DEPENDS",
    ):
        assert fields.get(key), key
    assert fields["EXTENSION_DEPENDS"] == "PyTorch" and fields["EXTENSION_CATEGORY"] == "Segmentation"
    assert "add_subdirectory(LiverSegUNet)" in text
    icon = fields["EXTENSION_ICONURL"].rsplit("/main/", 1)[1]
    assert (ROOT / icon).is_file()
    import SimpleITK as sitk

    image = sitk.ReadImage(str(ROOT / icon))
    assert image.GetSize() == (128, 128) and image.GetNumberOfComponentsPerPixel() in (3, 4)
    catalog = json.loads((ROOT / "Resources" / "LiverSegUNet.json").read_text())
    allowed = {
        "$schema",
        "build_dependencies",
        "build_subdirectory",
        "category",
        "scm_revision",
        "scm_type",
        "scm_url",
        "tier",
        "enabled",
    }
    assert set(catalog) <= allowed and {"$schema", "category", "scm_url"} <= set(catalog)
    assert catalog["category"] == fields["EXTENSION_CATEGORY"]
    assert catalog["build_dependencies"] == fields["EXTENSION_DEPENDS"].split(";")
    assert catalog["scm_url"].removesuffix(".git") in fields["EXTENSION_ICONURL"].replace(
        "raw.githubusercontent.com", "github.com"
    )
    assert (ROOT / "LICENSE").is_file()


def test_every_widget_the_code_uses_exists_in_the_ui():
    names = {w.get("name") for w in ET.parse(MODULE / "Resources" / "UI" / "LiverSegUNet.ui").iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "LiverSegUNet.py").read_text()))
    assert used and used <= names, used - names


def test_module_file_imports_nothing_heavy_at_file_scope():
    tree = ast.parse((MODULE / "LiverSegUNet.py").read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add((node.module or "").split(".")[0])
    assert top <= {"logging", "os", "re", "threading", "time", "numpy", "slicer", "vtk"}, top


def test_screenshots_are_in_the_repository_and_the_readme():
    text = (ROOT / "CMakeLists.txt").read_text()
    urls = re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]+)"\)', text).group(1).split()
    readme = (ROOT / "README.md").read_text()
    assert len(urls) >= 1
    import SimpleITK as sitk

    for url in urls:
        path = url.rsplit("/main/", 1)[1]
        assert (ROOT / path).is_file(), path
        assert sitk.ReadImage(str(ROOT / path)).GetSize()[0] >= 800
        assert path in readme, f"{path} is not shown in the README"


def test_bundled_sample_ct_matches_its_checksums_and_keeps_its_license():
    import hashlib

    data = MODULE / "LiverSegUNetLib" / "sample_data"
    sums = dict(line.split()[::-1] for line in (data / "SHA256SUMS").read_text().splitlines() if line.strip())
    files = {str(p.relative_to(data)) for p in (data / "totalseg_example_ct").iterdir()}
    assert files == set(sums) and len(files) == 20
    for name, digest in sums.items():
        assert hashlib.sha256((data / name).read_bytes()).hexdigest() == digest, name
    assert "Apache License" in (data / "LICENSE-TotalSegmentator.txt").read_text()
    from LiverSegUNetLib.sample import ATTRIBUTION

    assert ATTRIBUTION in (data / "README.md").read_text()
    assert ATTRIBUTION in (ROOT / "README.md").read_text()


def test_the_command_line_imports_where_resource_is_missing():
    """Windows has no ``resource`` module: the CLI (which lists the bench methods) must still import."""
    import subprocess
    import sys

    code = "import sys; sys.modules['resource'] = None; import LiverSegUNetLib.cli as c; c.build_parser(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_the_sample_ct_decodes_with_the_package_s_own_requirements():
    """The sample is JPEG 2000 compressed: the package must require the decoder pydicom uses for it (pillow)."""
    import importlib.metadata

    import pydicom

    requirements = {
        re.split(r"[<>=!;\s\[]", r, maxsplit=1)[0].lower() for r in importlib.metadata.requires("liversegunet")
    }
    assert "pillow" in requirements
    first = sorted((MODULE / "LiverSegUNetLib" / "sample_data" / "totalseg_example_ct").iterdir())[0]
    ds = pydicom.dcmread(first)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    if hasattr(ds, "pixel_array_options"):  # pydicom 3: decode with pillow only, not whatever else is installed
        ds.pixel_array_options(decoding_plugin="pillow")
    assert ds.pixel_array.shape == (512, 512)
