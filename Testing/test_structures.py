"""Output structures are model card data: a two-structure card flows through segment, every writer, the
summary and the Slicer Logic; bad structure lists are refused; the liver-only mask is unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from LiverSegUNetLib.errors import WeightsError
from LiverSegUNetLib.inference import segment
from LiverSegUNetLib.io import read_volume
from LiverSegUNetLib.io.images import read_image
from LiverSegUNetLib.io.segnrrd import read_mask, read_seg_nrrd
from LiverSegUNetLib.model import UNet2D
from LiverSegUNetLib.pipeline import segment_file
from LiverSegUNetLib.preprocess import Plan, normalize
from LiverSegUNetLib.sample import sample_ct_path
from LiverSegUNetLib.terminology import (
    ALTERED_STRUCTURE,
    ANATOMICAL_STRUCTURE,
    LIVER,
    Code,
    Structure,
    structures_from_card,
)
from LiverSegUNetLib.weights import card_structures, load_model, read_card, save_model

ROOT = Path(__file__).resolve().parents[1]
#: The last commit before output structures became card data (its model card is format 1).
BEFORE = "47016ad"
ORGAN = Structure("Organ A", (10, 200, 30), ANATOMICAL_STRUCTURE, Code("SCT", "1001", "Test organ"))
LESION = Structure(
    "Lesion B", (200, 20, 200), ALTERED_STRUCTURE, Code("SCT", "1002", "Test lesion"), "inside:Organ A", True
)


@pytest.fixture(scope="module")
def two_structure_card(tmp_path_factory, sample_ct):
    """A tiny random network with two outputs: 'Organ A' everywhere (bias), 'Lesion B' on the brightest
    fifth of its own random response (so it depends on the image and overlaps the organ)."""
    torch.manual_seed(0)
    net = UNet2D(3, 2, base=4, depth=2).eval()
    plan = Plan(multiple=4)
    x = normalize(torch.from_numpy(sample_ct.array[8:11].astype(np.float32)), plan)[None]
    with torch.no_grad():
        response = net(x)[0, 1]
        scale = 1.0 / float(response.std())
        net.head.weight[1] *= scale
        net.head.bias[1] = (net.head.bias[1] - float(response.quantile(0.8))) * scale
        net.head.bias[0] = 8.0
    folder = tmp_path_factory.mktemp("two")
    return save_model(net, plan, folder / "two", model_id="two-structures", structures=[ORGAN, LESION], dtype="float32")


@pytest.fixture(scope="module")
def result(two_structure_card, sample_ct):
    return segment(sample_ct, load_model(two_structure_card), device="cpu")


def test_segment_gives_one_mask_per_card_structure_with_its_rule(result):
    assert [s.name for s in result.structures] == ["Organ A", "Lesion B"]
    organ, lesion = (m.array.astype(bool) for m in result.masks)
    assert 0 < lesion.sum() < organ.sum()
    assert not (lesion & ~organ).any()  # inside:Organ A
    assert result.volumes_ml()["Lesion B"] == pytest.approx(lesion.sum() * result.masks[1].voxel_volume_ml)


def test_every_writer_holds_both_structures(two_structure_card, result, tmp_path):
    from dicom_factory import write_series

    ct = read_volume(sample_ct_path())
    write_series(tmp_path / "ct", ct.array.astype(np.float32), spacing_ij=ct.spacing_mm[:2], slice_gap=ct.spacing_mm[2])
    out = tmp_path / "out"
    summary = segment_file(
        tmp_path / "ct",
        out,
        model=load_model(two_structure_card),
        formats=("seg.nrrd", "nifti", "dicom-seg"),
        device="cpu",
    )
    source = read_volume(tmp_path / "ct")
    expected = segment(source, load_model(two_structure_card), device="cpu")
    organ, lesion = (m.array.astype(bool) for m in expected.masks)

    # .seg.nrrd: two segments, the overlapping one on a second layer; names, colours, codes
    layers, segments = read_seg_nrrd(out / "ct.seg.nrrd")
    assert len(layers) == 2 and [s["Name"] for s in segments] == ["Organ A", "Lesion B"]
    assert [s["Layer"] for s in segments] == ["0", "1"]
    assert [round(float(c) * 255) for c in segments[1]["Color"].split()] == [200, 20, 200]
    assert "SCT^49755003^Morphologically Altered Structure~SCT^1002^Test lesion" in segments[1]["Tags"]
    np.testing.assert_array_equal(read_mask(out / "ct.seg.nrrd", "Organ A").array, organ)
    np.testing.assert_array_equal(read_mask(out / "ct.seg.nrrd", "lesion b").array, lesion)

    # NIfTI label map: the later structure wins where they overlap; the legend names the values
    labels = read_image(out / "ct.nii.gz").array
    np.testing.assert_array_equal(labels == 2, lesion)
    np.testing.assert_array_equal(labels == 1, organ & ~lesion)
    legend = (out / "ct.labels.tsv").read_text().splitlines()
    assert legend[1].split("\t")[:3] == ["1", "Organ A", "10,200,30"]
    assert legend[2].split("\t")[:2] == ["2", "Lesion B"] and "1002 Test lesion" in legend[2]

    # DICOM-SEG: one segment per structure, coded, holding its mask
    hd = pytest.importorskip("highdicom")
    seg = hd.seg.segread(str(out / "ct.seg.dcm"))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Organ A", "Lesion B"]
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "1002"
    uids = [h.SOPInstanceUID for h in source.metadata["dicom_headers"]]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2])
    np.testing.assert_array_equal(pixels[..., 0] > 0, organ)
    np.testing.assert_array_equal(pixels[..., 1] > 0, lesion)

    # summary: per-structure volumes and the lesion measurements
    rows = {r["name"]: r for r in summary["structures"]}
    voxel_ml = source.voxel_volume_ml
    assert rows["Organ A"]["volume_ml"] == pytest.approx(organ.sum() * voxel_ml, abs=0.05)
    lesions = rows["Lesion B"]["lesions"]
    assert lesions["count"] == len(lesions["volumes_ml"]) >= 1
    rounding = 0.005 * lesions["count"]  # each lesion's volume is rounded to 0.01 ml
    assert sum(lesions["volumes_ml"]) == pytest.approx(lesion.sum() * voxel_ml, abs=rounding + 0.05)
    assert lesions["burden"] == pytest.approx(lesion.sum() / organ.sum(), abs=1e-3)
    assert summary["liver_volume_ml"] is None and summary["liver_found"] is False  # no structure named Liver
    assert json.loads((out / "ct.summary.json").read_text())["structures"] == summary["structures"]


def test_preview_has_a_legend_for_several_structures(result, sample_ct):
    from LiverSegUNetLib.preview import preview_image

    one = preview_image(sample_ct, result.masks[:1], result.structures[:1])
    two = preview_image(sample_ct, result.masks, result.structures)
    assert two.shape[0] > one.shape[0] and two.shape[1] == one.shape[1]
    legend = two[one.shape[0] :]
    assert (legend == np.array(LESION.color_rgb, np.uint8)).all(axis=-1).any()  # the swatch


def test_slicer_logic_writes_a_segment_per_structure_and_keeps_the_users(two_structure_card, sample_ct):
    pytest.importorskip("slicer")
    import headless

    slicer = headless.start()
    from LiverSegUNet import LiverSegUNetLogic

    slicer.mrmlScene.Clear()
    logic = LiverSegUNetLogic()
    node = logic.volumeNodeFromVolume(sample_ct, "CT")
    seg = logic.newSegmentationNode(node)
    user = seg.GetSegmentation().AddEmptySegment("mine", "My notes", [0.1, 0.2, 0.3])
    old = seg.GetSegmentation().AddEmptySegment("old", "organ a", [0.5, 0.5, 0.5])  # same name, other case
    stats = logic.process(node, seg, device="cpu", modelPath=two_structure_card)
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    assert segmentation.GetSegment(user).GetName() == "My notes"
    organ = segmentation.GetSegment(old)  # the same-named segment was the one replaced
    assert organ.GetName() == "Organ A" and np.allclose(organ.GetColor(), ORGAN.color)
    lesion_id = segmentation.GetSegmentIdBySegmentName("Lesion B")
    assert "SCT^1002^Test lesion" in segmentation.GetSegment(lesion_id).GetTerminology()
    result = segment(sample_ct, load_model(two_structure_card), device="cpu")
    for segment_id, mask in ((old, result.masks[0].array), (lesion_id, result.masks[1].array)):
        np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, segment_id, node) > 0, mask > 0)
    assert [r["name"] for r in stats["structures"]] == ["Organ A", "Lesion B"]

    # two segments with a produced structure's name: refused before anything changes
    segmentation.AddEmptySegment("dup", "Lesion B", [0, 0, 1])
    before = segmentation.GetNumberOfSegments()
    with pytest.raises(Exception, match="2 segments named 'Lesion B'"):
        logic.process(node, seg, device="cpu", modelPath=two_structure_card)
    assert segmentation.GetNumberOfSegments() == before


def _card(**change) -> dict:
    entries = [ORGAN.to_card(), LESION.to_card()]
    for index, fields in change.items():
        entries[int(index[1:])].update(fields)
    return entries


@pytest.mark.parametrize(
    "entries, channels, message",
    [
        (_card(), 3, "lists 2 structure(s) but the network has 3 output channel(s)"),
        (_card(s1={"name": "organ a"}), 2, "two structures are named 'organ a'"),
        (_card(s1={"type": ["SCT", "", "x"]}), 2, "needs a type code"),
        (_card(s0={"color": [10, 300, 0]}), 2, "needs a colour"),
        ([{k: v for k, v in ORGAN.to_card().items() if k != "category"}, LESION.to_card()], 2, "needs a category"),
        (_card(s1={"postprocess": "inside:Spleen"}), 2, "inside 'Spleen', which is not listed before it"),
        (_card(s1={"postprocess": "biggest"}), 2, "postprocess 'biggest' is none of"),
        ([], 2, "non-empty list"),
    ],
    ids=["channels", "duplicate", "code", "colour", "category", "inside", "rule", "empty"],
)
def test_bad_structure_lists_are_refused_by_name(entries, channels, message):
    with pytest.raises(WeightsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        structures_from_card(entries, channels, "model x")


def test_a_card_whose_structures_do_not_fit_the_network_is_refused_on_load(two_structure_card, tmp_path):
    card = json.loads(two_structure_card.read_text())
    card["structures"] = card["structures"][:1]
    (tmp_path / "two.json").write_text(json.dumps(card))
    (tmp_path / card["weights_file"]).write_bytes((two_structure_card.parent / card["weights_file"]).read_bytes())
    with pytest.raises(WeightsError, match="1 structure"):
        load_model(tmp_path / "two.json")


def test_format_1_cards_still_load_as_one_structure(tmp_path):
    """Models saved before the structure list (``label`` only) load, with the catalogue entry of their label."""
    old = subprocess.run(
        ["git", "show", f"{BEFORE}:LiverSegUNet/LiverSegUNetLib/models/liver_unet2d.json"],
        capture_output=True,
        cwd=ROOT,
    )
    if old.returncode != 0:
        pytest.fail("this test reads a format-1 card from the repository's history; clone with history (git clone)")
    card = json.loads(old.stdout)
    assert card["format"] == "liversegunet-model/1" and "structures" not in card
    (tmp_path / "m.json").write_text(json.dumps(card))
    assert [s.name for s in card_structures(card)] == ["Liver"]
    read_card(tmp_path / "m.json")


def test_liver_only_mask_unchanged_by_the_structures_refactor(ircadb_root, tmp_path):
    """The commit before output structures became card data, and this code, on the same model: same mask."""
    from patients import TEST_PATIENT

    archive = subprocess.run(["git", "archive", BEFORE, "LiverSegUNet/LiverSegUNetLib"], capture_output=True, cwd=ROOT)
    if archive.returncode != 0:
        pytest.fail(f"needs the repository's history (commit {BEFORE}): clone with git, not as an archive")
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True)
    old_lib = tmp_path / "LiverSegUNet"
    script = (
        "import sys, hashlib, numpy as np\n"
        "from LiverSegUNetLib.inference import segment\n"
        "from LiverSegUNetLib.io import read_volume\n"
        "from LiverSegUNetLib.weights import load_model\n"
        "r = segment(read_volume(sys.argv[1]), load_model(device='cpu'), device='cpu')\n"
        "print(r.precision, hashlib.sha256(np.packbits(r.mask.array)).hexdigest())\n"
    )
    case = ircadb_root / TEST_PATIENT
    proc = subprocess.run(
        [sys.executable, "-c", script, str(case)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(old_lib)},  # first on the path, before the installed package
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    precision, digest = proc.stdout.split()

    model = load_model(old_lib / "LiverSegUNetLib" / "models" / "liver_unet2d.json", device="cpu")
    now = segment(read_volume(case), model, device="cpu")
    assert now.precision == precision and [s.name for s in now.structures] == [LIVER.name]
    assert hashlib.sha256(np.packbits(now.mask.array)).hexdigest() == digest


def test_cli_prints_every_structure_of_a_model_without_a_liver(two_structure_card, tmp_path, capsys):
    from LiverSegUNetLib.cli import main

    assert main(["segment", "--sample", "--model", str(two_structure_card), "-o", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("totalseg_example_ct: Organ A ") and "Lesion B " in out and "lesion" in out
    summary = json.loads((tmp_path / "totalseg_example_ct.summary.json").read_text())
    assert summary["liver_volume_ml"] is None and [r["name"] for r in summary["structures"]] == ["Organ A", "Lesion B"]


def test_structures_of_many_pieces_stay_inside_the_body(sample_ct):
    """The 'all' rule keeps every component, but none in the air around the patient or on the table."""
    from LiverSegUNetLib import slicing
    from LiverSegUNetLib.preprocess import Reorientation
    from LiverSegUNetLib.weights import STRUCTURES_MODEL

    reorient = Reorientation(sample_ct)
    hu = reorient.forward(sample_ct.array)
    body = slicing.body_mask(hu)
    assert not body[:, 0, 0].any() and body[:, hu.shape[1] // 2, hu.shape[2] // 2].all()
    gas = (hu < -500) & body  # bowel gas and lung bases inside the outline count as body
    assert gas.any()
    assert not body[hu > slicing.BODY_HU].all()  # the table is bright but not body
    if not STRUCTURES_MODEL.is_file():
        pytest.skip("no multi-structure model bundled")
    result = segment(sample_ct, load_model(STRUCTURES_MODEL), device="cpu")
    for structure, mask in zip(result.structures, result.masks):
        if structure.postprocess == "all":
            assert not (reorient.forward(mask.array).astype(bool) & ~body).any(), structure.name
