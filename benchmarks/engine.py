"""Training-step time of a ModelBatch pack against a plain Python loop over the same N models.

One training step = forward + backward + optimizer step on a per-member batch of 64 inputs
(``[N, 64, ...]``, cross-entropy on 10 classes). Both sides use AdamW with one learning rate
per member (log-spaced 1e-4..1e-2) and start from the same weights:

* loop: N separate models, each with its own ``torch.optim.AdamW`` (torch's default
  implementation for the device), stepped one after another;
* pack: ``mb.ModelBatch`` of the N models with ``mb.optim.AdamW``, one vmapped step.

Models: ``mlp`` (64-32-10) and ``cnn`` (conv 1->8 3x3, relu, maxpool 2, conv 8->16 3x3, relu,
adaptive avg pool, linear 16->10, on 1x16x16 inputs).

Every (model, N, side) is measured in a fresh process: ``--warmup`` untimed steps, then up to
``--steps`` timed steps (``time.perf_counter``, with ``torch.cuda.synchronize`` on GPU), stopping
early once ``--max-seconds`` of timed steps have run (at least 3 are timed); the median is
reported. Memory: the peak growth of the process during the steps, over its size right after
building models and data and one tiny step of each side (which loads what torch imports on first
use). On CPU it is the peak resident set (Linux's VmHWM, reset through /proc/self/clear_refs;
left out on other systems), on CUDA ``torch.cuda.max_memory_allocated``. It covers gradients,
optimizer state, activations and (on CPU) allocator slack.

Prints a markdown table and writes ``benchmarks/results/engine-<machine>.json``.

Run from the repository root after ``pip install -e .`` (a full CPU run takes ~3 min on 2 cores):
    python benchmarks/engine.py
    python benchmarks/engine.py --quick                     # smoke run, N = 1 and 4
    python benchmarks/engine.py --device cuda --sizes 16 256 1024 --models cnn
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import modelbatch as mb

BATCH_SIZE = 64
MIN_TIMED_STEPS = 3
LR_RANGE = (1e-4, 1e-2)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (make_mlp, (64,)),
    "cnn": (make_cnn, (1, 16, 16)),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(key: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE).group(1))


def reset_peak_memory(device: torch.device) -> int | None:
    """Reset the peak-memory counter; return the current size in bytes (None where unsupported)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        return _proc_status_kib("VmRSS") * 1024
    except OSError:
        return None


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_kib("VmHWM") * 1024


def build_step(model: str, n: int, side: str, device: torch.device, seed: int) -> Callable[[], None]:
    """Models, data and optimizers for one measurement; returns a function running one training step."""
    factory, input_shape = MODELS[model]
    torch.manual_seed(seed)
    models = [factory().to(device) for _ in range(n)]
    xs = torch.randn(n, BATCH_SIZE, *input_shape, device=device)
    ys = torch.randint(0, 10, (n, BATCH_SIZE), device=device)
    lrs = torch.logspace(math.log10(LR_RANGE[0]), math.log10(LR_RANGE[1]), n, dtype=torch.float64).tolist()

    if side == "loop":
        opts = [torch.optim.AdamW(m.parameters(), lr=lr) for m, lr in zip(models, lrs, strict=True)]

        def loop_step() -> None:
            for m, opt, x, y in zip(models, opts, xs, ys, strict=True):
                opt.zero_grad()
                F.cross_entropy(m(x), y).backward()
                opt.step()

        return loop_step

    batch = mb.ModelBatch(models)
    opt = mb.optim.AdamW(batch, lr=lrs)

    def pack_step() -> None:
        opt.zero_grad()
        losses = batch.compute_loss(batch(xs, in_dims=0), ys, F.cross_entropy, target_in_dims=0)
        losses.sum().backward()
        opt.step()

    return pack_step


def warm_up_lazy_init(device: torch.device) -> None:
    """One tiny step of each side, so that modules torch imports on first use are not counted as memory."""
    for side in ("loop", "pack"):
        build_step("mlp", 1, side, device, seed=0)()


