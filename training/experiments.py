"""Run the report's experiments leave-one-patient-out, retrain the best on every patient, write the report.

    python -m training.experiments                 # everything: LOO runs, final model, RESULTS.md + plots
    python -m training.experiments --stage loo     # only the leave-one-out runs (finished runs are skipped)
    python -m training.experiments --stage robustness   # score every fold model on the robustness conditions
    python -m training.experiments --stage final   # retrain the best liver experiment, the multi-structure
                                                   # recipe and the accurate ensemble's members on all
                                                   # patients, bundle them
    python -m training.experiments --stage final_default   # only the default liver model
    python -m training.experiments --stage final_accurate  # only the accurate liver model
    python -m training.report                      # only regenerate RESULTS.md and the plots

Every patient folder found under <data>/3Dircadb1 is a fold: it is the test patient, the others
train. Transfer runs start from the same fold's bone model (STARTS_FROM says which). Extra ``--set`` values are
passed to every run (e.g. ``--set epochs=2`` for a smoke test).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

from LiverSegUNetLib.io.ircadb import default_data_root, is_ircadb_patient

from training import overlap
from training.export import keep_structures

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ROOT / "training" / "configs"
EXPERIMENTS = [
    "bone_pretrain",
    "liver_scratch",
    "liver_scratch_25",
    "liver_transfer_25",
    "liver_transfer_25_frozen",
    "liver_scratch_hu255",
    "liver_scratch_msd",
    "liver_robust",
    "liver_multi",
    "liver_elastic",
    "liver_noncontrast",
    "liver_elastic_seed1",
    "liver_msd_half",
    "liver_elastic_strong",
    "liver_crop256",
    "liver_msd_elastic",
    "liver_context2",
    "liver_pull",
    "liver_varied",
    "liver_varied_seed1",
    "liver_elastic_no2d",
    "liver_wide",
    "liver_robust_seed1",
    "liver_long",
    "liver_robust_half",
    "liver_robust_avg",
    "liver_robust_thick",
    "liver_robust_thick_avg",
    "liver_robust_thick_seed1",
    "liver_deep",
    "liver_deep_seed1",
    "liver_general",
    "liver_general_fine",
    "liver_general_many",
    "liver_lesions",
    "liver_lesions_inner",
    "liver_aspect",
    "liver_aspect_seed1",
    "liver_general_seed1",
    "liver_decay",
    "liver_decay_seed1",
    "liver_general_fine_seed1",
    "liver_fresh",
    "liver_general_seed2",
    "liver_general_avg",
    "liver_general_avg_seed2",
    "liver_dark_avg",
    "liver_general_avg_seed1",
    "liver_general_fine_avg",
    "liver_general_fine_avg_seed1",
    "liver_masses_avg",
    "liver_beside_avg",
    "liver_fluid_avg",
    "liver_views_avg",
    "liver_arterial_avg",
    "liver_arterial_avg_seed2",
    "liver_gamma_avg",
    "liver_gamma_avg_seed2",
    "liver_slices_avg",
    "liver_slices_avg_seed2",
    "bone_pretrain_final",
    "liver_scratch_25_final",
    "liver_transfer_25_final",
    "liver_transfer_25_frozen_final",
]
#: Experiments that start from another experiment's model of the same fold (``init_from``).
STARTS_FROM = {
    "liver_transfer_25": "bone_pretrain",
    "liver_transfer_25_frozen": "bone_pretrain",
    "liver_multi": "liver_robust",
    "liver_transfer_25_final": "bone_pretrain_final",
    "liver_transfer_25_frozen_final": "bone_pretrain_final",
}
#: Reruns of an experiment with another seed: reported (the run-to-run spread), never candidates to ship.
REPLICATES = {
    "liver_elastic_seed1": "liver_elastic",
    "liver_varied_seed1": "liver_varied",
    "liver_robust_seed1": "liver_robust",
    "liver_deep_seed1": "liver_deep",
    "liver_robust_thick_seed1": "liver_robust_thick",
    "liver_aspect_seed1": "liver_aspect",
    "liver_general_seed1": "liver_general",
    "liver_decay_seed1": "liver_decay",
    "liver_general_fine_seed1": "liver_general_fine",
    "liver_general_seed2": "liver_general",
    "liver_general_avg_seed2": "liver_general_avg",
    "liver_general_avg_seed1": "liver_general_avg",
    "liver_general_fine_avg_seed1": "liver_general_fine_avg",
    "liver_arterial_avg_seed2": "liver_arterial_avg",
    "liver_gamma_avg_seed2": "liver_gamma_avg",
    "liver_slices_avg_seed2": "liver_slices_avg",
}
#: Experiments sized for a GPU (python -m training.slot sweep, then slot score brings the fold models here):
#: the LOO stage runs them only when named with --only; once their fold runs exist they compete as any other.
GPU_SIZED = {"liver_wide"}
LIVER = [e for e in EXPERIMENTS if e.startswith("liver") and e not in REPLICATES]
#: The accurate liver model (``liverseg segment --accurate``): the mean of these recipes' liver logits.
#: The default's recipe with ``liver_general_fine`` (the same without the coarse-pixel samples): two networks of
#: the default's size from two training runs. Leave-one-out, the pair's fold ensembles are 0.002-0.007 above the
#: default in every condition's mean (native 0.917 against 0.914, worst condition 0.862 against 0.859): one run's
#: luck weighs less, which matters most on CTs unlike the three patients.
ACCURATE = ["liver_general", "liver_general_fine"]
#: Plan values a shipped model takes after its training, per recipe (``ensemble:A+B`` for the accurate ensemble):
#: values inference applies around the trained network (``training.rescore.NO_RETRAINING``), chosen on its fold
#: models scored at them (``training.robustness --floors --slices``; RESULTS.md, "Contrast raised at test time"
#: and "Thick slices read between"). The final stage gives them to the card it installs, with the robustness
#: table scored at them, so it installs again what ships. They live here, not in the recipe's config: the
#: configs that extend it were trained and scored without them.
SHIPPED_PLAN: dict[str, dict[str, float]] = {
    "liver_general_avg": {"liver_floor_hu": 60.0, "slice_mm": 1.6},
    "ensemble:liver_general+liver_general_fine": {"liver_floor_hu": 60.0, "slice_mm": 1.6},
}
#: The robustness command's option and entry tag for each such plan value (``model@floor=60``).
#: In the order the command applies them (and names its entries: ``model@floor=60@slices=1.6``).
PLAN_OPTIONS = {
    "threshold": ("--thresholds", ""),
    "opening_mm": ("--openings", "open"),
    "liver_floor_hu": ("--floors", "floor="),
    "slice_mm": ("--slices", "slices="),
}


def portable(value):
    """``value`` with this checkout's absolute path removed from every string (paths relative to the repo)."""
    if isinstance(value, str):
        return value.replace(str(ROOT) + "/", "")
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    return value


