"""Train a liver (or bone) U-Net on 3D-IRCADb patients, evaluate it on held-out patients, export it.

    python training/train.py training/configs/liver_first.toml [--set key=value ...]

The model is saved in the run folder; ``training/export.py`` installs it as the bundled model.
A config file is one experiment; ``--set epochs=5 --set plan.spacing_mm=2.0`` overrides values.
Held-out patients are evaluated in 3D on their original grid with the product's own inference
and postprocessing (``LiverSegUNetLib.inference.segment``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tomllib
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LiverSegUNet"))

from LiverSegUNetLib import metrics  # noqa: E402
from LiverSegUNetLib.inference import autocast_for, prepare_slices, segment  # noqa: E402
from LiverSegUNetLib.io.ircadb import IrcadbPatient, default_data_root  # noqa: E402
from LiverSegUNetLib.model import UNet2D  # noqa: E402
from LiverSegUNetLib.preprocess import Plan, Reorientation, SliceGrid, to_model_grid, with_context  # noqa: E402
from LiverSegUNetLib.weights import LoadedModel, save_model  # noqa: E402

log = logging.getLogger("train")


def load_config(path: Path, overrides: list[str]) -> dict:
    """The TOML config with ``key=value`` / ``section.key=value`` overrides (values parsed as TOML)."""
    cfg = tomllib.loads(path.read_text())
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.strip().split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = tomllib.loads(f"v = {value}")["v"] if value else ""
    return cfg


class PatientSlices:
    """One patient's slices and labels on the model grid, held in memory as float16."""

    def __init__(self, patient: IrcadbPatient, organ: str, plan: Plan):
        ct, mask = patient.ct, patient.mask(organ)
        reorient = Reorientation(ct)
        spacing = reorient.spacing(ct)
        grid = SliceGrid.for_slices(ct.shape[1:], spacing[:2], plan)
        hu = torch.from_numpy(np.ascontiguousarray(reorient.forward(ct.array)))
        lab = torch.from_numpy(np.ascontiguousarray(reorient.forward(mask.array)))
        self.name = patient.name
        self.images = prepare_slices(hu, grid, plan).half()
        self.labels = to_model_grid(lab.float(), grid).half()