def measure(
    model: str,
    n: int,
    side: str,
    device: str,
    threads: int,
    warmup: int,
    steps: int,
    max_seconds: float,
    seed: int,
) -> dict:
    """Median step time (ms), number of timed steps and peak memory growth (MB) of one configuration."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    warm_up_lazy_init(dev)
    step = build_step(model, n, side, dev, seed)
    base = reset_peak_memory(dev)
    for _ in range(warmup):
        step()
    sync(dev)
    times: list[float] = []
    while len(times) < steps and (len(times) < MIN_TIMED_STEPS or sum(times) < max_seconds):
        start = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - start)
    peak_mb = None if base is None else round((peak_memory(dev) - base) / 2**20, 1)
    return {"ms": round(statistics.median(times) * 1e3, 3), "timed_steps": len(times), "peak_mb": peak_mb}


def measure_in_fresh_process(**kwargs: object) -> dict:
    """Run :func:`measure` in a new process, so that no allocator cache or peak carries over."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, **kwargs).result()


def cpu_name() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return found.group(1).strip() if found else platform.processor()


def machine_info(device: torch.device, threads: int) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "device": device.type,
        "gpu": gpu,
    }


def machine_slug(info: dict) -> str:
    if info["gpu"]:
        return re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower()).strip("-")
    return f"cpu-{info['cpu_count']}core-{info['machine']}"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| model | N | loop ms/step | pack ms/step | speedup | loop peak MB | pack peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['n']} | {r['loop_ms']:.2f} | {r['pack_ms']:.2f} | {r['speedup']:.2f}x "
            f"| {r['loop_peak_mb']} | {r['pack_peak_mb']} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64, 256], help="pack sizes N")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "cnn"])
    parser.add_argument("--steps", type=int, default=20, help="most timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument(
        "--max-seconds", type=float, default=15.0, help="stop timing a measurement after this"
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: N = 1 and 4, 3 timed steps, 1 warm-up"
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build sees no CUDA device; use --device cpu")
    if min(args.sizes) < 1 or args.steps < MIN_TIMED_STEPS or args.warmup < 0 or args.threads < 1:
        parser.error(f"--sizes and --threads must be >= 1, --steps >= {MIN_TIMED_STEPS}, --warmup >= 0")
    if args.quick:
        args.sizes, args.steps, args.warmup = [1, 4], MIN_TIMED_STEPS, 1
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    info = machine_info(device, args.threads)
    print(
        f"{info['processor']} ({info['cpu_count']} cpus), torch {info['torch']}, {args.threads} threads, "
        f"device {info['gpu'] or 'cpu'}",
        flush=True,
    )
    rows = []
    for model in args.models:
        for n in args.sizes:
            result = {}
            for side in ("loop", "pack"):
                result[side] = measure_in_fresh_process(
                    model=model,
                    n=n,
                    side=side,
                    device=args.device,
                    threads=args.threads,
                    warmup=args.warmup,
                    steps=args.steps,
                    max_seconds=args.max_seconds,
                    seed=args.seed,
                )
            row = {"model": model, "n": n}
            for side in ("loop", "pack"):
                row |= {f"{side}_{k}": v for k, v in result[side].items()}
            row["speedup"] = round(row["loop_ms"] / row["pack_ms"], 3)
            rows.append(row)
            print(
                f"{model} N={n}: loop {row['loop_ms']:.2f} ms, pack {row['pack_ms']:.2f} ms, "
                f"speedup {row['speedup']:.2f}x",
                flush=True,
            )
    print("\n" + markdown_table(rows))
    suffix = "-quick" if args.quick else ""
    out = RESULTS_DIR / f"engine-{machine_slug(info)}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {
        k: getattr(args, k) for k in ("sizes", "models", "steps", "warmup", "max_seconds", "seed", "quick")
    }
    payload = {
        "machine": info,
        "config": config | {"batch_size": BATCH_SIZE},
        "command": sys.argv,
        "rows": rows,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
