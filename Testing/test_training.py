"""Training: a tiny real run to a loadable model, transfer/freeze semantics, honest splits, DDP, the report."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from LiverSegUNetLib.inference import segment
from LiverSegUNetLib.preprocess import Plan
from LiverSegUNetLib.runtime import autocast_for
from LiverSegUNetLib.terminology import CATALOGUE
from LiverSegUNetLib.volume import Volume
from LiverSegUNetLib.weights import load_model, save_model

from training import overlap, train

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ROOT / "training" / "configs"
TINY = ["epochs=1", "base=4", "depth=2", "crop=64", "batch_size=4"]


def _train(ircadb_root, out: Path, config: str, *sets: str, runner=(sys.executable,)) -> subprocess.CompletedProcess:
    cmd = [
        *runner,
        "-m",
        "training.train",
        str(CONFIGS / f"{config}.toml"),
        "--data",
        str(ircadb_root.parent),
        "--out",
        str(out),
    ]
    for s in (*TINY, *sets):
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_tiny_training_run_exports_a_loadable_model(ircadb_root, patient, tmp_path):
    proc = _train(
        ircadb_root,
        tmp_path / "run",
        "liver_scratch",
        "samples_fraction=0.05",
        'train_patients=["3Dircadb1.7"]',
        'test_patients=["3Dircadb1.17"]',
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    assert set(history[0]["val"]) == {"loss", "dice", "accuracy"}
    model = load_model(tmp_path / "run" / "model.json")
    prov = model.card["provenance"]
    assert prov["train_patients"] == ["3Dircadb1.7"] and set(prov["held_out_metrics"]) == {"3Dircadb1.17"}
    assert model.plan.multiple == 4 and model.card["architecture"]["base"] == 4
    ct = patient("3Dircadb1.17").ct
    small = Volume(ct.array[50:54], ct.spacing_mm, ct.origin_lps, ct.direction)
    result = segment(small, model, device="cpu", postprocess=False)
    assert result.mask.same_grid(small) and result.mask.array.dtype == np.uint8
    assert model.plan.opening_mm == 7.5  # common.toml's cleanup travels in the card

    # re-scored with another cleanup: same weights, new plan in card and weights, metrics measured again
    from training import rescore

    card = tmp_path / "run" / "model.json"
    after = rescore.rescore(card, {"opening_mm": 0.0}, ircadb_root.parent)
    again = load_model(card)
    assert again.plan.opening_mm == 0.0 and set(after) == {"3Dircadb1.17"}
    record = again.card["provenance"]["rescored"][-1]
    assert record["plan"] == {"opening_mm": 0.0} and set(record["held_out_metrics_before"]) == {"3Dircadb1.17"}
    assert again.card["provenance"]["config"]["plan"]["opening_mm"] == 0.0
    for a, b in zip(model.network.state_dict().values(), again.network.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(SystemExit, match="retrain"):
        rescore.parse_sets(["hu_min=0"])

    # a liver floor needs no retraining either; a card carrying its recipe's tables (as a final model's does) takes
    # the robustness table scored with the new plan, and only one whose native Dice is the card's own
    assert rescore.parse_sets(["liver_floor_hu=60"]) == {"liver_floor_hu": 60.0}
    with pytest.raises(SystemExit, match="no robustness table"):
        rescore.rescore(card, {"liver_floor_hu": 60.0}, ircadb_root.parent, table={"native": {}})
    content = json.loads(card.read_text())
    dice = round(json.loads(card.read_text())["provenance"]["held_out_metrics"]["3Dircadb1.17"]["dice"], 4)
    content["provenance"] |= {
        "leave_one_out_metrics": {"3Dircadb1.17": {"dice": dice}},
        "robustness_dice": {"native": {"3Dircadb1.17": dice}},
    }
    card.write_text(json.dumps(content))
    new_table = {"native": {"3Dircadb1.17": dice}, "unenhanced_dark": {"3Dircadb1.17": 0.5}}
    with pytest.raises(SystemExit, match="not the card's leave-one-out Dice"):
        rescore.rescore(card, {"liver_floor_hu": 60.0}, ircadb_root.parent, table={"native": {"3Dircadb1.17": 0.1}})
    rescore.rescore(
        card, {"liver_floor_hu": 60.0}, ircadb_root.parent, table=new_table, table_from="--entry x@floor=60"
    )
    floored = load_model(card)
    assert floored.plan.liver_floor_hu == 60.0 and floored.card["provenance"]["robustness_dice"] == new_table
    assert floored.card["provenance"]["rescored"][-1]["command"].endswith("--set liver_floor_hu=60 --entry x@floor=60")
    # the same entry scored on one more condition since: the card takes the table alone, its plan unchanged
    wider = {**new_table, "arterial": {"3Dircadb1.17": 0.6}}
    rescore.rescore(card, {}, ircadb_root.parent, table=wider, table_from="--entry x@floor=60")
    widened = load_model(card)
    assert widened.plan == floored.plan and widened.card["provenance"]["robustness_dice"] == wider
    assert widened.card["weights_sha256"] == floored.card["weights_sha256"]
    record = widened.card["provenance"]["rescored"][-1]
    assert record["plan"] == {} and record["command"].endswith(".json --entry x@floor=60")


def test_multi_structure_run_scores_each_structure_and_exports_a_chosen_few(ircadb_root, tmp_path):
    """liver_multi in miniature: a channel per structure, held-out metrics for those the test patient has
    masks for (patient 17 has no spleen), and export keeping only some channels."""
    from training import export

    proc = _train(
        ircadb_root,
        tmp_path / "run",
        "liver_multi",
        "samples_fraction=0.1",
        'extra_2d=""',
        "augment.unenhanced_p=0.0",
        'train_patients=["3Dircadb1.7"]',
        'test_patients=["3Dircadb1.17"]',
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = load_model(tmp_path / "run" / "model.json")
    assert [s.name for s in model.structures][:3] == ["Liver", "Liver tumours", "Portal vein"]
    assert model.card["architecture"]["out_channels"] == 9
    scores = model.card["provenance"]["held_out_metrics"]["3Dircadb1.17"]["structures"]
    assert "spleen" not in scores and {"liver", "liver_tumours", "bone"} <= set(scores)
    assert set(scores["liver_tumours"]["lesions"]) >= {"reference", "found", "missed", "false"}
    assert scores["liver_tumours"]["lesions"]["reference"] == 2
    assert (
        export.main(
            [
                str(tmp_path / "run" / "model.json"),
                "--to",
                str(tmp_path / "two.json"),
                "--structures",
                "Liver, portal vein",
            ]
        )
        == 0
    )
    two = load_model(tmp_path / "two.json")
    assert [s.name for s in two.structures] == ["Liver", "Portal vein"]
    torch.testing.assert_close(two.network.head.weight, model.network.head.weight[[0, 2]])
    with pytest.raises(SystemExit, match="not in the model"):
        export.main([str(tmp_path / "run" / "model.json"), "--to", str(tmp_path / "x.json"), "--structures", "Heart"])


def test_extra_slices_are_turned_to_the_radiological_view(msd_root):
    extra = train.ExtraSlices(msd_root, Plan(hu_min=0, hu_max=255, multiple=16), pixel_mm=1.5)
    assert extra.images.shape == (643, 256, 256) and len(extra.cases) == 122
    assert extra.sample(0, 1).shape == (4, 256, 256)  # the slice as its own neighbours, then its label
    liver_right = 0
    for image, label in zip(extra.images.float(), extra.labels.float()):
        cols = torch.arange(image.shape[1], dtype=torch.float32)
        body = (image > 0.1).float()
        liver_col = (label.sum(0) * cols).sum() / label.sum()
        body_col = (body.sum(0) * cols).sum() / body.sum()
        liver_right += bool(liver_col < body_col)  # patient's right is the image's left
    assert liver_right >= 0.97 * len(extra.images)


#: The msd_liver_2d cases that are shared 3D-IRCADb-01 patients (LiTS includes the database), by patient.
SAME_PATIENT = {"3Dircadb1.1": "10049", "3Dircadb1.7": "10056", "3Dircadb1.17": "10067"}


def test_extra_cases_showing_a_held_out_patient_are_found_by_their_pixels(msd_root, patient):
    """Each shared patient is one msd_liver_2d case, found from the pixels alone and only for that patient;
    dropping it removes its slices (every version) and nothing else, and no slice left shows the patient."""
    extra = train.ExtraSlices(msd_root, Plan(hu_min=0, hu_max=255, multiple=16), pixel_mm=1.5, varied=1)
    thumbs = {name: overlap.thumbnails(patient(name).ct.array) for name in SAME_PATIENT}
    for name, case in SAME_PATIENT.items():
        assert overlap.cases_showing(extra.case_of, extra.thumbs, {name: thumbs[name]}) == {case: name}
    assert overlap.cases_showing(extra.case_of, extra.thumbs, thumbs) == {c: n for n, c in SAME_PATIENT.items()}
    n, slices = extra.images.shape[0], extra.case_of.count("10067")
    kept = torch.tensor([c != "10067" for c in extra.case_of])
    first_kept = extra.images[kept][0].clone()
    assert slices == 5 and extra.drop_cases({"10067": "3Dircadb1.17"}) == slices
    assert "10067" not in extra.cases and len(extra.case_of) == n - slices
    for name in ("images", "labels", "unenhanced", "thumbs"):
        assert getattr(extra, name).shape[0] == n - slices, name
    assert extra.unenhanced_varied[0].shape[0] == n - slices
    assert torch.equal(extra.images[0], first_kept)
    assert not overlap.same_slices(extra.thumbs, thumbs["3Dircadb1.17"]).any()
    # a slice is found again after the 8-bit storage and a transposed flip, as the msd slices were made
    ct = patient("3Dircadb1.7").ct.array[70].clip(0, 255)
    stored = F.interpolate(torch.from_numpy(ct[None, None].astype(np.float32)), size=(256, 256), mode="area")
    stored = stored[0, 0].round().numpy()[::-1, :].T
    assert overlap.same_slices(overlap.thumbnails(stored[None]), thumbs["3Dircadb1.7"]).all()
    assert not overlap.same_slices(overlap.thumbnails(stored[None]), thumbs["3Dircadb1.1"]).any()


def test_extra_slices_lose_their_contrast_on_the_fly_and_drop_cases_with_it(msd_root):
    """``unenhanced_fresh`` on the extra slices: no version kept, the structure map is cut with the slices, and a
    sample's liver lands at the unenhanced value drawn for it."""
    plan = Plan(hu_min=0, hu_max=255, multiple=16)
    extra = train.ExtraSlices(msd_root, plan, pixel_mm=1.5, varied=3, fresh=True)
    assert extra.unenhanced is None and extra.unenhanced_varied == []
    n, slices = extra.images.shape[0], extra.case_of.count("10067")
    assert extra.drop_cases({"10067": "3Dircadb1.17"}) == slices
    assert extra.contrast_free.structures.shape == extra.images.shape == (n - slices, 256, 256)
    k = int(np.argmax(extra.labels[:, 0].float().sum(dim=(1, 2))))
    rng = np.random.default_rng(0)
    for liver_hu in (38.0, 62.0):
        mapping = {"targets": {"liver": liver_hu}, "contrast": 0.6, "pull": 0.3}
        x = extra.sample(k, 1, unenhanced=1.0, version=1, mapping=mapping, rng=rng)
        assert float(x[1][x[3] > 0.5].median()) * 255 == pytest.approx(liver_hu, abs=3)


