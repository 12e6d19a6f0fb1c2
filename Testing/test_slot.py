"""Packed training slices and the leave-one-out sweep for a short GPU slot, run for real on the CPU."""

from __future__ import annotations

import json
import os
import tarfile

import pytest
import torch

from training import packed, slot, train

CONFIGS = slot.CONFIGS
TINY = ["epochs=1", "base=4", "depth=2", "crop=64", "batch_size=4", "extra_2d=''", "samples_fraction=0.25"]


def test_packed_slices_are_what_training_holds(patient, tmp_path):
    """A patient packed and loaded back gives the run the same slices, labels and contrast-free slices
    (to one 8-bit level); a file packed for another grid or other structures is refused."""
    cfg = train.load_config(CONFIGS / "liver_elastic.toml")
    plan, keys = train.plan_of(cfg), train.structure_keys(cfg)
    original = train.PatientSlices(patient("3Dircadb1.17"), keys, plan, unenhanced=True)
    path = packed.save(original, tmp_path / "p.slices", plan, keys)
    assert path.stat().st_size < original.images.numel()  # 8 bits for images, contrast-free and labels, compressed
    loaded = packed.load(path, plan, keys, unenhanced=True)
    assert isinstance(loaded, train.PatientSlices) and loaded.name == "3Dircadb1.17"
    for name in ("images", "labels", "unenhanced"):
        a, b = getattr(original, name).float(), getattr(loaded, name).float()
        assert a.shape == b.shape and (a - b).abs().max() <= 0.5 / 255 + 1e-3, name
    assert torch.equal(loaded.available, original.available)
    assert torch.equal(loaded.thumbs, original.thumbs)  # what a run checks the extra slices against
    torch.testing.assert_close(loaded.sample(40, 1, 0.5, 2), original.sample(40, 1, 0.5, 2), atol=3e-3, rtol=0)
    with pytest.raises(SystemExit, match="grid"):
        packed.load(path, train.plan_of(train.load_config(CONFIGS / "liver_scratch.toml")), keys)
    with pytest.raises(SystemExit, match="structures"):
        packed.load(path, plan, ["bone"])
    with pytest.raises(SystemExit, match="no packed slices"):
        packed.load(tmp_path / "absent.slices", plan, keys)


def test_pack_sweep_and_score_end_to_end(ircadb_root, tmp_path, monkeypatch):
    """Two patients packed; a tiny recipe swept over both folds from the packed files alone, in runs that
    cannot import pydicom or SimpleITK (as on the GPU machine); the returned tar unpacked and scored in 3D
    on the real patients."""
    data = tmp_path / "data"
    (data / "3Dircadb1").mkdir(parents=True)
    for name in ("3Dircadb1.1", "3Dircadb1.17"):
        (data / "3Dircadb1" / name).symlink_to(ircadb_root / name)
    cache = tmp_path / "cache"
    written = slot.pack("liver_elastic", data, cache, ["extra_2d=''"])
    assert [p.name for p in written] == ["3Dircadb1.1.slices", "3Dircadb1.17.slices"]
    assert slot.packed_patients(cache) == ["3Dircadb1.1", "3Dircadb1.17"]

    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['pydicom'] = sys.modules['SimpleITK'] = None\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "out"
    summary = slot.sweep(cache, ["liver_elastic"], out, TINY, jobs=2)
    result = summary["results"]["liver_elastic"]
    assert set(result["folds"]) == {"3Dircadb1.1", "3Dircadb1.17"}
    assert all(f["rc"] == 0 and 0.0 <= f["dice"] <= 1.0 for f in result["folds"].values()), result
    assert "| liver_elastic |" in (out / "sweep.md").read_text()
    card = json.loads((out / "runs" / "3Dircadb1.1" / "liver_elastic" / "model.json").read_text())
    assert card["provenance"]["train_patients"] == ["3Dircadb1.17"] and card["provenance"]["held_out_metrics"] == {}
    assert card["provenance"]["config"]["cache"] == str(cache.resolve())  # outside the repository: as given
    assert slot._relative(slot.ROOT / "training" / "cache") == "training/cache"  # inside: no machine path

    with tarfile.open(out / "liver_elastic.tar") as tar:
        names = sorted(tar.getnames())
    assert "3Dircadb1.17/liver_elastic/model.safetensors" in names and not any("checkpoint" in n for n in names)
    runs = tmp_path / "loo"
    cards = slot.score(out / "liver_elastic.tar", runs, data)
    assert len(cards) == 2
    for path in cards:
        metrics = json.loads(path.read_text())["provenance"]["held_out_metrics"]
        (patient,) = metrics
        assert path.parent.parent.name == patient and 0.0 <= metrics[patient]["dice"] <= 1.0
        assert {"assd_mm", "hd95_mm"} <= set(metrics[patient])


def test_sweep_without_packed_patients_says_to_pack_them(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(SystemExit, match="no packed patients"):
        slot.sweep(cache, ["liver_elastic"], tmp_path / "out", [], jobs=1)


def test_score_refuses_a_tar_that_is_not_a_sweeps(tmp_path):
    (tmp_path / "evil.txt").write_text("x")
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        tar.add(tmp_path / "evil.txt", arcname="../evil.txt")
    with pytest.raises(SystemExit, match="unexpected member"):
        slot.score(tmp_path / "bad.tar", tmp_path / "runs", tmp_path)
    assert not (tmp_path / "runs").exists()


def test_the_loo_stage_leaves_gpu_sized_experiments_to_the_sweep_unless_named(tmp_path, monkeypatch):
    from training import experiments

    data = tmp_path / "data"
    for p in ("3Dircadb1.1", "3Dircadb1.7"):
        (data / "3Dircadb1" / p / "PATIENT_DICOM").mkdir(parents=True)
    ran = []
    monkeypatch.setattr(experiments, "run", lambda config, out, data, sets: ran.append((config, out.parent.name)))
    experiments.loo(data, tmp_path / "runs", [], [])
    assert ran and not any(c in experiments.GPU_SIZED for c, _ in ran)
    assert {c for c, _ in ran} == set(experiments.EXPERIMENTS) - experiments.GPU_SIZED
    ran.clear()
    experiments.loo(data, tmp_path / "runs", [], ["liver_wide"])
    assert ran == [("liver_wide", "3Dircadb1.1"), ("liver_wide", "3Dircadb1.7")]
    cfg = train.load_config(CONFIGS / "liver_wide.toml")
    assert cfg["base"] == 32 and cfg["augment"]["elastic"] > 0  # the shipped recipe, wider and longer
