"""Model files: safetensors + JSON card, verified by checksum; the bundled model is complete."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from LiverSegUNetLib.errors import WeightsError
from LiverSegUNetLib.model import UNet2D
from LiverSegUNetLib.preprocess import Plan
from LiverSegUNetLib.weights import DEFAULT_MODEL, load_model, model_files, save_member_card, save_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def small_model(tmp_path) -> Path:
    torch.manual_seed(0)
    net = UNet2D(3, 1, base=4, depth=2).eval()
    return save_model(net, Plan(multiple=4), tmp_path / "small", model_id="test-small", provenance={"why": "test"})


def test_save_load_same_outputs(small_model):
    torch.manual_seed(0)
    reference = UNet2D(3, 1, base=4, depth=2).eval()
    loaded = load_model(small_model)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(x), reference(x), atol=2e-2, rtol=2e-2)
    assert loaded.model_id == "test-small" and loaded.plan == Plan(multiple=4)
    assert loaded.card["provenance"] == {"why": "test"}


def test_a_width_capped_network_keeps_its_depth_and_round_trips(tmp_path):
    capped, full = UNet2D(3, 1, base=4, depth=3, max_width=8), UNet2D(3, 1, base=4, depth=3)
    widths = [m.out_channels for m in capped.modules() if isinstance(m, torch.nn.Conv2d)][:-1]
    assert max(widths) == 8 and 4 in widths  # 4, 8, 8, 8: doubling up to the cap, the four levels kept
    assert sum(p.numel() for p in capped.parameters()) < sum(p.numel() for p in full.parameters()) / 3
    assert "max_width" not in full.architecture()  # uncapped cards read as before
    torch.manual_seed(1)
    capped = UNet2D(3, 1, base=4, depth=3, max_width=8).eval()
    card = save_model(capped, Plan(multiple=8), tmp_path / "capped", model_id="test-capped")
    loaded = load_model(card)
    assert loaded.card["architecture"]["max_width"] == 8
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(x), capped(x), atol=2e-2, rtol=2e-2)


def test_saving_the_same_weights_again_keeps_the_file_and_its_checksum(small_model):
    """safetensors writes its metadata in no fixed order: a card re-saved with new provenance only (as
    ``training.rescore`` does) must keep the weights file byte for byte, or every re-save is a new copy in git."""
    import struct

    weights = small_model.with_suffix(".safetensors")
    data = weights.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(reversed(header["__metadata__"].items()))  # another order safetensors may write
    text = json.dumps(header, separators=(", ", ": ")).encode()  # and spaced: bytes no new save can repeat
    text += b" " * (-len(text) % 8)
    reordered = struct.pack("<Q", len(text)) + text + data[8 + n :]
    assert reordered != data
    weights.write_bytes(reordered)
    card = json.loads(small_model.read_text())
    card["weights_sha256"] = hashlib.sha256(reordered).hexdigest()
    small_model.write_text(json.dumps(card))
    model = load_model(small_model)
    save_model(model.network, model.plan, small_model, model_id="test-small", provenance={"why": "again"})
    assert weights.read_bytes() == reordered  # kept, not rewritten in the new order
    again = load_model(small_model)
    assert again.card["provenance"] == {"why": "again"} and again.card["weights_sha256"] == card["weights_sha256"]
    with torch.no_grad():
        next(model.network.parameters()).add_(1.0)
    save_model(model.network, model.plan, small_model, model_id="test-small")
    assert weights.read_bytes() != reordered
    assert load_model(small_model).card["weights_sha256"] != card["weights_sha256"]


def test_corrupted_weights_refused(small_model):
    weights = small_model.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_model(small_model)


def test_edited_card_refused(small_model):
    card = json.loads(small_model.read_text())
    card["preprocessing"]["threshold"] = 0.1
    small_model.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="do not match"):
        load_model(small_model)


def test_missing_and_malformed_files(small_model, tmp_path):
    small_model.with_suffix(".safetensors").unlink()
    with pytest.raises(WeightsError, match="weights file not found"):
        load_model(small_model)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_model(tmp_path / "junk.json")
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "absent.json")


def test_bundled_model_is_complete(tmp_path):
    card = json.loads(DEFAULT_MODEL.read_text())
    assert "non-commercial" in card["license"] and "IRCAD" in card["license"]
    prov = card["provenance"]
    patients = {"3Dircadb1.1", "3Dircadb1.7", "3Dircadb1.17"}
    assert set(prov["train_patients"]) == patients and prov["test_patients"] == []
    loo = prov["leave_one_out_metrics"]
    assert set(loo) == patients and all(0 < m["dice"] <= 1 for m in loo.values())
    model = load_model()
    assert model.plan.in_channels == card["architecture"]["in_channels"]
    # a copy with one flipped byte in the weights it runs is refused
    files = model_files(DEFAULT_MODEL)
    for f in files:
        shutil.copy(f, tmp_path / f.name)
    data = bytearray(files[-1].read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / files[-1].name).write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum"):
        load_model(tmp_path / DEFAULT_MODEL.name)


def test_a_card_runs_one_ensemble_member_on_the_ensemble_weights(tmp_path):
    """``weights_of``: a card that runs one member of an ensemble beside it, with no copy of its weights; the
    member's outputs are exactly what it gives inside the ensemble, and a card that does not describe that
    member, or names one that is not there, is refused with what to do."""
    from LiverSegUNetLib.model import Ensemble

    members = _members()
    ensemble = save_model(Ensemble(members), Plan(multiple=4), tmp_path / "ens", model_id="ens", dtype="float32")
    with pytest.raises(WeightsError, match="not a member 2"):
        save_member_card(ensemble, 2, tmp_path / "alone", model_id="alone", provenance={})
    assert not (tmp_path / "alone.json").exists()
    card = save_member_card(ensemble, 1, tmp_path / "alone", model_id="alone", provenance={"note": "kept"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone.json", "ens.json", "ens.safetensors"]
    assert model_files(card) == [card, ensemble, tmp_path / "ens.safetensors"]
    alone = load_model(card)
    assert isinstance(alone.network, UNet2D) and alone.card["provenance"] == {"note": "kept"}
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(alone.network(x), members[1](x), atol=1e-5, rtol=1e-5)
    content = json.loads(card.read_text())
    for edit, message in [
        ({"architecture": {**content["architecture"], "base": 4}}, "architecture differs from member 1"),
        ({"preprocessing": {**content["preprocessing"], "hu_max": 255.0}}, "preprocessing differs from member 1"),
        ({"weights_of": {"card": "ens.json", "member": 5}}, "names member 5 of ens.json"),
        ({"weights_of": {"card": "ens.json"}}, "must name a 'card'"),
        ({"weights_of": {"card": "absent.json", "member": 0}}, "model card not found"),
    ]:
        (tmp_path / "edited.json").write_text(json.dumps({**content, **edit}))
        with pytest.raises(WeightsError, match=message):
            load_model(tmp_path / "edited.json")
    single = save_model(members[0], Plan(multiple=4), tmp_path / "single", model_id="single", dtype="float32")
    (tmp_path / "edited.json").write_text(json.dumps({**content, "weights_of": {"card": single.name, "member": 0}}))
    with pytest.raises(WeightsError, match="not an ensemble"):
        load_model(tmp_path / "edited.json")


def test_the_shipped_card_holds_its_tables_and_the_readme_shows_them():
    """The bundled model's card keeps the leave-one-out and robustness tables it was chosen on; the README matches."""
    import statistics

    from LiverSegUNetLib.weights import DEFAULT_MODEL

    provenance = json.loads(DEFAULT_MODEL.read_text())["provenance"]
    loo, robustness = provenance["leave_one_out_metrics"], provenance["robustness_dice"]
    readme = (ROOT / "README.md").read_text()
    patients = sorted(loo, key=lambda p: int(p.rsplit(".", 1)[1]))
    assert len(patients) == 3 and "robustness" in provenance["chosen_as"]
    for patient in patients:
        m = loo[patient]
        assert f"| {patient} | {m['dice']:.3f} | {m['assd_mm']:.2f} mm | {m['hd95_mm']:.1f} mm |" in readme, patient
    conditions = {"native", "thick_3mm", "thick_5mm", "unenhanced", "unenhanced_3mm", "low_dose", "pixel_1.0mm"}
    assert conditions <= set(robustness)
    for condition, per_patient in robustness.items():
        assert set(per_patient) == set(patients), condition  # every held-out patient, scored by its own fold
        cells = " | ".join(f"{per_patient[p]:.3f}" for p in patients)
        mean = statistics.mean(per_patient.values())
        assert f"| {condition} | {cells} | {mean:.3f} |" in readme, condition


