"""How close each tier's inference comes to the machine's compute: eager, bf16, onnx (issue 13).

For the bundled champions (the bootstrap models: restored from the model cache, or
trained), on test images of each tier, in one run:

- ``matmul_peak_gflops``: the measured peak of a square matrix product (the best of
  several runs), in fp32 and in bf16, on ``--device`` with torch's threads;
- per tier and runtime (``eager`` fp32, ``bf16`` autocast, and ``onnx`` for the tiers
  that segment nuclei: their U-Net in ONNX Runtime), ``img_s`` (images per
  second through ``predict``, the best of ``--passes`` passes after a warm-up),
  ``gflop_per_image`` (floating-point operations counted by
  :class:`torch.utils.flop_counter.FlopCounterMode`: convolutions and matrix products,
  multiply and add counted apart), ``gflops`` (achieved: those operations over the time),
  ``fraction_of_peak`` (of the fp32 peak), and the tier's metric on those images
  (``auroc``, ``macro_f1`` or ``ap50``); ``bf16`` and ``onnx`` add ``speedup`` and
  ``metric_delta`` against eager, and ``accepted`` (speedup with ``|metric_delta| <=
  0.005``), or the error that refused it (``onnx``'s operations are eager's: torch's
  counter cannot see inside ONNX Runtime);
- with ``--replicas 1,2,...``, per tier the total images per second of that many
  processes predicting at once (each with its share of the threads), and on CUDA the
  GPU's mean utilisation while they ran (``nvidia-smi``).

Usage::

    .venv/bin/python benchmarks/compute.py [--device cpu|cuda] [--images 32]
        [--replicas 1,2] [--out benchmarks/results/compute.json]

``benchmarks/device_check.sh`` runs it on CUDA when the machine has a GPU, on the CPU
otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from phenocascade.config import Settings
from phenocascade.data.labelled import LabelledSet
from phenocascade.domain import DecodedImage
from phenocascade.errors import ConfigError
from phenocascade.models.base import load_stage
from phenocascade.models.evaluate import evaluate_stage
from phenocascade.models.runtime import with_runtime
from phenocascade.recipes import TIERS, Tier, decode, ensure_bootstrap, tier_data
from provenance import provenance

RESULTS = Path(__file__).parent / "results"
TOLERANCE = 0.005
# Each tier's metric in evaluate_stage's output.
METRIC = {"quality": "macro_auroc", "majority": "macro_f1", "minority": "ap50"}


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, runs: int = 8) -> float:
    """Return the best GFLOP/s of an ``n`` x ``n`` matrix product (``2 n^3`` operations)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(runs + 1):  # the first warms up
        _sync(device)
        started = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def runtime(name: str, device: str) -> Iterator[None]:
    """Run the block as ``name`` computes: ``eager`` fp32, or ``bf16`` autocast."""
    if name == "bf16":
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            yield
    else:
        yield


def tier_images(settings: Settings, tier: Tier, n: int) -> LabelledSet:
    """Return the first ``n`` test samples of the tier (the gate's: sources and copies)."""
    data = tier_data(tier, settings, "test")
    return LabelledSet(data.name, data.classes, data.samples[:n])


def measure(
    stage: Any,
    data: LabelledSet,
    images: Sequence[DecodedImage],
    tier: str,
    name: str,
    device: str,
    passes: int,
    work: Path,
) -> dict[str, Any]:
    """Measure one tier under one runtime: speed, counted operations and the metric.

    Every call gets copies of the pixels: a backend may keep its last batch's work for
    the same arrays (the morphometric classifier keeps its measurements).
    """
    with runtime(name, device), torch.inference_mode():
        stage.predict(fresh(images[:2]))  # warm-up
        with FlopCounterMode(display=False) as counter:
            stage.predict(fresh(images))
        flop = counter.get_total_flops()
        best = float("inf")
        for _ in range(passes):
            batch = fresh(images)
            _sync(device)
            started = time.perf_counter()
            stage.predict(batch)
            _sync(device)
            best = min(best, time.perf_counter() - started)
        metrics = evaluate_stage(stage, list(images), list(data.samples), work / tier / name)
    return {
        "img_s": round(len(images) / best, 2),
        "gflop_per_image": round(flop / len(images) / 1e9, 3),
        "gflops": round(flop / best / 1e9, 2),
        "metric": METRIC[tier],
        "value": metrics.get(METRIC[tier]),
    }


def against_eager(
    figures: dict[str, Any], eager: Mapping[str, Any], fp32_peak: float
) -> dict[str, Any]:
    """Add a runtime's ``fraction_of_peak``, ``speedup``, ``metric_delta`` and ``accepted``."""
    delta = (
        None
        if figures["value"] is None or eager["value"] is None
        else round(figures["value"] - eager["value"], 4)
    )
    speedup = round(figures["img_s"] / eager["img_s"], 2)
    return {
        **figures,
        "fraction_of_peak": round(figures["gflops"] / fp32_peak, 3),
        "speedup": speedup,
        "metric_delta": delta,
        "accepted": delta is not None and abs(delta) <= TOLERANCE and speedup > 1.0,
    }


