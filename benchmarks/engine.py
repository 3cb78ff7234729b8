"""Training-step time of a ModelBatch pack, by backend, against a plain Python loop over the same N models.

One training step = forward + backward + optimizer step on a per-member batch of 64 inputs
(``[N, 64, ...]``, cross-entropy on 10 classes). Every side uses AdamW with one learning rate
per member (log-spaced 1e-4..1e-2) and starts from the same weights:

* loop: N separate models, each with its own ``torch.optim.AdamW`` (torch's default
  implementation for the device), stepped one after another (the baseline);
* pack with each ``--backends`` entry: ``mb.ModelBatch(models, backend=...)`` with
  ``mb.optim.AdamW``, one step for all members. ``vmap``: one vmap over all members;
  ``chunked``: vmap over chunks of ``--chunk-size`` members; ``loop``: one functional_call per
  member (the pack's own loop, still one vectorized optimizer step); ``auto``: the backend the
  pack's cost model picks for such a call (``batch.backend_choice``; no timing, so no trial).

``--inference`` times forward passes instead: every model (and the pack) in ``eval()`` under
``torch.no_grad()``, the loop calling each model on its batch, the pack one ``batch(xs, in_dims=0)``.

Models: ``mlp`` (64-32-10), ``cnn`` (conv 1->8 3x3, relu, maxpool 2, conv 8->16 3x3, relu,
adaptive avg pool, linear 16->10, on 1x16x16 inputs), ``lstm`` (LSTM 16->32 over 16 steps, last
hidden state, linear 32->10) and ``attention`` (one TransformerEncoderLayer, d_model 32, 4 heads,
feed-forward 64, no dropout, over 16 tokens; mean pool, linear 32->10); by name also ``resnet18``
(torchvision's ResNet-18, 10 classes, on 3x32x32 inputs) and ``dropout`` (the MLP with dropout
after its hidden layer at 0.1, 0.2 or 0.3 by member: each member its own masks and rate).

Every (model, N, side) is measured in a fresh process: ``--warmup`` untimed steps, then up to
``--steps`` timed steps (``time.perf_counter``, with ``torch.cuda.synchronize`` on GPU), stopping
early once ``--max-seconds`` of timed steps have run (at least 3 are timed); the median is
reported. Memory: the peak growth of the process during the steps, over its size right after
building models and data and one tiny step of each side (which loads what torch imports on first
use). On CPU it is the peak resident set (Linux's
VmHWM, reset through /proc/self/clear_refs; left out on other systems), on CUDA
``torch.cuda.max_memory_allocated``. It covers gradients, optimizer state, activations and (on
CPU) allocator slack.

Prints a markdown table and writes ``benchmarks/results/engine-<machine>[-inference].json``.

Run from the repository root after ``pip install -e .`` (a full CPU run takes ~25 min on 2 cores):
    python benchmarks/engine.py --threads 2
    python benchmarks/engine.py --quick                     # smoke run, N = 1 and 4
    python benchmarks/engine.py --models mlp cnn --backends vmap auto
    python benchmarks/engine.py --inference --models mlp cnn --sizes 16 --backends auto
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


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class AttentionClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs with BatchNorm; a 1x1 projection where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision's ``resnet18(num_classes=10)`` layer for layer (7x7 stem, max pool, [2, 2, 2, 2]
    BasicBlocks of 64-512 channels; 11.2 M parameters), written here because torchvision's wheel does not
    import against the CPU torch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, layers, cin = (64, 128, 256, 512), [], 64
        for i, cout in enumerate(widths):
            layers.append(nn.Sequential(BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


DROPOUT_RATES = (0.1, 0.2, 0.3)


def make_dropout_mlp(i: int) -> nn.Module:
    """The MLP with dropout after its hidden layer at 0.1, 0.2 or 0.3 by member (all in one pack)."""
    p = DROPOUT_RATES[i % len(DROPOUT_RATES)]
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, 10))


# name: (factory of member i, input shape of one example)
MODELS: dict[str, tuple[Callable[[int], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda i: make_mlp(), (64,)),
    "cnn": (lambda i: make_cnn(), (1, 16, 16)),
    "lstm": (lambda i: LSTMClassifier(), (16, 16)),
    "attention": (lambda i: AttentionClassifier(), (16, 32)),
    "resnet18": (lambda i: ResNet18(), (3, 32, 32)),
    "dropout": (make_dropout_mlp, (64,)),
}
DEFAULT_MODELS = ("mlp", "cnn", "lstm", "attention")
BACKENDS = ("vmap", "chunked", "loop", "auto")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(key: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE).group(1))


def cpu_stall_us() -> int | None:
    """Linux's CPU pressure: total µs some task waited for a CPU (None where unavailable)."""
    try:
        text = Path("/proc/pressure/cpu").read_text()
    except OSError:
        return None
    return int(re.search(r"^some .*total=(\d+)", text, re.MULTILINE).group(1))