def test_training_with_extra_slices_records_them(ircadb_root, msd_root, tmp_path):
    """A run with extra slices records them, leaving out the case that is its test patient."""
    proc = _train(
        ircadb_root,
        tmp_path / "run",
        "liver_scratch_msd",
        "samples_fraction=0.05",
        'train_patients=["3Dircadb1.7"]',
        'test_patients=["3Dircadb1.17"]',
        "validate=false",
        "augment.arterial_p=0.5",  # the CT and the extra slices both get late-arterial versions
        "augment.arterial_versions=1",
        "augment.gamma_p=0.5",  # and a gamma curve on half the samples
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "samples whose contrast is kept (arterial versions per set: 1)" in proc.stderr
    prov = load_model(tmp_path / "run" / "model.json").card["provenance"]
    assert prov["config"]["augment"]["arterial_p"] == 0.5
    assert prov["config"]["augment"]["gamma_p"] == 0.5 and prov["config"]["augment"]["gamma"] == [0.7, 1.5]
    assert prov["extra_2d_left_out"] == {"10067": "3Dircadb1.17"}
    assert prov["extra_2d_slices"] == 643 - 5 and "Decathlon" in prov["data"]
    assert prov["config"]["plan"]["hu_min"] == 0 and prov["config"]["plan"]["hu_max"] == 255


def test_a_run_trains_on_coronal_and_sagittal_slices_and_is_scored_in_every_direction(ircadb_root, tmp_path):
    """``augment.view_p`` with the plan's other views: the run draws from them beside the axial and extra slices,
    and its card runs (and was scored) in every direction; without other views in the plan the share is refused
    before any data is read."""
    sets = ["samples_fraction=0.05", 'train_patients=["3Dircadb1.7"]', 'test_patients=["3Dircadb1.17"]']
    proc = _train(ircadb_root, tmp_path / "run", "liver_views_avg", *sets, "augment.unenhanced_p=0.0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "50% of the CT samples from the coronal and sagittal views (267/267 slices per patient)" in proc.stderr
    model = load_model(tmp_path / "run" / "model.json")
    assert model.plan.views == ("axial", "coronal", "sagittal")
    assert (
        "views axial+coronal+sagittal" in proc.stderr and "3Dircadb1.17" in model.card["provenance"]["held_out_metrics"]
    )
    proc = _train(ircadb_root, tmp_path / "refused", "liver_views_avg", *sets, 'plan.views=["axial"]')
    assert proc.returncode != 0 and "augment.view_p takes samples from plan.views other than axial" in proc.stderr
    assert "training slices" not in proc.stderr  # refused before the patients were read
    proc = _train(ircadb_root, tmp_path / "arterial", "liver_views_avg", *sets, "augment.arterial_p=0.4")
    assert proc.returncode != 0 and "augment.arterial_p takes late-arterial versions" in proc.stderr
    assert "training slices" not in proc.stderr
    proc = _train(ircadb_root, tmp_path / "gamma", "liver_gamma_avg", *sets, "augment.gamma=[0.0, 1.5]")
    assert proc.returncode != 0 and "augment.gamma must be [low, high] with 0 < low <= high" in proc.stderr
    assert "training slices" not in proc.stderr


def test_overlapping_split_is_refused(ircadb_root, tmp_path):
    proc = _train(
        ircadb_root,
        tmp_path / "run",
        "liver_scratch",
        'train_patients=["3Dircadb1.7"]',
        'test_patients=["3Dircadb1.7"]',
    )
    assert proc.returncode != 0 and "both in training and test" in proc.stderr


class _Fake(train.PatientSlices):
    """Slices of one value (``tag``) that sample as a patient's do."""

    def __init__(self, n, tag):
        self.images = torch.full((n, 8, 8), float(tag))
        self.labels = torch.zeros((n, 1, 8, 8))
        self.available = torch.ones(1, dtype=torch.bool)
        self.unenhanced = None


def test_subset_is_reproducible_and_from_training_patients_only():
    train_set = [_Fake(40, 1), _Fake(60, 2)]
    a = train.training_samples(train_set, 0.25, subset_seed=1234)
    b = train.training_samples(train_set, 0.25, subset_seed=1234)
    c = train.training_samples(train_set, 0.25, subset_seed=99)
    assert a == b and a != c and len(a) == 25
    assert all(p in (0, 1) and k < train_set[p].images.shape[0] for p, k in a)
    # every slice a batch is built from comes from the training list it is given
    plan = Plan(multiple=4)
    aug = {"unenhanced_p": 0.0, "thick_p": 0.5, "thick_slices": [2, 3]}
    x, _, _ = train.make_batch(train_set, a[:6], plan, 8, np.random.default_rng(0), aug)
    assert set(torch.unique(x).tolist()) <= {1.0, 2.0}


@pytest.fixture()
def source_card(tmp_path) -> Path:
    torch.manual_seed(3)
    net = train.UNet2D(3, 1, base=4, depth=2)
    for m in net.modules():  # give batch-norm non-trivial statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    return save_model(
        net, Plan(multiple=4), tmp_path / "bone", model_id="bone-test", structures=[CATALOGUE["bone"]], dtype="float32"
    )


def _cfg(**over):
    cfg = train.load_config(CONFIGS / "liver_transfer_25.toml", [f"{k}={v}" for k, v in over.items()])
    return cfg


def test_transfer_loads_the_source_encoder(source_card):
    cfg = _cfg(base=4, depth=2, init_from=json.dumps(str(source_card)))
    net = train.initial_network(cfg, train.plan_of(cfg))
    source = load_model(source_card).network
    for a, b in zip(net.encoder_parameters(), source.encoder_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(net.encoder[0][1].running_mean, source.encoder[0][1].running_mean, rtol=0, atol=0)


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_encoder_does_not_move_and_decoder_does(source_card, frozen):
    cfg = _cfg(base=4, depth=2, init_from=json.dumps(str(source_card)), freeze_encoder=str(frozen).lower())
    net = train.initial_network(cfg, train.plan_of(cfg))
    before_enc = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(("encoder", "bottleneck"))}
    before_dec = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(("decoder", "ups", "head"))}
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    train.set_train_mode(net, cfg)
    x, y = torch.rand(4, 3, 32, 32), (torch.rand(4, 1, 32, 32) > 0.5).float()
    train.train_step(net, opt, sched, (x, y, torch.ones(4, 1, dtype=torch.bool)), autocast_for("cpu")[0], "cpu")
    after = net.state_dict()
    enc_same = all(torch.equal(after[k], v) for k, v in before_enc.items())
    assert enc_same == frozen
    assert any(not torch.equal(after[k], v) for k, v in before_dec.items())


