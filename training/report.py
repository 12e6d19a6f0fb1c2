"""Write training/results/RESULTS.md and the learning-curve PNGs from the leave-one-out runs.

python -m training.report [--runs training/runs/loo] [--results training/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

from LiverSegUNetLib.system import machine

from training import overlap
from training.experiments import EXPERIMENTS, LIVER, portable

ROOT = Path(__file__).resolve().parents[1]

METRICS = [
    ("dice", "Dice", "{:.3f}"),
    ("voe", "VOE", "{:.3f}"),
    ("rvd", "RVD", "{:+.3f}"),
    ("assd_mm", "ASSD mm", "{:.2f}"),
    ("hd95_mm", "HD95 mm", "{:.1f}"),
    ("accuracy", "pixel acc.", "{:.4f}"),
]
ORDER = LIVER + [e for e in EXPERIMENTS if e not in LIVER]  # liver experiments first, bone last
NOTES = Path(__file__).resolve().parent / "results_notes.md"


def collect(runs: Path) -> dict[str, dict[str, dict]]:
    """experiment -> test patient -> {"card": provenance, "history": per-epoch rows}."""
    found: dict[str, dict[str, dict]] = {}
    for card_path in sorted(runs.glob("*/*/model.json")):
        prov = json.loads(card_path.read_text())["provenance"]
        history = json.loads((card_path.parent / "history.json").read_text())
        for patient in prov["test_patients"]:
            found.setdefault(card_path.parent.name, {})[patient] = {"card": prov, "history": history}
    return {e: found[e] for e in ORDER if e in found} | {e: v for e, v in found.items() if e not in ORDER}


def _mean_sd(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values)).lstrip('+')}"


def plot_curves(results: dict, out: Path) -> list[str]:
    """Loss, Dice and accuracy per epoch (mean over folds), one line per experiment; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    panels = [
        ("train_loss", "training loss (BCE + Dice)", lambda r: r["loss"]),
        ("val_loss", "held-out loss", lambda r: r["val"]["loss"]),
        ("val_dice", "held-out Dice (model grid, no postprocessing)", lambda r: r["val"]["dice"]),
        ("val_accuracy", "held-out pixel accuracy", lambda r: r["val"]["accuracy"]),
    ]
    for key, title, get in panels:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for exp, per_patient in results.items():
            histories = [v["history"] for v in per_patient.values() if all("val" in r for r in v["history"])]
            if not histories:
                continue
            epochs = min(len(h) for h in histories)
            mean = [statistics.mean(get(h[e]) for h in histories) for e in range(epochs)]
            ax.plot(range(1, epochs + 1), mean, label=exp, lw=1.8, ls="--" if exp.startswith("bone") else "-")
        ax.set_xlabel("epoch")
        ax.set_title(f"{title}, mean over leave-one-out folds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"curves_{key}.png"
        fig.savefig(out / name)
        plt.close(fig)
        files.append(name)
    return files


def extra_data_section(results: dict, patients: list[str], without="liver_scratch_hu255", with_="liver_scratch_msd"):
    """Markdown lines comparing the same recipe with and without the extra 2D slices, per held-out patient."""
    if without not in results or with_ not in results:
        return []
    lines = [
        "",
        "## With and without the msd_liver_2d slices",
        "",
        f"`{with_}` is `{without}` (liver from scratch, all slices, HU window 0..255 as the extra slices are stored)",
        "with the 643 2D liver slices of 122 other patients making up a third of every batch. Held-out Dice:",
        "",
        "| held-out patient | without | with | change |",
        "|---|---|---|---|",
    ]
    deltas = []
    for p in patients:
        a = results[without].get(p, {}).get("card", {}).get("held_out_metrics", {}).get(p)
        b = results[with_].get(p, {}).get("card", {}).get("held_out_metrics", {}).get(p)
        if a and b:
            deltas.append(b["dice"] - a["dice"])
            lines.append(f"| {p} | {a['dice']:.3f} | {b['dice']:.3f} | {deltas[-1]:+.3f} |")
    if deltas:
        lines.append(f"| mean | | | {statistics.mean(deltas):+.3f} |")
    return lines


#: A structure ships as a segment when its mean held-out Dice reaches this (and, for lesions, when more
#: lesions are found than missed and fewer are false than found).
SHIP_DICE = 0.7


def structure_scores(results: dict, exp: str = "liver_multi") -> dict[str, dict[str, dict]]:
    """structure key -> held-out patient -> its metrics, from ``exp``'s fold cards."""
    scores: dict[str, dict[str, dict]] = {}
    for patient, run in results.get(exp, {}).items():
        for key, m in run["card"]["held_out_metrics"].get(patient, {}).get("structures", {}).items():
            scores.setdefault(key, {})[patient] = m
    return scores


def mean_dice(per_patient: dict[str, dict]) -> float:
    """Mean held-out Dice over the patients whose expert mask holds the structure (an empty mask predicted
    empty says nothing about how well it is outlined); NaN when there are none."""
    values = [m["dice"] for m in per_patient.values() if m.get("ref_ml", 1) > 0]
    return statistics.mean(values) if values else float("nan")


def ships(per_patient: dict[str, dict]) -> bool:
    """Whether a structure's held-out results are good enough to ship it as a segment (:data:`SHIP_DICE`)."""
    if not mean_dice(per_patient) >= SHIP_DICE:
        return False
    lesions = [m["lesions"] for m in per_patient.values() if "lesions" in m]
    if lesions:
        found, missed, false = (sum(x[k] for x in lesions) for k in ("found", "missed", "false"))
        return found > missed and false < found
    return True


def structures_section(results: dict, patients: list[str], exp: str = "liver_multi") -> list[str]:
    """Markdown: each structure of the multi-structure recipe on each held-out patient, lesion detection
    for the tumours, and whether the liver gained from the extra targets."""
    scores = structure_scores(results, exp)
    if not scores:
        return []
    from LiverSegUNetLib.terminology import CATALOGUE

    lines = [
        "",
        "## Every part labelled: the multi-structure recipe",
        "",
        f"`{exp}`: one output channel per structure, trained on the 3D-IRCADb masks each patient has (a",
        "patient without a structure's mask adds no loss for it). Held-out Dice per structure after the",
        "product's clean-up (card rules: largest component for liver and spleen, every component inside the body for",
        "vessels, kidneys, lungs, bone, tumours kept inside the liver); blank where the held-out patient",
        "has no mask; *none in the mask*: the mask exists and is empty there (left out of the mean). *Ships*",
        f"is yes when that mean Dice is at least {SHIP_DICE} (and, for lesions, more",
        "lesions are found than missed and fewer are false than found).",
        "",
        "| structure | " + " | ".join(patients) + " | mean | ships |",
        "|---|" + "---|" * len(patients) + "---|---|",
    ]
    for key, per in sorted(scores.items(), key=lambda kv: list(CATALOGUE).index(kv[0])):
        cells = [
            ("none in the mask" if per[p].get("ref_ml", 1) == 0 else f"{per[p]['dice']:.3f}") if p in per else ""
            for p in patients
        ]
        mean = mean_dice(per)
        lines.append(
            f"| {CATALOGUE[key].name} | " + " | ".join(cells) + f" | {mean:.3f} | {'yes' if ships(per) else 'no'} |"
        )
    tumours = scores.get("liver_tumours", {})
    if tumours:
        lines += [
            "",
            "Liver tumours, per lesion (a reference lesion is found when a predicted one touches it):",
            "",
            "| held-out patient | lesions | found | missed | false | split | merged | volume (ml) predicted / expert |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in patients:
            if p in tumours:
                m, d = tumours[p], tumours[p]["lesions"]
                lines.append(
                    f"| {p} | {d['reference']} | {d['found']} | {d['missed']} | {d['false']} | {d['split']} | "
                    f"{d['merged']} | {m['pred_ml']:.1f} / {m['ref_ml']:.1f} |"
                )
    base = "liver_robust"
    if base in results:
        rows = [
            (
                p,
                results[base][p]["card"]["held_out_metrics"][p]["dice"],
                results[exp][p]["card"]["held_out_metrics"][p]["dice"],
            )
            for p in patients
            if p in results[base] and p in results.get(exp, {})
        ]
        if rows:
            lines += ["", f"The liver alone (`{base}`) against the liver with the extra targets (`{exp}`):", ""]
            lines += ["| held-out patient | liver only | with every structure | change |", "|---|---|---|---|"]
            lines += [f"| {p} | {a:.3f} | {b:.3f} | {b - a:+.3f} |" for p, a, b in rows]
            mean_a, mean_b = statistics.mean(r[1] for r in rows), statistics.mean(r[2] for r in rows)
            lines.append(f"| mean | {mean_a:.3f} | {mean_b:.3f} | {mean_b - mean_a:+.3f} |")
    return lines


def saw_own_slices(per: dict) -> bool:
    """Whether a run of the experiment trained on the held-out patient's own extra 2D slices (``overlap``)."""
    return any(overlap.saw_own_slices(v["card"]) for v in per.values())


def experiment_row(exp: str, per: dict) -> str:
    """The per-experiment table's row: mean ± sd of each metric over the held-out patients."""
    cards = [v["card"] for v in per.values()]
    row = [
        exp + (overlap.MARK if saw_own_slices(per) else ""),
        cards[0]["organ"],
        f"{statistics.mean(c['training_slices'] for c in cards):.0f}"
        + (f" + {cards[0]['extra_2d_slices']} 2D" if cards[0].get("extra_2d_slices") else ""),
        str(cards[0]["config"]["epochs"]),
    ]
    for key, _, fmt in METRICS:
        row.append(_mean_sd([c["held_out_metrics"][p][key] for p, c in zip(per, cards)], fmt))
    row.append(f"{statistics.mean(c['train_seconds'] for c in cards) / 60:.1f}")
    return "| " + " | ".join(row) + " |"


def patient_row(exp: str, per: dict, patients: list[str]) -> str:
    """The per-patient table's row: Dice / ASSD / HD95 of each held-out patient."""
    cells = []
    for p in patients:
        m = per.get(p, {}).get("card", {}).get("held_out_metrics", {}).get(p)
        cells.append(f"{m['dice']:.3f} / {m['assd_mm']:.2f} / {m['hd95_mm']:.1f}" if m else "")
    return f"| {exp}{overlap.MARK if saw_own_slices(per) else ''} | " + " | ".join(cells) + " |"


def command_lines(results: dict) -> list[str]:
    """The training command of every run, each with its experiment and held-out patient, and the commands
    that re-scored it after a change to the cleanup (``training.rescore``)."""
    lines = []
    for exp, per in results.items():
        for p, v in per.items():
            lines.append(f"{portable(v['card']['command'])}   # {exp}, held out {p}")
            lines += [f"{portable(r['command'])}   # {exp}, re-scored" for r in v["card"].get("rescored", [])]
    return lines


def write_report(runs: Path, out: Path) -> Path:
    """Write RESULTS.md and the plots into ``out``; returns the RESULTS.md path."""
    import torch

    results = collect(runs)
    if not results:
        raise SystemExit(f"no finished runs under {runs}")
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(results, out)
    patients = sorted({p for v in results.values() for p in v}, key=lambda n: int(n.rsplit(".", 1)[-1]))
    cpu_seconds = sum(v["card"]["train_seconds"] for per in results.values() for v in per.values())
    any_card = next(iter(next(iter(results.values())).values()))["card"]
    lines = [
        "# Training results: scratch vs bone-to-liver transfer, leave-one-patient-out",
        "",
        "Written by `python -m training.report` from the runs of `python -m training.experiments`",
        f"({datetime.now(UTC):%Y-%m-%d}). Every patient of 3D-IRCADb-01 found in the data folder is held",
        "out once; the others train. Metrics are 3D, on the held-out patient's original grid, after the",
        "product's postprocessing (largest component, hole filling; none for bone), computed by",
        "`LiverSegUNetLib.metrics`. Mean ± standard deviation over the held-out patients. Runs trained before",
        "the clean-up's thin-bridge cut (the plan's `opening_mm`) and re-scored with it by `training.rescore`",
        "show the re-scored metrics (their commands are listed below); the others were scored without it.",
        "",
        f"Machine: {machine()}, torch {torch.__version__}, "
        f"precision {any_card['precision']}, {any_card['processes']} process(es) on {any_card['device']}. "
        f"Training wall time of all runs below: {cpu_seconds / 3600:.2f} h.",
        "",
        "## Per experiment",
        "",
        "| experiment | organ | training slices | epochs | " + " | ".join(m[1] for m in METRICS) + " | minutes/run |",
        "|---|---|---|---|" + "---|" * len(METRICS) + "---|",
    ]
    lines += [experiment_row(exp, per) for exp, per in results.items()]
    if any(saw_own_slices(per) for per in results.values()):
        lines += [
            "",
            f"{overlap.MARK.strip()} Trained before the runs left out the msd_liver_2d slices of the held-out patient",
            "itself: that set comes from LiTS, which includes 3D-IRCADb-01, and holds 3, 2 and 5 slices of patients",
            "1, 7 and 17 (found by their pixels, `training/overlap.py`). These rows may be flattered; rows without",
            "the mark were trained without them.",
        ]
    lines += [
        "",
        "## Per held-out patient (Dice / ASSD mm / HD95 mm)",
        "",
        "| experiment | " + " | ".join(patients) + " |",
        "|---|" + "---|" * len(patients),
    ]
    lines += [patient_row(exp, per, patients) for exp, per in results.items()]
    lines += extra_data_section(results, patients)
    lines += structures_section(results, patients)
    robustness = out / "robustness.md"
    if robustness.exists():
        lines += ["", "## Robustness: the held-out patients made to look like other CTs", ""]
        lines += [robustness.read_text().rstrip()]
    lines += ["", "## Learning curves", ""] + [f"![{p}]({p})" for p in plots]
    lines += [
        "",
        "## Why pixel accuracy flatters",
        "",
        "Most voxels of an abdominal CT are not liver (the liver is about 3-5% of the volume here), so a",
        "model that predicts background everywhere already scores about 0.96 pixel accuracy. The report's",
        '"97% accuracy" therefore says little; Dice and the surface distances are the numbers to compare.',
        "",
        "## Commands",
        "",
        "```",
    ]
    lines += command_lines(results)
    lines += ["```", ""]
    if NOTES.exists():
        lines += [NOTES.read_text().rstrip(), ""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines))
    print(f"wrote {path} and {len(plots)} plots")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "training" / "runs" / "loo")
    parser.add_argument("--results", type=Path, default=ROOT / "training" / "results")
    parser.add_argument(
        "--section",
        choices=["structures", "rows"],
        help="print only the structures section, or each experiment's table rows and commands; write nothing",
    )
    args = parser.parse_args(argv)
    if args.section:
        results = collect(args.runs)
        patients = sorted({p for v in results.values() for p in v}, key=lambda n: int(n.rsplit(".", 1)[-1]))
        if args.section == "rows":
            print("\n".join([experiment_row(e, per) for e, per in results.items()]))
            print("\n".join([patient_row(e, per, patients) for e, per in results.items()]))
            print("\n".join(command_lines(results)))
        else:
            print("\n".join(structures_section(results, patients)))
        return 0
    write_report(args.runs, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