def wait_until_idle(max_seconds: float = 900.0) -> None:
    """Wait (at most ``max_seconds``) until the CPU pressure of the last 10 s is below 5 %."""
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        try:
            text = Path("/proc/pressure/cpu").read_text()
        except OSError:
            return
        if float(re.search(r"^some avg10=([\d.]+)", text, re.MULTILINE).group(1)) < 5.0:
            return
        time.sleep(5)


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


def build_step(
    model: str,
    n: int,
    side: str,
    device: torch.device,
    seed: int,
    chunk_size: int | None = None,
    inference: bool = False,
) -> tuple[Callable[[], None], mb.ModelBatch | None]:
    """Models, data and optimizers for one measurement: a function running one step, and the pack.

    ``side`` is ``"loop"`` (N plain models) or ``"pack-<backend>"``. The step is a training step, or
    with ``inference`` a forward of every model in ``eval()`` under ``torch.no_grad()``.
    """
    factory, input_shape = MODELS[model]
    torch.manual_seed(seed)
    models = [factory(i).to(device) for i in range(n)]
    xs = torch.randn(n, BATCH_SIZE, *input_shape, device=device)
    ys = torch.randint(0, 10, (n, BATCH_SIZE), device=device)
    lrs = torch.logspace(math.log10(LR_RANGE[0]), math.log10(LR_RANGE[1]), n, dtype=torch.float64).tolist()

    if inference:
        for m in models:
            m.eval()
    if side == "loop" and inference:

        @torch.no_grad()
        def loop_forward() -> None:
            for m, x in zip(models, xs, strict=True):
                m(x)

        return loop_forward, None
    if side == "loop":
        opts = [torch.optim.AdamW(m.parameters(), lr=lr) for m, lr in zip(models, lrs, strict=True)]

        def loop_step() -> None:
            for m, opt, x, y in zip(models, opts, xs, ys, strict=True):
                opt.zero_grad()
                F.cross_entropy(m(x), y).backward()
                opt.step()

        return loop_step, None

    backend = side.removeprefix("pack-")
    batch = mb.ModelBatch(models, backend=backend, chunk_size=chunk_size if backend == "chunked" else None)
    if inference:

        @torch.no_grad()
        def pack_forward() -> None:
            batch(xs, in_dims=0)

        return pack_forward, batch
    opt = mb.optim.AdamW(batch, lr=lrs)

    def pack_step() -> None:
        opt.zero_grad()
        losses = batch.compute_loss(batch(xs, in_dims=0), ys, F.cross_entropy, target_in_dims=0)
        losses.sum().backward()
        opt.step()

    return pack_step, batch


def warm_up_lazy_init(device: torch.device) -> None:
    """One tiny step of each side, so that modules torch imports on first use are not counted as memory."""
    for side in ("loop", "pack-vmap", "pack-loop"):
        build_step("mlp", 1, side, device, seed=0)[0]()


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
    chunk_size: int,
    inference: bool = False,
) -> dict:
    """Median step time (ms), number of timed steps and peak memory growth (MB) of one configuration.

    For a pack also the backend it runs (``"chunked:16"`` style; for ``auto``, what it chose).
    """
    torch.set_num_threads(threads)
    dev = torch.device(device)
    warm_up_lazy_init(dev)
    step, batch = build_step(model, n, side, dev, seed, chunk_size, inference)
    result: dict = {}
    stall_start, wall_start = cpu_stall_us(), time.perf_counter()
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
    if stall_start is not None:  # share of the run during which some task waited for a CPU
        stalled_s = (cpu_stall_us() - stall_start) / 1e6
        result["cpu_stall"] = round(stalled_s / (time.perf_counter() - wall_start), 3)
    result |= {"ms": round(statistics.median(times) * 1e3, 3), "timed_steps": len(times), "peak_mb": peak_mb}
    if batch is not None:
        result["backend"] = batch.backend_choice["inference" if inference else "training"]
    return result


