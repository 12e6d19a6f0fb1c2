"""Re-score finished runs after a change to what inference does once the network has run (the plan's
``threshold`` or ``opening_mm``): the weights stay as trained, the card gets the new plan (weights re-saved
with it, so card and weights still match) and its held-out metrics are measured again through the product's
own ``segment()``. Run from the repository root with the project installed:

    python -m training.rescore --runs training/runs/loo --experiments liver_robust --set opening_mm=7.5
    python -m training.rescore --cards training/runs/final/liver_robust/model.json --set opening_mm=7.5

The card's provenance keeps a record per re-scoring: the plan values changed, the metrics before, the
command. Anything that changes what the network sees (window, pixel size, context) needs retraining and
is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from LiverSegUNetLib.io.ircadb import IrcadbPatient, default_data_root
from LiverSegUNetLib.weights import card_structures, load_model, save_model

#: Plan values that only act after the network: changing them needs no retraining.
AFTER_THE_NETWORK = ("threshold", "opening_mm")


def parse_sets(sets: list[str]) -> dict[str, float]:
    """``key=value`` pairs for :data:`AFTER_THE_NETWORK` plan values; anything else exits with a message."""
    changes = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or key not in AFTER_THE_NETWORK:
            raise SystemExit(
                f"--set {item!r}: give key=value with key one of {', '.join(AFTER_THE_NETWORK)} "
                "(other plan values change what the network sees: retrain instead)"
            )
        try:
            changes[key] = float(value)
        except ValueError:
            raise SystemExit(f"--set {item!r}: {value!r} is not a number") from None
    return changes


def rescore(card_path: Path, changes: dict[str, float], data: Path, device: str = "cpu") -> dict:
    """Give the model at ``card_path`` the plan ``changes``, measure its test patients again, rewrite its
    card and weights; returns the new held-out metrics (empty for a run without test patients)."""
    from training.experiments import portable
    from training.train import evaluate

    model = load_model(card_path, device=device)
    card = model.card
    plan = dataclasses.replace(model.plan, **changes)
    provenance = dict(card.get("provenance", {}))
    before = provenance.get("held_out_metrics", {})
    patients = [IrcadbPatient(data / "3Dircadb1" / p) for p in provenance.get("test_patients", [])]
    keys = provenance.get("structures") or ["liver"]
    after = evaluate(dataclasses.replace(model, plan=plan), patients, keys, device) if patients else {}
    provenance["rescored"] = [
        *provenance.get("rescored", []),
        {
            "plan": changes,
            "held_out_metrics_before": before,
            "command": f"python -m training.rescore --cards {portable(str(Path(card_path).resolve()))} "
            + " ".join(f"--set {k}={v:g}" for k, v in changes.items()),
        },
    ]
    provenance["held_out_metrics"] = after
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
    parser.add_argument("--data", type=Path, default=default_data_root())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    changes = parse_sets(args.set)
    if not changes:
        parser.error("nothing to change: give --set opening_mm=... or --set threshold=...")
    cards = list(args.cards)
    if args.runs is not None:
        cards += [c for e in args.experiments for c in sorted(args.runs.glob(f"*/{e}/model.json"))]
    if not cards:
        parser.error("no model cards: give --cards, or --runs with --experiments")
    for card in cards:
        if not card.exists():
            raise SystemExit(f"{card}: no such model card")
    for card in cards:
        after = rescore(card, changes, args.data, args.device)
        dice = {p: round(m["dice"], 4) for p, m in after.items()}
        print(f"{card}: {changes} -> held-out Dice {json.dumps(dice)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
