"""Install a trained model (a run's model.json) as the model the extension and the CLI bundle.

python -m training.export training/runs/liver_first/model.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from LiverSegUNetLib.weights import DEFAULT_MODEL, load_model, save_model

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="model card (.json) written by training.train")
    parser.add_argument(
        "--to", type=Path, default=DEFAULT_MODEL, help=f"destination card (default: {DEFAULT_MODEL.relative_to(ROOT)})"
    )
    args = parser.parse_args(argv)
    model = load_model(args.model)  # verifies the checksum before anything is copied
    card = model.card
    out = save_model(
        model.network,
        model.plan,
        args.to,
        model_id=card["model_id"],
        label=card["label"],
        provenance=card["provenance"],
        dtype=card.get("weights_dtype", "float16"),
    )
    print(f"installed {card['model_id']} as {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
