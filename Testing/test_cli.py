"""``liverseg`` end to end on a real held-out patient, and its refusals of bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_series
from LiverSegUNetLib.cli import main
from LiverSegUNetLib.io.segnrrd import read_mask, read_seg_nrrd
from LiverSegUNetLib.metrics import dice
from LiverSegUNetLib.weights import DEFAULT_MODEL
from patients import TEST_PATIENT

LIVERSEG = str(Path(sys.executable).with_name("liverseg"))


def test_segment_real_patient_end_to_end(patient, ircadb_root, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [LIVERSEG, "segment", str(ircadb_root / TEST_PATIENT), "-o", str(out), "--format", "seg.nrrd,nifti"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    suffixes = (".seg.nrrd", ".nii.gz", ".labels.tsv", ".summary.json", ".preview.png")
    assert names == sorted(f"{TEST_PATIENT}{s}" for s in suffixes)
    expert = patient(TEST_PATIENT).mask("liver")
    (seg,), (segment,) = read_seg_nrrd(out / f"{TEST_PATIENT}.seg.nrrd")
    assert seg.same_grid(expert, tol_mm=1e-3) and segment["Name"] == "Liver"
    score = dice(seg.array > 0, expert.array)
    assert score >= 0.85, score
    np.testing.assert_array_equal(read_mask(out / f"{TEST_PATIENT}.nii.gz").array, seg.array)
    summary = json.loads((out / f"{TEST_PATIENT}.summary.json").read_text())
    assert summary["liver_volume_ml"] == pytest.approx(seg.array.sum() * seg.voxel_volume_ml, abs=0.1)
    assert summary["slices"] == 119 and {"read", "inference", "postprocess", "write", "total"} <= set(
        summary["seconds"]
    )
    assert summary["soft_tissue_raised_hu"] == 0  # an enhanced liver (median 101 HU): the network ran once
    assert f"{TEST_PATIENT}: liver" in proc.stdout and "raised" not in proc.stdout
    # evaluate prints the same Dice
    ev = subprocess.run(
        [LIVERSEG, "evaluate", str(out / f"{TEST_PATIENT}.seg.nrrd"), str(ircadb_root / TEST_PATIENT), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["dice"] == pytest.approx(score, abs=1e-4)


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    import SimpleITK as sitk

    tmp_path.mkdir(parents=True, exist_ok=True)
    cases = {}
    cases["text"] = tmp_path / "notes.txt"
    cases["text"].write_text("this is not a CT")
    cases["empty"] = tmp_path / "empty"
    cases["empty"].mkdir()
    cases["2d"] = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((64, 64), np.int16)), str(cases["2d"]))
    cases["rgb"] = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 64, 64, 3), np.uint8), isVector=True), str(cases["rgb"]))
    cases["truncated"] = tmp_path / "dicom"
    paths = write_series(cases["truncated"], np.zeros((5, 32, 32)) + 40)
    paths[3].write_bytes(paths[3].read_bytes()[:-500])
    labels = np.zeros((8, 64, 64), np.uint8)
    labels[2:6, 10:40, 10:50] = 1
    cases["labelmap"] = tmp_path / "liver_mask.nii.gz"  # a mask given where the CT belongs
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(cases["labelmap"]))
    cases["labels16"] = tmp_path / "organs.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray((labels * 7).astype(np.int16)), str(cases["labels16"]))
    cases["no_air"] = tmp_path / "no_air.nrrd"  # HU-like noise but nothing below -500: not in Hounsfield units
    noisy = np.random.default_rng(0).normal(60, 30, (8, 64, 64)).round().astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(noisy), str(cases["no_air"]))
    cases["missing"] = tmp_path / "no_such_folder"
    return cases


@pytest.mark.parametrize(
    "case, message",
    [
        ("text", "unsupported input"),
        ("empty", "no DICOM image files"),
        ("2d", "2D image"),
        ("rgb", "colour"),
        ("truncated", "pixel data cannot be decoded"),
        ("labelmap", "uint8 with values 0..1, not a CT"),
        ("labels16", "distinct values (0..7): a label map"),
        ("no_air", "has no air"),
        ("missing", "no such file or folder"),
    ],
)
def test_bad_input_clear_error_nothing_written(tmp_path, capsys, case, message):
    inputs = _bad_inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["segment", str(inputs[case]), "-o", str(out)]) == 2  # no -q: no progress line before the error
    err = capsys.readouterr().err
    assert err.startswith("liverseg: error:") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() or list(out.iterdir()) == []


def test_corrupted_weights_exit_code_and_nothing_written(patient, ircadb_root, tmp_path, capsys):
    from LiverSegUNetLib.weights import model_files

    files = model_files(DEFAULT_MODEL)  # the card, then the weights it runs (its own, or an ensemble's it shares)
    for f in files:
        shutil.copy(f, tmp_path / f.name)
    data = bytearray(files[-1].read_bytes())
    data[1000] ^= 0x10
    (tmp_path / files[-1].name).write_bytes(bytes(data))
    out = tmp_path / "out"
    code = main(
        ["segment", str(ircadb_root / TEST_PATIENT), "-o", str(out), "--model", str(tmp_path / DEFAULT_MODEL.name)]
    )
    assert code == 3
    assert "checksum mismatch" in capsys.readouterr().err
    assert not out.exists()


def test_cancel_leaves_no_file(patient, ircadb_root, tmp_path, monkeypatch):
    from LiverSegUNetLib import pipeline
    from LiverSegUNetLib.errors import Cancelled

    calls = []
    with pytest.raises(Cancelled):
        pipeline.segment_file(
            ircadb_root / TEST_PATIENT,
            tmp_path,
            device="cpu",
            cancel=lambda: len(calls) > 0,
            progress=lambda s, f: calls.append(s),
        )
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_and_device(ircadb_root, tmp_path, capsys):
    assert main(["segment", str(ircadb_root / TEST_PATIENT), "-o", str(tmp_path), "--format", "stl"]) == 2
    assert "unknown output format" in capsys.readouterr().err
    assert main(["segment", str(ircadb_root / TEST_PATIENT), "-o", str(tmp_path), "--device", "tpu"]) == 2
    assert "unknown device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bench_measures_our_pipeline_in_a_fresh_process(ircadb_root):
    from training.bench import bench

    row = bench.measure("ours", ircadb_root / TEST_PATIENT)
    assert row["slices"] == 119 and row["peak_mb"] > 100 and row["process_start_s"] > 0
    assert {"read", "inference", "postprocess", "resample", "write"} <= set(row["stages_s"])
    assert abs(sum(row["stages_s"].values()) - row["seconds"]) < 0.5  # the stages account for the total
    text = bench.table({TEST_PATIENT: {"ours": [row]}}, bench.machine(), "python -m training.bench")
    assert f"| {TEST_PATIENT} | ours | 119 | 1 |" in text and "1.0x" in text


def test_readme_command_one_segments_the_bundled_sample_without_any_data(tmp_path):
    """README set-up command 1 (`liverseg segment --sample -o out`) on a machine without 3D-IRCADb."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert ".venv/bin/liverseg segment --sample -o out\n" in readme
    env = {**os.environ, "LIVERSEG_DATA": str(tmp_path / "no_data_here")}
    proc = subprocess.run(
        [LIVERSEG, "segment", "--sample", "-o", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("totalseg_example_ct: liver ") and " ml in 20 slices" in proc.stdout
    summary = json.loads((tmp_path / "out" / "totalseg_example_ct.summary.json").read_text())
    assert 300 < summary["liver_volume_ml"] < 1000
    (seg,), (segment,) = read_seg_nrrd(tmp_path / "out" / "totalseg_example_ct.seg.nrrd")
    assert segment["Name"] == "Liver" and seg.shape == (20, 512, 512)


def test_a_closed_pipe_on_stdout_stops_quietly_after_complete_outputs(tmp_path):
    """``liverseg segment ... | head`` with the reader gone: no traceback, the SIGPIPE exit code, and the case
    written whole (its lines are printed after its files)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the first line printed meets a broken pipe
    try:
        proc = subprocess.run(
            [LIVERSEG, "segment", "--sample", "-o", "out"],
            cwd=tmp_path,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr, proc.stderr
    summary = json.loads((tmp_path / "out" / "totalseg_example_ct.summary.json").read_text())
    assert summary["liver_volume_ml"] > 300
    assert read_mask(tmp_path / "out" / "totalseg_example_ct.seg.nrrd").array.any()


def test_segment_without_input_says_what_to_give(tmp_path, capsys):
    assert main(["segment", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no input given" in err and "--sample" in err
    assert not (tmp_path / "out").exists()


def test_a_ct_without_liver_is_reported_not_silent(tmp_path, capsys):
    """A real-looking CT that holds no liver: exit 0, a warning on stderr, and the summaries say so."""
    k, j, i = np.meshgrid(np.arange(6), np.arange(64), np.arange(64), indexing="ij")
    hu = np.full((6, 64, 64), -1000.0)
    hu[((j - 32) / 28) ** 2 + ((i - 32) / 30) ** 2 < 1] = -80  # a body of fat: nothing like a liver
    hu += np.random.default_rng(0).normal(0, 15, hu.shape).round()
    write_series(tmp_path / "in" / "fat", hu)
    write_series(tmp_path / "in" / "fat2", hu)
    assert main(["segment", str(tmp_path / "in" / "fat"), "-o", str(tmp_path / "out"), "-q"]) == 0
    captured = capsys.readouterr()
    assert "liverseg: warning: fat: no liver found" in captured.err and "liver 0.0 ml" in captured.out
    assert json.loads((tmp_path / "out" / "fat.summary.json").read_text())["liver_found"] is False
    assert main(["segment", str(tmp_path / "in"), "-o", str(tmp_path / "batch"), "-q"]) == 0
    rows = json.loads((tmp_path / "batch" / "batch_summary.json").read_text())
    assert all(r["status"] == "ok" and r["reason"].startswith("no liver found") for r in rows)


def test_accurate_runs_the_bundled_ensemble_or_says_none_is_bundled(tmp_path, capsys, monkeypatch):
    from LiverSegUNetLib import weights
    from LiverSegUNetLib.model import Ensemble

    assert weights.ACCURATE_MODEL.is_file(), f"this version bundles the accurate model {weights.ACCURATE_MODEL.name}"
    assert isinstance(weights.load_model(weights.ACCURATE_MODEL).network, Ensemble)
    assert main(["segment", "--sample", "--accurate", "-o", str(tmp_path / "acc"), "-q", "--no-preview"]) == 0
    assert main(["segment", "--sample", "-o", str(tmp_path / "one"), "-q", "--no-preview"]) == 0
    accurate = json.loads(next((tmp_path / "acc").glob("*.summary.json")).read_text())
    default = json.loads(next((tmp_path / "one").glob("*.summary.json")).read_text())
    assert accurate["model_id"] == json.loads(weights.ACCURATE_MODEL.read_text())["model_id"] != default["model_id"]
    assert accurate["liver_volume_ml"] == pytest.approx(default["liver_volume_ml"], rel=0.1)
    capsys.readouterr()
    monkeypatch.setattr(weights, "ACCURATE_MODEL", tmp_path / "absent.json")
    assert main(["segment", "--sample", "--accurate", "-o", str(tmp_path / "none")]) == 2
    assert "--accurate: no accurate (ensemble) model is bundled" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    with pytest.raises(SystemExit):  # one model at a time
        main(["segment", "--sample", "--accurate", "--structures", "-o", str(tmp_path / "both")])
