"""A sweep three ways: plain Tune (one trial per config) vs ModelBatchSearcher vs mb.fit without Ray.

The search space, configs and epochs are those of the main job (``examples/sweep.py``: MLPs on
scikit-learn's digits, AdamW, batch 64, one report per epoch). For each number of configs, the
same configs (a fixed list fed by one Tune ``Searcher``; ModelBatchSearcher may take them out of
order to group architectures, drawing ``4 * slots`` ahead as when it samples the space) are trained by:

- ``tune``: plain ``tune.run`` of a function trainable that trains one config with plain torch
  (its own seeded shuffling DataLoader and ``torch.optim.AdamW``); ``--trial-cpus`` CPUs per trial
  (default 0.5: 4 trials at once on 2 CPUs, as users do with fractional GPUs), ASHA, ``reuse_actors``.
- ``modelbatch``: ``tune.run`` with ``ModelBatchSearcher`` (same ASHA, ``reuse_actors``).
- ``fit``: ``mb.fit`` of every config for every epoch (no early stopping, no Ray).

Each (side, configs) runs in a fresh process, ``--repeat`` times with the sides interleaved; a row
holds the run with the median wall time of each side (every run's wall time in ``<side>_wall_s_runs``),
since repeated runs on a shared machine vary by up to 1.5x. Reported: wall time (from the start of
the sweep to its end, after ``ray.init``; ``ray_init_s`` apart), configs/hour, peak memory of the run's
process tree (the sum of its processes' proportional set sizes, ``Pss`` in
``/proc/<pid>/smaps_rollup``, sampled every 0.5 s: Ray's processes are children of the run's),
the best validation loss/accuracy, the trained epochs, and where the CPU went: CPU seconds of the
process tree during the sweep by role (driver, Tune trial processes, slot servers, the packing
service, the rest of Ray).

    python benchmarks/sweep.py                        # 16, 64, 256 configs x 3 sides (~6 min on 2 idle CPUs)
    python benchmarks/sweep.py --configs 64 --sides tune modelbatch
    python benchmarks/sweep.py --quick                # 8 configs, 3 epochs
    python benchmarks/sweep.py --repeat 3             # each side 3 times, median (~18 min)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load_example() -> Any:
    """examples/sweep.py as a module (the search space, data and recipe of the main job)."""
    spec = importlib.util.spec_from_file_location("modelbatch_sweep_example", ROOT / "examples" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def sample_configs(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` configs of the example's search space, drawn once with a seeded sampler."""
    from tune_integration._sampler import SpaceSampler

    sampler = SpaceSampler(seed)
    sampler.set_search_properties(None, None, load_example().search_space())
    return sampler.samples(n)


