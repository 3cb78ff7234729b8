"""The Tune driver's cost of a ModelBatchSearcher sweep vs plain Tune, a relay's cost, when it saturates.

Issue 18's on-machine measurements beside ``scale.py`` (one slot server's part). Each side runs in
a fresh process with its own local Ray (``num_cpus=2``, no dashboard), shut down at its end:

- ``tune``: plain ``tune.run`` of a trivial function trainable (``tune.report`` in a loop; nothing
  trained), ``{"cpu": 0.01}`` per trial, ``max_concurrent_trials`` = the other side's slots.
- ``modelbatch``: ``tune.run`` with ``ModelBatchSearcher`` (one CPU slot server of ``--slots``
  slots) and ``MLflowCallback`` (sqlite store): a recipe whose training is near zero (Linear 4→2,
  batch 8, one step per report, no validation data, no checkpoints).

Both with ``reuse_actors=True``, FIFO, Tune's auto-loggers off (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``
as in Tune's scalability release tests; ``--tune-loggers`` keeps them). Each side runs two sweeps:

1. **Per result** (``--members`` x ``--results``): the driver's CPU time (``getrusage`` of the
   driver process, all its threads) per result over the whole ``tune.run`` and over the middle
   80 % of results (steady state, between two marks a Tune callback takes at those results),
   results/s, and the driver's CPU split: CPU time of the calling thread (``time.thread_time``)
   inside the searcher's methods (``ModelBatchSearcher`` and its ConcurrencyLimiter), the grouping
   lookahead's, the inner sampler's and the MLflow callback's hooks (exclusive: nested calls count
   once, in the innermost part); per thread (``/proc/self/task``), the MLflow writer thread, the
   sweep's lease heartbeat and Ray's threads; Tune itself is the rest of the main thread. The Tune
   trial processes (member relays on the modelbatch side) are sampled every second: CPU seconds
   since their start and peak RSS/USS per process (psutil).
2. **Memory per trial** (``--trials`` sequential members of one result each): the driver's RSS
   after each finished trial (slope of a linear fit over the second half: bytes per trial), and
   ``tracemalloc`` on over the last quarter of the trials (its own memory subtracted from the RSS):
   what it saw allocated and still alive at the end, attributed by each allocation's innermost
   frame to ``tune_integration`` (the searcher, its lookahead and callback), Ray Tune, the MLflow
   logging (``modelbatch``/``mlflow``), the rest of Ray or other; and the live ``ray.tune``
   ``Trial`` objects counted by ``gc``. ``--trials 0`` (``--quick``) traces the per-result sweep instead.

Then, without Ray: ``python -X importtime`` of the relay's entry module (``tune_integration._relay``)
in a fresh interpreter and after ``ray.tune``, and of ``ray.tune`` and ``ray`` alone, with the
CPU time and peak RSS of each import. Last, the saturation table (:func:`saturation`).

The JSON records ``os.getloadavg()`` before and after each part; the machine is shared, so CPU
times (not wall clock) are the figures to read, and even they grow with contention.

    python benchmarks/driver_scale.py            # 16 members x 64 results, 8 slots; 2,000 trials per side
    python benchmarks/driver_scale.py --trials 250   # what was run: ~17 min at load average 10-95
    python benchmarks/driver_scale.py --quick    # 2 x 3, traced, both sides in one Ray (a smoke run)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SIDES = ("tune", "modelbatch")
PARTS = ("searcher", "lookahead", "sampler", "mlflow_callback")
"""The driver's timed parts on the modelbatch side (what is left of the main thread is Tune's)."""
HOLDERS = ("tune_integration", "ray_tune", "ray_other", "mlflow_logging", "other")
"""Who holds the driver's memory, by allocation site (see :func:`classify`)."""
TRIAL_PROCESS = "ray::ImplicitFunc"
"""How Ray names a Tune function trial's process (a relay or a plain trainable), psutil's name."""


# ---------------------------------------------------------------------- what the trials run
def make_model(config: dict[str, Any]) -> Any:
    """A near-zero model: Linear 4 → 2."""
    from torch import nn

    return nn.Linear(4, 2)


