"""``python -m training.bench``: seconds and peak memory per CT, ours against the alternatives.

Run from the repository root with the project installed (``pip install -e ".[bench]"`` adds MONAI
for the peers and ONNX Runtime). Each method runs on each patient in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from LiverSegUNetLib.errors import InputError
from LiverSegUNetLib.io.ircadb import default_data_root
from LiverSegUNetLib.outputs import atomic_write_bytes
from LiverSegUNetLib.weights import ACCURATE_MODEL, STRUCTURES_MODEL

from training.bench import bench


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m training.bench",
        description="Run each method on each patient in a fresh process and print a markdown table "
        "of seconds and peak resident memory, with ratios to ours. Peers run with "
        "untrained weights (their compute, not their accuracy).",
    )
    parser.add_argument(
        "--patients",
        type=Path,
        nargs="*",
        default=[],
        help="3D-IRCADb patient folders (default: every patient under $LIVERSEG_DATA/3Dircadb1)",
    )
    methods = ", ".join(bench.METHODS)
    bundled = {bench.STRUCTURES: STRUCTURES_MODEL, bench.ACCURATE: ACCURATE_MODEL}
    default = [m for m in bench.METHODS if m not in bundled or bundled[m].is_file()]
    parser.add_argument(
        "--methods",
        default=",".join(default),
        help=f"comma-separated subset of: {methods} (default: all; {bench.STRUCTURES} and {bench.ACCURATE} "
        "only when their model is bundled)",
    )
    parser.add_argument(
        "--structures-model",
        type=Path,
        default=STRUCTURES_MODEL,
        help="model card that ours_structures runs (default: the bundled multi-structure model)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of our pipeline per patient (median reported)")
    parser.add_argument("--device", default="cpu", help="device for our pipeline (default: cpu)")
    parser.add_argument(
        "--baseline-slices",
        type=int,
        default=16,
        help="slices the fp32 512x512 baseline runs before extrapolating (0: all)",
    )
    parser.add_argument(
        "--stack",
        type=int,
        default=4,
        help="memory scaling: also run the largest patient stacked this many times (1 to skip)",
    )
    parser.add_argument("-o", "--output", type=Path, help="also write the table to this .md file (and .json beside it)")
    parser.add_argument("--worker", choices=[*bench.METHODS, bench.STACKED], help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        result = bench.worker(
            args.worker, args.patients[0], args.stack, args.device, args.baseline_slices, args.structures_model
        )
        print(json.dumps(result))
        return 0
    root = default_data_root() / "3Dircadb1"
    patients = args.patients or (sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else [])
    if not patients:
        raise InputError(f"no patients given and none found in {root}; pass patient folders or set LIVERSEG_DATA")
    methods = args.methods.split(",")
    unknown = set(methods) - set(bench.METHODS)
    if unknown:
        raise InputError(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(bench.METHODS)}")
    info = bench.machine()
    results, scaling = bench.run_bench(
        patients,
        methods,
        args.repeats,
        args.device,
        args.baseline_slices,
        args.stack,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
        structures_model=args.structures_model,
    )
    command = " ".join(["python -m training.bench", *(sys.argv[1:] if argv is None else argv)])
    text = bench.table(results, info, command)
    if scaling:
        text += "\n\nMemory against volume size (our inference, patient stacked along k):\n\n" + bench.memory_table(
            scaling
        )
    print(text)
    if args.output:
        atomic_write_bytes(args.output, (text + "\n").encode())
        atomic_write_bytes(
            args.output.with_suffix(".json"),
            json.dumps({"machine": info, "results": results, "memory_scaling": scaling}, indent=1).encode(),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