def find_patients(data: Path) -> list[str]:
    """3D-IRCADb patient folder names, in patient-number order."""
    folders = [p.name for p in (data / "3Dircadb1").iterdir() if is_ircadb_patient(p)]
    return sorted(folders, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])


def run(config: str, out: Path, data: Path, sets: list[str]) -> None:
    """Train one configuration into ``out`` unless it already finished there (an interrupted run resumes)."""
    if (out / "model.json").exists():
        print(f"done already: {portable(str(out))}", flush=True)
        return
    cmd = [
        sys.executable,
        "-m",
        "training.train",
        str(CONFIGS / f"{config}.toml"),
        "--data",
        str(data),
        "--out",
        str(out),
    ]
    for s in sets:
        cmd += ["--set", s]
    if (out / "checkpoint.json").exists():
        cmd.append("--resume")
    print("running:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def loo(data: Path, runs: Path, extra: list[str], only: list[str]) -> None:
    """All experiments for every leave-one-patient-out fold."""
    patients = find_patients(data)
    for test in patients:
        train = [p for p in patients if p != test]
        split = [f"train_patients={json.dumps(train)}", f"test_patients={json.dumps([test])}"]
        for exp in EXPERIMENTS:
            if (only and exp not in only) or (not only and exp in GPU_SIZED):
                continue
            sets = split + extra
            if exp in STARTS_FROM:
                sets.append(f'init_from="{portable(str(runs / test / STARTS_FROM[exp] / "model.json"))}"')
            run(exp, runs / test / exp, data, sets)


#: A recipe may trade this much mean leave-one-out Dice on the native CTs for a better worst condition ...
NATIVE_TOLERANCE = 0.01
#: ... better by more than this: two runs of one recipe (another seed, or another CPU) move most conditions' means
#: by up to 0.005 (RESULTS.md), so a smaller lead is the run's luck, not the recipe's.
WORST_MARGIN = 0.005
#: Where some candidate recipes were run at least this many times (``REPLICATES``), only those compete. The worst
#: condition (contrast removed towards darker values) moves far more between runs than the others: of three
#: recipes run twice, two lost patient 1 there in one run only (0.867 and 0.770; 0.859 and 0.820; RESULTS.md),
#: so a recipe run once would win on not having had its bad run yet.
MIN_RUNS = 2


def loo_scores(runs: Path, experiments: list[str] | None = None) -> dict[str, dict]:
    """Per liver experiment finished in every fold, its held-out metrics per patient (an experiment with a
    fold still to run is left out: a mean over fewer patients is not comparable; so is one with a run that
    trained on its held-out patient's own extra 2D slices, ``overlap.saw_own_slices``). ``experiments``:
    which to look for (default the candidates to ship, ``LIVER``)."""
    folds = [f for f in runs.iterdir() if f.is_dir()] if runs.is_dir() else []
    scores = {}
    for exp in LIVER if experiments is None else experiments:
        provenances = fold_cards(runs, exp).values()
        if not folds or len(provenances) < len(folds) or any(overlap.saw_own_slices(p) for p in provenances):
            continue
        scores[exp] = {}
        for provenance in provenances:
            scores[exp].update(provenance["held_out_metrics"])
    return scores


def fold_cards(runs: Path, run: str) -> dict[str, dict]:
    """Per fold folder, ``run``'s card provenance there (folds where it has none left out)."""
    folds = sorted(f for f in runs.iterdir() if f.is_dir()) if runs.is_dir() else []
    cards = {f.name: f / run / "model.json" for f in folds}
    return {fold: json.loads(card.read_text())["provenance"] for fold, card in cards.items() if card.exists()}


def worst_condition(per_condition: dict[str, dict[str, float]]) -> tuple[str, float]:
    """The robustness condition with the lowest mean Dice over the held-out patients, and that mean."""
    means = {c: sum(v.values()) / len(v) for c, v in per_condition.items() if v}
    worst = min(means, key=means.get)
    return worst, means[worst]


def runs_of(exp: str) -> list[str]:
    """``exp`` and its reruns with other seeds (``REPLICATES``)."""
    return [exp] + [r for r, base in REPLICATES.items() if base == exp]


def recipe_runs(runs: Path) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """Per candidate recipe finished in every fold, its finished runs (itself first, then its seed reruns), and
    every such run's held-out metrics per patient (``loo_scores``)."""
    scores = loo_scores(runs, [r for e in LIVER for r in runs_of(e)])
    return {e: [r for r in runs_of(e) if r in scores] for e in LIVER if e in scores}, scores


def run_dice(metrics: dict[str, dict]) -> float:
    """One run's mean leave-one-out Dice over its held-out patients (``loo_scores`` values)."""
    return sum(m["dice"] for m in metrics.values()) / len(metrics)


def scored_conditions(tables) -> set[str]:
    """The robustness conditions every one of ``tables`` (condition -> patient -> Dice) was scored on."""
    return set.intersection(*(set(c for c, v in t.items() if v) for t in tables))


def condition_mean(table: dict, condition: str) -> float:
    """A robustness table's mean Dice over the held-out patients in ``condition``."""
    return sum(table[condition].values()) / len(table[condition])


def worst_mean(table: dict, conditions: set[str]) -> float:
    """A robustness table's lowest condition mean among ``conditions`` (its worst condition there)."""
    return min(condition_mean(table, c) for c in conditions)


def recipe_means(runs: Path, robustness: dict | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Per candidate recipe, its mean leave-one-out Dice and its worst robustness condition's mean, each over
    the recipe's runs found finished (itself and its seed reruns): one run's luck weighs less where a recipe
    was run twice. A condition's mean is averaged over the runs scored on it before the worst is taken, and
    only the conditions every scored candidate run has are compared."""
    done, scores = recipe_runs(runs)
    native = {e: sum(run_dice(scores[r]) for r in rs) / len(rs) for e, rs in done.items()}
    scored = {e: [robustness[r] for r in rs if robustness and r in robustness] for e, rs in done.items()}
    scored = {e: tables for e, tables in scored.items() if tables}
    if not scored:
        return native, {}
    shared = scored_conditions(t for tables in scored.values() for t in tables)
    robust = {
        e: min(sum(condition_mean(t, c) for t in tables) / len(tables) for c in shared) for e, tables in scored.items()
    }
    return native, robust


#: The default model's float16 weights may take this much (MB). The Slicer Extensions Index refuses a repository
#: whose clone, history included, exceeds 100 MB, and every default model shipped stays in the history: at 3.9 MB
#: (1.9 M parameters) a new default costs the clone about 4 MB; a 7.8 M-parameter network (15.6 MB) would take
#: it past the limit.
DEFAULT_WEIGHTS_BUDGET_MB = 5.0


def weights_mb(runs: Path, exp: str) -> float:
    """The float16 size (MB) of ``exp``'s network as its fold cards describe it; 0 for a card without one."""
    from LiverSegUNetLib.weights import build_network

    cards = sorted(runs.glob(f"*/{exp}/model.json"))
    architecture = json.loads(cards[0].read_text()).get("architecture") if cards else None
    if not architecture:
        return 0.0
    return sum(p.numel() for p in build_network(architecture).parameters()) * 2 / 1e6


def bundled_member(recipe: str, patients: list[str] | None = None) -> int | None:
    """The index of the bundled accurate ensemble's member that is ``recipe`` trained on every patient (on exactly
    ``patients``, when given), if there is one: the default model then runs that member's weights alone
    (``weights_of``), adding no bytes."""
    from LiverSegUNetLib.weights import ACCURATE_MODEL

    if not ACCURATE_MODEL.exists():
        return None
    members = json.loads(ACCURATE_MODEL.read_text())["provenance"].get("ensemble_of", [])
    found = [
        i
        for i, m in enumerate(members)
        if m.get("config", {}).get("name") == recipe
        and not m["test_patients"]
        and (patients is None or sorted(m["train_patients"]) == sorted(patients))
    ]
    return found[0] if found else None


def contenders(runs: Path, candidates: list[str]) -> list[str]:
    """Those of ``candidates`` run at least ``MIN_RUNS`` times (finished in every fold), if there are any; else
    all of them."""
    done, _ = recipe_runs(runs)
    replicated = [e for e in candidates if len(done.get(e, [])) >= MIN_RUNS]
    return replicated or list(candidates)


def oversized(runs: Path, experiments) -> list[str]:
    """Those of ``experiments`` whose network is above the default model's size budget and not already bundled
    (``bundled_member``)."""
    return sorted(
        e for e in experiments if weights_mb(runs, e) > DEFAULT_WEIGHTS_BUDGET_MB and bundled_member(e) is None
    )


def run_spreads(runs: Path, robustness: dict | None = None) -> tuple[float, float]:
    """What a rerun alone moves: the largest difference between two runs of one recipe (among the candidates run
    more than once) in mean leave-one-out Dice, and in the mean of the worst robustness condition (each run's
    own worst, over the conditions all those runs were scored on); 0 where no recipe was run twice."""
    done, scores = recipe_runs(runs)
    native_spread = worst_spread = 0.0
    for rs in (rs for rs in done.values() if len(rs) > 1):
        means = [run_dice(scores[r]) for r in rs]
        native_spread = max(native_spread, max(means) - min(means))
        tables = [robustness[r] for r in rs if robustness and r in robustness]
        if len(tables) > 1:
            shared = scored_conditions(tables)
            worst = [worst_mean(t, shared) for t in tables]
            worst_spread = max(worst_spread, max(worst) - min(worst))
    return native_spread, worst_spread


#: Config keys that change how a run's weights are read out or kept, not how it trains.
READ_OUT_KEYS = {"name", "average_from", "snapshots"}


def flat(config: dict, prefix: str = "") -> dict:
    """A config's values by dotted key (``augment.elastic``)."""
    out = {}
    for key, value in config.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def runs_apart(runs: Path, robustness: dict | None, recipe: str, incumbent: str) -> bool:
    """Whether every run of ``recipe`` is better in its worst robustness condition than every run of ``incumbent``,
    by more than ``WORST_MARGIN``, with at least ``MIN_RUNS`` runs of each (the worst over the conditions all those
    runs were scored on). With two runs a recipe cannot show a lead larger than the largest gap between two seeds of
    any recipe (``run_spreads``, set by one seed that lost a patient); that no run of one falls as low as the best
    run of the other is the evidence two runs can give that the lead is not one run's luck."""
    done, _ = recipe_runs(runs)
    ours, theirs = done.get(recipe, []), done.get(incumbent, [])
    if len(ours) < MIN_RUNS or len(theirs) < MIN_RUNS or not robustness:
        return False
    if any(r not in robustness for r in ours + theirs):
        return False
    shared = scored_conditions(robustness[r] for r in ours + theirs)
    worst = {r: worst_mean(robustness[r], shared) for r in ours + theirs}
    return min(worst[r] for r in ours) > max(worst[r] for r in theirs) + WORST_MARGIN


def same_training(runs: Path, averaged: str, plain: str) -> bool:
    """Whether the weight-averaged run ``averaged`` trained exactly as ``plain`` did: the same config but for the
    read-out (``READ_OUT_KEYS``) and, in every fold, its last weights scoring as ``plain``'s to the last digit
    (training is deterministic on one machine: the same seed gives the same weights). The two are then one training
    read out two ways, and their difference carries none of the spread between seeds."""
    a, b = fold_cards(runs, averaged), fold_cards(runs, plain)
    if not a or a.keys() != b.keys():
        return False

    def recipe(provenance):
        return {k: v for k, v in flat(provenance.get("config", {})).items() if k not in READ_OUT_KEYS}

    def same_recipe(x, y):  # a key only one card has was added to the code since the other was trained, off there
        return all(x[k] == y[k] for k in x.keys() & y.keys())

    return all(
        same_recipe(recipe(a[f]), recipe(b[f]))
        and a[f].get("held_out_metrics_last_weights") == b[f]["held_out_metrics"]
        for f in a
    )


def read_out_gains(runs: Path, robustness: dict | None, recipe: str, incumbent: str) -> list[tuple[float, float]]:
    """Where every run of ``recipe`` is a run of ``incumbent`` with its weights averaged (``same_training``), what
    the average gained in each such pair: in mean leave-one-out Dice and in the run's worst robustness condition
    (over the conditions both were scored on); empty where some run has no such partner or no robustness table."""
    done, scores = recipe_runs(runs)
    gains = []
    for averaged in done.get(recipe, []):
        plain = next((p for p in done.get(incumbent, []) if same_training(runs, averaged, p)), None)
        if plain is None or not robustness or averaged not in robustness or plain not in robustness:
            return []
        tables = [robustness[averaged], robustness[plain]]
        shared = scored_conditions(tables)
        worst = [worst_mean(t, shared) for t in tables]
        gains.append((run_dice(scores[averaged]) - run_dice(scores[plain]), worst[0] - worst[1]))
    return gains


def averaged_wins(gains: list[tuple[float, float]]) -> bool:
    """Whether averaged weights beat the last ones of the same trainings (``read_out_gains``): in the worst
    condition in every one of at least ``MIN_RUNS`` pairs, and not lower natively over the pairs."""
    return len(gains) >= MIN_RUNS and all(w > 0 for _, w in gains) and sum(n for n, _ in gains) >= 0


def best_liver_experiment(runs: Path, robustness: dict | None = None, incumbent: str | None = None) -> tuple[str, dict]:
    """The liver experiment to ship, and its per-patient leave-one-out metrics (of its own run, not its reruns).

    By mean leave-one-out Dice; where robustness results exist for the candidates, the one with the
    best worst-condition mean among those within ``NATIVE_TOLERANCE`` of the best native mean, if that is
    more than ``WORST_MARGIN`` above the best native recipe's own. Both means are over the recipe's runs
    (``recipe_means``). The ``incumbent`` (the recipe shipped now), when it competes, stays unless the pick
    beats it by more than a rerun alone moves (``run_spreads``) in native Dice or in the worst condition, or in the
    worst condition with every run of the pick above every run of the incumbent (``runs_apart``): the default does
    not change on a run's luck; or unless its own trainings read out with averaged weights beat it
    pair by pair (``read_out_gains``, ``averaged_wins``), a comparison the seeds' spread does not enter. A recipe
    whose network is larger than
    ``DEFAULT_WEIGHTS_BUDGET_MB`` is not a candidate, unless the accurate ensemble already bundles it; where
    some candidates have ``MIN_RUNS`` runs, the others are not candidates either (``contenders``).
    """
    native, robust = recipe_means(runs, robustness)
    too_large = oversized(runs, native)
    keep = contenders(runs, [e for e in native if e not in too_large])
    native = {e: v for e, v in native.items() if e in keep}
    robust = {e: v for e, v in robust.items() if e in keep}
    if not native:
        raise SystemExit(
            f"no finished leave-one-out runs under {runs} within {DEFAULT_WEIGHTS_BUDGET_MB} MB of weights "
            f"(too large: {too_large}); run --stage loo first"
        )
    best = max(native, key=native.get)
    close = [e for e in robust if native[e] >= native[best] - NATIVE_TOLERANCE]
    if close:
        challenger = max(close, key=robust.get)
        if best not in robust or robust[challenger] > robust[best] + WORST_MARGIN:
            best = challenger
    if incumbent in native and best != incumbent:
        native_spread, worst_spread = run_spreads(runs, robustness)
        better_native = native[best] > native[incumbent] + native_spread
        better_worst = best in robust and incumbent in robust and robust[best] > robust[incumbent] + worst_spread
        better_worst = better_worst or runs_apart(runs, robustness, best, incumbent)
        if not (better_native or better_worst):
            best = incumbent
    if best == incumbent:  # its own trainings, read out with averaged weights, are compared pair by pair
        averaged = [e for e in native if e != best and averaged_wins(read_out_gains(runs, robustness, e, best))]
        if averaged:
            best = max(averaged, key=lambda e: robust.get(e, 0.0))
    return best, loo_scores(runs, [best])[best]


def robustness_command(data: Path, runs: Path, out: Path, *options: str) -> dict:
    """Run ``training.robustness`` on the fold runs into ``out`` with ``options``; returns its results. Paths in the
    repository are given relative to it, and ``--data`` only when it is not the default: the command is recorded
    in the results file, which is committed."""
    cmd = [sys.executable, "-m", "training.robustness", "--runs", portable(str(runs)), "-o", portable(str(out))]
    if Path(data).resolve() != default_data_root().resolve():
        cmd += ["--data", str(data)]
    cmd += options
    print("running:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(out.read_text())["results"]


def run_robustness(data: Path, runs: Path, out: Path) -> dict:
    """Score every fold's liver model on the robustness conditions (training/robustness.py); returns the results."""
    return robustness_command(data, runs, out, "--ensemble", "+".join(ACCURATE))


def shipped_entry(name: str) -> tuple[dict[str, float], str]:
    """``name``'s ``SHIPPED_PLAN`` values and the robustness entry of its fold models scored at them (``name``
    itself when it has none)."""
    changes = SHIPPED_PLAN.get(name, {})
    if not set(changes) <= set(PLAN_OPTIONS):
        raise SystemExit(f"SHIPPED_PLAN[{name!r}]: give values of {', '.join(PLAN_OPTIONS)}, not {sorted(changes)}")
    tags = [f"@{tag}{changes[key]:g}" for key, (_, tag) in PLAN_OPTIONS.items() if key in changes]
    return changes, name + "".join(tags)


def shipped_table(name: str, data: Path, runs: Path, robustness_file: Path) -> tuple[dict, dict | None, str]:
    """``name``'s ``SHIPPED_PLAN`` values, its fold models' robustness table at them and that table's entry name.
    A missing entry is scored now (``training.robustness``, merged into ``robustness_file``); no table where the
    robustness stage never ran (no ``robustness_file``)."""
    changes, entry = shipped_entry(name)
    if not robustness_file.exists():
        return changes, None, entry
    results = json.loads(robustness_file.read_text())["results"]
    if entry not in results and changes:
        options = [x for key, value in changes.items() for x in (PLAN_OPTIONS[key][0], f"{value:g}")]
        ensemble = name.startswith("ensemble:")
        options += ["--ensemble", name.removeprefix("ensemble:")] if ensemble else ["--experiments", name]
        results = robustness_command(data, runs, robustness_file, "--merge", *options)
    return changes, results.get(entry), entry


def after_training(provenance: dict, changes: dict[str, float], entry: str) -> dict:
    """``provenance`` with the ``SHIPPED_PLAN`` values given after training recorded, and in its config's plan."""
    if not changes:
        return provenance
    config = provenance.get("config", {})
    if isinstance(config.get("plan"), dict):
        provenance = {**provenance, "config": {**config, "plan": {**config["plan"], **changes}}}
    return {
        **provenance,
        "plan_after_training": {
            "values": changes,
            "robustness_entry": entry,
            "set_by": "training.experiments.SHIPPED_PLAN (values that need no retraining)",
        },
    }


def final(data: Path, runs: Path, extra: list[str], robustness_file: Path, command: str = "--stage final") -> Path:
    """Retrain the best liver experiment on every patient and install it as the bundled model.

    Its card keeps the leave-one-out metrics and, when ``robustness_file`` exists, the robustness
    table of the same recipe's fold models.
    """
    from LiverSegUNetLib.weights import ACCURATE_MODEL, DEFAULT_MODEL, load_model, save_member_card, save_model

    robustness = json.loads(robustness_file.read_text())["results"] if robustness_file.exists() else None
    incumbent = shipped_recipe()
    best, loo_metrics = best_liver_experiment(runs, robustness, incumbent)
    native_spread, worst_spread = run_spreads(runs, robustness)
    paired = read_out_gains(runs, robustness, best, incumbent) if incumbent and best != incumbent else []
    candidates, _ = recipe_runs(runs)
    reruns = {e: rs for e, rs in candidates.items() if len(rs) > 1}
    too_large = oversized(runs, candidates)
    competing = contenders(runs, [e for e in candidates if e not in too_large])
    patients = find_patients(data)
    # the accurate ensemble's member of this recipe trained on these patients is what training would give again
    # (same recipe, patients and seed): run it alone rather than bundle a second copy (whatever its size)
    shared = bundled_member(best, patients)
    changes, table, entry = shipped_table(best, data, runs, robustness_file)
    ensemble_changes = SHIPPED_PLAN.get("ensemble:" + "+".join(ACCURATE), {})
    if shared is not None and changes != ensemble_changes:
        raise SystemExit(
            f"SHIPPED_PLAN gives {best} {changes or 'no values'} and the accurate ensemble {ensemble_changes or 'none'}"
            f", but {best} ships as a member of {ACCURATE_MODEL.name}, whose plan it shares: give both the same values"
        )
    if shared is None:
        model = load_model(train_final(best, data, runs, extra))
        trained = model.card["provenance"]
    else:  # the accurate ensemble's member of this recipe, trained on every patient: shared, not trained again
        trained = json.loads(ACCURATE_MODEL.read_text())["provenance"]["ensemble_of"][shared]
    provenance = {
        **trained,
        "chosen_as": (
            f"best mean leave-one-out Dice among {list(candidates)} (liver experiments finished in every fold)"
            + (f"; means over the runs {reruns}" if reruns else "")
            + (f"; left out as larger than {DEFAULT_WEIGHTS_BUDGET_MB} MB of weights: {too_large}" if too_large else "")
            + (
                f"; only the recipes run at least {MIN_RUNS} times compete: {competing}"
                if len(competing) < len(candidates) - len(too_large)
                else ""
            )
            + (
                f"; among those within {NATIVE_TOLERANCE} of it, the best worst robustness condition"
                f" if more than {WORST_MARGIN} above the first one's"
                if robustness
                else ""
            )
            + (
                f"; the recipe shipped before, {incumbent}, stays unless beaten by more than a rerun moves"
                f" (native {native_spread:.3f}, worst condition {worst_spread:.3f}), or in the worst condition by"
                f" every run (each run's worst above each of {incumbent}'s runs' by more than {WORST_MARGIN}), or by"
                " its own trainings read out with averaged weights, pair by pair (better in the worst condition in"
                f" each of at least {MIN_RUNS} pairs, not lower natively)"
                if incumbent
                else ""
            )
            + (
                f"; every run of {best} is above every run of {incumbent} in its worst condition"
                if incumbent and best != incumbent and not paired and runs_apart(runs, robustness, best, incumbent)
                else ""
            )
            + (
                f"; {best} is {incumbent}'s own trainings read out with averaged weights, and gained in each pair"
                f" (native, worst condition): {[(round(n, 4), round(w, 4)) for n, w in paired]}"
                if paired
                else ""
            )
        ),
        "leave_one_out_metrics": loo_metrics,
        **({"robustness_dice": table} if table else {}),
        "command": f"python -m training.experiments {command}".rstrip(),
    }
    provenance = after_training(provenance, changes, entry)
    model_id = f"liver-unet2d-{best}-all"
    if shared is None:
        network, structures = model.network, model.structures
        if len(structures) > 1:  # a multi-structure recipe won on the liver: ship its liver channel, as fast
            network, structures = keep_structures(model, [structures[0].name])
        plan = dataclasses.replace(model.plan, **changes)
        card = save_model(network, plan, DEFAULT_MODEL, model_id=model_id, structures=structures, provenance=provenance)
    else:
        provenance["weights"] = f"member {shared} of {ACCURATE_MODEL.name} (the same {best} network, not a copy)"
        card = save_member_card(ACCURATE_MODEL, shared, DEFAULT_MODEL, model_id=model_id, provenance=provenance)
        DEFAULT_MODEL.with_suffix(".safetensors").unlink(missing_ok=True)  # the previous default's own weights
    record_sample_agreement(card)
    print(f"installed {best} trained on {patients} as {portable(str(card))}")
    return card


def shipped_recipe() -> str | None:
    """The recipe of the default model installed now (its card's training config), if there is one."""
    from LiverSegUNetLib.weights import DEFAULT_MODEL

    if not DEFAULT_MODEL.exists():
        return None
    return json.loads(DEFAULT_MODEL.read_text())["provenance"].get("config", {}).get("name")


def record_sample_agreement(card: Path) -> float:
    """Score the installed model on the sample CT against TotalSegmentator's liver (``training.external``) and
    keep the Dice in its card's provenance (not a field the weights' checksum covers)."""
    from LiverSegUNetLib.outputs import atomic_write_bytes
    from LiverSegUNetLib.weights import load_model

    from training.external import agreement

    value = agreement({card.stem: [(load_model(card), "model")]})[card.stem]["model"]
    content = json.loads(card.read_text())
    content["provenance"]["sample_agreement"] = value
    atomic_write_bytes(card, (json.dumps(content, indent=2) + "\n").encode())
    return value


def train_final(recipe: str, data: Path, runs: Path, extra: list[str]) -> Path:
    """``recipe`` trained on every patient (after the recipe it starts from, if any); its model card."""
    patients = find_patients(data)
    everyone = [f"train_patients={json.dumps(patients)}", "test_patients=[]", "validate=false", *extra]
    sets = list(everyone)
    if recipe in STARTS_FROM:
        source = runs.parent / "final" / STARTS_FROM[recipe]
        run(STARTS_FROM[recipe], source, data, everyone)
        sets.append(f'init_from="{portable(str(source / "model.json"))}"')
    out = runs.parent / "final" / recipe
    run(recipe, out, data, sets)
    return out / "model.json"


def final_accurate(
    data: Path, runs: Path, extra: list[str], robustness_file: Path, command: str = "--stage final"
) -> Path:
    """The ensemble of the ``ACCURATE`` recipes, each trained on every patient, installed as the accurate
    liver model; its card keeps the fold ensembles' leave-one-out Dice and robustness table (``--stage
    robustness`` scores them)."""
    from LiverSegUNetLib.weights import ACCURATE_MODEL, load_model, save_model

    from training.export import ensemble_of, ensemble_provenance

    models = [load_model(train_final(m, data, runs, extra)) for m in ACCURATE]
    network, structures, plan = ensemble_of(models, [models[0].structures[0].name])
    changes, table, entry = shipped_table("ensemble:" + "+".join(ACCURATE), data, runs, robustness_file)
    provenance = {
        **ensemble_provenance(models),
        "chosen_as": f"the mean of the liver logits of {', '.join(ACCURATE)}, each trained on every patient",
        **({"leave_one_out_metrics": {p: {"dice": d} for p, d in table["native"].items()}} if table else {}),
        **({"robustness_dice": table} if table else {}),
        "command": f"python -m training.experiments {command}".rstrip(),
    }
    provenance = after_training(provenance, changes, entry)
    card = save_model(
        network,
        dataclasses.replace(plan, **changes),
        ACCURATE_MODEL,
        model_id="liver-unet2d-ensemble-" + "+".join(ACCURATE) + "-all",
        structures=structures,
        provenance=provenance,
    )
    record_sample_agreement(card)
    print(f"installed the ensemble of {ACCURATE} as {portable(str(card))}", flush=True)
    return card


def final_structures(data: Path, runs: Path, extra: list[str], recipe: str = "liver_multi") -> Path | None:
    """Retrain the multi-structure recipe on every patient and install, as the structures model, the
    structures whose leave-one-out results are good enough (``report.ships``); None without fold runs."""
    from LiverSegUNetLib.terminology import CATALOGUE
    from LiverSegUNetLib.weights import STRUCTURES_MODEL, load_model, save_model

    from training.report import SHIP_DICE, collect, ships, structure_scores

    scores = structure_scores(collect(runs), recipe)
    if not scores:
        print(f"no {recipe} fold runs under {runs}: no structures model", flush=True)
        return None
    shipped = [k for k in CATALOGUE if k in scores and ships(scores[k])]
    if not shipped or shipped[0] != "liver":
        raise SystemExit(f"{recipe}: the liver does not pass its own bar ({scores.get('liver')}); nothing to ship")
    card = train_final(recipe, data, runs, extra)
    model = load_model(card)
    network, structures = keep_structures(model, [CATALOGUE[k].name for k in shipped])
    provenance = {
        **model.card["provenance"],
        "chosen_as": f"structures of {recipe} with mean leave-one-out Dice >= {SHIP_DICE} (lesions: found > missed, "
        "false < found); the others stay in the results",
        "leave_one_out_structures": scores,
        "left_out": [k for k in scores if k not in shipped],
        "command": "python -m training.experiments --stage final",
    }
    card = save_model(
        network,
        model.plan,
        STRUCTURES_MODEL,
        model_id=f"structures-unet2d-{recipe}-all",
        structures=structures,
        provenance=provenance,
    )
    print(f"installed {recipe} ({', '.join(s.name for s in structures)}) as {portable(str(card))}", flush=True)
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--stage",
        choices=["all", "loo", "robustness", "final", "final_default", "final_accurate", "report"],
        default="all",
        help="final_default / final_accurate: only the default / the accurate liver model",
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="folder holding 3Dircadb1/ (default: $LIVERSEG_DATA or ../shared/data)"
    )
    parser.add_argument("--runs", type=Path, default=ROOT / "training" / "runs" / "loo", help="where fold runs go")
    parser.add_argument("--only", nargs="*", default=[], choices=EXPERIMENTS, help="restrict the LOO stage")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every run")
    parser.add_argument("--results", type=Path, default=ROOT / "training" / "results", help="report folder")
    args = parser.parse_args(argv)
    data = (args.data or default_data_root()).resolve()
    if args.stage in ("all", "loo"):
        loo(data, args.runs, args.set, args.only)
    robustness_file = args.results / "robustness.json"
    if args.stage in ("all", "robustness"):
        run_robustness(data, args.runs, robustness_file)
    if args.stage in ("all", "final"):
        final_structures(data, args.runs, args.set)
    command = " ".join(portable(argv if argv is not None else sys.argv[1:]))
    if args.stage in ("all", "final", "final_accurate"):  # before the default: it may share one of its networks
        final_accurate(data, args.runs, args.set, robustness_file, command)
    if args.stage in ("all", "final", "final_default"):
        final(data, args.runs, args.set, robustness_file, command)
    if args.stage in ("all", "report"):
        from training.report import write_report

        write_report(args.runs, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