def test_weight_average_is_the_mean_of_the_averaged_epochs_and_survives_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = train.UNet2D(3, 1, base=4, depth=2)
    average = train.WeightAverage(net, start=2)
    seen = []
    for epoch in (1, 2, 3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        average.add(net, epoch)
        if epoch >= 2:
            seen.append({n: p.detach().clone() for n, p in net.named_parameters()})
    assert average.count == 2
    # through a checkpoint and back (an interrupted run resumes with its average)
    opt = torch.optim.AdamW(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    rng, gen = np.random.default_rng(0), torch.Generator()
    train.save_checkpoint(tmp_path / "ck", net, opt, sched, 3, [], rng, gen, average)
    resumed = train.WeightAverage(net, start=2)
    assert train.load_checkpoint(tmp_path / "ck", net, opt, sched, rng, gen, resumed)[0] == 3
    assert resumed.count == 2
    resumed.apply(net)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p, (seen[0][n] + seen[1][n]) / 2)
    with pytest.raises(ValueError, match="no epoch"):
        train.WeightAverage(net, start=9).apply(net)
    for share, start in ((0.0, 0), (0.5, 16), (0.9, 28)):
        assert train.averaging_start({"average_from": share, "epochs": 30}) == start
    with pytest.raises(SystemExit, match="between 0 and 1"):
        train.averaging_start({"average_from": 1.5, "epochs": 30})


@pytest.mark.parametrize("frozen", [False, True])
def test_batch_norm_is_measured_again_on_the_given_batches_frozen_layers_kept(frozen):
    torch.manual_seed(1)
    net = train.UNet2D(3, 1, base=4, depth=2)
    if frozen:
        for p in net.encoder_parameters():
            p.requires_grad_(False)
    first = net.encoder[0][1]  # the first batch-norm layer, right after the first convolution
    before = first.running_mean.clone()
    batches = [torch.randn(2, 3, 16, 16) * 3 + 5, torch.randn(2, 3, 16, 16) * 3 - 1]
    measured = train.measure_batch_norm(net, iter(batches), torch.autocast("cpu", enabled=False), "cpu")
    assert not net.training and first.momentum == 0.1
    if frozen:
        assert torch.equal(first.running_mean, before) and measured < 10
        return
    assert measured == 10
    conv = net.encoder[0][0]
    with torch.no_grad():
        expected = torch.stack([conv(x).mean((0, 2, 3)) for x in batches]).mean(0)
    torch.testing.assert_close(first.running_mean, expected, rtol=1e-4, atol=1e-4)


def test_a_weight_averaged_run_saves_the_average_and_its_last_weights(ircadb_root, tmp_path):
    proc = _train(
        ircadb_root,
        tmp_path / "run",
        "liver_scratch",
        "epochs=2",
        "average_from=0.5",
        "snapshots=[1, 2]",
        "samples_fraction=0.05",
        'train_patients=["3Dircadb1.7"]',
        'test_patients=["3Dircadb1.17"]',
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "averaged the weights of 1 epochs from epoch 2 on" in proc.stderr
    # the weights on the way are kept where asked: the last epoch's snapshot is the last weights, an earlier one not
    snaps = {e: load_model(tmp_path / "run" / f"epoch{e}" / "model.json") for e in (1, 2)}
    assert set(snaps[1].card["provenance"]["held_out_metrics"]) == {"3Dircadb1.17"}
    assert not (tmp_path / "run" / "epoch3").exists()
    averaged, last = load_model(tmp_path / "run" / "model.json"), load_model(tmp_path / "run" / "last" / "model.json")
    prov = averaged.card["provenance"]
    assert set(prov["held_out_metrics"]) == set(prov["held_out_metrics_last_weights"]) == {"3Dircadb1.17"}
    assert prov["held_out_metrics_last_weights"] == last.card["provenance"]["held_out_metrics"]
    # one epoch averaged: the same weights, but batch-norm statistics measured again
    a, b = averaged.network.state_dict(), last.network.state_dict()
    assert torch.equal(a["head.weight"], b["head.weight"])
    assert all(torch.equal(v, snaps[2].network.state_dict()[k]) for k, v in b.items())
    assert not torch.equal(snaps[1].network.state_dict()["head.weight"], b["head.weight"])
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("running_mean"))
    # the robustness evaluation finds the last weights by name beside the average
    from training import robustness

    runs = tmp_path / "loo"
    (runs / "3Dircadb1.17").mkdir(parents=True)
    (runs / "3Dircadb1.17" / "avg").symlink_to(tmp_path / "run")
    found = robustness.loo_models(runs, ["avg", "avg/last"], "cpu")
    assert sorted(found) == ["avg", "avg/last"] and found["avg/last"][0][1] == "3Dircadb1.17"


@pytest.mark.skipif(
    shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="torchrun not installed"
)
def test_torchrun_two_cpu_processes_keep_equal_weights(ircadb_root, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    proc = _train(
        ircadb_root,
        tmp_path / "ddp",
        "liver_scratch",
        "samples_fraction=0.1",
        'device="cpu"',
        'train_patients=["3Dircadb1.7"]',
        "test_patients=[]",
        runner=(torchrun, "--nproc_per_node", "2", "--master_port", "29517"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = [(tmp_path / "ddp" / f"rank{r}.sha256").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    card = json.loads((tmp_path / "ddp" / "model.json").read_text())
    assert card["provenance"]["processes"] == 2


def test_report_is_written_from_runs(tmp_path):
    from training import report

    runs = tmp_path / "loo"
    for patient, dice in (("3Dircadb1.1", 0.9), ("3Dircadb1.7", 0.8)):
        for exp in ("liver_scratch", "liver_transfer_25", "liver_robust", "liver_multi"):
            folder = runs / patient / exp
            folder.mkdir(parents=True)
            metrics = {"dice": dice, "voe": 0.2, "rvd": 0.01, "assd_mm": 2.0, "hd95_mm": 9.0, "accuracy": 0.99}
            if exp == "liver_multi":
                metrics["dice"] += 0.01
                lesions = {"reference": 3, "found": 2, "missed": 1, "false": 1, "split": 0, "merged": 0}
                metrics["structures"] = {
                    "liver": {"dice": dice + 0.01},
                    "liver_tumours": {"dice": 0.6, "pred_ml": 10.0, "ref_ml": 12.0, "lesions": lesions},
                    **({"spleen": {"dice": 0.9}} if patient == "3Dircadb1.1" else {}),
                }
            prov = {
                "organ": "liver",
                "training_slices": 100,
                "config": {"epochs": 2},
                "train_seconds": 60.0,
                "held_out_metrics": {patient: metrics},
                "test_patients": [patient],
                "precision": "bf16",
                "processes": 1,
                "device": "cpu",
                "command": f"python -m training.train {exp}",
            }
            if exp == "liver_robust":  # extra slices, trained before runs left out the held-out patient's own
                prov["extra_2d_slices"] = 643
            if exp == "liver_multi":
                prov |= {"extra_2d_slices": 640, "extra_2d_left_out": {"10049": patient}}
            (folder / "model.json").write_text(json.dumps({"provenance": prov}))
            hist = [
                {"epoch": e, "loss": 1.0 / e, "val": {"loss": 1.0, "dice": 0.5 * e, "accuracy": 0.9}} for e in (1, 2)
            ]
            (folder / "history.json").write_text(json.dumps(hist))
    path = report.write_report(runs, tmp_path / "results")
    text = path.read_text()
    assert "| liver_scratch | liver | 100 | 2 | 0.850 ± 0.071 |" in text
    assert "0.900 / 2.00 / 9.0" in text and "Why pixel accuracy flatters" in text
    # runs that saw the held-out patient's own extra slices are marked, in both tables, and the mark explained
    assert "| liver_robust † | liver | 100 + 643 2D | 2 |" in text and "| liver_robust † | 0.900 / 2.00" in text
    assert "| liver_multi | liver | 100 + 640 2D | 2 |" in text and "| liver_multi | 0.910 / 2.00" in text
    assert "\n† Trained before the runs left out the msd_liver_2d slices of the held-out patient\n" in text
    # the multi-structure section: blank where a patient has no mask, what ships, the liver with and without
    assert "| Spleen | 0.900 |  | 0.900 | yes |" in text
    assert "| Liver tumours | 0.600 | 0.600 | 0.600 | no |" in text
    assert "| 3Dircadb1.7 | 3 | 2 | 1 | 1 | 0 | 0 | 10.0 / 12.0 |" in text
    assert "| mean | 0.850 | 0.860 | +0.010 |" in text
    assert {p.name for p in (tmp_path / "results").glob("*.png")} == {
        "curves_train_loss.png",
        "curves_val_loss.png",
        "curves_val_dice.png",
        "curves_val_accuracy.png",
    }


@pytest.mark.parametrize(
    "override, message",
    [
        ("epocs=5", "unknown config key 'epocs'; known keys: augment, average_from, base"),
        ("augment.nosie=0.1", "unknown config key 'augment.nosie'; known keys in augment: arterial_min, arterial_p"),
        ("epochs=5.5", "config key 'epochs' must be int (like 30), got 5.5"),
        ("epochs=true", "config key 'epochs' must be int"),
        ('lr="fast"', "config key 'lr' must be float"),
        ("epochs", "expected KEY=VALUE"),
    ],
)
def test_a_typo_or_a_wrong_type_in_the_config_is_refused(override, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.load_config(CONFIGS / "liver_scratch.toml", [override])
    cfg = train.load_config(CONFIGS / "liver_scratch.toml", ["epochs=5", "lr=1", "plan.spacing_mm=2"])
    assert cfg["epochs"] == 5 and cfg["lr"] == 1 and cfg["plan"]["spacing_mm"] == 2


def test_every_experiment_config_is_valid_and_run_by_the_experiments():
    from training import experiments

    for path in CONFIGS.glob("*.toml"):
        train.load_config(path)
    names = {p.stem for p in CONFIGS.glob("*.toml")} - {"common"}
    assert names == set(experiments.EXPERIMENTS), "a config the experiments never run, or one without a file"


def test_the_report_question_is_asked_again_at_the_shipped_recipe():
    """The *_final transfer configs train with the shipped default's training recipe (``liver_general``, which the
    default ``liver_general_avg`` reads out with averaged weights; RESULTS.md, rows "(general)"): its network,
    window, augmentations and extra slices (the bone source without the liver-only slices), only the organ, subset
    and start differ, and how the weights are read out (``experiments.READ_OUT_KEYS``)."""
    from training import experiments

    shipped = json.loads((ROOT / "LiverSegUNet/LiverSegUNetLib/models/liver_unet2d.json").read_text())
    recipe = train.load_config(CONFIGS / f"{shipped['provenance']['config']['name']}.toml")
    assert recipe["name"] == "liver_general_avg" and recipe["average_from"] > 0

    def differs(cfg):
        return {k for k in cfg if cfg[k] != recipe[k]} - experiments.READ_OUT_KEYS

    for name in ("bone_pretrain_final", "liver_scratch_25_final", "liver_transfer_25_final"):
        cfg = train.load_config(CONFIGS / f"{name}.toml")
        assert cfg["plan"] == recipe["plan"] and cfg["augment"] == recipe["augment"], name
        assert [cfg[k] for k in ("depth", "base", "max_width")] == [recipe[k] for k in ("depth", "base", "max_width")]
    scratch = train.load_config(CONFIGS / "liver_scratch_25_final.toml")
    assert differs(scratch) == {"samples_fraction"}
    bone = train.load_config(CONFIGS / "bone_pretrain_final.toml")
    assert differs(bone) == {"organ", "epochs", "extra_2d", "extra_2d_share"}
    assert differs(train.load_config(CONFIGS / "liver_general.toml")) == set()
    assert "(general)" in (ROOT / "training/results/RESULTS.md").read_text()


def test_the_shipped_recipe_trades_a_little_native_dice_for_a_better_worst_condition(tmp_path):
    from training import experiments

    def fold(exp, patient, value):
        card = tmp_path / patient / exp / "model.json"
        card.parent.mkdir(parents=True)
        card.write_text(json.dumps({"provenance": {"held_out_metrics": {patient: {"dice": value}}}}))

    for patient, a, b in [("p1", 0.93, 0.925), ("p2", 0.91, 0.905)]:
        fold("liver_scratch_msd", patient, a)
        fold("liver_robust", patient, b)
    assert experiments.best_liver_experiment(tmp_path)[0] == "liver_scratch_msd"  # native Dice alone
    robustness = {
        "liver_scratch_msd": {"native": {"p1": 0.93, "p2": 0.91}, "unenhanced": {"p1": 0.70, "p2": 0.75}},
        "liver_robust": {"native": {"p1": 0.925, "p2": 0.905}, "unenhanced": {"p1": 0.90, "p2": 0.89}},
    }
    assert experiments.best_liver_experiment(tmp_path, robustness)[0] == "liver_robust"
    # a worst condition better by less than two runs of one recipe differ does not outweigh the native lead
    robustness["liver_scratch_msd"]["unenhanced"] = {"p1": 0.893, "p2": 0.893}  # worst 0.893 against 0.895
    assert experiments.best_liver_experiment(tmp_path, robustness)[0] == "liver_scratch_msd"
    robustness["liver_scratch_msd"]["unenhanced"] = {"p1": 0.889, "p2": 0.889}  # 0.006 below: the trade is made
    assert experiments.best_liver_experiment(tmp_path, robustness)[0] == "liver_robust"
    assert experiments.worst_condition(robustness["liver_robust"]) == ("unenhanced", pytest.approx(0.895))
    robustness["liver_robust"]["native"] = {"p1": 0.90, "p2": 0.88}  # too much native Dice lost: not chosen
    for patient, value in [("p1", 0.90), ("p2", 0.88)]:
        (tmp_path / patient / "liver_robust" / "model.json").write_text(
            json.dumps({"provenance": {"held_out_metrics": {patient: {"dice": value}}}})
        )
    assert experiments.best_liver_experiment(tmp_path, robustness)[0] == "liver_scratch_msd"
    fold("liver_elastic", "p1", 0.99)  # one fold of two finished: not a candidate yet
    assert experiments.best_liver_experiment(tmp_path, robustness)[0] == "liver_scratch_msd"
    fold("liver_elastic", "p2", 0.95)
    assert experiments.best_liver_experiment(tmp_path, robustness)[0] == "liver_elastic"
    for patient in ("p1", "p2"):  # a rerun with another seed is reported, never shipped
        fold("liver_elastic_seed1", patient, 0.999)
    assert experiments.best_liver_experiment(tmp_path, robustness)[0] == "liver_elastic"
    for patient in ("p1", "p2"):  # (the rerun would make liver_elastic the only recipe run twice: see below)
        shutil.rmtree(tmp_path / patient / "liver_elastic_seed1")
    # a recipe whose runs trained on their held-out patient's own extra slices is not comparable: never chosen
    for patient in ("p1", "p2"):
        card = tmp_path / patient / "liver_msd_half" / "model.json"
        card.parent.mkdir(parents=True)
        card.write_text(
            json.dumps({"provenance": {"held_out_metrics": {patient: {"dice": 0.999}}, "extra_2d_slices": 643}})
        )
    assert "liver_msd_half" not in experiments.loo_scores(tmp_path)
    assert experiments.best_liver_experiment(tmp_path, robustness)[0] == "liver_elastic"
    for patient in ("p1", "p2"):  # the same, trained with the held-out patient's slices left out: a candidate
        card = tmp_path / patient / "liver_msd_half" / "model.json"
        provenance = json.loads(card.read_text())["provenance"] | {"extra_2d_left_out": {}}
        card.write_text(json.dumps({"provenance": provenance}))
    assert experiments.best_liver_experiment(tmp_path, robustness)[0] == "liver_msd_half"


def test_the_final_stage_weighs_a_recipe_by_all_its_runs(tmp_path):
    """A recipe rerun with another seed is judged on the mean of its runs, native and per condition; its
    card keeps its own run's metrics."""
    from training import experiments

    def fold(exp, patient, value):
        card = tmp_path / patient / exp / "model.json"
        card.parent.mkdir(parents=True)
        card.write_text(json.dumps({"provenance": {"held_out_metrics": {patient: {"dice": value}}}}))

    for patient, robust, deep, deep_rerun in [("p1", 0.92, 0.95, 0.90), ("p2", 0.90, 0.93, 0.88)]:
        fold("liver_robust", patient, robust)
        fold("liver_robust_seed1", patient, robust)
        fold("liver_deep", patient, deep)
        fold("liver_deep_seed1", patient, deep_rerun)
    native, robust = experiments.recipe_means(tmp_path)
    assert native == pytest.approx({"liver_robust": 0.91, "liver_deep": 0.915}) and robust == {}
    assert experiments.best_liver_experiment(tmp_path)[1] == {"p1": {"dice": 0.95}, "p2": {"dice": 0.93}}
    conditions = {
        "liver_robust": {"native": {"p1": 0.92, "p2": 0.90}, "unenhanced": {"p1": 0.88, "p2": 0.86}},
        "liver_deep": {"native": {"p1": 0.95, "p2": 0.93}, "unenhanced": {"p1": 0.90, "p2": 0.90}},
        "liver_deep_seed1": {"native": {"p1": 0.90, "p2": 0.88}, "unenhanced": {"p1": 0.80, "p2": 0.82}},
    }
    conditions["liver_robust_seed1"] = conditions["liver_robust"]
    # deep's worst condition is unenhanced averaged over its two runs (0.855), not its first run's (0.90)
    assert experiments.recipe_means(tmp_path, conditions)[1] == pytest.approx(
        {"liver_robust": 0.87, "liver_deep": 0.855}
    )
    assert experiments.best_liver_experiment(tmp_path, conditions)[0] == "liver_robust"
    conditions["liver_robust"]["sharp_kernel"] = {"p1": 0.5, "p2": 0.5}  # a condition the others lack: not compared
    assert experiments.recipe_means(tmp_path, conditions)[1]["liver_robust"] == pytest.approx(0.87)
    del conditions["liver_deep_seed1"]  # the rerun not scored on the conditions: the first run's alone
    assert experiments.best_liver_experiment(tmp_path, conditions)[0] == "liver_deep"
    # a network too large for the extension's size budget is never the default, however it scores
    for patient in ("p1", "p2"):
        card = tmp_path / patient / "liver_deep" / "model.json"
        architecture = {"name": "UNet2D", "in_channels": 3, "out_channels": 1, "base": 16, "depth": 5}
        card.write_text(json.dumps(json.loads(card.read_text()) | {"architecture": architecture}))
    assert experiments.weights_mb(tmp_path, "liver_deep") == pytest.approx(15.56, abs=0.01)
    assert experiments.weights_mb(tmp_path, "liver_deep") > experiments.DEFAULT_WEIGHTS_BUDGET_MB
    from LiverSegUNetLib import weights

    with pytest.MonkeyPatch.context() as patch:  # no accurate model bundled
        patch.setattr(weights, "ACCURATE_MODEL", tmp_path / "absent.json")
        assert experiments.bundled_member("liver_deep") is None
        assert experiments.best_liver_experiment(tmp_path, conditions)[0] == "liver_robust"
    # ... unless the bundled accurate model holds that network already: the default then shares it
    members = [
        {"config": {"name": n}, "train_patients": ["p1", "p2"], "test_patients": []}
        for n in ("liver_robust", "liver_deep")
    ]
    accurate = tmp_path / "accurate.json"
    accurate.write_text(json.dumps({"provenance": {"ensemble_of": members}}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(weights, "ACCURATE_MODEL", accurate)
        assert experiments.bundled_member("liver_deep") == 1
        assert experiments.best_liver_experiment(tmp_path, conditions)[0] == "liver_deep"


def test_the_shipped_recipe_stays_unless_beaten_by_more_than_a_rerun_moves(tmp_path):
    """The incumbent default is replaced only by a recipe better than it by more than two runs of one recipe
    differ (``run_spreads``), natively or in the worst condition, or in the worst condition by every run of it
    (``runs_apart``); without an incumbent the rule is as before."""
    from training import experiments

    def runs_at(exp, means):  # one run per mean, each over two held-out patients (mean - 0.01, mean + 0.01)
        for run, mean in zip([exp, f"{exp}_seed1", f"{exp}_seed2"], means):
            for patient, value in (("p1", mean - 0.01), ("p2", mean + 0.01)):
                card = tmp_path / patient / run / "model.json"
                card.parent.mkdir(parents=True, exist_ok=True)
                card.write_text(json.dumps({"provenance": {"held_out_metrics": {patient: {"dice": value}}}}))

    runs_at("liver_general", [0.91, 0.91, 0.905])  # a rerun moves the native mean by up to 0.005
    runs_at("liver_decay", [0.912, 0.912])
    assert experiments.run_spreads(tmp_path) == (pytest.approx(0.005), 0.0)
    assert experiments.best_liver_experiment(tmp_path)[0] == "liver_decay"  # no incumbent: the best mean
    assert experiments.best_liver_experiment(tmp_path, incumbent="liver_general")[0] == "liver_general"  # +0.0037
    assert experiments.best_liver_experiment(tmp_path, incumbent="liver_decay")[0] == "liver_decay"
    runs_at("liver_decay", [0.915, 0.915])  # +0.0067: more than a rerun moves
    assert experiments.best_liver_experiment(tmp_path, incumbent="liver_general")[0] == "liver_decay"
    runs_at("liver_decay", [0.906, 0.906])  # below natively, better in the worst condition ...
    conditions = {
        r: {"native": {"p1": 0.9, "p2": 0.92}, "dark": {"p1": v, "p2": v}}
        for r, v in [("liver_general", 0.86), ("liver_general_seed1", 0.85), ("liver_general_seed2", 0.71)]
    }
    conditions |= {
        r: {"native": {"p1": 0.9, "p2": 0.92}, "dark": {"p1": 0.85, "p2": 0.85}}
        for r in ("liver_decay", "liver_decay_seed1")
    }
    spreads = experiments.run_spreads(tmp_path, conditions)
    assert spreads == (pytest.approx(0.005), pytest.approx(0.15))  # the dark condition moves 0.15 between runs
    assert experiments.best_liver_experiment(tmp_path, conditions)[0] == "liver_decay"  # 0.85 against 0.807
    # ... but by less than a rerun moves there (0.043 < 0.15): the incumbent stays
    assert experiments.best_liver_experiment(tmp_path, conditions, incumbent="liver_general")[0] == "liver_general"
    assert experiments.best_liver_experiment(tmp_path, conditions, incumbent="liver_unknown")[0] == "liver_decay"
    # every run of the pick above every run of the incumbent there (0.868 > 0.86 + 0.005): not one run's luck
    conditions["liver_decay"]["dark"] = {"p1": 0.87, "p2": 0.87}
    conditions["liver_decay_seed1"]["dark"] = {"p1": 0.866, "p2": 0.87}
    assert experiments.runs_apart(tmp_path, conditions, "liver_decay", "liver_general")
    assert experiments.best_liver_experiment(tmp_path, conditions, incumbent="liver_general")[0] == "liver_decay"
    conditions["liver_decay_seed1"]["dark"] = {"p1": 0.858, "p2": 0.87}  # 0.864: within the margin of 0.86
    assert not experiments.runs_apart(tmp_path, conditions, "liver_decay", "liver_general")
    assert experiments.best_liver_experiment(tmp_path, conditions, incumbent="liver_general")[0] == "liver_general"
    conditions["liver_decay_seed1"]["dark"] = {"p1": 0.87, "p2": 0.87}
    del conditions["liver_decay_seed1"]  # one run scored: no evidence beyond that run
    assert not experiments.runs_apart(tmp_path, conditions, "liver_decay", "liver_general")


def test_the_shipped_recipe_gives_way_to_its_own_trainings_averaged_only_if_better_pair_by_pair(tmp_path):
    """A recipe whose every run is one of the incumbent's trainings with its weights averaged (the same config but
    for the read-out, last weights scoring as the incumbent's run to the last digit) replaces it when better in the
    worst condition in every pair and not lower natively over the pairs, though by less than a rerun moves."""
    from training import experiments

    def card(run, patient, dice, seed, last=None, lr=0.002):
        config = {"name": run, "seed": seed, "lr": lr, "average_from": 0.5 if last is not None else 0.0}
        if last is not None:  # keys added to the code since the plain runs were trained, off: not a difference
            config |= {"snapshots": [], "augment": {"aspect": 0.0}}
        provenance = {"held_out_metrics": {patient: {"dice": dice}}, "config": config}
        if last is not None:
            provenance["held_out_metrics_last_weights"] = {patient: {"dice": last}}
        path = tmp_path / patient / run / "model.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"provenance": provenance}))

    plain = {"liver_general": (0, 0.90, 0.92), "liver_general_seed2": (2, 0.89, 0.93)}
    for run, (seed, p1, p2) in plain.items():
        card(run, "p1", p1, seed)
        card(run, "p2", p2, seed)
    for run, (seed, p1, p2) in {
        "liver_general_avg": (0, 0.905, 0.92),
        "liver_general_avg_seed2": (2, 0.89, 0.93),
    }.items():
        base = plain[run.replace("_avg", "")]
        card(run, "p1", p1, seed, last=base[1])
        card(run, "p2", p2, seed, last=base[2])
    assert experiments.same_training(tmp_path, "liver_general_avg", "liver_general")
    assert not experiments.same_training(tmp_path, "liver_general_avg", "liver_general_seed2")  # other weights
    dark = {
        "liver_general": 0.86,
        "liver_general_seed2": 0.42,
        "liver_general_avg": 0.87,
        "liver_general_avg_seed2": 0.68,
    }
    conditions = {r: {"native": {"p1": 0.9, "p2": 0.92}, "dark": {"p1": v, "p2": v}} for r, v in dark.items()}
    gains = experiments.read_out_gains(tmp_path, conditions, "liver_general_avg", "liver_general")
    assert gains == [(pytest.approx(0.0025), pytest.approx(0.01)), (0.0, pytest.approx(0.26))]
    # +0.135 in the mean of the worst condition is less than the seeds move it (0.44): the spread rule alone keeps it
    assert experiments.run_spreads(tmp_path, conditions)[1] == pytest.approx(0.44)
    assert experiments.best_liver_experiment(tmp_path, conditions, incumbent="liver_general")[0] == "liver_general_avg"
    conditions["liver_general_avg"]["dark"] = {"p1": 0.85, "p2": 0.85}  # one pair worse: the incumbent stays
    assert experiments.best_liver_experiment(tmp_path, conditions, incumbent="liver_general")[0] == "liver_general"
    conditions["liver_general_avg"]["dark"] = {"p1": 0.87, "p2": 0.87}
    card("liver_general_avg", "p1", 0.89, 0, last=0.90)  # lower natively over the pairs (-0.005): stays
    assert experiments.best_liver_experiment(tmp_path, conditions, incumbent="liver_general")[0] == "liver_general"
    card("liver_general_avg", "p1", 0.905, 0, last=0.90, lr=0.001)  # trained otherwise: no pair at all
    assert not experiments.same_training(tmp_path, "liver_general_avg", "liver_general")
    assert experiments.read_out_gains(tmp_path, conditions, "liver_general_avg", "liver_general") == []
    assert experiments.best_liver_experiment(tmp_path, conditions, incumbent="liver_general")[0] == "liver_general"


def test_a_recipe_run_once_does_not_compete_with_recipes_run_twice(tmp_path):
    """``MIN_RUNS``: where some recipes were run with two seeds, a recipe run once is not chosen however its one
    run scored (its bad run may not have happened yet); where none was, every recipe competes."""
    from training import experiments

    def fold(exp, patient, value):
        card = tmp_path / patient / exp / "model.json"
        card.parent.mkdir(parents=True)
        card.write_text(json.dumps({"provenance": {"held_out_metrics": {patient: {"dice": value}}}}))

    table = {}
    for exp, native, dark in [("liver_general", 0.91, 0.86), ("liver_general_many", 0.93, 0.88)]:
        for patient in ("p1", "p2"):
            fold(exp, patient, native)
        table[exp] = {"native": {"p1": native, "p2": native}, "unenhanced_dark": {"p1": dark, "p2": dark}}
    assert experiments.MIN_RUNS == 2
    assert experiments.best_liver_experiment(tmp_path, table)[0] == "liver_general_many"  # no recipe run twice
    for patient in ("p1", "p2"):
        fold("liver_general_seed1", patient, 0.90)
    table["liver_general_seed1"] = {"native": {"p1": 0.90, "p2": 0.90}, "unenhanced_dark": {"p1": 0.8, "p2": 0.8}}
    assert experiments.contenders(tmp_path, ["liver_general", "liver_general_many"]) == ["liver_general"]
    assert experiments.best_liver_experiment(tmp_path, table)[0] == "liver_general"
    assert experiments.best_liver_experiment(tmp_path)[0] == "liver_general"  # without robustness results too


def finished_default_runs(tmp_path, monkeypatch) -> tuple[list[str], dict]:
    """Fold runs of three recipes (``liver_deep`` wins over its two runs), their robustness table, the final
    ``liver_deep`` run finished already, and the bundled models redirected under ``tmp_path``: the
    ``--stage final_default`` arguments and the table."""
    from LiverSegUNetLib import weights

    data, runs, results = tmp_path / "data", tmp_path / "runs" / "loo", tmp_path / "results"
    table = {}
    for patient, robust, deep, rerun in [("3Dircadb1.1", 0.93, 0.95, 0.94), ("3Dircadb1.7", 0.90, 0.91, 0.90)]:
        (data / "3Dircadb1" / patient / "PATIENT_DICOM").mkdir(parents=True)
        for exp, value in [("liver_robust", robust), ("liver_deep", deep), ("liver_deep_seed1", rerun)]:
            card = runs / patient / exp / "model.json"
            card.parent.mkdir(parents=True)
            card.write_text(json.dumps({"provenance": {"held_out_metrics": {patient: {"dice": value}}}}))
            table.setdefault(exp, {"native": {}, "unenhanced": {}})["native"][patient] = value
            table[exp]["unenhanced"][patient] = value - 0.03
    results.mkdir()
    (results / "robustness.json").write_text(json.dumps({"results": table}))
    net = train.UNet2D(3, 1, base=4, depth=3).eval()
    provenance = {"config": {"name": "liver_deep", "plan": {"threshold": 0.5}}, "test_patients": []}
    final = tmp_path / "runs" / "final" / "liver_deep" / "model"
    save_model(net, Plan(multiple=8), final, model_id="d", provenance=provenance)
    for name in ("DEFAULT_MODEL", "STRUCTURES_MODEL", "ACCURATE_MODEL"):
        monkeypatch.setattr(weights, name, tmp_path / f"{name.lower()}.json")
    return ["--stage", "final_default", "--data", str(data), "--runs", str(runs), "--results", str(results)], table


def accurate_with_liver_deep(path):
    """An accurate ensemble card at ``path`` whose second member is ``liver_deep`` trained on both patients of
    :func:`finished_default_runs` (the default's recipe bundled there: shared, not trained again)."""
    from LiverSegUNetLib.model import Ensemble

    members = [train.UNet2D(3, 1, base=4, depth=2).eval(), train.UNet2D(3, 1, base=4, depth=3).eval()]
    trained = [
        {"config": {"name": n}, "train_patients": ["3Dircadb1.1", "3Dircadb1.7"], "test_patients": []}
        for n in ("liver_robust", "liver_deep")
    ]
    save_model(Ensemble(members), Plan(multiple=8), path, model_id="e", provenance={"ensemble_of": trained})


def test_final_default_installs_the_chosen_recipe_with_its_tables_and_nothing_else(tmp_path, monkeypatch):
    """``--stage final_default`` retrains (here: finds finished) the recipe the rule picks over all its runs
    and installs it as the default model, its card holding that run's tables and the command; the structures
    and accurate models are left alone."""
    from LiverSegUNetLib import weights

    from training import experiments

    monkeypatch.setattr(experiments, "SHIPPED_PLAN", {})
    argv, table = finished_default_runs(tmp_path, monkeypatch)
    assert experiments.main(argv) == 0
    card = load_model(weights.DEFAULT_MODEL).card
    provenance = card["provenance"]
    assert card["model_id"] == "liver-unet2d-liver_deep-all"
    assert provenance["leave_one_out_metrics"] == {"3Dircadb1.1": {"dice": 0.95}, "3Dircadb1.7": {"dice": 0.91}}
    assert provenance["robustness_dice"] == table["liver_deep"]
    assert "robustness" in provenance["chosen_as"] and "liver_deep_seed1" in provenance["chosen_as"]
    assert "only the recipes run at least 2 times compete: ['liver_deep']" in provenance["chosen_as"]
    assert provenance["command"].startswith("python -m training.experiments --stage final_default")
    assert 0 <= provenance["sample_agreement"] <= 1  # scored on the sample CT (an untrained network here)
    assert not weights.STRUCTURES_MODEL.exists() and not weights.ACCURATE_MODEL.exists()

    # the chosen recipe bundled in the accurate model (the same recipe trained on every patient): a card that runs
    # that member, nothing trained, and the previous default's own weights file gone
    shutil.rmtree(tmp_path / "runs" / "final")
    assert weights.DEFAULT_MODEL.with_suffix(".safetensors").is_file()
    accurate_with_liver_deep(weights.ACCURATE_MODEL)
    assert experiments.bundled_member("liver_deep", ["3Dircadb1.7", "3Dircadb1.1"]) == 1
    assert experiments.bundled_member("liver_deep", ["3Dircadb1.1"]) is None  # trained on other patients: not it
    assert experiments.main(argv) == 0
    shared = load_model(weights.DEFAULT_MODEL)
    assert shared.card["weights_of"] == {"card": weights.ACCURATE_MODEL.name, "member": 1}
    assert shared.network.depth == 3 and not (tmp_path / "runs" / "final").exists()
    assert not weights.DEFAULT_MODEL.with_suffix(".safetensors").exists()
    assert shared.card["provenance"]["leave_one_out_metrics"] == provenance["leave_one_out_metrics"]
    assert shared.card["provenance"]["train_patients"] == ["3Dircadb1.1", "3Dircadb1.7"]
    assert "sample_agreement" in shared.card["provenance"] and "member 1" in shared.card["provenance"]["weights"]


def test_final_default_gives_the_card_its_shipped_plan_with_the_table_scored_at_it(tmp_path, monkeypatch):
    """A recipe with ``SHIPPED_PLAN`` values (a liver floor, a slice distance) is installed with them in its card's
    plan, its card holding its fold models' table scored at them, and the step recorded; a table not scored yet is
    scored by the robustness command first. A network shared with the accurate ensemble must get its values."""
    from LiverSegUNetLib import weights

    from training import experiments

    shipped = {"liver_floor_hu": 60.0, "slice_mm": 1.6}
    monkeypatch.setattr(experiments, "SHIPPED_PLAN", {"liver_deep": shipped})
    argv, table = finished_default_runs(tmp_path, monkeypatch)
    robustness = tmp_path / "results" / "robustness.json"
    raised = {"native": table["liver_deep"]["native"], "unenhanced": {"3Dircadb1.1": 0.93, "3Dircadb1.7": 0.89}}
    robustness.write_text(json.dumps({"results": {**table, "liver_deep@floor=60@slices=1.6": raised}}))
    assert experiments.main(argv) == 0
    model = load_model(weights.DEFAULT_MODEL)
    provenance = model.card["provenance"]
    assert model.plan.liver_floor_hu == 60 and model.card["preprocessing"]["liver_floor_hu"] == 60
    assert model.plan.slice_mm == 1.6
    assert provenance["robustness_dice"] == raised  # the table of what the card runs, not the plain one
    assert provenance["plan_after_training"]["values"] == shipped
    assert provenance["plan_after_training"]["robustness_entry"] == "liver_deep@floor=60@slices=1.6"
    assert provenance["config"]["plan"] == {"threshold": 0.5, **shipped}
    assert provenance["leave_one_out_metrics"] == {"3Dircadb1.1": {"dice": 0.95}, "3Dircadb1.7": {"dice": 0.91}}

    # the entry not scored yet: the robustness command scores that recipe at that floor into the same file first
    robustness.write_text(json.dumps({"results": table}))
    commands = []

    def robustness_run(cmd, **kwargs):
        commands.append(cmd)
        merged = {**json.loads(robustness.read_text())["results"], "liver_deep@floor=60@slices=1.6": raised}
        robustness.write_text(json.dumps({"results": merged}))

    monkeypatch.setattr(experiments.subprocess, "run", robustness_run)
    weights.DEFAULT_MODEL.unlink()
    assert experiments.main(argv) == 0
    (cmd,) = commands
    assert cmd[1:3] == ["-m", "training.robustness"] and cmd[cmd.index("-o") + 1] == str(robustness)
    assert cmd[cmd.index("--data") + 1] == str(tmp_path / "data")  # not the default data folder: given
    assert cmd[cmd.index("--floors") + 1] == "60" and cmd[cmd.index("--slices") + 1] == "1.6"
    assert {"--merge", "--experiments", "liver_deep"} <= set(cmd) and "--ensemble" not in cmd
    assert load_model(weights.DEFAULT_MODEL).card["provenance"]["robustness_dice"] == raised

    # the same network bundled in the accurate ensemble, which runs without them: refused, nothing written
    shutil.rmtree(tmp_path / "runs" / "final")
    accurate_with_liver_deep(weights.ACCURATE_MODEL)
    before = weights.DEFAULT_MODEL.read_bytes()
    with pytest.raises(SystemExit, match="whose plan it shares"):
        experiments.main(argv)
    assert weights.DEFAULT_MODEL.read_bytes() == before


def test_shipped_plan_values_are_in_the_bundled_cards():
    """``SHIPPED_PLAN`` holds only values that need no retraining, and each bundled liver card runs
    with its recipe's values (and the defaults where it has none): the constant is what the final stage gives, the
    cards what ships, and the two must not drift apart."""
    from LiverSegUNetLib.weights import ACCURATE_MODEL, DEFAULT_MODEL

    from training import experiments
    from training.rescore import NO_RETRAINING

    assert set(experiments.PLAN_OPTIONS) == set(NO_RETRAINING)
    for name, values in experiments.SHIPPED_PLAN.items():
        assert values and set(values) <= set(NO_RETRAINING), name
    for card_path, recipe in [
        (DEFAULT_MODEL, experiments.shipped_recipe()),
        (ACCURATE_MODEL, "ensemble:" + "+".join(experiments.ACCURATE)),
    ]:
        card = json.loads(card_path.read_text())
        values = experiments.SHIPPED_PLAN.get(recipe, {})
        for key, value in values.items():
            assert card["preprocessing"].get(key) == value, card_path.name
        if "liver_floor_hu" not in values:  # off unless given
            assert card["preprocessing"].get("liver_floor_hu", 0) == 0, card_path.name
        changes, entry = experiments.shipped_entry(recipe)
        assert changes == values and (entry == recipe) == (not values)


def test_final_accurate_installs_the_ensemble_of_finished_runs_with_its_fold_table_and_nothing_else(
    tmp_path, monkeypatch
):
    """``--stage final_accurate`` builds the accurate model from the ``ACCURATE`` recipes trained on every
    patient (here: finished already, so nothing trains), keeps the fold ensembles' table and the sample CT's
    agreement in its card, and leaves the default and structures models alone."""
    from LiverSegUNetLib import weights
    from LiverSegUNetLib.model import Ensemble

    from training import experiments

    data, runs, results = tmp_path / "data", tmp_path / "runs" / "loo", tmp_path / "results"
    (data / "3Dircadb1" / "3Dircadb1.1" / "PATIENT_DICOM").mkdir(parents=True)
    pair = ["liver_a", "liver_b"]
    for depth, name in zip((2, 3), pair):
        net = train.UNet2D(3, 1, base=4, depth=depth).eval()
        save_model(net, Plan(multiple=8), tmp_path / "runs" / "final" / name / "model", model_id=name)
    table = {"native": {"3Dircadb1.1": 0.95}, "unenhanced": {"3Dircadb1.1": 0.91}}
    results.mkdir()
    (results / "robustness.json").write_text(json.dumps({"results": {"ensemble:liver_a+liver_b": table}}))
    monkeypatch.setattr(experiments, "ACCURATE", pair)
    for name in ("DEFAULT_MODEL", "STRUCTURES_MODEL", "ACCURATE_MODEL"):
        monkeypatch.setattr(weights, name, tmp_path / f"{name.lower()}.json")
    argv = ["--stage", "final_accurate", "--data", str(data), "--runs", str(runs), "--results", str(results)]
    assert experiments.main(argv) == 0
    model = load_model(weights.ACCURATE_MODEL)
    assert isinstance(model.network, Ensemble) and [m.depth for m in model.network.members] == [2, 3]
    provenance = model.card["provenance"]
    assert model.card["model_id"] == "liver-unet2d-ensemble-liver_a+liver_b-all"
    assert provenance["robustness_dice"] == table
    assert provenance["leave_one_out_metrics"] == {"3Dircadb1.1": {"dice": 0.95}}
    assert 0 <= provenance["sample_agreement"] <= 1
    assert not weights.DEFAULT_MODEL.exists() and not weights.STRUCTURES_MODEL.exists()


def test_loss_ignores_structures_a_patient_has_no_mask_for():
    dice_bce_loss = train.dice_bce_loss

    torch.manual_seed(0)
    logits = torch.randn(4, 3, 8, 8, requires_grad=True)
    target = (torch.rand(4, 3, 8, 8) > 0.5).float()
    available = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    dice_bce_loss(logits, target, available).backward()
    grad = logits.grad.abs().sum((2, 3))
    assert (grad[~available] == 0).all() and (grad[available] > 0).all()
    # no mask anywhere for a structure: the loss is that of the others alone
    none = torch.tensor([[1, 1, 0]] * 4, dtype=torch.bool)
    torch.testing.assert_close(
        dice_bce_loss(logits, target, none), dice_bce_loss(logits[:, :2], target[:, :2], none[:, :2])
    )
    # one structure, all present: the original loss (cross-entropy plus soft Dice over the batch)
    one = dice_bce_loss(logits[:, :1], target[:, :1])
    prob = torch.sigmoid(logits[:, :1])
    dice = (2 * (prob * target[:, :1]).sum() + 1) / (prob.sum() + target[:, :1].sum() + 1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :1], target[:, :1])
    torch.testing.assert_close(one, bce + 1 - dice)


def test_per_sample_dice_weighs_each_crop_holding_the_liver_alike_and_leaves_the_empty_ones_to_cross_entropy():
    dice_bce_loss = train.dice_bce_loss
    logits = torch.full((3, 1, 8, 8), -4.0)
    target = torch.zeros(3, 1, 8, 8)
    target[0, 0] = 1  # a crop full of liver, found
    logits[0, 0] = 4.0
    target[1, 0, :2, :2] = 1  # a sliver of liver (4 pixels), missed; crop 2 holds none
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)

    def dice(i):
        return (2 * (prob[i] * target[i]).sum() + 1) / (prob[i].sum() + target[i].sum() + 1)

    each = dice_bce_loss(logits, target, per_sample=True)
    torch.testing.assert_close(each, bce + 1 - (dice(0) + dice(1)) / 2)  # crop 2 adds only cross-entropy
    pooled = dice_bce_loss(logits, target)
    assert float(each - bce) > 0.35 and float(pooled - bce) < 0.1  # the missed sliver: half the Dice loss
    # a structure no crop holds: cross-entropy alone; one not available in a crop: nothing from that crop
    torch.testing.assert_close(
        dice_bce_loss(logits[2:], target[2:], per_sample=True),
        bce.new_tensor(0) + (torch.nn.functional.binary_cross_entropy_with_logits(logits[2:], target[2:])),
    )
    available = torch.tensor([[True], [False], [True]])
    only = dice_bce_loss(logits, target, available, per_sample=True)
    kept = torch.tensor([0, 2])
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits[kept], target[kept])
    torch.testing.assert_close(only, ce + 1 - dice(0))


def test_tumour_targets_are_the_lesion_masks_inside_the_liver(patient):
    from training.labels import mask_names, targets

    p = patient("3Dircadb1.17")
    assert mask_names(p.organs, "liver_tumours") == ["livertumor1", "livertumor2"]
    liver, tumours, spleen = targets(p, ["liver", "liver_tumours", "spleen"])
    assert spleen is None  # patient 17 has no spleen mask: no target, not "absent"
    raw = np.logical_or(p.mask("livertumor1").array, p.mask("livertumor2").array)
    assert tumours.sum() > 0 and not (tumours & ~liver).any()
    assert tumours.sum() == (raw & (liver > 0)).sum()
    # patient 7's 'tumor' lies outside the liver: no liver tumour there (a target, empty), not specks at its border
    (seven,) = targets(patient("3Dircadb1.7"), ["liver_tumours"])
    assert seven is not None and seven.sum() == 0


def test_final_stage_ships_only_the_structures_that_pass(tmp_path, monkeypatch):
    """The structures model keeps the channels whose leave-one-out results pass (report.ships), in order."""
    from LiverSegUNetLib import weights

    from training import experiments

    data = tmp_path / "data"
    for p in ("3Dircadb1.1", "3Dircadb1.7"):
        (data / "3Dircadb1" / p / "PATIENT_DICOM").mkdir(parents=True)
    runs = tmp_path / "runs" / "loo"
    lesions = {"reference": 2, "found": 0, "missed": 2, "false": 3, "split": 0, "merged": 0}
    for p in ("3Dircadb1.1", "3Dircadb1.7"):
        folder = runs / p / "liver_multi"
        folder.mkdir(parents=True)
        scores = {
            "liver": {"dice": 0.9},
            "liver_tumours": {"dice": 0.75, "lesions": lesions},  # Dice passes, detection does not
            "portal_vein": {"dice": 0.72},
            "bone": {"dice": 0.5},
        }
        prov = {"test_patients": [p], "held_out_metrics": {p: {"dice": 0.9, "structures": scores}}}
        (folder / "model.json").write_text(json.dumps({"provenance": prov}))
        (folder / "history.json").write_text("[]")
    keys = ["liver", "liver_tumours", "portal_vein", "venous_system", "bone"]
    net = train.UNet2D(3, len(keys), base=4, depth=2)
    final = tmp_path / "runs" / "final" / "liver_multi"
    save_model(net, Plan(multiple=4), final / "model", model_id="m", structures=[CATALOGUE[k] for k in keys])
    source = tmp_path / "runs" / "final" / "liver_robust"  # the recipe's starting model, finished already
    save_model(train.UNet2D(3, 1, base=4, depth=2), Plan(multiple=4), source / "model", model_id="l")
    monkeypatch.setattr(weights, "STRUCTURES_MODEL", tmp_path / "structures.json")
    card = experiments.final_structures(data, runs, [])
    model = load_model(card)
    assert [s.name for s in model.structures] == ["Liver", "Portal vein"]
    torch.testing.assert_close(model.network.head.weight.float(), net.head.weight[[0, 2]].half().float())
    assert set(model.card["provenance"]["left_out"]) == {"liver_tumours", "bone"}


def test_final_stage_installs_the_accurate_ensemble_with_its_fold_tables(tmp_path, monkeypatch):
    """The accurate model is the mean of the ACCURATE recipes' final networks; its card keeps the fold
    ensembles' native Dice as leave-one-out metrics and their robustness table."""
    from LiverSegUNetLib import weights
    from LiverSegUNetLib.model import Ensemble

    from training import experiments

    data = tmp_path / "data"
    (data / "3Dircadb1" / "3Dircadb1.1" / "PATIENT_DICOM").mkdir(parents=True)
    nets = []
    for seed, recipe in enumerate(experiments.ACCURATE):
        torch.manual_seed(seed)
        nets.append(train.UNet2D(3, 1, base=4, depth=2).eval())
        final = tmp_path / "runs" / "final" / recipe  # finished already: the stage does not retrain it
        save_model(nets[-1], Plan(multiple=4), final / "model", model_id=recipe, dtype="float32")
    name = "ensemble:" + "+".join(experiments.ACCURATE)
    table = {"native": {"3Dircadb1.1": 0.94, "3Dircadb1.7": 0.9}, "unenhanced": {"3Dircadb1.1": 0.88}}
    plain = {"native": table["native"], "unenhanced": {"3Dircadb1.1": 0.87}}
    changes, entry = experiments.shipped_entry(name)  # the table of the plan the card ships with
    robustness = tmp_path / "robustness.json"
    robustness.write_text(json.dumps({"results": {entry: table, name: plain, "liver_elastic": {"native": {}}}}))
    monkeypatch.setattr(weights, "ACCURATE_MODEL", tmp_path / "accurate.json")
    card = experiments.final_accurate(data, tmp_path / "runs" / "loo", [], robustness)
    assert card == tmp_path / "accurate.json"
    model = load_model(card)
    assert isinstance(model.network, Ensemble) and len(model.network.members) == len(experiments.ACCURATE)
    provenance = model.card["provenance"]
    assert provenance["robustness_dice"] == table
    assert all(getattr(model.plan, key) == value for key, value in changes.items())
    assert provenance["leave_one_out_metrics"] == {"3Dircadb1.1": {"dice": 0.94}, "3Dircadb1.7": {"dice": 0.9}}
    assert [m["model_id"] for m in provenance["ensemble_of"]] == experiments.ACCURATE
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = torch.stack([n(x) for n in nets]).mean(0)
        torch.testing.assert_close(model.network(x).float(), expected, rtol=1e-2, atol=1e-2)


def test_contrast_only_structures_are_no_target_where_the_contrast_was_removed():
    train_set = [_Fake(40, 1)]
    for ps in train_set:
        ps.labels = torch.zeros((40, 2, 8, 8))
        ps.available = torch.ones(2, dtype=torch.bool)
    plan, batch = Plan(multiple=4), [(0, k) for k in range(40)]
    vessels = torch.tensor([False, True])
    aug = {"unenhanced_p": 1.0, "unenhanced_min": 0.0, "thick_p": 0.0, "thick_slices": [2]}
    _, _, available = train.make_batch(train_set, batch, plan, 8, np.random.default_rng(0), aug, vessels)
    assert available[:, 0].all()  # the liver stays a target
    assert 5 < int((~available[:, 1]).sum()) < 35  # vessels dropped where more than half was removed
    aug["unenhanced_p"] = 0.0
    _, _, available = train.make_batch(train_set, batch, plan, 8, np.random.default_rng(0), aug, vessels)
    assert available.all()


def test_a_liver_model_starts_a_multi_structure_run(tmp_path):
    """Every weight but the output layer, and the liver's output channel, come from the liver model."""
    torch.manual_seed(1)
    liver = train.UNet2D(3, 1, base=4, depth=2)
    card = save_model(liver, Plan(multiple=4), tmp_path / "liver", model_id="l", dtype="float32")
    cfg = train.load_config(CONFIGS / "liver_multi.toml", ["base=4", "depth=2", f"init_from={json.dumps(str(card))}"])
    net = train.initial_network(cfg, train.plan_of(cfg))
    assert net.head.out_channels == 9
    torch.testing.assert_close(net.head.weight[:1], liver.head.weight, rtol=0, atol=0)
    torch.testing.assert_close(net.head.bias[:1], liver.head.bias, rtol=0, atol=0)
    torch.testing.assert_close(net.encoder[1][0].weight, liver.encoder[1][0].weight, rtol=0, atol=0)
    torch.testing.assert_close(net.decoder[0][0].weight, liver.decoder[0][0].weight, rtol=0, atol=0)
    assert not torch.equal(net.head.weight[1], net.head.weight[2])  # the new channels start fresh
