"""One GPU suite: the engine, a sweep and pack sizing on one GPU in one run of at most ~8 minutes.

Sections (each with its own time budget; one that runs out records ``"skipped: time budget"``;
the JSON is written again after each section, so a killed run still leaves its data):

* ``bandwidth``: the device's peak memory bandwidth from :data:`PEAK_BANDWIDTH_TB_S` (H100 SXM
  3.35 TB/s, H200 4.8 TB/s) and, always, a measured big device-to-device copy (the peak used
  where the table has no entry).
* ``engine``: one training step (forward, backward, AdamW) of N members of one model, N = 1, 16, 64,
  256, 1024, in fp32 and under bf16 autocast, five ways: ``pack`` (``mb.ModelBatch(models,
  backend="auto")`` with ``mb.optim.AdamW``, one lr per member), ``pack_graph`` (the same with
  ``AdamW(capturable=True)``, the whole step captured once in a ``torch.cuda.CUDAGraph`` after three
  warm-up steps on a side stream, then replayed; on CPU the capturable step runs eagerly), ``loop``
  (N models, each with its own ``torch.optim.AdamW``), ``func`` (the raw torch.func ensemble:
  ``stack_module_state`` + ``vmap(functional_call)``, one ``torch.optim.AdamW`` over the stacked
  leaves, one shared lr) and ``streams`` (the loop with each model on its own CUDA stream). Models:
  engine.py's MLP, CNN, LSTM, attention (one TransformerEncoderLayer) and ResNet-18 (engine.py's
  torchvision-free one) on 3x32x32. Per cell: median step time from CUDA events after warm-up,
  members x steps / s, peak memory (``torch.cuda.max_memory_allocated``), achieved bandwidth as a
  share of the device's peak and the host syncs of one extra (untimed) step
  (``torch.cuda.set_sync_debug_mode``).
* ``slots``: what ``slots_per_gpu="auto"`` picks for a ResNet-18 recipe against the largest N
  whose pack trains without ``torch.cuda.OutOfMemoryError`` (doubling, then bisection).
* ``sweep``: benchmarks/sweep.py's sweep (MLPs on digits, ASHA) at 64 and 256 configs:
  ModelBatchSearcher against plain Tune with 0.25 GPU per trial, each run capped in time.

    python benchmarks/gpu_suite.py                # one H100/H200, <= 8 min: results/gpu_suite-<gpu>.json
    python benchmarks/gpu_suite.py --smoke        # every code path on CPU, tiny sizes (< 1 min)
    python benchmarks/gpu_suite.py --sections engine --models mlp resnet18

``--smoke`` runs every code path on CPU without CUDA: streams are a no-op (the ``streams`` column is
the plain loop), events are ``time.perf_counter``, N = 1 and 4, 2 timed steps, a narrow ResNet-18
(width 8), the sweep at 4 configs with 1 report, the slot search against a fake limit of 6 members
(a CPU has no out-of-memory signal: it swaps); the JSON says so (``smoke``, ``timing``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine
import sweep

import modelbatch as mb

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS = ("pack", "pack_graph", "loop", "func", "streams")
MODELS = ("mlp", "cnn", "resnet18", "lstm", "transformer")
ENGINE_MODEL = {"transformer": "attention"}  # our name -> engine.MODELS' name
DTYPES = ("fp32", "bf16")
SECTIONS = ("bandwidth", "engine", "slots", "sweep")
PEAK_BANDWIDTH_TB_S = {"H100 SXM": 3.35, "H200": 4.8}
"""Peak HBM bandwidth by device (vendor data sheets); other devices use the measured copy."""
BANDWIDTH_MODEL = (
    "bytes moved per step = 2 x (parameter + gradient + AdamW state bytes) of all members: each byte of "
    "the training state read and written once a step (fp32: 32 bytes per parameter); activations are not "
    "counted, so the fraction is a lower bound"
)
STATE_BYTES_PER_PARAM = 16  # fp32 parameter, gradient, exp_avg, exp_avg_sq

GPU = {
    "sizes": [1, 16, 64, 256, 1024],
    "batch": engine.BATCH_SIZE,
    "warmup": 2,
    "steps": 20,
    "cell_s": 8.0,
    "resnet_width": 64,
    "configs": [64, 256],
    "epochs": 10,
    "slot_max_n": 1 << 14,
    "slot_fake_limit": None,
    "budgets": {"bandwidth": 10.0, "engine": 240.0, "slots": 45.0, "sweep": 140.0},
    "total_s": 455.0,
}
SMOKE = {
    "sizes": [1, 4],
    "batch": 8,
    "warmup": 1,
    "steps": 2,
    "cell_s": 5.0,
    "resnet_width": 8,
    "configs": [4],
    "epochs": 1,
    "slot_max_n": 8,
    "slot_fake_limit": 6,
    "budgets": {"bandwidth": 5.0, "engine": 30.0, "slots": 10.0, "sweep": 90.0},
    "total_s": 150.0,
}


# ---------------------------------------------------------------------- models
class NarrowResNet18(engine.ResNet18):
    """engine.py's ResNet-18 (torchvision's layout, its forward inherited) with a base ``width``.

    ``width=64`` would be engine.py's (torchvision's ``resnet18(num_classes=10)``, 11.2 M parameters),
    which the GPU run uses itself; ``--smoke`` uses 8 (channels 8-64, 0.18 M): seconds on a CPU.
    """

    def __init__(self, width: int = 64) -> None:
        nn.Module.__init__(self)
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], width
        for i, cout in enumerate(width * k for k in (1, 2, 4, 8)):
            blocks = (engine.BasicBlock(cin, cout, 1 if i == 0 else 2), engine.BasicBlock(cout, cout, 1))
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, 10)


def model_factory(name: str, resnet_width: int) -> tuple[Callable[[int], nn.Module], tuple[int, ...]]:
    """``(member i -> module, input shape of one example)`` of one of :data:`MODELS`."""
    if name == "resnet18" and resnet_width != 64:
        return (lambda i: NarrowResNet18(resnet_width)), (3, 32, 32)
    return engine.MODELS[ENGINE_MODEL.get(name, name)]


# ---------------------------------------------------------------------- timing
class Clock:
    """CUDA events and ``torch.cuda.synchronize`` on a GPU; ``time.perf_counter`` on a CPU (smoke)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        """Wait for the device (the only host sync of a measurement: at its boundaries)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def marks(self, count: int) -> list[Any]:
        """``count`` unrecorded marks (events are created before the timed region)."""
        return [torch.cuda.Event(enable_timing=True) for _ in range(count)] if self.cuda else [0.0] * count

    def record(self, marks: list[Any], i: int) -> None:
        """Record mark ``i`` on the current stream (no host sync)."""
        if self.cuda:
            marks[i].record()
        else:
            marks[i] = time.perf_counter()

    def elapsed_ms(self, marks: list[Any], i: int, j: int) -> float:
        """Milliseconds between marks ``i`` and ``j`` (after :meth:`sync`)."""
        if self.cuda:
            return marks[i].elapsed_time(marks[j])
        return (marks[j] - marks[i]) * 1e3


def time_left(deadline: float) -> float:
    """Seconds until ``deadline`` (a ``time.monotonic`` value)."""
    return deadline - time.monotonic()


def free_device(device: torch.device) -> None:
    """Drop what the last measurement left: Python garbage and, on a GPU, the allocator's cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` says the device ran out of memory (also cuDNN's and cuBLAS's words for it)."""
    text = str(exc)
    return isinstance(exc, torch.cuda.OutOfMemoryError) or any(
        s in text for s in ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED")
    )