def tiny_recipe() -> Any:
    """A recipe whose training is near zero: one step of batch 8 per report, no validation data."""
    import torch
    import torch.nn.functional as F

    import modelbatch as mb

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)
    return mb.Recipe(
        model=make_model,
        optimizer="sgd",
        loss=F.cross_entropy,
        train_data=(x, y),
        batch_size=8,
        steps_per_report=1,
        device="cpu",
    )


def plain_trainable(config: dict[str, Any]) -> None:
    """Plain Tune's side: ``results`` reports of a made-up loss, nothing trained."""
    from ray import tune

    for i in range(config["results"]):
        tune.report({"loss": config["lr"] / (i + 1)})


# ---------------------------------------------------------------------- driver-side timers
class PartTimers:
    """Exclusive CPU seconds (``time.thread_time``) spent inside wrapped methods, by part.

    A method of one part called inside another's counts for the inner part only.
    """

    def __init__(self) -> None:
        self.cpu_s: dict[str, float] = dict.fromkeys(PARTS, 0.0)
        self.calls: dict[str, int] = dict.fromkeys(PARTS, 0)
        self._stack: list[list[Any]] = []  # [part, start, child seconds]

    def wrap(self, obj: Any, part: str, names: tuple[str, ...]) -> None:
        """Time ``obj``'s methods ``names`` as ``part`` (instance attributes shadow the class's)."""
        for name in names:
            original = getattr(obj, name, None)
            if callable(original):
                setattr(obj, name, self._timed(original, part))

    def _timed(self, fn: Callable[..., Any], part: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not threading.main_thread():
                return fn(*args, **kwargs)
            frame = [part, time.thread_time(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                spent = time.thread_time() - frame[1]
                self.cpu_s[part] += spent - frame[2]
                self.calls[part] += 1
                if self._stack:
                    self._stack[-1][2] += spent

        return timed


SEARCHER_METHODS = (
    "set_search_properties",
    "suggest",
    "on_trial_result",
    "on_trial_complete",
    "on_pause",
    "on_unpause",
    "save",
    "restore",
    "get_state",
    "set_state",
    "save_to_dir",
    "add_evaluated_point",
)
CALLBACK_HOOKS = (
    "setup",
    "on_trial_start",
    "on_trial_result",
    "on_trial_complete",
    "on_trial_error",
    "on_experiment_end",
    "get_state",
    "set_state",
)


def timed_searcher(timers: PartTimers, searcher: Any) -> None:
    """Wrap a ModelBatchSearcher's, its limiter's, lookahead's and inner sampler's methods."""
    timers.wrap(searcher, "searcher", SEARCHER_METHODS)
    timers.wrap(searcher._limiter, "searcher", SEARCHER_METHODS)
    timers.wrap(searcher._ahead, "lookahead", (*SEARCHER_METHODS, "peek"))
    timers.wrap(searcher._inner, "sampler", (*SEARCHER_METHODS, "samples"))


# ---------------------------------------------------------------------- measures of processes
def thread_cpu_s() -> dict[int, tuple[str, float]]:
    """This process's threads: native id -> (name, user + system CPU seconds); Linux only. A Python
    thread's name is its ``threading`` name (Python does not name native threads), others' the kernel's."""
    ticks, out = os.sysconf("SC_CLK_TCK"), {}
    python = {t.native_id: f"py:{t.name}" for t in threading.enumerate()}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        out[int(tid)] = (python.get(int(tid), name), (int(fields[11]) + int(fields[12])) / ticks)
    return out


def rusage_cpu_s() -> float:
    """User + system CPU seconds of this process (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_bytes() -> int:
    """This process's resident set size."""
    import psutil

    return psutil.Process().memory_info().rss


class TrialProcesses:
    """Tune trial processes (named :data:`TRIAL_PROCESS`) among this process's descendants, sampled
    every ``interval`` seconds in a thread: each one's last CPU seconds (since it started, so the
    worker's start and imports count) and its peak RSS and USS."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval, self.seen = interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while True:
            for proc in me.children(recursive=True):
                try:
                    if not proc.name().startswith(TRIAL_PROCESS):
                        continue
                    cpu = proc.cpu_times()
                    memory = proc.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                row = self.seen.setdefault(proc.pid, {"cpu_s": 0.0, "rss": 0, "uss": 0})
                row["cpu_s"] = cpu.user + cpu.system
                row["rss"], row["uss"] = max(row["rss"], memory.rss), max(row["uss"], memory.uss)
            if self._stop.wait(self.interval):
                return

    def summary(self, members: int, results: int) -> dict[str, Any]:
        """Per process (medians) and per member and result (sums over processes)."""
        rows = list(self.seen.values())
        if not rows:
            return {"processes": 0}
        cpu = sum(r["cpu_s"] for r in rows)
        return {
            "processes": len(rows),
            "cpu_s_per_process_median": statistics.median(r["cpu_s"] for r in rows),
            "cpu_s_per_member": cpu / members,
            "cpu_ms_per_result": 1e3 * cpu / results,
            "rss_mb_median": statistics.median(r["rss"] for r in rows) / 2**20,
            "uss_mb_median": statistics.median(r["uss"] for r in rows) / 2**20,
        }

    def __enter__(self) -> TrialProcesses:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def mark(timers: PartTimers) -> dict[str, Any]:
    """The driver's clocks now: process CPU, wall, each thread's CPU, the timed parts' CPU."""
    return {
        "cpu_s": rusage_cpu_s(),
        "wall_s": time.perf_counter(),
        "threads": thread_cpu_s(),
        "parts": dict(timers.cpu_s),
    }


def meter_callback(
    timers: PartTimers, marks_at: tuple[int, ...] = (), on_complete: Callable[[int], None] | None = None
) -> Any:
    """A Tune callback that takes a :func:`mark` after the results numbered ``marks_at`` and notes the
    driver's RSS (less tracemalloc's own memory) after every finished trial, then calls
    ``on_complete(n)``."""
    from ray.tune import Callback

    class Meter(Callback):
        def __init__(self) -> None:
            self.results, self.first_result = 0, float("nan")
            self.marks: dict[int, dict[str, Any]] = {}
            self.at_complete: list[int] = []

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            self.results += 1
            if self.results == 1:
                self.first_result = time.perf_counter()
            if self.results in marks_at:
                self.marks[self.results] = mark(timers)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.at_complete.append(rss_bytes() - tracemalloc.get_tracemalloc_memory())
            if on_complete is not None:
                on_complete(len(self.at_complete))

    return Meter()


def split_ms(before: dict[str, Any], after: dict[str, Any], results: int) -> dict[str, float]:
    """Driver CPU ms per result between two marks, by part: Tune (the rest of the main thread), the
    timed parts, the MLflow writer thread, Ray's threads in the driver, and all threads."""
    by_thread = dict.fromkeys(
        ("main", "mlflow_writer", "sweep_heartbeat", "python_threads", "ray_threads"), 0.0
    )
    main_tid = threading.main_thread().native_id
    for tid, (name, spent) in after["threads"].items():
        spent -= before["threads"].get(tid, (name, 0.0))[1]
        if name.startswith("py:bench-sampler"):
            continue
        if tid == main_tid:
            role = "main"
        elif name.startswith("py:modelbatch-mlflow"):
            role = "mlflow_writer"
        elif name.startswith("py:modelbatch-sweep"):
            role = "sweep_heartbeat"
        else:  # Ray's and Tune's Python threads, or Ray's C++ core worker threads (gRPC, io)
            role = "python_threads" if name.startswith("py:") else "ray_threads"
        by_thread[role] += spent
    parts = {p: after["parts"][p] - before["parts"][p] for p in PARTS}
    out = {"tune": by_thread["main"] - sum(parts.values()), **parts}
    out["mlflow_writer_thread"] = by_thread["mlflow_writer"]
    out["sweep_heartbeat_thread"] = by_thread["sweep_heartbeat"]
    out["other_python_threads"] = by_thread["python_threads"]
    out["ray_threads"] = by_thread["ray_threads"]
    out["all"] = after["cpu_s"] - before["cpu_s"]
    return {k: 1e3 * v / max(results, 1) for k, v in out.items()}


def slope(ys: list[float]) -> float:
    """Least-squares slope of ``ys`` against 0, 1, 2, ... (0.0 for fewer than two points)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, statistics.fmean(ys)
    num = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(ys))
    return num / sum((i - mean_x) ** 2 for i in range(n))


# ---------------------------------------------------------------------- one side (a child process)
def run_sweep(
    side: str,
    members: int,
    results: int,
    args: argparse.Namespace,
    workdir: Path,
    name: str,
    on_complete: Callable[[int], None] | None = None,
    marks_at: tuple[int, ...] = (),
) -> Any:
    """One ``tune.run`` of ``members`` trials of ``results`` results each on ``side``; returns
    (analysis, meter, timers, searcher or None); see :func:`meter_callback` for the rest."""
    from ray import tune

    timers, searcher = PartTimers(), None
    meter = meter_callback(timers, marks_at, on_complete)
    callbacks: list[Any] = [meter]
    kwargs: dict[str, Any] = {}
    if side == "modelbatch":
        from tune_integration import MLflowCallback, ModelBatchSearcher

        searcher = ModelBatchSearcher(
            tiny_recipe(), slots_per_gpu=args.slots, reports=results, checkpoint_every=None, random_state=0
        )
        timed_searcher(timers, searcher)
        mlflow = MLflowCallback(f"sqlite:///{workdir}/mlflow.db", f"bench-{name}", metric="loss")
        timers.wrap(mlflow, "mlflow_callback", CALLBACK_HOOKS)
        callbacks.append(mlflow)
        trainable = searcher.trainable()
        kwargs["search_alg"] = searcher
        config = {"lr": tune.loguniform(1e-3, 1e-1)}
    else:
        trainable = tune.with_resources(plain_trainable, {"cpu": 0.01})
        kwargs["max_concurrent_trials"] = args.slots
        config = {"lr": tune.loguniform(1e-3, 1e-1), "results": results}
    analysis = tune.run(
        trainable,
        config=config,
        num_samples=members,
        metric="loss",
        mode="min",
        reuse_actors=True,
        callbacks=callbacks,
        storage_path=str(workdir / "tune"),
        name=name,
        verbose=0,
        **kwargs,
    )
    return analysis, meter, timers, searcher


def classify(trace: Any) -> str:
    """Who holds an allocation, by the innermost frame of its traceback that says."""
    for frame in reversed(trace.traceback):  # innermost last in tracemalloc's order: walk from it
        path = frame.filename.replace("\\", "/")
        if "/tune_integration/" in path:
            return "tune_integration"
        if "/ray/tune/" in path or "/ray/train/" in path or "/ray/air/" in path:
            return "ray_tune"
        if "/mlflow/" in path or "/modelbatch/" in path:
            return "mlflow_logging"
    for frame in trace.traceback:
        if "/ray/" in frame.filename:
            return "ray_other"
    return "other"


def sweep_part(
    side: str, members: int, results: int, args: argparse.Namespace, workdir: Path, trace: bool
) -> dict[str, Any]:
    """One sweep of ``members`` x ``results``: the driver's CPU per result, split, over the whole
    sweep and its middle 80 % of results (steady state), the trial processes' cost, and (``trace``)
    the driver's memory per finished trial with tracemalloc's attribution."""
    from ray.tune.experiment import Trial

    load_start = os.getloadavg()
    expected = members * results
    lo, hi = max(expected // 10, 1), max(expected * 9 // 10, 2)
    at = min(max(members * 3 // 4, 1), members - 1)  # traced from here on: the last quarter

    def start_tracing(finished: int) -> None:
        if trace and finished == at:
            gc.collect()
            tracemalloc.start(args.frames)

    gc.collect()
    rss_start = rss_bytes()
    with TrialProcesses() as processes:
        first = mark(PartTimers())
        name = "memory" if trace else "results"
        analysis, meter, timers, searcher = run_sweep(
            side, members, results, args, workdir, name, start_tracing, (lo, hi)
        )
        last = mark(timers)
    first["parts"] = dict.fromkeys(PARTS, 0.0)
    wall = last["wall_s"] - first["wall_s"]
    row: dict[str, Any] = {
        "side": side,
        "members": members,
        "results_per_member": results,
        "results": meter.results,
        "errored": sum(t.status == "ERROR" for t in analysis.trials),
        "wall_s": wall,
        "results_per_s": meter.results / wall,
        "first_result_s": meter.first_result - first["wall_s"],
        "driver_cpu_ms_per_result": split_ms(first, last, meter.results)["all"],
        "driver_cpu_ms_per_result_split": split_ms(first, last, meter.results),
        "timed_calls": timers.calls,
        "trial_processes": processes.summary(members, meter.results),
        "server_stats": searcher.server_stats() if searcher is not None else None,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    steady = meter.marks.get(lo), meter.marks.get(hi)
    if steady[0] is not None and steady[1] is not None:
        between = split_ms(steady[0], steady[1], hi - lo)
        row["steady_results"] = hi - lo
        row["results_per_s_steady"] = (hi - lo) / (steady[1]["wall_s"] - steady[0]["wall_s"])
        row["driver_cpu_ms_per_result_steady"] = between["all"]
        row["driver_cpu_ms_per_result_split_steady"] = between
    if not trace:
        return {"per_result": row}
    gc.collect()
    grown = dict.fromkeys(HOLDERS, 0)
    overhead = 0
    if tracemalloc.is_tracing():  # what was allocated since it started and is still alive
        for stat in tracemalloc.take_snapshot().statistics("traceback"):
            grown[classify(stat)] += stat.size
        overhead = tracemalloc.get_tracemalloc_memory()
        tracemalloc.stop()
    rss = meter.at_complete
    memory = {
        "side": side,
        "trials": members,
        "results_per_trial": results,
        "finished": len(rss),
        "errored": row["errored"],
        "wall_s": wall,
        "trials_per_s": len(rss) / wall,
        "rss_start_mb": rss_start / 2**20,
        "rss_end_mb": (rss[-1] if rss else rss_start) / 2**20,
        "rss_bytes_per_trial_fit": slope(rss[len(rss) // 2 :]),
        "rss_bytes_per_trial_overall": (rss[-1] - rss_start) / len(rss) if rss else 0.0,
        "traced_bytes_per_trial": {k: v / max(members - at, 1) for k, v in grown.items()},
        "traced_trials": members - at,
        "tracemalloc_frames": args.frames,
        "tracemalloc_overhead_mb": overhead / 2**20,
        "live_tune_trial_objects": sum(isinstance(o, Trial) for o in gc.get_objects()),
        "searcher_completed_ids": len(searcher._completed) if searcher is not None else None,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    return {"per_result": row, "memory": memory}


def run_sides(sides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Both parts of each side in this process, on one local Ray (shut down at the end)."""
    import ray

    start = time.perf_counter()
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    rows: dict[str, Any] = {}
    try:
        for side in sides:
            workdir = Path(tempfile.mkdtemp(prefix=f"driver-scale-{side}-"))
            os.chdir(workdir)  # MLflow or Tune may write relative paths
            rows[side] = {"ray_init_s": time.perf_counter() - start, "process": os.getpid()}
            if args.trials:  # a results sweep, then a traced sweep of one-result trials
                rows[side].update(sweep_part(side, args.members, args.results, args, workdir, False))
                rows[side]["memory"] = sweep_part(side, args.trials, 1, args, workdir, True)["memory"]
            else:  # --quick: one traced sweep for both
                rows[side].update(sweep_part(side, args.members, args.results, args, workdir, True))
            start = time.perf_counter()
    finally:
        ray.shutdown()
    return rows


# ---------------------------------------------------------------------- the relay's imports
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def import_cost(module: str, after: str | None = None) -> dict[str, Any]:
    """``python -X importtime`` of ``import module`` in a fresh interpreter (``after``: once that module
    is imported, e.g. ``ray.tune``, which a Tune trial's process has already): the heaviest modules
    by cumulative time (nesting depth <= 2), and the CPU seconds of the import and the interpreter's
    peak RSS."""
    code = "import resource, sys, time; "
    code += f"import {after}; sys.stderr.write('MARK\\n'); " if after else ""
    code += (
        f"t = time.process_time(); import {module}; u = resource.getrusage(resource.RUSAGE_SELF); "
        "print(time.process_time() - t, u.ru_maxrss, 'torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    lines = done.stderr.splitlines()
    if after:
        lines = lines[lines.index("MARK") + 1 :]
    cumulative, total = {}, 0
    for line in lines:
        match = IMPORT_LINE.match(line)
        if not match:
            continue
        cum_us, indent, name = int(match[2]), len(match[3]), match[4]
        total += cum_us if indent == 1 else 0
        if indent <= 5:
            cumulative[name] = max(cumulative.get(name, 0), cum_us)
    seconds, maxrss_kb, torch = done.stdout.split()
    heaviest = sorted(cumulative.items(), key=lambda kv: -kv[1])[:12]
    return {
        "module": module,
        "after": after,
        "import_ms": total / 1e3,
        "import_cpu_s": float(seconds),
        "peak_rss_mb": int(maxrss_kb) / 1024,
        "imports_torch": torch == "True",
        "top_cumulative": [{"module": k, "cumulative_ms": v / 1e3} for k, v in heaviest],
    }


# ---------------------------------------------------------------------- saturation
def saturation(rows: dict[str, Any], scale: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Members per GPU → results/s, driver and relay load, driver RSS: on this machine's one CPU slot
    server and on an 8-GPU node (the models are in the returned ``model``)."""
    mb, plain = rows["modelbatch"], rows["tune"]
    per = mb["per_result"]
    ms_result = per.get("driver_cpu_ms_per_result_steady", per["driver_cpu_ms_per_result"])
    driver_max = 1e3 / ms_result  # the driver's event loop is one thread: one core at 100 %
    kb_trial = max(mb["memory"]["rss_bytes_per_trial_fit"], 0.0) / 1e3
    relay = per["trial_processes"]
    relay_mb, relay_ms = relay.get("uss_mb_median", 0.0), relay.get("cpu_ms_per_result", 0.0)
    rss0 = mb["memory"]["rss_start_mb"]
    table = []
    for checkpoints, scale_rows in scale.items():
        for row in scale_rows:
            m, report_s = row["members"], row["report_ms"] / 1e3
            for gpus, where in ((1, "this machine"), (8, "8-GPU node")):
                offered = gpus * m / report_s
                table.append(
                    {
                        "where": where,
                        "checkpoints": checkpoints,
                        "members_per_gpu": m,
                        "live_members": gpus * m,
                        "report_ms": row["report_ms"],
                        "results_per_s_offered": offered,
                        "driver_core_utilization": offered / driver_max,
                        "results_per_s": min(offered, driver_max),
                        "min_report_s_before_driver_saturates": gpus * m / driver_max,
                        "relay_cores": min(offered, driver_max) * relay_ms / 1e3,
                        "relay_uss_gb": gpus * m * relay_mb / 1024,
                        "driver_rss_mb_after_10k_trials": rss0 + 10_000 * kb_trial / 1e3,
                    }
                )
    return {
        "driver_ms_per_result": ms_result,
        "driver_max_results_per_s": driver_max,
        "plain_tune_ms_per_result": plain["per_result"].get(
            "driver_cpu_ms_per_result_steady", plain["per_result"]["driver_cpu_ms_per_result"]
        ),
        "driver_kb_per_trial": kb_trial,
        "relay_uss_mb": relay_mb,
        "relay_cpu_ms_per_result": relay_ms,
        "model": {
            "results_per_s": "offered = GPUs x members per GPU / report time (every member reports once "
            "per report of its pack; report time = scale.py's slot-server row at that many members, with "
            "or without a checkpoint every report); served = min(offered, 1000 / the driver's steady CPU "
            "ms per result), since Tune's driver loop runs in one thread (one core)",
            "min_report_s_before_driver_saturates": "live members / the driver's most results per s: a "
            "shorter report interval saturates the driver whatever the GPU's speed",
            "relay": "one relay process per live member: live members x its median USS; relay cores = "
            "results/s x the relays' CPU ms per result (their process start included)",
            "driver_rss": "the driver's RSS at the start of the memory sweep + 10,000 finished trials x "
            "the fitted bytes per trial",
            "8_gpu": "8 slot servers each with this machine's report time (a GPU's differs: scale "
            "report_ms by it; the driver and relay columns hold for any report time), one driver",
        },
        "rows": table,
    }


# ---------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=16, help="per-result sweep: members")
    parser.add_argument("--results", type=int, default=64, help="per-result sweep: results per member")
    parser.add_argument(
        "--trials",
        type=int,
        default=2000,
        help="memory sweep: one-result members (0: trace the results sweep)",
    )
    parser.add_argument("--slots", type=int, default=8, help="slot server's slots = plain Tune's concurrency")
    parser.add_argument("--frames", type=int, default=12, help="tracemalloc frames per allocation")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 members x 3 results, 2 slots, one traced sweep per side, both in one process",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--tune-loggers",
        action="store_true",
        help="keep Tune's default CSV/JSON/TensorBoard loggers (off by default, as in Tune's release tests)",
    )
    parser.add_argument("--one", nargs="+", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.members, args.results, args.trials, args.slots = 2, 3, 0, 2
    return args


def child(sides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Run ``sides`` in a fresh process; their JSON rows."""
    command = [sys.executable, __file__, "--one", *sides, "--members", str(args.members)]
    command += ["--results", str(args.results), "--trials", str(args.trials), "--slots", str(args.slots)]
    command += ["--frames", str(args.frames)]
    env = {**os.environ}
    if not args.tune_loggers:
        env["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    print(f"{' and '.join(sides)} ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"benchmarks/driver_scale.py: {sides} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every side in its own process, then the import measures; write and return the report."""
    from sweep import machine as sweep_machine  # benchmarks/ is on the path when run as a script

    args = parse(argv)
    if args.one:
        print(json.dumps(run_sides(args.one, args)))
        return {}
    load_start = os.getloadavg()
    if args.quick:  # one Ray for both sides: the smoke run's time is mostly starting things
        rows = child(args.sides, args)
    else:
        rows = {side: row for side in args.sides for row in child([side], args).values()}
    imports = [import_cost("tune_integration._relay")]
    if not args.quick:
        imports += [import_cost("tune_integration._relay", after="ray.tune"), import_cost("ray.tune")]
        imports.append(import_cost("ray"))
    scale = {
        checkpoints: json.loads(path.read_text())["slot_server"]
        for checkpoints, path in (
            (True, RESULTS / "scale-slot-server.json"),
            (False, RESULTS / "scale-slot-server-no-checkpoints.json"),
        )
        if path.exists()
    }
    report: dict[str, Any] = {
        "benchmark": "driver_scale",
        "machine": sweep_machine(),
        "command": ["benchmarks/driver_scale.py", *(argv if argv is not None else sys.argv[1:])],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "one"},
        "loadavg_start": load_start,
        "sides": rows,
        "imports": imports,
    }
    if set(rows) == set(SIDES):
        mb, plain = rows["modelbatch"], rows["tune"]
        report["added_ms_per_result"] = {
            key: mb["per_result"][key] - plain["per_result"][key]
            for key in ("driver_cpu_ms_per_result", "driver_cpu_ms_per_result_steady")
        }
        steady = mb["per_result"]["driver_cpu_ms_per_result_split_steady"]
        report["added_ms_per_result"]["timed_parts_steady"] = (
            sum(steady[p] for p in PARTS) + steady["mlflow_writer_thread"] + steady["sweep_heartbeat_thread"]
        )
        report["added_bytes_per_trial"] = (
            mb["memory"]["rss_bytes_per_trial_fit"] - plain["memory"]["rss_bytes_per_trial_fit"]
        )
        report["saturation"] = saturation(rows, scale)
    report["loadavg_end"] = os.getloadavg()
    name = f"driver_scale-cpu-{os.cpu_count()}core-{platform.machine()}{'-quick' if args.quick else ''}.json"
    out = args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(summary(report))
    print(f"results: {out}")
    return report


def summary(report: dict[str, Any]) -> str:
    """A few lines to read on the terminal."""
    lines = []
    for side, row in report["sides"].items():
        per, mem = row["per_result"], row["memory"]
        lines.append(
            f"{side:>10}: {per['driver_cpu_ms_per_result']:.2f} ms driver CPU per result "
            f"({per.get('driver_cpu_ms_per_result_steady', float('nan')):.2f} steady), "
            f"{per['results_per_s']:.0f} results/s; "
            f"{mem['rss_bytes_per_trial_fit'] / 1e3:.1f} KB RSS per trial over {mem['finished']} trials"
        )
        split = per.get("driver_cpu_ms_per_result_split_steady", per["driver_cpu_ms_per_result_split"])
        lines.append(
            "            steady split ms/result: " + ", ".join(f"{k} {v:.3f}" for k, v in split.items())
        )
    for imp in report["imports"]:
        after = f" after {imp['after']}" if imp["after"] else ""
        lines.append(
            f"import {imp['module']}{after}: {imp['import_ms']:.0f} ms, {imp['import_cpu_s']:.2f} CPU s, "
            f"peak RSS {imp['peak_rss_mb']:.0f} MB"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