def fresh(images: Sequence[DecodedImage]) -> list[DecodedImage]:
    """Return copies of ``images`` whose pixels are new arrays."""
    return [DecodedImage(i.image_id, i.pixels.copy()) for i in images]


def _replica(
    artifacts: str, tier: str, device: str, threads: int, images: list[DecodedImage], seconds: float
) -> int:
    """Predict on ``images`` over and over for ``seconds``; return how many were done."""
    torch.set_num_threads(threads)
    stage = load_stage(Path(artifacts), tier, device=device, novelty=False)
    stage.predict(fresh(images[:2]))
    done, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        stage.predict(fresh(images))
        done += len(images)
    return done


def _gpu_utilisation(stop: threading.Event, samples: list[float]) -> None:
    while not stop.is_set():
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout
            samples.append(float(out.split()[0]))
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return
        stop.wait(0.5)


def scaling(
    artifacts: Path,
    tier: str,
    device: str,
    images: list[DecodedImage],
    replicas: Sequence[int],
    seconds: float,
) -> dict[str, Any]:
    """Total img/s of 1, 2, ... processes predicting at once (and GPU utilisation on CUDA)."""
    cores = torch.get_num_threads()
    out: dict[str, Any] = {}
    context = multiprocessing.get_context("spawn")
    for r in replicas:
        threads = max(1, cores // r)
        samples: list[float] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_gpu_utilisation, args=(stop, samples), daemon=True)
        if device.startswith("cuda"):
            sampler.start()
        started = time.perf_counter()
        with context.Pool(r) as pool:
            args = (str(artifacts), tier, device, threads, images, seconds)
            done = sum(pool.starmap(_replica, [args] * r))
        wall = time.perf_counter() - started
        stop.set()
        out[str(r)] = {
            "img_s": round(done / seconds, 2),
            "threads_each": threads,
            "wall_s": round(wall, 1),
            "gpu_utilisation": round(sum(samples) / len(samples), 1) if samples else None,
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and write the result file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--images", type=int, default=32, help="test images per tier")
    parser.add_argument("--passes", type=int, default=3, help="timed passes (the best counts)")
    parser.add_argument("--replicas", default="", help="e.g. 1,2,4: processes at once")
    parser.add_argument("--seconds", type=float, default=20.0, help="per replica count")
    parser.add_argument("--only", default=",".join(TIERS), help="tiers, comma-separated")
    parser.add_argument("--out", type=Path, default=RESULTS / "compute.json")
    args = parser.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compute-") as tmp:
        work = Path(tmp)
        settings = Settings(home=work, artifacts=work / "artifacts")
        ensure_bootstrap(settings)
        peak = {
            "fp32": round(matmul_peak(args.device, torch.float32), 1),
            "bf16": round(matmul_peak(args.device, torch.bfloat16), 1),
        }
        tiers: dict[str, Any] = {}
        for tier in [t for t in TIERS if t in args.only.split(",")]:
            data = tier_images(settings, tier, args.images)
            images = decode(data.samples)
            stage = load_stage(settings.artifacts, tier, device=args.device, novelty=False)
            eager = measure(stage, data, images, tier, "eager", args.device, args.passes, work)
            eager["fraction_of_peak"] = round(eager["gflops"] / peak["fp32"], 3)
            result: dict[str, Any] = {"images": len(images), "eager": eager}
            try:
                bf16 = measure(stage, data, images, tier, "bf16", args.device, args.passes, work)
            except (RuntimeError, TypeError) as exc:  # an op or a conversion bf16 lacks
                result["bf16"] = {"accepted": False, "error": f"{type(exc).__name__}: {exc}"}
            else:
                result["bf16"] = against_eager(bf16, eager, peak["fp32"])
            try:
                in_ort = with_runtime(
                    load_stage(settings.artifacts, tier, device=args.device, novelty=False),
                    "onnx",
                    args.device,
                )
            except ConfigError as exc:  # a tier without a nucleus segmenter, or CUDA
                result["onnx"] = {"accepted": False, "error": str(exc)}
            else:
                onnx = measure(in_ort, data, images, tier, "onnx", args.device, args.passes, work)
                # torch's counter does not see ONNX Runtime's work: it is eager's, faster.
                onnx["gflop_per_image"] = eager["gflop_per_image"]
                onnx["gflops"] = round(eager["gflop_per_image"] * onnx["img_s"], 2)
                result["onnx"] = against_eager(onnx, eager, peak["fp32"])
            if args.replicas:
                counts = [int(r) for r in args.replicas.split(",") if r]
                result["replicas"] = scaling(
                    settings.artifacts, tier, args.device, images, counts, args.seconds
                )
            tiers[tier] = result
            print(tier, json.dumps(result), flush=True)
    report = {
        **provenance(command),
        "device": args.device,
        "matmul_peak_gflops": peak,
        "tolerance": TOLERANCE,
        "tiers": tiers,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
