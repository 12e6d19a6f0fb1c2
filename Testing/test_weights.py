"""Model files: safetensors + JSON card, verified by checksum; the bundled model is complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from LiverSegUNetLib.errors import WeightsError
from LiverSegUNetLib.model import UNet2D
from LiverSegUNetLib.preprocess import Plan
from LiverSegUNetLib.weights import DEFAULT_MODEL, load_model, save_model

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
    # a copy with one flipped byte is refused
    shutil.copy(DEFAULT_MODEL, tmp_path / DEFAULT_MODEL.name)
    data = bytearray((DEFAULT_MODEL.parent / card["weights_file"]).read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / card["weights_file"]).write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum"):
        load_model(tmp_path / DEFAULT_MODEL.name)


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
