"""``python -m training.bench``: seconds and peak memory per CT for our pipeline, the report's approach and the peers'.

Every measurement runs in a fresh worker process, so peak resident memory (``ru_maxrss``) belongs
to that one job and process start-up is measured too. The peers' weights cannot be downloaded, so
their pipelines run with untrained weights of the real architectures, patch sizes and overlaps:
the compute is theirs, the output is meaningless (and is not scored).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

#: Peers as SlicerMONAIAuto3DSeg and TotalSegmentator run them (see PEERS_SOURCES in the table notes).
PEERS = {
    "monai_segresnet_1.5mm": {"kind": "segresnet", "spacing_mm": 1.5},
    "monai_segresnet_3mm": {"kind": "segresnet", "spacing_mm": 3.0},
    "nnunet_3d_fullres_1.5mm": {"kind": "nnunet", "spacing_mm": 1.5},
}
#: Our pipeline with the network run by ONNX Runtime (fp32) instead of torch: the optional-backend candidate.
ONNXRUNTIME = "ours_onnxruntime"
#: Our pipeline with the multi-structure model (``--structures-model``, the bundled one by default).
STRUCTURES = "ours_structures"
#: Our pipeline with the bundled accurate liver model (an ensemble of networks).
ACCURATE = "ours_accurate"
METHODS = ["ours", ACCURATE, STRUCTURES, ONNXRUNTIME, "report_unet_fp32", *PEERS]
#: Internal method: our inference on the patient stacked ``stack`` times along k, to show memory scaling.
STACKED = "ours_stacked"


def _peak_mb() -> float:
    """Peak resident memory of this process in MB (POSIX ``getrusage``; the module still imports on Windows)."""
    try:
        import resource
    except ImportError as exc:
        from LiverSegUNetLib.errors import InputError

        raise InputError("the benchmark measures peak memory with getrusage, which needs Linux or macOS") from exc
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _patient_volume(patient_dir: Path, stack: int):
    from LiverSegUNetLib.io import read_volume
    from LiverSegUNetLib.volume import Volume

    t = time.perf_counter()
    ct = read_volume(patient_dir)
    if stack > 1:
        ct = Volume(np.concatenate([ct.array] * stack), ct.spacing_mm, ct.origin_lps, ct.direction)
    return ct, time.perf_counter() - t


def onnxruntime_runtime(model, folder: str):
    """A network runtime for ``segment(runtime=...)``: ``model``'s network (batch norm folded, fp32) exported
    to ONNX in ``folder`` and run by an ONNX Runtime session."""
    import contextlib

    import onnxruntime
    import torch
    from LiverSegUNetLib import runtime

    path = str(Path(folder) / "network.onnx")
    x = torch.zeros(1, model.plan.in_channels, 64, 64)
    dims = {0: "n", 2: "h", 3: "w"}
    net = runtime.fold_batch_norm(model.network).float()
    torch.onnx.export(
        net, (x,), path, input_names=["x"], output_names=["y"], dynamic_axes={"x": dims, "y": dims}, dynamo=False
    )
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": batch.float().contiguous().numpy()})[0])

    return lambda network, device: runtime.NetworkRuntime(run, torch.float32, contextlib.nullcontext(), "fp32")


def _run_ours(
    patient_dir: Path, stack: int, device: str, onnxruntime: bool = False, model_path: Path | None = None
) -> dict:
    from LiverSegUNetLib.io.segnrrd import write_seg_nrrd
    from LiverSegUNetLib.outputs import write_all
    from LiverSegUNetLib.pipeline import segment_file
    from LiverSegUNetLib.weights import load_model

    t = time.perf_counter()
    model = load_model(model_path, device=device)
    export = tempfile.TemporaryDirectory()
    runtime = onnxruntime_runtime(model, export.name) if onnxruntime else None
    load_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        if stack == 0:
            summary = segment_file(patient_dir, tmp, model=model, device=device, preview=False, runtime=runtime)
            stages = {k: v for k, v in summary["seconds"].items() if k != "total"}
            return {
                "model_load_s": load_s,
                "stages_s": stages,
                "seconds": summary["seconds"]["total"],
                "slices": summary["slices"],
            }
        from LiverSegUNetLib.inference import segment

        t0 = time.perf_counter()
        ct, read_s = _patient_volume(patient_dir, stack)
        result = segment(ct, model, device=device, runtime=runtime)
        t = time.perf_counter()
        write_all({Path(tmp) / "x.seg.nrrd": lambda p: write_seg_nrrd(result.masks, p, result.structures)})
        stages = {"read+stack": read_s, **result.seconds, "write": time.perf_counter() - t}
        return {
            "model_load_s": load_s,
            "stages_s": stages,
            "seconds": time.perf_counter() - t0,
            "slices": ct.shape[0],
            "input_mb": ct.array.nbytes / 2**20,
            "output_mb": result.mask.array.nbytes / 2**20,
        }


def _run_report_unet(patient_dir: Path, slices: int) -> dict:
    """The report's approach, plainly: a 64-channel U-Net at full 512x512, fp32, one slice at a time."""
    import torch
    from LiverSegUNetLib.model import UNet2D

    t0 = time.perf_counter()
    ct, read_s = _patient_volume(patient_dir, 1)
    net = UNet2D(in_channels=1, out_channels=1, base=64, depth=4).eval()
    n = ct.shape[0] if slices <= 0 else min(slices, ct.shape[0])
    mask = np.zeros(ct.shape, np.uint8)
    t = time.perf_counter()
    with torch.inference_mode():
        for k in range(n):
            x = torch.from_numpy(ct.array[k].astype(np.float32))[None, None]
            x = (x.clamp(-200, 300) + 200) / 500
            mask[k] = (net(x)[0, 0] > 0).numpy()
    per_slice = (time.perf_counter() - t) / n
    model_s = per_slice * ct.shape[0]
    return {
        "stages_s": {"read": read_s, "model": model_s},
        "seconds": read_s + model_s,
        "slices": ct.shape[0],
        "measured_slices": n,
        "extrapolated": n < ct.shape[0],
        "wall_s": time.perf_counter() - t0,
    }