def test_the_accurate_card_holds_its_fold_ensemble_tables_and_the_readme_shows_them():
    """The bundled accurate model is an ensemble whose card keeps the fold ensembles' robustness table and
    their native Dice as leave-one-out metrics; the README's accurate-mode table matches it."""
    import statistics

    from LiverSegUNetLib.weights import ACCURATE_MODEL, DEFAULT_MODEL

    card = json.loads(ACCURATE_MODEL.read_text())
    assert card["architecture"]["name"] == "Ensemble" and len(card["architecture"]["members"]) >= 2
    provenance = card["provenance"]
    robustness, default = provenance["robustness_dice"], json.loads(DEFAULT_MODEL.read_text())["provenance"]
    patients = sorted(robustness["native"], key=lambda p: int(p.rsplit(".", 1)[1]))
    # the default may also be scored on conditions added after the accurate fold ensembles were scored
    assert len(patients) == 3 and set(robustness) <= set(default["robustness_dice"])
    assert {p: m["dice"] for p, m in provenance["leave_one_out_metrics"].items()} == robustness["native"]
    section = (ROOT / "README.md").read_text().split("### Accurate mode", 1)[1]
    for condition, per_patient in robustness.items():
        cells = " | ".join(f"{per_patient[p]:.3f}" for p in patients)
        mine, theirs = (
            statistics.mean(per_patient.values()),
            statistics.mean(default["robustness_dice"][condition].values()),
        )
        assert f"| {condition} | {cells} | {mine:.3f} | {theirs:.3f} |" in section, condition


