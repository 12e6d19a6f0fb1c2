"""Install a trained model (a run's model.json) as a model the extension and the CLI bundle.

    python -m training.export training/runs/final/liver_robust/model.json
    python -m training.export training/runs/final/liver_multi/model.json --to structures \\
        --structures "Liver,Liver tumours,Portal vein"

``--to`` names the destination: ``liver`` (the default model), ``structures`` (the multi-structure
model behind ``liverseg segment --structures`` and the panel's checkbox), or a card path.
``--structures`` keeps only the named output structures (their network channels, in the given
order), so a structure whose held-out results are not good enough is not shipped.

Several cards make one ensemble model card (architecture ``Ensemble``: the mean of the networks'
logits, each cut to ``--structures`` first), which ``liverseg segment --model`` and the robustness
command run like any other. They must share the preprocessing (but for the grid padding: networks of
different depths are padded to a multiple every one of them accepts) and, after the cut, the structures:

    python -m training.export training/runs/final/liver_multi/model.json \
        training/runs/final/liver_elastic/model.json --to ensemble.json --structures Liver
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

from LiverSegUNetLib.preprocess import Plan
from LiverSegUNetLib.weights import BUNDLED, LoadedModel, load_model, save_model

ROOT = Path(__file__).resolve().parents[1]


def keep_structures(model: LoadedModel, names: list[str]) -> tuple[object, list]:
    """The network with only the output channels of the structures ``names`` (in that order), and those
    structures; an unknown name exits with the known ones."""
    import torch

    known = [s.name for s in model.structures]
    lower = [n.lower() for n in known]
    missing = [n for n in names if n.lower() not in lower]
    if missing:
        raise SystemExit(f"--structures: {missing} not in the model; it has {known}")
    index = [lower.index(n.lower()) for n in names]
    network = model.network
    head = network.head
    kept = torch.nn.Conv2d(head.in_channels, len(index), 1)
    with torch.no_grad():
        kept.weight.copy_(head.weight[index])
        kept.bias.copy_(head.bias[index])
    network.head = kept
    return network, [model.structures[i] for i in index]


def ensemble_of(models: list[LoadedModel], names: list[str] | None = None) -> tuple[object, list, Plan]:
    """One ``Ensemble`` network of ``models`` (each cut to the structures ``names`` first, if given), the
    structures they share, and their shared preprocessing. Members may differ in depth: the model grid is then
    padded to the least common multiple of the members' multiples (the deepest one's, for powers of two).
    Models with other preprocessing or other structures exit with the difference."""
    from LiverSegUNetLib.model import Ensemble
    from LiverSegUNetLib.weights import network_stride

    networks, structures = [], None
    first = dataclasses.replace(models[0].plan, multiple=0)
    for model in models:
        network, mine = keep_structures(model, names) if names else (model.network, model.structures)
        if dataclasses.replace(model.plan, multiple=0) != first:
            raise SystemExit(
                f"{model.model_id}: preprocessing {model.plan.to_dict()} differs from "
                f"{models[0].model_id}'s {models[0].plan.to_dict()}; an ensemble's members share one"
            )
        if structures is not None and [s.name for s in mine] != [s.name for s in structures]:
            raise SystemExit(
                f"{model.model_id}: structures {[s.name for s in mine]} differ from {[s.name for s in structures]}; "
                "choose the shared ones with --structures"
            )
        networks.append(network)
        structures = structures or mine
    members = [m for n in networks for m in (n.members if isinstance(n, Ensemble) else [n])]
    ensemble = Ensemble(members)
    multiple = math.lcm(network_stride(ensemble), *(m.plan.multiple for m in models))
    return ensemble, structures, dataclasses.replace(models[0].plan, multiple=multiple)


def ensemble_provenance(models: list[LoadedModel]) -> dict:
    """An ensemble card's provenance: each member's, and what the members were trained on together (the
    patients, the extra slices: the licence follows from them)."""
    members = [{"model_id": m.model_id, **m.card["provenance"]} for m in models]
    return {
        "ensemble_of": members,
        "train_patients": sorted({p for m in members for p in m.get("train_patients", [])}),
        "test_patients": sorted({p for m in members for p in m.get("test_patients", [])}),
        "extra_2d_slices": max(int(m.get("extra_2d_slices", 0)) for m in members),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, nargs="+", help="model card(s) (.json) written by training.train")
    parser.add_argument("--to", default="liver", help=f"{', '.join(BUNDLED)}, or a destination card path")
    parser.add_argument("--structures", default="", help="comma-separated structure names to keep (default: all)")
    args = parser.parse_args(argv)
    destination = BUNDLED.get(args.to, Path(args.to))
    models = [load_model(path) for path in args.model]  # verifies the checksums before anything is written
    names = [n.strip() for n in args.structures.split(",") if n.strip()]
    card = models[0].card
    if len(models) > 1:
        network, structures, plan = ensemble_of(models, names)
        model_id = "ensemble-" + "+".join(m.model_id for m in models)
        provenance = ensemble_provenance(models)
    else:
        network, structures = keep_structures(models[0], names) if names else (models[0].network, models[0].structures)
        model_id, provenance, plan = card["model_id"], card["provenance"], models[0].plan
    out = save_model(
        network,
        plan,
        destination,
        model_id=model_id,
        structures=structures,
        provenance=provenance,
        dtype=card.get("weights_dtype", "float16"),
    )
    print(f"installed {model_id} ({', '.join(s.name for s in structures)}) as {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