# ---------------------------------------------------------------------- memory of a process tree
def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _name_and_cpu_s(pid: int) -> tuple[str, float] | None:
    """The process's name (``ray::SlotServer``, ``raylet``, ...) and its user + system CPU seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
    return name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


CPU_ROLES = ("driver", "trials", "slot_servers", "service", "ray_system")
"""Who spends the CPU: the ``tune.run`` process, the Tune trial processes (plain trainables or member
relays), the slot servers, the packing service's scheduler, and everything else of Ray (raylet, GCS,
idle workers...)."""


def _role(pid: int, name: str) -> str:
    if pid == os.getpid():
        return "driver"
    for prefix, role in (("ray::ImplicitFu", "trials"), ("ray::SlotServer", "slot_servers")):
        if name.startswith(prefix):
            return role
    return "service" if name.startswith("ray::Service") else "ray_system"


class TreeUsage:
    """Peak of the summed Pss of this process and all its descendants (Linux), sampled in a thread.

    Also the CPU seconds the tree spends while it runs, by role (:data:`CPU_ROLES`): each process's
    CPU time at its last sample, less what it had spent when first seen at the start.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.peak_kb, self.interval = 0, interval
        self.available = os.path.exists(f"/proc/{os.getpid()}/smaps_rollup")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._cpu: dict[int, tuple[str, float, float]] = {}  # pid -> (role, cpu at start, last cpu)
        self._first = True

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds spent since the start, by role."""
        out = dict.fromkeys(CPU_ROLES, 0.0)
        for role, start, last in self._cpu.values():
            out[role] += last - start
        return out

    def _sample_cpu(self, pid: int) -> None:
        seen = _name_and_cpu_s(pid)
        if seen is None:
            return
        name, cpu = seen
        role, start, _ = self._cpu.get(pid, ("ray_system", cpu if self._first else 0.0, 0.0))
        # A Ray worker is "ray::IDLE" until it runs an actor: its role is the last specific one seen.
        now = _role(pid, name)
        self._cpu[pid] = (role if now == "ray_system" else now, start, cpu)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)
        self._sample()

    def _sample(self) -> None:
        pids, total = [os.getpid()], 0
        while pids:
            pid = pids.pop()
            total += _pss_kb(pid)
            self._sample_cpu(pid)
            pids.extend(_children(pid))
        self._first = False
        self.peak_kb = max(self.peak_kb, total)

    def __enter__(self) -> TreeUsage:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()


# ---------------------------------------------------------------------- the three sides
def fixed_searcher(configs: list[dict[str, Any]]) -> Any:
    """A Tune Searcher suggesting ``configs`` in order, then FINISHED (same configs for every side)."""
    from ray.tune.search import Searcher

    class FixedConfigs(Searcher):
        def __init__(self) -> None:
            super().__init__()
            self.next = 0

        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            if self.next >= len(configs):
                return Searcher.FINISHED
            self.next += 1
            return dict(configs[self.next - 1])

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            pass

    return FixedConfigs()


def plain_trainable(config: dict[str, Any]) -> None:
    """One config trained alone with plain torch, as a user would write it for Tune."""
    import torch
    import torch.nn.functional as F
    from ray import tune
    from torch.utils.data import DataLoader, TensorDataset

    example = load_example()
    torch.set_num_threads(1)
    (x, y), (xv, yv) = example.digits()
    torch.manual_seed(config["seed"])
    model = example.make_model(config)
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=example.BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(config["seed"]),
    )
    while True:
        model.train()
        total, count = 0.0, 0
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count = total + float(loss), count + 1
        model.eval()
        with torch.no_grad():
            logits = model(xv)
            val_loss = float(F.cross_entropy(logits, yv))
            val_acc = float((logits.argmax(-1) == yv).float().mean())
        tune.report({"loss": total / count, "val_loss": val_loss, "val_acc": val_acc})


def run_tune_side(side: str, configs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    example = load_example()
    start = time.perf_counter()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    row: dict[str, Any] = {"ray_init_s": time.perf_counter() - start}
    inner = fixed_searcher(configs)
    if side == "modelbatch":
        from tune_integration import ModelBatchSearcher

        searcher = ModelBatchSearcher(
            example.make_recipe(device="cpu"),
            searcher=inner,
            slots_per_gpu=args.slots,
            checkpoint_every=args.checkpoint_every,
            group_ahead=4 * args.slots,  # what it draws ahead when sampling the space (not adaptive)
        )
        trainable, search_alg = searcher.trainable(), searcher
    else:
        trainable, search_alg = tune.with_resources(plain_trainable, {"cpu": args.trial_cpus}), inner
    with TreeUsage() as memory:
        start = time.perf_counter()
        analysis = tune.run(
            trainable,
            config={},
            num_samples=len(configs),
            search_alg=search_alg,
            scheduler=ASHAScheduler(max_t=args.epochs, grace_period=2, reduction_factor=3),
            metric="val_loss",
            mode="min",
            stop={"training_iteration": args.epochs},
            reuse_actors=True,
            storage_path=args.storage,
            name=f"{side}-{len(configs)}",
            verbose=0,
        )
        row["wall_s"] = time.perf_counter() - start
    if side == "modelbatch":
        row["server_stats"] = searcher.server_stats()
    ray.shutdown()
    trials = analysis.trials
    row["peak_mb"] = memory.peak_kb / 1024 if memory.available else None
    row["cpu_s"] = memory.cpu_s() if memory.available else None
    row["epochs_trained"] = sum(t.last_result.get("training_iteration", 0) for t in trials)
    row["errored"] = sum(t.status == "ERROR" for t in trials)
    frames = [f for f in analysis.trial_dataframes.values() if not f.empty]
    best = min(frames, key=lambda f: f["val_loss"].min())
    row["best_val_loss"] = float(best["val_loss"].min())
    row["best_val_acc"] = float(best.loc[best["val_loss"].idxmin(), "val_acc"])
    return row


def run_fit_side(configs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    import modelbatch as mb

    example = load_example()
    with TreeUsage() as memory:
        start = time.perf_counter()
        history = mb.fit(example.make_recipe(device="cpu"), configs, reports=args.epochs, progress=False)
        wall = time.perf_counter() - start
    best = history.loc[history["val_loss"].idxmin()]
    return {
        "wall_s": wall,
        "peak_mb": memory.peak_kb / 1024 if memory.available else None,
        "cpu_s": memory.cpu_s() if memory.available else None,
        "epochs_trained": int(history.groupby("member")["training_iteration"].max().sum()),
        "errored": int(history.groupby("member")["status"].last().str.startswith("errored").sum()),
        "best_val_loss": float(best["val_loss"]),
        "best_val_acc": float(best["val_acc"]),
    }


def run_one(args: argparse.Namespace) -> None:
    """The child process: one side at one size; prints its row as JSON on the last line."""
    configs = sample_configs(args.one_configs, args.seed)
    row = run_fit_side(configs, args) if args.one == "fit" else run_tune_side(args.one, configs, args)
    row["configs_per_hour"] = len(configs) / row["wall_s"] * 3600
    print(json.dumps(row, default=str))


# ---------------------------------------------------------------------- driver
def cpu_auto_slots() -> int:
    """``slots_per_gpu="auto"`` on a CPU server for a model far smaller than memory: its core-based cap."""
    from tune_integration._packs import AUTO_MAX_SLOTS, AUTO_SLOTS_PER_CPU

    return min(AUTO_MAX_SLOTS["cpu"], AUTO_SLOTS_PER_CPU * (os.cpu_count() or 1))


def machine() -> dict[str, Any]:
    import ray
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument(
        "--sides", nargs="+", choices=["tune", "modelbatch", "fit"], default=["tune", "modelbatch", "fit"]
    )
    parser.add_argument("--epochs", type=int, default=10, help="most epochs per config (ASHA max_t)")
    parser.add_argument("--trial-cpus", type=float, default=0.5, help="CPUs per plain Tune trial")
    parser.add_argument(
        "--slots",
        type=int,
        default=cpu_auto_slots(),
        help="ModelBatchSearcher slots_per_gpu (default: what 'auto' picks for a tiny model on this CPU)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=lambda v: None if v == "none" else int(v),
        default=1,
        help="ModelBatchSearcher checkpoint_every (default 1, its default; 'none': no checkpoints)",
    )
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each side per size (sides interleaved; median kept)"
    )
    parser.add_argument("--quick", action="store_true", help="8 configs, 3 epochs")
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default benchmarks/results/...)"
    )
    parser.add_argument("--one", choices=["tune", "modelbatch", "fit"], help=argparse.SUPPRESS)
    parser.add_argument("--one-configs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--storage", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return
    if args.quick:
        args.configs, args.epochs = [8], 3
    rows = []
    for n in args.configs:
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in args.sides}
        for _ in range(args.repeat):
            for side in args.sides:
                runs[side].append(run_side(side, n, args))
        row: dict[str, Any] = {"configs": n}
        for side, results in runs.items():
            median = sorted(results, key=lambda r: r["wall_s"])[(len(results) - 1) // 2]
            row.update({f"{side}_{k}": v for k, v in median.items()})
            row[f"{side}_wall_s_runs"] = [r["wall_s"] for r in results]
        if "tune_wall_s" in row and "modelbatch_wall_s" in row:
            row["speedup_modelbatch_vs_tune"] = row["tune_wall_s"] / row["modelbatch_wall_s"]
        rows.append(row)
    name = f"sweep-cpu-{os.cpu_count()}core-{platform.machine()}{'-quick' if args.quick else ''}.json"
    out = args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("one", "one_configs", "storage", "out")}
    report = {"machine": machine(), "config": config, "command": " ".join(sys.argv), "rows": rows}
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(table(rows))
    print(cpu_table(rows))
    print(f"results: {out}")


def run_side(side: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One side at ``n`` configs in a fresh process (its own Ray and Tune storage); its result row."""
    with tempfile.TemporaryDirectory() as storage:
        command = [sys.executable, __file__, "--one", side, "--one-configs", str(n), "--storage", storage]
        command += ["--epochs", str(args.epochs), "--trial-cpus", str(args.trial_cpus)]
        command += ["--slots", str(args.slots), "--seed", str(args.seed)]
        command += ["--checkpoint-every", str(args.checkpoint_every).lower()]
        command += ["--cpus", str(args.cpus)] if args.cpus else []
        print(f"{n} configs, {side} ...", flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmarks/sweep.py: {side} at {n} configs failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {result['wall_s']:.1f} s, best val_loss {result['best_val_loss']:.4f}", flush=True)
    return result


def table(rows: list[dict[str, Any]]) -> str:
    header = ["configs", "side", "wall s", "configs/hour", "peak MB", "epochs trained", "best val_loss"]
    lines = ["| " + " | ".join([*header, "best val_acc"]) + " |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        for side in ("tune", "modelbatch", "fit"):
            if f"{side}_wall_s" not in row:
                continue
            peak = row[f"{side}_peak_mb"]
            cells = [
                row["configs"],
                side,
                wall_cell(row, side),
                f"{row[f'{side}_configs_per_hour']:.0f}",
                "n/a" if peak is None else f"{peak:.0f}",
                row[f"{side}_epochs_trained"],
                f"{row[f'{side}_best_val_loss']:.4f}",
                f"{row[f'{side}_best_val_acc']:.4f}",
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        speedup = row.get("speedup_modelbatch_vs_tune")
        if speedup is not None and math.isfinite(speedup):
            lines.append(f"| {row['configs']} | **modelbatch vs tune** | **{speedup:.2f}x** | | | | | |")
    return "\n".join(lines)


def wall_cell(row: dict[str, Any], side: str) -> str:
    """The median wall time, and every run's in brackets when there were several."""
    runs = row.get(f"{side}_wall_s_runs", [])
    cell = f"{row[f'{side}_wall_s']:.1f}"
    return cell + (f" ({' / '.join(f'{w:.1f}' for w in runs)})" if len(runs) > 1 else "")


def cpu_table(rows: list[dict[str, Any]]) -> str:
    """Where the CPU went: seconds by role (:data:`CPU_ROLES`) per side, with the side's wall time."""
    lines = [
        "| configs | side | " + " | ".join(f"{r} CPU s" for r in CPU_ROLES) + " | total CPU s | wall s |",
        "|---:|---|" + "---:|" * (len(CPU_ROLES) + 2),
    ]
    for row in rows:
        for side in ("tune", "modelbatch", "fit"):
            cpu = row.get(f"{side}_cpu_s")
            if not cpu:
                continue
            cells = [f"{cpu[r]:.1f}" for r in CPU_ROLES]
            total = f"{sum(cpu.values()):.1f}"
            lines.append(
                f"| {row['configs']} | {side} | {' | '.join(cells)} | {total} | {row[f'{side}_wall_s']:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