def _run_peer(name: str, patient_dir: Path) -> dict:
    from training.bench import peers

    ct, read_s = _patient_volume(patient_dir, 1)
    info = peers.run(PEERS[name], ct)
    return {
        "stages_s": {"read": read_s, "inference": info["peer_seconds"]},
        "seconds": read_s + info["peer_seconds"],
        "slices": ct.shape[0],
        **info,
    }


def worker(
    method: str, patient_dir: Path, stack: int, device: str, baseline_slices: int, structures_model: Path | None = None
) -> dict:
    """Run one measurement in this process and return its numbers (peak memory included)."""
    import torch  # noqa: F401  (start-up cost is the process's, not the first stage's)
    from LiverSegUNetLib import inference, io, pipeline  # noqa: F401

    ready = time.time()
    if method in ("ours", STACKED, ONNXRUNTIME, STRUCTURES, ACCURATE):
        from LiverSegUNetLib.weights import ACCURATE_MODEL

        out = _run_ours(
            patient_dir,
            stack if method == STACKED else 0,
            device,
            onnxruntime=method == ONNXRUNTIME,
            model_path={STRUCTURES: structures_model, ACCURATE: ACCURATE_MODEL}.get(method),
        )
    elif method == "report_unet_fp32":
        out = _run_report_unet(patient_dir, baseline_slices)
    else:
        out = _run_peer(method, patient_dir)
    return {
        "method": method,
        "patient": patient_dir.name,
        "stack": stack,
        "ready_wall": ready,
        "peak_mb": _peak_mb(),
        **out,
    }


