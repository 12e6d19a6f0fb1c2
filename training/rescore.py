"""Re-score finished runs after a change to what inference does around the trained network (the plan's
``threshold``, ``opening_mm``, ``liver_floor_hu`` or ``slice_mm``): the weights stay as trained, the card gets the
new plan (weights re-saved with it, so card and weights still match) and its held-out metrics are measured again
through the product's own ``segment()``. Run from the repository root with the project installed:

    python -m training.rescore --runs training/runs/loo --experiments liver_robust --set opening_mm=7.5
    python -m training.rescore --cards training/runs/final/liver_robust/model.json --set opening_mm=7.5
    python -m training.rescore --cards CARD.json --set liver_floor_hu=60 \
        --robustness training/results/robustness.json --entry liver_general_avg@floor=60
    python -m training.rescore --cards CARD.json --robustness training/results/robustness.json --entry E  # a table

The card's provenance keeps a record per re-scoring: the plan values changed, the metrics before, the
command. A card that carries its recipe's robustness table (a final model's) takes the new one from
``--robustness`` (the entry scored with the same plan values, e.g. by ``training.robustness --floors``); its
leave-one-out Dice must be that entry's native one; without ``--set`` the card only takes the table (its entry
scored on more conditions since). Anything that changes what the network sees (window, pixel
size, context) needs retraining and is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from LiverSegUNetLib.io.ircadb import IrcadbPatient, default_data_root
from LiverSegUNetLib.weights import card_structures, load_model, save_model

#: Plan values inference applies around the trained network (after it, to a second pass's input, or in how many
#: slices it reads): changing them needs no retraining.
NO_RETRAINING = ("threshold", "opening_mm", "liver_floor_hu", "slice_mm")


def parse_sets(sets: list[str]) -> dict[str, float]:
    """``key=value`` pairs for :data:`NO_RETRAINING` plan values; anything else exits with a message."""
    changes = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or key not in NO_RETRAINING:
            raise SystemExit(
                f"--set {item!r}: give key=value with key one of {', '.join(NO_RETRAINING)} "
                "(other plan values change what the network sees: retrain instead)"
            )
        try:
            changes[key] = float(value)
        except ValueError:
            raise SystemExit(f"--set {item!r}: {value!r} is not a number") from None
    return changes


def rescore(
    card_path: Path,
    changes: dict[str, float],
    data: Path,
    device: str = "cpu",
    table: dict | None = None,
    table_from: str = "",
) -> dict:
    """Give the model at ``card_path`` the plan ``changes``, measure its test patients again, rewrite its
    card and weights; returns the new held-out metrics (empty for a run without test patients). ``table``: the
    robustness table of its recipe's fold models under the same changes, for a card that carries one (a final
    model), read as ``table_from`` says (the command's ``--robustness F --entry E``); its native Dice must be the
    card's leave-one-out Dice."""
    from training.experiments import portable
    from training.train import evaluate

    model = load_model(card_path, device=device)
    card = model.card
    plan = dataclasses.replace(model.plan, **changes)
    provenance = dict(card.get("provenance", {}))
    before = provenance.get("held_out_metrics", {})
    if table is not None:  # refused before the patients are measured
        if "robustness_dice" not in provenance:
            raise SystemExit(f"{card_path}: the card carries no robustness table to replace")
        loo = {p: round(m["dice"], 4) for p, m in provenance.get("leave_one_out_metrics", {}).items()}
        if table.get("native") != loo:
            raise SystemExit(
                f"{card_path}: the table's native Dice {table.get('native')} is not the card's leave-one-out Dice "
                f"{loo}: re-score the fold runs and measure them again instead"
            )
    patients = [IrcadbPatient(data / "3Dircadb1" / p) for p in provenance.get("test_patients", [])]
    keys = provenance.get("structures") or ["liver"]
    after = evaluate(dataclasses.replace(model, plan=plan), patients, keys, device) if patients else {}
    provenance["rescored"] = [
        *provenance.get("rescored", []),
        {
            "plan": changes,
            "held_out_metrics_before": before,
            "command": " ".join(
                [
                    f"python -m training.rescore --cards {portable(str(Path(card_path).resolve()))}",
                    *(f"--set {k}={v:g}" for k, v in changes.items()),
                    *([table_from] if table_from else []),
                ]
            ),
        },
    ]
    provenance["held_out_metrics"] = after
    if table is not None:
        order = [*provenance["robustness_dice"], *table]  # the card's conditions in their order, any new ones after
        provenance["robustness_dice"] = {c: table[c] for c in dict.fromkeys(order) if c in table}
    if isinstance(provenance.get("config", {}).get("plan"), dict):
        provenance["config"] = {**provenance["config"], "plan": {**provenance["config"]["plan"], **changes}}
    save_model(
        model.network,
        plan,
        card_path,
        model_id=card["model_id"],
        structures=card_structures(card),
        provenance=provenance,
        dtype=card.get("weights_dtype", "float16"),
    )
    return after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.rescore", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, help="leave-one-out runs folder (<patient>/<experiment>/model.json)")
    parser.add_argument("--experiments", nargs="*", default=[], help="experiments under --runs (default: none)")
    parser.add_argument("--cards", nargs="*", type=Path, default=[], help="model cards to re-score")
    parser.add_argument("--set", action="append", default=[], help="plan value after the network, e.g. opening_mm=7.5")
    parser.add_argument("--robustness", type=Path, help="with --entry: the robustness results holding the new table")
    parser.add_argument("--entry", help="with --robustness: the model entry scored with these plan values")
    parser.add_argument("--data", type=Path, default=default_data_root())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    changes = parse_sets(args.set)
    if not changes and not args.robustness:
        parser.error(
            "nothing to change: give --set opening_mm=... or --set threshold=..., or --robustness F --entry E for a "
            "card's robustness table alone"
        )
    cards = list(args.cards)
    if args.runs is not None:
        cards += [c for e in args.experiments for c in sorted(args.runs.glob(f"*/{e}/model.json"))]
    if not cards:
        parser.error("no model cards: give --cards, or --runs with --experiments")
    if bool(args.robustness) != bool(args.entry):
        parser.error("--robustness and --entry go together")
    table = None
    if args.robustness:
        results = json.loads(args.robustness.read_text())["results"]
        if args.entry not in results:
            parser.error(f"--entry {args.entry!r} is not in {args.robustness}")
        table = results[args.entry]
    from training.experiments import portable

    for card in cards:
        if not card.exists():
            raise SystemExit(f"{card}: no such model card")
    for card in cards:
        source = f"--robustness {portable(str(args.robustness.resolve()))} --entry {args.entry}" if table else ""
        after = rescore(card, changes, args.data, args.device, table, source)
        dice = {p: round(m["dice"], 4) for p, m in after.items()}
        print(f"{card}: {changes} -> held-out Dice {json.dumps(dice)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
