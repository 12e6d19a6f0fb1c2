"""A tiny real training run: data to an exported model that the product's inference loads and runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from LiverSegUNetLib.inference import segment
from LiverSegUNetLib.volume import Volume
from LiverSegUNetLib.weights import load_model

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_training_run_exports_a_loadable_model(ircadb_root, patient, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "training" / "train.py"),
        str(ROOT / "training" / "configs" / "liver_first.toml"),
        "--data",
        str(ircadb_root.parent),
        "--out",
        str(out),
        "--set",
        "epochs=1",
        "--set",
        "base=4",
        "--set",
        "depth=2",
        "--set",
        "crop=64",
        "--set",
        "batch_size=4",
        "--set",
        "samples_fraction=0.03",
        "--set",
        'train_patients=["3Dircadb1.7"]',
        "--set",
        "test_patients=[]",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    model = load_model(out / "model.json")
    assert model.card["provenance"]["train_patients"] == ["3Dircadb1.7"]
    assert model.plan.multiple == 4 and model.card["architecture"]["base"] == 4
    ct = patient("3Dircadb1.17").ct
    small = Volume(ct.array[50:54], ct.spacing_mm, ct.origin_lps, ct.direction)
    result = segment(small, model, device="cpu", postprocess=False)
    assert result.mask.same_grid(small) and result.mask.array.dtype == np.uint8
