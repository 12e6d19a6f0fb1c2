"""Leave-one-out sweeps of several recipes in one command, sized for a GPU machine available for minutes.

    # here, with the data: pack what training reads (8-bit, compressed: about 5 MB a patient)
    python -m training.slot pack liver_elastic -o training/cache
    # on the GPU machine (PyTorch only; no pydicom or SimpleITK needed), every recipe x every fold:
    PYTHONPATH=LiverSegUNet:. python3 -m training.slot sweep --cache training/cache \\
        --configs liver_elastic liver_wide --set device=cuda --jobs 6 -o OUT
    # here again: unpack the returned fold models under training/runs/loo and score them in 3D
    python -m training.slot score OUT/liver_wide.tar --runs training/runs/loo

``sweep`` trains each config once per fold (the fold's patient held out, the others training),
several runs at a time, and ranks the configs by the mean over folds of the held-out patient's
Dice on the model grid after the last epoch (the per-epoch validation: no postprocessing, not the
product's 3D Dice). It writes ``sweep.json`` and ``sweep.md`` and, per config, ``<config>.tar`` with
the fold models, so the best can be brought back. ``score`` unpacks such a tar into the leave-one-out
runs folder and adds the product's 3D metrics on the original grid (``training.train.evaluate``)
to each card, so the report, the robustness command and the final stage treat them like any other
leave-one-out run. The packed slices are derived from the data and never committed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from LiverSegUNetLib.io.ircadb import IrcadbPatient, default_data_root

from training import packed
from training.train import (  # _relative: the runs start in the repository; cards keep no machine paths
    ExtraSlices,
    PatientSlices,
    _relative,
    evaluate,
    load_config,
    plan_of,
    structure_keys,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "training" / "configs"
#: What a fold's tar holds of its run folder: enough to load, score and report it.
FOLD_FILES = ("model.json", "model.safetensors", "history.json", "train.log")


def _config(name: str, sets: list[str]) -> dict:
    return load_config(CONFIGS / f"{name}.toml", sets)


def pack(config: str, data: Path, out: Path, sets: list[str]) -> list[Path]:
    """Every patient under ``data`` (and the config's extra 2D slices) as the config's run would hold them."""
    from training.experiments import find_patients

    cfg = _config(config, sets)
    plan, keys, unenhanced = plan_of(cfg), structure_keys(cfg), cfg["augment"]["unenhanced_p"] > 0
    written = []
    for name in find_patients(data):
        slices = PatientSlices(IrcadbPatient(data / "3Dircadb1" / name), keys, plan, unenhanced)
        written.append(packed.save(slices, packed.path_for(out, name), plan, keys))
    if cfg["extra_2d"]:
        extra = ExtraSlices(data / cfg["extra_2d"], plan, cfg["extra_2d_pixel_mm"], len(keys))
        written.append(packed.save(extra, packed.path_for(out, cfg["extra_2d"]), plan, keys))
    for path in written:
        print(f"{path.name}: {path.stat().st_size / 2**20:.1f} MB", flush=True)
    return written


def packed_patients(cache: Path) -> list[str]:
    """The patients packed in ``cache`` (not the extra 2D slices), in patient-number order."""
    names = []
    for path in sorted(cache.glob(f"*{packed.SUFFIX}")):
        meta = packed.metadata_of(path)
        if meta.get("format") == packed.FORMAT and meta.get("kind") == "PatientSlices":
            names.append(meta["name"])
    if not names:
        raise SystemExit(f"no packed patients in {cache}; run python -m training.slot pack first")
    return sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in n.replace(".", " ").split()])


def _train(config: str, patients: list[str], test: str, cache: Path, out: Path, sets: list[str], threads: int) -> dict:
    folder = out / "runs" / test / config
    split = [f"train_patients={json.dumps([p for p in patients if p != test])}", f"test_patients={json.dumps([test])}"]
    cmd = [sys.executable, "-m", "training.train", str(CONFIGS / f"{config}.toml"), "--out", str(folder)]
    for s in [f'cache="{_relative(cache)}"', *split, *sets]:
        cmd += ["--set", s]
    t = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # the runs share the CPU cores (batch building)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    row = {"config": config, "patient": test, "seconds": round(time.perf_counter() - t, 1), "rc": done.returncode}
    if done.returncode != 0:
        row["error"] = (done.stderr or done.stdout)[-2000:]
        return row
    history = json.loads((folder / "history.json").read_text())
    row["dice"] = history[-1].get("val", {}).get("dice")
    row["best_dice"] = max((h.get("val", {}).get("dice", 0.0) for h in history), default=None)
    return row


def sweep(cache: Path, configs: list[str], out: Path, sets: list[str], jobs: int, keep: int = 3) -> dict:
    """Every config on every fold, ``jobs`` runs at a time; the ranking, the tables and, for the ``keep``
    best configs, one tar of their fold models each (what comes back from a remote machine stays small)."""
    patients = packed_patients(cache)
    for config in configs:
        _config(config, sets)  # an unknown config or key stops here, before any run
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(c, p) for c in configs for p in patients]
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        rows = list(pool.map(lambda task: _train(task[0], patients, task[1], cache, out, sets, threads), tasks))
    results = {}
    for config in configs:
        mine = [r for r in rows if r["config"] == config]
        dice = [r.get("dice") for r in mine]
        complete = all(d is not None for d in dice)
        results[config] = {
            "folds": {r["patient"]: r for r in mine},
            "mean_dice": sum(dice) / len(dice) if complete else None,
        }
    ranked = sorted(results, key=lambda c: -(results[c]["mean_dice"] or -1.0))
    for config in [c for c in ranked if results[c]["mean_dice"] is not None][:keep]:
        with tarfile.open(out / f"{config}.tar", "w") as tar:
            for patient in patients:
                for name in FOLD_FILES:
                    path = out / "runs" / patient / config / name
                    if path.exists():
                        tar.add(path, arcname=f"{patient}/{config}/{name}")
    summary = {"patients": patients, "sets": sets, "ranking": ranked, "results": results}
    (out / "sweep.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        "Held-out Dice on the model grid after the last epoch (the per-epoch validation), per fold.",
        "",
        "| config | " + " | ".join(patients) + " | mean | minutes (sum) |",
        "|---|" + "---|" * (len(patients) + 2),
    ]
    for config in ranked:
        folds = results[config]["folds"]
        cells = [f"{folds[p]['dice']:.3f}" if folds[p].get("dice") is not None else "failed" for p in patients]
        mean = results[config]["mean_dice"]
        minutes = sum(f["seconds"] for f in folds.values()) / 60
        lines.append(f"| {config} | {' | '.join(cells)} | {'-' if mean is None else f'{mean:.3f}'} | {minutes:.1f} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    failed = [r for r in rows if r["rc"] != 0]
    for r in failed:
        print(f"{r['config']} on {r['patient']} failed:\n{r['error']}", file=sys.stderr, flush=True)
    return summary


def score(archive: Path, runs: Path, data: Path, device: str = "cpu") -> list[Path]:
    """Unpack a sweep's tar under ``runs`` and write each fold card's 3D held-out metrics into it."""
    from LiverSegUNetLib.weights import load_model

    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        for m in members:
            parts = Path(m.name).parts
            if len(parts) != 3 or parts[2] not in FOLD_FILES or ".." in parts:
                raise SystemExit(f"{archive}: unexpected member {m.name!r}; not a sweep's fold archive")
        tar.extractall(runs, members=members, filter="data")
    cards = sorted({runs / Path(m.name).parent / "model.json" for m in members})
    for card in cards:
        model = load_model(card, device=device)  # checksum-verified
        info = json.loads(card.read_text())
        keys = info["provenance"]["structures"]
        patients = [IrcadbPatient(data / "3Dircadb1" / p) for p in info["provenance"]["test_patients"]]
        info["provenance"]["held_out_metrics"] = evaluate(model, patients, keys, device)
        tmp = card.with_name(card.name + ".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(card)
        dice = {p: round(m["dice"], 4) for p, m in info["provenance"]["held_out_metrics"].items()}
        print(f"{_relative(card.parent)}: held-out Dice {dice}", flush=True)
    return cards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="pack every patient (and the extra 2D slices) as a config's run holds them")
    p.add_argument("config", help="config name under training/configs (its grid, structures and augmentation)")
    p.add_argument("-o", "--output", type=Path, default=ROOT / "training" / "cache")
    p.add_argument("--data", type=Path, default=None, help="folder holding 3Dircadb1/ (default: $LIVERSEG_DATA)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s = sub.add_parser("sweep", help="every config on every packed fold; ranking and fold models in OUTPUT")
    s.add_argument("--cache", type=Path, default=ROOT / "training" / "cache")
    s.add_argument("--configs", nargs="+", required=True)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every run")
    s.add_argument("--jobs", type=int, default=3, help="runs at a time (default: 3)")
    s.add_argument("--keep", type=int, default=3, help="tar the fold models of this many best configs (default: 3)")
    s.add_argument("-o", "--output", type=Path, required=True)
    c = sub.add_parser("score", help="unpack a sweep's fold models under --runs and add their 3D held-out metrics")
    c.add_argument("archive", type=Path)
    c.add_argument("--runs", type=Path, default=ROOT / "training" / "runs" / "loo")
    c.add_argument("--data", type=Path, default=None)
    c.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.config, (args.data or default_data_root()).resolve(), args.output, args.set)
    elif args.command == "sweep":
        summary = sweep(args.cache, args.configs, args.output, args.set, args.jobs, args.keep)
        if any(r["mean_dice"] is None for r in summary["results"].values()):
            return 1
    else:
        score(args.archive, args.runs, (args.data or default_data_root()).resolve(), args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