def measure_ab(
    model: str,
    n: int,
    device: str,
    threads: int,
    warmup: int,
    steps: int,
    max_seconds: float,
    seed: int,
    chunk_size: int,
    inference: bool = False,
) -> dict:
    """Plain loop and ``auto`` pack in ONE process, their timed steps interleaved (A, B, A, B, ...).

    Both sides then see the same machine state (frequency, neighbours, memory layout), which fresh
    processes do not: at sub-millisecond steps those differ between processes by more than the
    sides differ. Returns the median ms of each side and their ratio (``ab_speedup``).
    """
    torch.set_num_threads(threads)
    dev = torch.device(device)
    warm_up_lazy_init(dev)
    loop_step, _ = build_step(model, n, "loop", dev, seed, chunk_size, inference)
    pack_step, batch = build_step(model, n, "pack-auto", dev, seed, chunk_size, inference)
    for _ in range(warmup):
        loop_step()
        pack_step()
    sync(dev)
    times: dict[str, list[float]] = {"loop": [], "pack": []}
    while len(times["pack"]) < steps and (
        len(times["pack"]) < MIN_TIMED_STEPS or sum(times["loop"]) + sum(times["pack"]) < max_seconds
    ):
        for side, step in (("loop", loop_step), ("pack", pack_step)):
            start = time.perf_counter()
            step()
            sync(dev)
            times[side].append(time.perf_counter() - start)
    loop_ms, pack_ms = (statistics.median(times[k]) * 1e3 for k in ("loop", "pack"))
    label = batch.backend_choice["inference" if inference else "training"]
    return {
        "loop_ms": round(loop_ms, 3),
        "auto_ms": round(pack_ms, 3),
        "speedup": round(loop_ms / pack_ms, 3),
        "timed_steps": len(times["pack"]),
        "backend": label,
    }


def measure_when_idle(max_stall: float, retries: int, **kwargs: object) -> dict:
    """:func:`measure_safely` on an idle CPU: measured again while other processes stalled it.

    A run counts as disturbed when tasks waited for a CPU during more than ``max_stall`` of it
    (Linux CPU pressure); after ``retries`` disturbed runs the least disturbed one is kept.
    """
    runs = []
    for _ in range(retries + 1):
        wait_until_idle()
        result = measure_safely(**kwargs)
        runs.append(result)
        if result.get("cpu_stall") is not None and result["cpu_stall"] > max_stall:
            print(
                f"  {kwargs['model']} N={kwargs['n']} {kwargs['side']}: other tasks stalled the CPU "
                f"{result['cpu_stall']:.0%} of the run; measuring again",
                flush=True,
            )
        if result.get("cpu_stall") is None or result["cpu_stall"] <= max_stall:
            break
    best = min(runs, key=lambda r: r.get("cpu_stall") or 0.0)
    return best | {"runs": len(runs)}


def measure_safely(**kwargs: object) -> dict:
    """:func:`measure_in_fresh_process`, or the error of a configuration that cannot run (no vmap rule)."""
    try:
        return measure_in_fresh_process(**kwargs)
    except Exception as exc:  # a model the engine does not support yet gives a row saying so
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"}


