"""Time per exploit of population-based training: ModelBatchSearcher vs plain Tune.

Two measurements, written to ``benchmarks/results/pbt-<machine>.json`` with the machine's load:

- ``restore``: what a slot server does for one exploit, without Ray: put the donor's
  checkpointed state into the recipient's slot with the new lr, from the checkpoint's bytes
  (``torch.load`` + copy into the pack: what a restart from a checkpoint file costs) and from the
  donor's snapshot on the device (what ModelBatchSearcher does within a server under PBT), for a
  small and a larger MLP; median of ``--repeats``.
- ``tune``: the same PBT sweep (``--members`` MLPs, lr mutated every ``--interval`` reports,
  ``--iterations`` reports) under ``tune.run`` with ``search_alg=ModelBatchSearcher`` and with a
  plain function trainable that trains its member alone and checkpoints every report. Time per
  exploit: from PBT's exploit decision to the exploited trial's next result in the driver (pause,
  restart of the trial, restore, one report of training); plus the sweep's wall time. The searcher
  runs with ``park_after_s=1`` (a member Tune paused stops holding its pack back after 1 s).

    python benchmarks/pbt.py                    # both (~3 min on 2 CPUs)
    python benchmarks/pbt.py --only restore     # no Ray
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import modelbatch as mb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def make_model(cfg: dict) -> nn.Module:
    width, depth = cfg.get("width", 32), cfg.get("depth", 1)
    layers: list[nn.Module] = [nn.Linear(16, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 4))


def recipe(device: str) -> mb.Recipe:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 16, generator=g)
    Y = (X[:, 0] > 0).long() + 2 * (X[:, 1] > 0).long()
    return mb.Recipe(
        model=make_model,
        optimizer="adamw",
        loss=F.cross_entropy,
        train_data=(X, Y),
        val_data=(X[:128], Y[:128]),
        batch_size=32,
        steps_per_report=8,
        device=device,
    )


# ---------------------------------------------------------------------- restore
def bench_restore(args: argparse.Namespace) -> list[dict[str, Any]]:
    from tune_integration._packs import Packs

    rows = []
    for width, depth in ((32, 1), (1024, 4)):
        config = {"lr": 0.01, "width": width, "depth": depth}
        packs = Packs(recipe(args.device), args.members, snapshot_every=1)
        pid = 0
        for m in range(args.members):
            pid = packs.join(f"m{m}", {**config, "seed": m}, None)
        blob = packs.train(pid, {})["m0"]["checkpoint"]
        params = sum(p.numel() for p in make_model(config).parameters())
        row: dict[str, Any] = {
            "width": width,
            "depth": depth,
            "params": params,
            "blob_bytes": len(blob),
        }
        for side in ("device", "bytes"):
            if side == "bytes":
                packs.snapshots.clear()
            times = []
            for _ in range(args.repeats):
                _sync(args.device)
                start = time.perf_counter()
                packs.join("m1", {**config, "lr": 0.02}, blob)  # m1 exploits m0's checkpoint
                _sync(args.device)
                times.append(time.perf_counter() - start)
            row[f"{side}_ms"] = 1e3 * statistics.median(times)
        rows.append(row)
    return rows


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------- tune
def plain_member(config: dict) -> None:
    """A plain Tune trainable: the member alone, a checkpoint per report, the new lr after a restore."""
    from ray import tune

    trainer = mb.PackTrainer(recipe("cpu"), 1, example_config=config)
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        trainer.add("m", config)
    else:
        with checkpoint.as_directory() as directory:
            state = torch.load(os.path.join(directory, "m.pt"), weights_only=False)
        trainer.restore_member(state)
        trainer.optimizer.set_hparam("lr", config["lr"], member=0)
    while True:
        result = trainer.train_report()["m"]
        buffer = io.BytesIO()
        torch.save(trainer.member_state_dict("m"), buffer)
        with tempfile.TemporaryDirectory() as directory:
            with open(os.path.join(directory, "m.pt"), "wb") as f:
                f.write(buffer.getvalue())
            tune.report(
                {k: v for k, v in result.items() if k != "training_iteration"},
                checkpoint=tune.Checkpoint.from_directory(directory),
            )


def bench_tune(args: argparse.Namespace) -> list[dict[str, Any]]:
    import ray
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    from tune_integration import ModelBatchSearcher

    class TimedPBT(PopulationBasedTraining):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.exploited: dict[str, list[float]] = {}

        def _exploit(self, tune_controller: Any, trial: Any, trial_to_clone: Any) -> None:
            super()._exploit(tune_controller, trial, trial_to_clone)
            self.exploited.setdefault(trial.trial_id, []).append([time.monotonic(), False])

    class NextResult(tune.Callback):
        def __init__(self, scheduler: TimedPBT) -> None:
            self.scheduler, self.waits = scheduler, []

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            pending = self.scheduler.exploited.get(trial.trial_id)
            if pending and not pending[0][1]:  # the result PBT exploited on (callbacks come after it)
                pending[0][1] = True
            elif pending:
                self.waits.append(time.monotonic() - pending.pop(0)[0])

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for side in ("modelbatch", "plain"):
            scheduler = TimedPBT(
                time_attr="training_iteration",
                perturbation_interval=args.interval,
                hyperparam_mutations={"lr": tune.loguniform(1e-4, 0.1)},
                quantile_fraction=0.25,
            )
            timing = NextResult(scheduler)
            searcher = None
            if side != "plain":  # a paused member's slot is parked after 1 s (default 30 s)
                searcher = ModelBatchSearcher(recipe("cpu"), slots_per_gpu=args.members, park_after_s=1.0)
            load = os.getloadavg()[0]
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as storage:
                tune.run(
                    searcher.trainable() if searcher else plain_member,
                    config={"lr": tune.loguniform(1e-4, 0.1), "seed": tune.randint(0, 10_000)},
                    num_samples=args.members,
                    search_alg=searcher,
                    scheduler=scheduler,
                    metric="val_loss",
                    mode="min",
                    stop={"training_iteration": args.iterations},
                    reuse_actors=True,
                    storage_path=storage,
                    callbacks=[timing],
                    verbose=0,
                )
            stats = searcher.server_stats()[0] if searcher else {}
            rows.append(
                {
                    "side": side,
                    "wall_s": time.perf_counter() - start,
                    "exploits": len(timing.waits),
                    "s_per_exploit_median": statistics.median(timing.waits) if timing.waits else None,
                    "s_per_exploit_mean": statistics.mean(timing.waits) if timing.waits else None,
                    "device_restores": stats.get("device_restores"),
                    "loadavg_1min_before": load,
                    "loadavg_1min_after": os.getloadavg()[0],
                }
            )
    finally:
        ray.shutdown()
    return rows


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_1_5_15": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("restore", "tune"))
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out: dict[str, Any] = {"machine": machine(), "config": {k: str(v) for k, v in vars(args).items()}}
    if args.only in (None, "restore"):
        out["restore"] = bench_restore(args)
        print(json.dumps(out["restore"], indent=1))
    if args.only in (None, "tune"):
        out["tune"] = bench_tune(args)
        print(json.dumps(out["tune"], indent=1))
    name = f"pbt-{args.device.split(':')[0]}-{os.cpu_count()}core-{platform.machine()}.json"
    path = args.out or RESULTS / name
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