def error_text(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters)."""
    lines = str(exc).strip().splitlines() or [""]
    return f"{type(exc).__name__}: {lines[0][:200]}"


# ---------------------------------------------------------------------- bandwidth
def table_peak_tb_s(name: str | None) -> tuple[str, float] | None:
    """The :data:`PEAK_BANDWIDTH_TB_S` entry matching a CUDA device name, or None."""
    if not name:
        return None
    upper = name.upper()
    if "H200" in upper:
        return "H200", PEAK_BANDWIDTH_TB_S["H200"]
    if "H100" in upper and ("SXM" in upper or "HBM3" in upper) and "PCIE" not in upper and "NVL" not in upper:
        return "H100 SXM", PEAK_BANDWIDTH_TB_S["H100 SXM"]
    return None


def measure_copy_tb_s(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bandwidth of ``dst.copy_(src)`` over ``nbytes`` (read + write counted), in TB/s."""
    clock = Clock(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    clock.sync()
    marks = clock.marks(2)
    clock.record(marks, 0)
    for _ in range(repeats):
        dst.copy_(src)
    clock.record(marks, 1)
    clock.sync()
    seconds = clock.elapsed_ms(marks, 0, 1) / 1e3
    return 2 * nbytes * repeats / seconds / 1e12


def bandwidth_section(device: torch.device, smoke: bool) -> dict[str, Any]:
    """The peak used for the engine's bandwidth fractions: the table's, else the measured copy."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    nbytes = (64 << 20) if smoke else (2 << 30)
    measured = measure_copy_tb_s(device, nbytes, repeats=3 if smoke else 20)
    found = table_peak_tb_s(name)
    del nbytes
    free_device(device)
    return {
        "device_name": name or "cpu",
        "table_tb_s": PEAK_BANDWIDTH_TB_S,
        "table_entry": found[0] if found else None,
        "measured_copy_tb_s": round(measured, 4),
        "peak_tb_s": found[1] if found else round(measured, 4),
        "peak_from": "table" if found else "measured copy",
    }


# ---------------------------------------------------------------------- the four methods
def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``"bf16"`` (forward and loss only), nothing for ``"fp32"``."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def member_lrs(n: int) -> list[float]:
    """engine.py's learning rates: log-spaced over ``engine.LR_RANGE``, one per member."""
    low, high = (math.log10(v) for v in engine.LR_RANGE)
    return torch.logspace(low, high, n, dtype=torch.float64).tolist()


def build_method(
    method: str,
    model: str,
    n: int,
    dtype: str,
    device: torch.device,
    settings: dict[str, Any],
    seed: int = 0,
) -> tuple[Callable[[], None], dict[str, Any]]:
    """A function running one training step of ``n`` members by ``method``, and facts about it.

    Every method starts from the same weights (same seed, built on ``device``) and gets the same
    per-member batches ``[n, batch, ...]``. Nothing in the returned step synchronizes with the host.
    """
    factory, shape = model_factory(model, settings["resnet_width"])
    torch.manual_seed(seed)
    with torch.device(device):  # built where they train: no copy of N models to the device
        models = [factory(i) for i in range(n)]
    for rnn in (m for member in models for m in member.modules() if isinstance(m, nn.RNNBase)):
        rnn.flatten_parameters()  # what .cuda() does: cuDNN's one weight buffer, no compaction per call
    xs = torch.randn(n, settings["batch"], *shape, device=device)
    ys = torch.randint(0, 10, (n, settings["batch"]), device=device)
    lrs, cast = member_lrs(n), (lambda: autocast(device, dtype))
    facts: dict[str, Any] = {}
    if method in ("pack", "pack_graph"):
        batch = mb.ModelBatch(models, backend="auto")
        del models
        opt = mb.optim.AdamW(batch, lr=lrs, capturable=method == "pack_graph")

        def pack_step() -> None:
            opt.zero_grad()
            with cast():
                losses = batch.compute_loss(batch(xs, in_dims=0), ys, F.cross_entropy, target_in_dims=0)
            losses.sum().backward()
            opt.step()

        facts["backend"] = batch.backend_choice["training"]
        return (pack_step if method == "pack" else captured(pack_step, device, facts)), facts
    if method == "func":
        params, buffers = stack_module_state(models)
        skeleton = copy.deepcopy(models[0]).to("meta")
        del models
        opt = torch.optim.AdamW(list(params.values()), lr=statistics.geometric_mean(lrs))

        def one(p: dict, b: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(functional_call(skeleton, (p, b), (x,)), y)

        losses_of = vmap(one, in_dims=(0, 0, 0, 0), randomness="different")

        def func_step() -> None:
            opt.zero_grad()
            with cast():
                losses = losses_of(params, buffers, xs, ys)
            losses.sum().backward()
            opt.step()

        facts["shared_lr"] = statistics.geometric_mean(lrs)
        return func_step, facts
    opts = [torch.optim.AdamW(m.parameters(), lr=lr) for m, lr in zip(models, lrs, strict=True)]
    work = list(zip(models, opts, xs, ys, strict=True))
    if method == "loop":

        def loop_step() -> None:
            for m, opt, x, y in work:
                opt.zero_grad()
                with cast():
                    loss = F.cross_entropy(m(x), y)
                loss.backward()
                opt.step()

        return loop_step, facts
    if method != "streams":
        raise ValueError(f"gpu_suite: unknown method {method!r}; expected one of {METHODS}")
    if device.type != "cuda":  # smoke on CPU: no streams, the plain loop
        facts["streams"] = "no-op on CPU: the plain loop"
        return build_method("loop", model, n, dtype, device, settings, seed)[0], facts
    streams = [torch.cuda.Stream(device) for _ in range(n)]  # torch hands them out of a pool
    distinct = list({s.cuda_stream: s for s in streams}.values())
    main = torch.cuda.current_stream(device)
    facts["streams"] = len(distinct)

    def streams_step() -> None:
        for stream, (m, opt, x, y) in zip(streams, work, strict=True):
            stream.wait_stream(main)  # the step starts after what came before it (inputs, last step)
            with torch.cuda.stream(stream):
                opt.zero_grad()
                with cast():
                    loss = F.cross_entropy(m(x), y)
                loss.backward()  # autograd runs each backward op on its forward op's stream
                opt.step()
        for stream in distinct:  # the step ends when the work of every stream has ended
            main.wait_stream(stream)

    return streams_step, facts


def captured(step: Callable[[], None], device: torch.device, facts: dict[str, Any]) -> Callable[[], None]:
    """``step`` captured once in a CUDA graph (after 3 warm-up steps on a side stream), as its replay.

    The warm-up creates the optimizer state and the step's cached device constants; capture then
    needs a step that reads nothing on the host (a capturable optimizer). On CPU: ``step`` itself.
    """
    if device.type != "cuda":
        facts["graph"] = "not captured on CPU: the capturable step runs eagerly"
        return step
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    facts["graph"] = "captured"
    return graph.replay


def count_host_syncs(step: Callable[[], None], device: torch.device) -> int | None:
    """Host syncs torch reports during one step (``set_sync_debug_mode("warn")``); None on CPU."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def measure_cell(
    step: Callable[[], None], device: torch.device, settings: dict[str, Any], budget_s: float
) -> dict[str, Any]:
    """Median step time of ``step`` after warm-up, with peak memory and host syncs.

    The first warm-up step is timed (synchronized) to size the run: timed steps are as many as fit
    in ``budget_s`` (``settings["steps"]`` at most, 2 at least), fixed before the timed region, so the
    timed loop holds no host check. Returns ``{"skipped": ...}`` when even that does not fit.
    """
    clock = Clock(device)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats(device)
    warmup, done = settings["warmup"], 0
    while True:  # a first step over budget is timed again once: it may have been one-time set-up
        start = time.perf_counter()
        step()
        clock.sync()
        first_s, done = time.perf_counter() - start, done + 1
        needed = first_s * (max(warmup - done, 0) + 3)  # the rest of the warm-up, 2 timed, the sync check
        if needed <= budget_s:
            break
        if done == 2 or first_s * 2 > budget_s:
            return {"skipped": f"time budget: a warm-up step took {first_s:.2f} s, {budget_s:.1f} s given"}
    for _ in range(warmup - done):
        step()
    clock.sync()
    count = max(2, min(settings["steps"], int((budget_s - needed) / max(first_s, 1e-6)) + 2))
    marks = clock.marks(count + 1)
    wall = time.perf_counter()
    clock.record(marks, 0)
    for i in range(count):  # timed region: events only, no host sync until clock.sync()
        step()
        clock.record(marks, i + 1)
    clock.sync()
    wall = time.perf_counter() - wall
    ms = [clock.elapsed_ms(marks, i, i + 1) for i in range(count)]
    peak = torch.cuda.max_memory_allocated(device) if clock.cuda else None
    return {
        "ms": round(statistics.median(ms), 4),
        "ms_min": round(min(ms), 4),
        "wall_ms_per_step": round(wall * 1e3 / count, 4),
        "timed_steps": count,
        "first_step_s": round(first_s, 4),
        "peak_mb": None if peak is None else round(peak / 2**20, 1),
        "host_syncs_per_step": count_host_syncs(step, device),
    }


def memory_skip(model: str, n: int, params: int, device: torch.device) -> str | None:
    """The reason to skip ``n`` members of ``model`` whose training state alone cannot fit, or None."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    need = STATE_BYTES_PER_PARAM * params * n * 1.25  # + the models being stacked, inputs, workspace
    if need <= 0.9 * total:
        return None
    return (
        f"memory: {n} x {model} need >= {need / 1e9:.1f} GB of parameters, gradients and AdamW state "
        f"(with the copies made while stacking), the device has {total / 1e9:.1f} GB"
    )


def params_of(model: str, settings: dict[str, Any]) -> int:
    """Parameters of one member of ``model`` (built on the meta device)."""
    factory, _ = model_factory(model, settings["resnet_width"])
    with torch.device("meta"):
        return sum(p.numel() for p in factory(0).parameters())


def engine_model_rows(
    model: str,
    device: torch.device,
    settings: dict[str, Any],
    dtypes: list[str],
    methods: list[str],
    peak_tb_s: float | None,
    deadline: float,
) -> list[dict[str, Any]]:
    """One row per (N, dtype) of ``model``: each method measured, or the reason it was not.

    Cells run N ascending, then dtype, then method. A cell gets at most ``settings["cell_s"]`` and
    4x its fair share of the model's time left; a method is not tried at larger N once it erred,
    ran out of memory or of time, nor where its last N's step time predicts it cannot finish.
    """
    params = params_of(model, settings)
    rows = []
    given_up: dict[tuple[str, str], str] = {}  # (dtype, method) -> why larger N are not tried
    last_ms: dict[tuple[str, str], tuple[int, float]] = {}
    cells_left = len(settings["sizes"]) * len(dtypes) * len(methods)
    for n in settings["sizes"]:
        for dtype in dtypes:
            row: dict[str, Any] = {"model": model, "n": n, "dtype": dtype, "params_per_member": params}
            row["methods"] = {}
            rows.append(row)
            for method in methods:
                left = time_left(deadline)
                budget = max(0.0, min(settings["cell_s"], 4 * left / cells_left, left))
                cells_left -= 1
                reason = given_up.get((dtype, method)) or memory_skip(model, n, params, device)
                if reason is None and (dtype, method) in last_ms:  # predicted from the last N measured
                    n0, ms0 = last_ms[(dtype, method)]
                    predicted = ms0 * n / n0 / 1e3 * (settings["warmup"] + 3)
                    if predicted > budget:
                        reason = f"time budget: predicted {predicted:.1f} s from N={n0}, {budget:.1f} s given"
                if reason is None and budget < 0.05:
                    reason = "time budget"
                if reason is not None:
                    row["methods"][method] = {"skipped": reason}
                    continue
                result = run_cell(method, model, n, dtype, device, settings, budget)
                row["methods"][method] = result
                if "ms" in result:
                    last_ms[(dtype, method)] = (n, result["ms"])
                    add_rates(result, n, params, peak_tb_s)
                elif "error" in result:
                    given_up[(dtype, method)] = f"error at N={n}: {result['error']}"
                else:
                    given_up[(dtype, method)] = f"{result['skipped']} (at N={n})"
    return rows


def run_cell(
    method: str,
    model: str,
    n: int,
    dtype: str,
    device: torch.device,
    settings: dict[str, Any],
    budget_s: float,
) -> dict[str, Any]:
    """Build and measure one (method, model, N, dtype); out of memory and errors become the result."""
    try:
        step, facts = build_method(method, model, n, dtype, device, settings)
        return facts | measure_cell(step, device, settings, budget_s)
    except Exception as exc:  # a cell that cannot run is a result, not a failure of the suite
        if is_oom(exc):
            return {"skipped": f"out of memory ({error_text(exc)[:120]})"}
        return {"error": error_text(exc)}
    finally:
        step = None
        free_device(device)


def add_rates(result: dict[str, Any], n: int, params: int, peak_tb_s: float | None) -> None:
    """members x steps / s and the achieved share of the peak bandwidth (:data:`BANDWIDTH_MODEL`)."""
    seconds = result["ms"] / 1e3
    result["member_steps_per_s"] = round(n / seconds, 2)
    moved = 2 * STATE_BYTES_PER_PARAM * params * n
    result["bytes_moved_per_step"] = moved
    result["bandwidth_tb_s"] = round(moved / seconds / 1e12, 6)
    result["bandwidth_fraction"] = round(moved / seconds / (peak_tb_s * 1e12), 6) if peak_tb_s else None


def warm_up(device: torch.device, settings: dict[str, Any]) -> None:
    """One untimed step of every method and dtype on a tiny MLP pack: the device's one-time set-up
    (cuBLAS handles, autocast caches, the first vmap) is not charged to the first measured cell."""
    for dtype in DTYPES:
        for method in METHODS:
            step, _ = build_method(method, "mlp", 2, dtype, device, settings)
            step()
    Clock(device).sync()
    free_device(device)


def engine_section(
    device: torch.device,
    settings: dict[str, Any],
    models: list[str],
    peak_tb_s: float | None,
    budget_s: float,
    save: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Every model's rows; the models share the budget (what one leaves goes to the next)."""
    section: dict[str, Any] = {
        "status": "running",
        "sizes": settings["sizes"],
        "dtypes": list(DTYPES),
        "methods": list(METHODS),
        "batch_per_member": settings["batch"],
        "optimizer": "AdamW; pack, loop: one lr per member (engine.py's range), func: their geometric mean",
        "peak_tb_s": peak_tb_s,
        "bandwidth_model": BANDWIDTH_MODEL,
        "rows": [],
    }
    if device.type != "cuda":
        section["streams_note"] = "no CUDA: 'streams' runs the plain loop, timing is time.perf_counter"
    end = time.monotonic() + budget_s
    warm_up(device, settings)
    for i, model in enumerate(models):
        deadline = time.monotonic() + time_left(end) / (len(models) - i)
        section["rows"] += engine_model_rows(
            model, device, settings, list(DTYPES), list(METHODS), peak_tb_s, deadline
        )
        save(section)
    skipped = sum(
        str(cell.get("skipped", "")).startswith("time budget")
        for row in section["rows"]
        for cell in row["methods"].values()
    )
    section["status"] = f"partial: {skipped} cells skipped for the time budget" if skipped else "done"
    return section


# ---------------------------------------------------------------------- slots_per_gpu="auto"
def slot_recipe(model: str, device: torch.device, settings: dict[str, Any]) -> mb.Recipe:
    """A recipe training ``model`` on random 10-class data (what ``"auto"`` measures a member of)."""
    factory, shape = model_factory(model, settings["resnet_width"])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, *shape, generator=generator)
    y = torch.randint(0, 10, (256,), generator=generator)
    return mb.Recipe(
        model=lambda config: factory(0),
        optimizer="adamw",
        loss=F.cross_entropy,
        train_data=(x, y),
        batch_size=settings["batch"],
        steps_per_report=1,
        device=str(device),
    )


def pack_fits(model: str, n: int, device: torch.device, settings: dict[str, Any]) -> dict[str, Any]:
    """Two training steps of a pack of ``n`` (backend ``"auto"``, AdamW): ``fits`` False on out of memory."""
    factory, shape = model_factory(model, settings["resnet_width"])
    start = time.perf_counter()
    free_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        if settings["slot_fake_limit"] is not None and n > settings["slot_fake_limit"]:
            raise torch.cuda.OutOfMemoryError(f"smoke: a fake limit of {settings['slot_fake_limit']} members")
        with torch.device(device):
            one = factory(0)
        batch = mb.ModelBatch([one] * n)  # stacked copies: one module's weights besides the pack
        del one
        opt = mb.optim.AdamW(batch, lr=1e-3)
        xs = torch.randn(n, settings["batch"], *shape, device=device)
        ys = torch.randint(0, 10, (n, settings["batch"]), device=device)
        for _ in range(2):
            opt.zero_grad()
            batch.compute_loss(batch(xs, in_dims=0), ys, F.cross_entropy, target_in_dims=0).sum().backward()
            opt.step()
        Clock(device).sync()
        fits, backend = True, batch.backend_choice["training"]
    except Exception as exc:
        if not is_oom(exc):
            raise
        fits, backend = False, None
    batch = opt = xs = ys = None
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    free_device(device)
    return {
        "n": n,
        "fits": fits,
        "backend": backend,
        "peak_mb": None if peak is None else round(peak / 2**20, 1),
        "s": round(time.perf_counter() - start, 2),
    }


def largest_fit(
    model: str, device: torch.device, settings: dict[str, Any], start_n: int, deadline: float
) -> dict[str, Any]:
    """The largest N that trains: doubling from ``start_n`` to the first failure, then bisection.

    Stops at ``settings["slot_max_n"]``, at a resolution of 1/64 of N, or at ``deadline`` (then the
    bracket found so far is the result).
    """
    max_n, probes = settings["slot_max_n"], []
    fit, fail, n = 0, None, max(1, min(start_n, max_n))
    status = "done"
    while True:
        if time_left(deadline) <= 0:
            status = "partial: time budget"
            break
        probe = pack_fits(model, n, device, settings)
        probes.append(probe)
        fit, fail = (max(fit, n), fail) if probe["fits"] else (fit, n)
        if fail is None and fit >= max_n:
            status = f"capped at N={max_n}"
            break
        if fail is not None and fail - fit <= max(1, fit // 64):
            break
        n = min(2 * n, max_n) if fail is None else (fit + fail) // 2
        if n == 0:  # even one member does not fit
            break
    return {"status": status, "largest_fit": fit, "smallest_fail": fail, "probes": probes}


def slots_section(
    device: torch.device, settings: dict[str, Any], smoke: bool, budget_s: float
) -> dict[str, Any]:
    """``slots_per_gpu="auto"``'s pack size for a recipe against the measured largest N that fits."""
    from tune_integration import _packs

    deadline = time.monotonic() + budget_s
    model = "mlp" if smoke else "resnet18"
    free_device(device)
    recipe = slot_recipe(model, device, settings)
    configs = [{"seed": 0}]
    chosen = _packs.auto_slots(recipe, configs, device)
    per_member, data_bytes = _packs.member_memory(recipe, configs, device)
    free = _packs.free_memory(device)
    uncapped = int((_packs.AUTO_MEMORY_FRACTION * free - data_bytes) // max(per_member, 1))
    section: dict[str, Any] = {
        "model": model,
        "batch_per_member": settings["batch"],
        "auto_slots": chosen,
        "auto_cap": _packs.AUTO_MAX_SLOTS["cuda" if device.type == "cuda" else "cpu"],
        "auto_memory_fraction": _packs.AUTO_MEMORY_FRACTION,
        "auto_member_mb": round(per_member / 2**20, 2),
        "auto_uncapped": uncapped,
        "free_mb": round(free / 2**20, 1),
    }
    if smoke:  # a CPU has no out-of-memory signal (it swaps): the search runs against a fake limit
        limit = settings["slot_fake_limit"]
        section["smoke_note"] = f"CPU: N > {limit} raises a fake OutOfMemoryError; the search starts at 1"
    found = largest_fit(model, device, settings, 1 if smoke else max(1, uncapped), deadline)
    section |= found
    if found["largest_fit"]:
        section["auto_vs_largest_fit"] = round(chosen / found["largest_fit"], 4)
        section["estimate_vs_largest_fit"] = round(uncapped / found["largest_fit"], 4)
    return section


# ---------------------------------------------------------------------- sweep (benchmarks/sweep.py's)
def device_trainable(config: dict[str, Any]) -> None:
    """benchmarks/sweep.py's plain trainable on the trial's device (its GPU share, else the CPU).

    One config alone with plain torch: its own seeded shuffle, ``torch.optim.AdamW``, a report per epoch.
    """
    from ray import tune

    example = sweep.load_example()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(1)
    (x, y), (xv, yv) = ((a.to(device), b.to(device)) for a, b in example.digits())
    torch.manual_seed(config["seed"])
    model = example.make_model(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    shuffle = torch.Generator().manual_seed(config["seed"])
    while True:
        model.train()
        total = torch.zeros((), device=device)
        batches = torch.randperm(len(y), generator=shuffle).to(device).split(example.BATCH_SIZE)
        for idx in batches:
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach()
        model.eval()
        with torch.no_grad():
            logits = model(xv)
            val_loss = float(F.cross_entropy(logits, yv))
            val_acc = float((logits.argmax(-1) == yv).float().mean())
        tune.report({"loss": float(total) / len(batches), "val_loss": val_loss, "val_acc": val_acc})


def trial_resources(device: torch.device) -> dict[str, float]:
    """A plain Tune trial's resources: a quarter of the GPU (4 trials per GPU); on CPU (smoke) one core."""
    return {"cpu": 1, "gpu": 0.25} if device.type == "cuda" else {"cpu": 1}


def sweep_run(
    side: str, n: int, device: torch.device, settings: dict[str, Any], cap_s: float, storage: str
) -> dict[str, Any]:
    """One ``tune.run`` of ``n`` configs by ``side`` (``"tune"`` or ``"modelbatch"``), capped at ``cap_s``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from tune_integration import ModelBatchSearcher

    example = sweep.load_example()
    epochs = settings["epochs"]
    inner = sweep.fixed_searcher(sweep.sample_configs(n, seed=0))
    cuda = device.type == "cuda"
    searcher = None
    if side == "modelbatch":
        recipe = example.make_recipe(device=None if cuda else "cpu")
        searcher = ModelBatchSearcher(recipe, searcher=inner, slots_per_gpu="auto")
        trainable, search_alg = searcher.trainable(), searcher
    else:
        resources = trial_resources(device)
        trainable, search_alg = tune.with_resources(device_trainable, resources), inner
    start = time.perf_counter()
    try:
        analysis = tune.run(
            trainable,
            config={},
            num_samples=n,
            search_alg=search_alg,
            scheduler=ASHAScheduler(max_t=epochs, grace_period=min(2, epochs), reduction_factor=3),
            metric="val_loss",
            mode="min",
            stop={"training_iteration": epochs},
            reuse_actors=True,
            storage_path=storage,
            name=f"{side}-{n}",
            verbose=0,
            time_budget_s=cap_s,
            raise_on_failed_trial=False,
        )
        wall = time.perf_counter() - start
    finally:
        stats = searcher.server_stats() if searcher is not None else None
        if searcher is not None:
            searcher.shutdown()
            released_s = wait_for_release(timeout_s=20.0 if cuda else 2.0)  # the next run: a free GPU
    trials = analysis.trials
    epochs_trained = sum((t.last_result or {}).get("training_iteration", 0) for t in trials)
    hit_cap = wall >= cap_s - 0.5  # Tune stopped every trial at the cap
    row: dict[str, Any] = {
        "wall_s": round(wall, 2),
        "cap_s": round(cap_s, 1),
        "hit_cap": hit_cap,
        "trials_started": len(trials),
        "trials_reported": sum(bool(t.last_result) for t in trials),
        "errored": sum(t.status == "ERROR" for t in trials),
        "epochs_trained": epochs_trained,
        "epochs_per_s": round(epochs_trained / wall, 3),
        "configs_per_hour": None if hit_cap else round(n / wall * 3600, 1),
        "resources_per_trial": "relay {'cpu': 0.01}, one slot server per GPU" if searcher else resources,
    }
    losses = [t.metric_analysis["val_loss"]["min"] for t in trials if "val_loss" in t.metric_analysis]
    row["best_val_loss"] = round(float(min(losses)), 5) if losses else None
    if stats is not None:
        row["slots"] = [s.get("slots") for s in stats]
        row["server_release_s"] = released_s
    return row


def wait_for_release(timeout_s: float) -> float | None:
    """Seconds until every GPU and CPU of the cluster is free again (slot servers gone), None at timeout."""
    import ray

    start = time.monotonic()
    total = ray.cluster_resources()
    while time.monotonic() - start < timeout_s:
        free = ray.available_resources()
        if all(free.get(key, 0.0) >= total.get(key, 0.0) - 1e-6 for key in ("GPU", "CPU")):
            return round(time.monotonic() - start, 2)
        time.sleep(0.25)
    return None


def sweep_section(device: torch.device, settings: dict[str, Any], budget_s: float) -> dict[str, Any]:
    """benchmarks/sweep.py's sweep at each of ``settings["configs"]``: plain Tune vs ModelBatchSearcher."""
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sweep)  # Ray workers cannot import benchmarks/sweep.py
    sweep.load_example().quiet_ray()
    end = time.monotonic() + budget_s
    cuda = device.type == "cuda"
    start = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=os.cpu_count() if cuda else 2,
        num_gpus=1 if cuda else 0,
        include_dashboard=False,
        log_to_driver=False,
    )
    section: dict[str, Any] = {
        "epochs": settings["epochs"],
        "ray_init_s": round(time.perf_counter() - start, 2),
        "trial_resources": trial_resources(device),
        "rows": [],
    }
    runs = [(n, side) for n in settings["configs"] for side in ("tune", "modelbatch")]
    try:
        with tempfile.TemporaryDirectory() as storage:
            for i, (n, side) in enumerate(runs):
                if side == "tune":
                    section["rows"].append({"configs": n})
                row = section["rows"][-1]
                # each run's share of what is left, less its own stop (~5 s) and ray.shutdown's (5 s)
                cap = (time_left(end) - 5.0) / (len(runs) - i) - 5.0
                if cap < 5.0:
                    row[side] = {"skipped": "time budget"}
                    continue
                try:
                    row[side] = sweep_run(side, n, device, settings, cap, storage)
                except Exception as exc:  # one side failing leaves the other's figures
                    row[side] = {"error": error_text(exc)}
                tune_row, mb_row = row.get("tune", {}), row.get("modelbatch", {})
                if tune_row.get("epochs_per_s") and mb_row.get("epochs_per_s"):
                    row["speedup_epochs_per_s"] = round(mb_row["epochs_per_s"] / tune_row["epochs_per_s"], 3)
    finally:
        ray.shutdown()
    errors = [
        r[s]["error"] for r in section["rows"] for s in ("tune", "modelbatch") if "error" in r.get(s, {})
    ]
    skipped = any("skipped" in r.get(s, {}) for r in section["rows"] for s in ("tune", "modelbatch"))
    section["status"] = f"error: {errors[0]}" if errors else "partial: time budget" if skipped else "done"
    return section


# ---------------------------------------------------------------------- driver
def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` to ``path`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="every code path on CPU, tiny sizes (< 1 min)")
    parser.add_argument(
        "--out", type=Path, default=None, help="the JSON (default results/gpu_suite-<device>.json)"
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="engine N (default 1 16 64 256 1024)"
    )
    parser.add_argument(
        "--total-s",
        type=float,
        default=None,
        help="the whole run's time budget in seconds (default 455; smoke 150)",
    )
    args = parser.parse_args(argv)
    if args.sizes is not None and min(args.sizes) < 1:
        parser.error("--sizes must be >= 1")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: this suite measures a GPU; run --smoke to check its code paths on CPU")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the selected sections, writing the JSON after each; 1 if a section failed."""
    args = parse_args(argv)
    started = time.monotonic()
    gc.freeze()  # the imports' objects out of the collector's way: a gc.collect() then takes ms, not 0.4 s
    settings = copy.deepcopy(SMOKE if args.smoke else GPU)
    if args.sizes:
        settings["sizes"] = sorted(set(args.sizes))
    if args.total_s:
        settings["total_s"] = args.total_s
    deadline = started + settings["total_s"]
    device = torch.device("cpu" if args.smoke else "cuda")
    threads = 1 if args.smoke else torch.get_num_threads()  # 2 threads on 2 busy cores: up to 8x slower
    torch.set_num_threads(threads)
    info = engine.machine_info(device, threads)
    out = (
        args.out
        or RESULTS_DIR / f"gpu_suite-{engine.machine_slug(info)}{'-smoke' if args.smoke else ''}.json"
    )
    report: dict[str, Any] = {
        "suite": "benchmarks/gpu_suite.py",
        "smoke": args.smoke,
        "timing": "time.perf_counter, no CUDA (smoke): streams are a no-op" if args.smoke else "CUDA events",
        "machine": info,
        "config": settings | {"models": args.models},
        "command": sys.argv if argv is None else argv,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sections": {name: {"status": "pending"} for name in SECTIONS},
    }

    def save(name: str, section: dict[str, Any]) -> None:
        report["sections"][name] = section
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        write_json(out, report)

    save("bandwidth", {"status": "pending"})
    peak = None
    for name in SECTIONS:
        budget = min(settings["budgets"][name], time_left(deadline))
        if name not in args.sections and name != "bandwidth":  # the peak is needed by the engine rows
            save(name, {"status": "skipped: not selected"})
            continue
        if budget <= 1.0:
            save(name, {"status": "skipped: time budget"})
            continue
        print(f"gpu_suite: {name} ({budget:.0f} s budget) ...", flush=True)
        t0 = time.monotonic()
        try:
            if name == "bandwidth":
                section = bandwidth_section(device, args.smoke) | {"status": "done"}
                peak = section["peak_tb_s"]
            elif name == "engine":
                section = engine_section(
                    device, settings, args.models, peak, budget, lambda s: save("engine", s)
                )
            elif name == "slots":
                section = slots_section(device, settings, args.smoke, budget)
            else:
                section = sweep_section(device, settings, budget)
        except Exception as exc:  # the other sections still run, and this one says what broke
            section = {"status": f"error: {error_text(exc)}"}
        section["budget_s"], section["elapsed_s"] = round(budget, 1), round(time.monotonic() - t0, 1)
        save(name, section)
        print(f"gpu_suite: {name}: {section['status']} in {section['elapsed_s']} s", flush=True)
    print(f"gpu_suite: wrote {out} ({report['elapsed_s']} s)", flush=True)
    return int(any(s["status"].startswith("error") for s in report["sections"].values()))


if __name__ == "__main__":
    sys.exit(main())