def crop_or_pad(x: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """Random ``size`` x ``size`` window of ``(..., H, W)``, zero-padded where the image is smaller."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        top, left = int(rng.integers(0, ph + 1)), int(rng.integers(0, pw + 1))
        x = F.pad(x, (left, pw - left, top, ph - top))
        h, w = x.shape[-2:]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return x[..., top : top + size, left : left + size]


def augment(x: torch.Tensor, y: torch.Tensor, aug: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotation, scale, shift (same for image and label), then contrast, brightness and noise."""
    n = x.shape[0]

    def uniform(lo, hi, shape=(n,)):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    angle = uniform(-1, 1) * math.radians(aug["rotate_deg"])
    scale = uniform(aug["scale_min"], aug["scale_max"])
    shift = uniform(-aug["shift"], aug["shift"], (n, 2))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    flip = torch.rand(n, generator=gen) < aug["reverse_context"]
    x[flip] = x[flip].flip(1)
    contrast = uniform(1 - aug["contrast"], 1 + aug["contrast"]).view(n, 1, 1, 1)
    brightness = uniform(-aug["brightness"], aug["brightness"]).view(n, 1, 1, 1)
    noise = uniform(0, aug["noise"]).view(n, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    x = ((x - 0.5) * contrast + 0.5 + brightness + noise).clamp(0, 1)
    return x, y


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice over the batch."""
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    soft_dice = (2 * inter + 1) / (prob.sum() + target.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + (1 - soft_dice)


def evaluate(model: LoadedModel, patients: list[IrcadbPatient], organ: str) -> dict[str, dict]:
    """3D metrics per held-out patient, with and without postprocessing, on the original grid."""
    out = {}
    for patient in patients:
        ref = patient.mask(organ)
        row = {}
        for post in (False, True):
            seg = segment(patient.ct, model, device="cpu", postprocess=post)
            m = metrics.all_metrics(seg.mask.array, ref.array, ref.spacing_mm)
            m["accuracy"] = float(np.mean(seg.mask.array == ref.array))
            row["post" if post else "raw"] = m
        out[patient.name] = row
    return out


def git_commit() -> str:
    """The current commit of this repository, or 'unknown'."""
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument(
        "--data", type=Path, default=None, help="folder holding 3Dircadb1/ (default: LIVERSEG_DATA or ../shared/data)"
    )
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: training/runs/<name>)")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.set)
    out = args.out or ROOT / "training" / "runs" / cfg["name"]
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(out / "train.log")],
    )
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    plan = Plan(multiple=2 ** cfg["depth"], **cfg["plan"])
    data_root = (args.data or default_data_root()) / "3Dircadb1"

    t0 = time.perf_counter()
    train = [PatientSlices(IrcadbPatient(data_root / n), cfg["organ"], plan) for n in cfg["train_patients"]]
    test = [IrcadbPatient(data_root / n) for n in cfg["test_patients"]]
    samples = [(p, k) for p, ps in enumerate(train) for k in range(ps.images.shape[0])]
    if cfg["samples_fraction"] < 1:
        keep = rng.permutation(len(samples))[: max(1, round(len(samples) * cfg["samples_fraction"]))]
        samples = [samples[i] for i in sorted(keep)]
    log.info("data: %d training slices from %s (%.1f s)", len(samples), cfg["train_patients"], time.perf_counter() - t0)

    net = UNet2D(plan.in_channels, 1, cfg["base"], cfg["depth"]).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps_per_epoch = max(1, len(samples) // cfg["batch_size"])
    total = steps_per_epoch * cfg["epochs"]
    warm = steps_per_epoch * cfg["warmup_epochs"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )
    autocast, precision = autocast_for("cpu")
    model = LoadedModel(net, plan, {"model_id": cfg["name"]}, out)
    history = []
    t_train = time.perf_counter()
    for epoch in range(1, cfg["epochs"] + 1):
        net.train()
        order = rng.permutation(len(samples))
        losses = []
        for step in range(steps_per_epoch):
            batch = [samples[i] for i in order[step * cfg["batch_size"] : (step + 1) * cfg["batch_size"]]]
            xs, ys = [], []
            for p, k in batch:
                ps = train[p]
                both = torch.cat([with_context(ps.images, torch.tensor([k]), plan.context)[0], ps.labels[k : k + 1]])
                both = crop_or_pad(both, cfg["crop"], rng)
                xs.append(both[:-1])
                ys.append(both[-1:])
            x, y = augment(torch.stack(xs).float(), torch.stack(ys).float(), cfg["augment"], gen)
            with autocast:
                logits = net(x.contiguous(memory_format=torch.channels_last))
            loss = dice_bce_loss(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        row = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "lr": sched.get_last_lr()[0],
            "seconds": time.perf_counter() - t_train,
        }
        if test and (epoch % cfg["eval_every"] == 0 or epoch == cfg["epochs"]):
            net.eval()
            row["test"] = evaluate(model, test, cfg["organ"])
            net.train()
        history.append(row)
        log.info(
            "epoch %d loss %.4f %s",
            epoch,
            row["loss"],
            {n: round(r["post"]["dice"], 4) for n, r in row.get("test", {}).items()},
        )
        (out / "history.json").write_text(json.dumps(history, indent=1))

    net.eval()
    final = history[-1].get("test", {})
    provenance = {
        "data": "3D-IRCADb-01, IRCAD France",
        "organ": cfg["organ"],
        "train_patients": cfg["train_patients"],
        "test_patients": cfg["test_patients"],
        "config": cfg,
        "commit": git_commit(),
        "precision": precision,
        "train_seconds": round(time.perf_counter() - t_train, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "held_out_metrics": {n: r["post"] for n, r in final.items()},
        "command": "python training/train.py "
        + " ".join(
            [
                str(args.config.relative_to(ROOT) if args.config.is_absolute() else args.config),
                *[f"--set {s}" for s in args.set],
            ]
        ),
    }
    model_id = f"{cfg['organ']}-unet2d-{cfg['name']}"
    card = save_model(net, plan, out / "model", model_id=model_id, label=cfg["organ"], provenance=provenance)
    log.info("saved %s (install it as the bundled model with: python training/export.py %s)", card, card)
    return 0


if __name__ == "__main__":
    sys.exit(main())