def measure_in_fresh_process(fn: Callable[..., dict] = measure, **kwargs: object) -> dict:
    """Run :func:`measure` (or ``fn``) in a new process, so that no allocator cache or peak carries over."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, **kwargs).result()


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


def _cell(row: dict, side: str) -> str:
    if f"{side}_error" in row:
        return "unsupported yet"
    return f"{row[f'{side}_ms']:.2f} ({row[f'{side}_speedup']:.2f}x)"


def markdown_table(rows: list[dict], backends: list[str], chunk_size: int) -> str:
    """One row per (model, N): the loop's ms/step, then each backend's ms/step (speedup over the loop)."""
    names = {"chunked": f"chunked:{chunk_size}", "loop": "pack loop"}
    heads = [names.get(b, b) for b in backends]
    auto = "auto" in backends
    cols = ["model", "N", "loop ms", *(f"{h} ms (speedup)" for h in heads)]
    cols += (["auto picks"] if auto else []) + ["loop peak MB", *(f"{h} peak MB" for h in heads)]
    lines = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for r in rows:
        cells = [r["model"], str(r["n"]), f"{r['loop_ms']:.2f}"]
        cells += [_cell(r, f"pack_{b}") for b in backends]
        if auto:
            cells.append(str(r.get("pack_auto_backend", "-")))
        cells.append(str(r["loop_peak_mb"]))
        cells += [str(r.get(f"pack_{b}_peak_mb", "-")) for b in backends]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64, 256], help="pack sizes N")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=list(DEFAULT_MODELS),
        help="default: " + " ".join(DEFAULT_MODELS) + " (resnet18 and dropout: by name)",
    )
    parser.add_argument(
        "--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="pack backends to time"
    )
    parser.add_argument("--chunk-size", type=int, default=16, help="members per chunk of 'chunked'")
    parser.add_argument("--steps", type=int, default=20, help="most timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument(
        "--max-seconds", type=float, default=15.0, help="stop timing a measurement after this"
    )
    parser.add_argument(
        "--max-stall",
        type=float,
        default=0.05,
        help="measure again when other tasks waited for a CPU during more than this share of a run",
    )
    parser.add_argument("--retries", type=int, default=4, help="most runs again of a disturbed measurement")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the JSON to write (default: benchmarks/results/engine-<machine>[-inference][-quick].json)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: N = 1 and 4, 3 timed steps, 1 warm-up"
    )
    parser.add_argument(
        "--inference",
        action="store_true",
        help="time eval() forwards under torch.no_grad() instead of training steps",
    )
    parser.add_argument(
        "--no-ab",
        dest="ab",
        action="store_false",
        help="skip the interleaved loop-vs-auto timing in one process (ab_* columns)",
    )
    parser.add_argument(
        "--ab-steps", type=int, default=200, help="most timed steps per side of the interleaved run"
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build sees no CUDA device; use --device cpu")
    if min(args.sizes) < 1 or args.steps < MIN_TIMED_STEPS or args.warmup < 0 or args.threads < 1:
        parser.error(f"--sizes and --threads must be >= 1, --steps >= {MIN_TIMED_STEPS}, --warmup >= 0")
    if args.chunk_size < 1:
        parser.error("--chunk-size must be >= 1")
    if args.quick:
        args.sizes, args.steps, args.warmup, args.ab_steps = [1, 4], MIN_TIMED_STEPS, 1, MIN_TIMED_STEPS
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
    sides = ["loop"] + [f"pack-{b}" for b in args.backends]
    for model in args.models:
        for n in args.sizes:
            row = {"model": model, "n": n}
            for side in sides:
                result = measure_when_idle(
                    max_stall=args.max_stall,
                    retries=args.retries,
                    model=model,
                    n=n,
                    side=side,
                    device=args.device,
                    threads=args.threads,
                    warmup=args.warmup,
                    steps=args.steps,
                    max_seconds=args.max_seconds,
                    seed=args.seed,
                    chunk_size=args.chunk_size,
                    inference=args.inference,
                )
                key = side.replace("-", "_")
                row |= {f"{key}_{k}": v for k, v in result.items()}
            if "loop_error" in row:
                raise RuntimeError(f"the plain loop failed for {model}: {row['loop_error']}")
            if args.ab and "auto" in args.backends:
                wait_until_idle()
                ab = measure_in_fresh_process(
                    fn=measure_ab,
                    model=model,
                    n=n,
                    device=args.device,
                    threads=args.threads,
                    warmup=args.warmup,
                    steps=args.ab_steps,
                    max_seconds=args.max_seconds,
                    seed=args.seed,
                    chunk_size=args.chunk_size,
                    inference=args.inference,
                )
                row |= {f"ab_{k}": v for k, v in ab.items()}
            summary = []
            for b in args.backends:
                if f"pack_{b}_ms" in row:
                    row[f"pack_{b}_speedup"] = round(row["loop_ms"] / row[f"pack_{b}_ms"], 3)
                    summary.append(f"{b} {row[f'pack_{b}_ms']:.2f} ms ({row[f'pack_{b}_speedup']:.2f}x)")
                else:
                    summary.append(f"{b} unsupported yet ({row[f'pack_{b}_error']})")
            rows.append(row)
            print(f"{model} N={n}: loop {row['loop_ms']:.2f} ms; " + "; ".join(summary), flush=True)
    print("\n" + markdown_table(rows, args.backends, args.chunk_size))
    suffix = ("-inference" if args.inference else "") + ("-quick" if args.quick else "")
    out = args.out or RESULTS_DIR / f"engine-{machine_slug(info)}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {
        k: getattr(args, k)
        for k in (
            "sizes",
            "models",
            "backends",
            "chunk_size",
            "steps",
            "warmup",
            "max_seconds",
            "max_stall",
            "retries",
            "seed",
            "quick",
            "ab",
            "ab_steps",
        )
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