def measure(
    method: str,
    patient_dir: Path,
    stack: int = 0,
    device: str = "cpu",
    baseline_slices: int = 16,
    structures_model: Path | None = None,
) -> dict:
    """Spawn a worker process for one measurement; adds its start-up time (interpreter + imports)."""
    spawn = time.time()
    cmd = [
        sys.executable,
        "-m",
        "training.bench",
        "--worker",
        method,
        "--patients",
        str(patient_dir),
        "--stack",
        str(stack),
        "--device",
        device,
        "--baseline-slices",
        str(baseline_slices),
        *(["--structures-model", str(structures_model)] if structures_model else []),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {method} on {patient_dir.name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_start_s"] = result.pop("ready_wall") - spawn
    return result


def machine() -> dict:
    """CPU model, cores, bf16 support, torch version."""
    import torch
    from LiverSegUNetLib.runtime import cpu_has_bf16
    from LiverSegUNetLib.system import cpu_name

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "bf16": cpu_has_bf16(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def table(results: dict, info: dict, command: str) -> str:
    """The markdown report of a bench run."""
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, bf16 {'yes' if info['bf16'] else 'no'}, "
        f"torch {info['torch']}. Command: `{command}`.",
        "",
    ]
    lines += [
        "| patient | method | slices | runs | seconds (median) | ratio to ours | peak MB | ratio to ours | "
        "process start s | model load s | stages s (median) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for patient, per_method in results.items():
        ours = per_method.get("ours")
        for method, rows in per_method.items():
            sec, mb = _median(rows, "seconds"), _median(rows, "peak_mb")
            stages = {k: statistics.median(r["stages_s"][k] for r in rows) for k in rows[0]["stages_s"]}
            r0 = rows[0]
            note = ""
            if r0.get("extrapolated") and "measured_slices" in r0:
                note = f" (extrapolated from {r0['measured_slices']} slices)"
            elif r0.get("extrapolated"):
                note = (
                    f" (extrapolated from {r0['measured_tiles']} of {r0['tiles_per_network'] * r0['networks']} tiles)"
                )
            ratio_s = f"{sec / _median(ours, 'seconds'):.1f}x" if ours else ""
            ratio_m = f"{mb / _median(ours, 'peak_mb'):.1f}x" if ours else ""
            load = f"{_median(rows, 'model_load_s'):.2f}" if "model_load_s" in rows[0] else ""
            lines.append(
                f"| {patient} | {method}{note} | {rows[0]['slices']} | {len(rows)} | {sec:.2f} | {ratio_s} | "
                f"{mb:.0f} | {ratio_m} | {_median(rows, 'process_start_s'):.2f} | {load} | "
                + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
                + " |"
            )
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    """Peak memory against volume size: what remains after the input and output arrays must not grow."""
    lines = [
        "| slices | peak MB | input array MB | output mask MB | peak minus input and output MB | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        rest = r["peak_mb"] - r["input_mb"] - r["output_mb"]
        lines.append(
            f"| {r['slices']} | {r['peak_mb']:.0f} | {r['input_mb']:.0f} | {r['output_mb']:.0f} | {rest:.0f} | "
            f"{r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def run_bench(
    patients: list[Path],
    methods: list[str],
    repeats: int,
    device: str,
    baseline_slices: int,
    stack: int,
    progress=print,
    structures_model: Path | None = None,
) -> tuple[dict, list[dict]]:
    """All measurements: ``repeats`` runs of ours, one of each other method, per patient; then memory scaling."""
    results: dict[str, dict[str, list[dict]]] = {}
    for patient in patients:
        for method in methods:
            runs = repeats if method in ("ours", STRUCTURES, ACCURATE) else 1
            for i in range(runs):
                progress(f"{patient.name}: {method} run {i + 1}/{runs}")
                results.setdefault(patient.name, {}).setdefault(method, []).append(
                    measure(
                        method,
                        patient,
                        device=device,
                        baseline_slices=baseline_slices,
                        structures_model=structures_model,
                    )
                )
    scaling = []
    if stack > 1 and patients:
        biggest = max(patients, key=lambda p: results.get(p.name, {}).get("ours", [{"slices": 0}])[0]["slices"])
        for n in (1, stack):
            progress(f"{biggest.name} x{n}: memory scaling")
            scaling.append(measure(STACKED, biggest, stack=n, device=device))
    return results, scaling
