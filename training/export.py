"""Install a trained model (a run's model.json) as a model the extension and the CLI bundle.

    python -m training.export training/runs/final/liver_robust/model.json
    python -m training.export training/runs/final/liver_multi/model.json --to structures \\
        --structures "Liver,Liver tumours,Portal vein"

``--to`` names the destination: ``liver`` (the default model), ``structures`` (the multi-structure
model behind ``liverseg segment --structures`` and the panel's checkbox), or a card path.
``--structures`` keeps only the named output structures (their network channels, in the given
order), so a structure whose held-out results are not good enough is not shipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="model card (.json) written by training.train")
    parser.add_argument("--to", default="liver", help="liver, structures, or a destination card path")
    parser.add_argument("--structures", default="", help="comma-separated structure names to keep (default: all)")
    args = parser.parse_args(argv)
    destination = BUNDLED.get(args.to, Path(args.to))
    model = load_model(args.model)  # verifies the checksum before anything is copied
    card = model.card
    network, structures = model.network, model.structures
    if args.structures:
        network, structures = keep_structures(model, [n.strip() for n in args.structures.split(",") if n.strip()])
    out = save_model(
        network,
        model.plan,
        destination,
        model_id=card["model_id"],
        structures=structures,
        provenance=card["provenance"],
        dtype=card.get("weights_dtype", "float16"),
    )
    print(f"installed {card['model_id']} ({', '.join(s.name for s in structures)}) as {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