def _members(out_channels: int = 1) -> list[UNet2D]:
    torch.manual_seed(1)
    return [UNet2D(3, out_channels, base=4, depth=2).eval(), UNet2D(3, out_channels, base=8, depth=2).eval()]


def test_an_ensemble_is_the_mean_of_its_members_and_round_trips(tmp_path):
    from LiverSegUNetLib.model import Ensemble

    members = _members()
    card = save_model(Ensemble(members), Plan(multiple=4), tmp_path / "ens", model_id="test-ensemble", dtype="float32")
    loaded = load_model(card)
    assert isinstance(loaded.network, Ensemble) and len(loaded.network.members) == 2
    architecture = loaded.card["architecture"]
    assert architecture["name"] == "Ensemble" and [m["base"] for m in architecture["members"]] == [4, 8]
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        expected = (members[0](x) + members[1](x)) / 2
        torch.testing.assert_close(loaded.network(x), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(members[0](x), members[1](x), atol=1e-3)  # the mean differs from either member


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda a: a.update(members=a["members"][:1]), "two or more UNet2D members"),
        (lambda a: a["members"][1].update(name="Ensemble"), "every Ensemble member must be a UNet2D"),
        (lambda a: a["members"][1].update(out_channels=2), "agree on out_channels"),
    ],
)
def test_a_malformed_ensemble_architecture_is_refused(edit, message):
    from LiverSegUNetLib.model import Ensemble
    from LiverSegUNetLib.weights import build_network

    architecture = Ensemble(_members()).architecture()
    edit(architecture)
    with pytest.raises(WeightsError, match=message):
        build_network(architecture)


def test_export_makes_an_ensemble_of_the_chosen_structures(tmp_path):
    from LiverSegUNetLib.model import Ensemble
    from LiverSegUNetLib.terminology import CATALOGUE

    from training.export import main as export

    liver, bone = CATALOGUE["liver"], CATALOGUE["bone"]
    multi, single = _members(2)[0], _members(1)[1]
    a = save_model(multi, Plan(multiple=4), tmp_path / "a", model_id="multi", structures=[liver, bone], dtype="float32")
    b = save_model(single, Plan(multiple=4), tmp_path / "b", model_id="single", dtype="float32")
    out = tmp_path / "ens.json"
    assert export([str(a), str(b), "--to", str(out), "--structures", "Liver"]) == 0
    model = load_model(out)
    assert isinstance(model.network, Ensemble) and [s.name for s in model.structures] == ["Liver"]
    assert [m["model_id"] for m in model.card["provenance"]["ensemble_of"]] == ["multi", "single"]
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.network(x), (multi(x)[:, :1] + single(x)) / 2, atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit, match="structures"):  # without --structures the members' outputs differ
        export([str(a), str(b), "--to", str(tmp_path / "bad.json")])
    other = save_model(single, Plan(multiple=4, spacing_mm=2.0), tmp_path / "c", model_id="other", dtype="float32")
    with pytest.raises(SystemExit, match="preprocessing"):
        export([str(b), str(other), "--to", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()


def test_an_ensemble_of_networks_of_different_depths_pads_to_the_deepest(tmp_path):
    from training.export import main as export

    torch.manual_seed(2)
    shallow, deep = UNet2D(3, 1, base=4, depth=2).eval(), UNet2D(3, 1, base=4, depth=3).eval()
    a = save_model(shallow, Plan(multiple=4), tmp_path / "a", model_id="shallow", dtype="float32")
    b = save_model(deep, Plan(multiple=8), tmp_path / "b", model_id="deep", dtype="float32")
    out = tmp_path / "ens.json"
    assert export([str(a), str(b), "--to", str(out)]) == 0
    model = load_model(out)
    assert model.plan.multiple == 8  # the deeper member's stride: a 4-multiple grid would break it
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(model.network(x), (shallow(x) + deep(x)) / 2, atol=1e-5, rtol=1e-5)


def test_a_card_whose_grid_multiple_does_not_fit_the_network_is_refused(tmp_path):
    deep = UNet2D(3, 1, base=4, depth=3).eval()
    card = save_model(deep, Plan(multiple=4), tmp_path / "m", model_id="bad-multiple", dtype="float32")
    with pytest.raises(WeightsError, match="multiple of 8"):
        load_model(card)
