"""A sweep driver for the packing-service tests, run as its own process (one Ray job per driver).

``python service_driver.py ADDRESS OUT TENANT [options]``: connects to the cluster at ADDRESS, runs a
sweep of the tests' recipe as TENANT and writes every trial's config, status, error and results to
OUT (JSON). Options: ``--samples``, ``--reports``, ``--slots``, ``--weight``, ``--priority``,
``--time-budget`` as in the searcher and Tune; ``--linger S`` keeps the process (and its searcher)
alive that long after Tune returns, as a notebook would; ``--after TENANT:N`` starts the sweep once
TENANT has N members training in the service; ``--barrier DIR:N`` once N drivers (this one
included) got there (files in DIR); ``--nan`` makes half the members diverge (``scale`` nan);
``--loss-fails-after N`` gives the recipe a loss that raises at its N+1-th call in a process (a
recipe that breaks mid-sweep); ``--until PATH`` stops every trial at its first result after PATH
exists; ``--stop-all-after N`` ends the whole experiment (a ``tune.Stopper``) at its N-th result;
``--fail-fast`` ends it at the first trial error (``fail_fast=True``); ``--progress PATH`` appends
each result's trial, iteration, pack and error to PATH as it reaches Tune (a JSON line each).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import ray
from ray import tune
from tune_recipes import FailingLoss, recipe

from tune_integration import ModelBatchSearcher


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("out", type=Path)
    parser.add_argument("tenant")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--reports", type=int, default=3)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--priority", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=None)
    parser.add_argument("--linger", type=float, default=0.0)
    parser.add_argument("--after", default=None)
    parser.add_argument("--barrier", default=None)
    parser.add_argument("--nan", action="store_true")
    parser.add_argument("--loss-fails-after", type=int, default=None)
    parser.add_argument("--until", type=Path, default=None)
    parser.add_argument("--stop-all-after", type=int, default=None)
    parser.add_argument("--fail-fast", action="store_true")
    parser.add_argument("--progress", type=Path, default=None)
    args = parser.parse_args()
    ray.init(address=args.address, log_to_driver=False)
    if args.after is not None:
        wait_for_live(*args.after.split(":"))
    if args.barrier is not None:
        folder, drivers = args.barrier.rsplit(":", 1)
        (Path(folder) / args.tenant).touch()
        while len(list(Path(folder).iterdir())) < int(drivers):
            time.sleep(0.1)
    rec = recipe() if args.loss_fails_after is None else recipe(loss=FailingLoss(args.loss_fails_after))
    searcher = ModelBatchSearcher(
        rec,
        slots_per_gpu=args.slots,
        reports=args.reports,
        tenant=args.tenant,
        weight=args.weight,
        priority=args.priority,
        random_state=sum(map(ord, args.tenant)),
    )
    space = {"lr": tune.loguniform(1e-3, 3e-2), "seed": tune.randint(0, 10_000)}
    if args.nan:
        space["scale"] = tune.grid_search([1.0, float("nan")])
    analysis = tune.run(
        searcher.trainable(),
        config=space,
        num_samples=args.samples,
        search_alg=searcher,
        metric="val_loss",
        mode="min",
        storage_path=str(args.out.parent / f"tune-{args.tenant}"),
        verbose=0,
        reuse_actors=True,
        time_budget_s=args.time_budget,
        raise_on_failed_trial=False,
        stop=stopper(args),
        fail_fast=args.fail_fast,
        callbacks=[ProgressLog(args.progress)] if args.progress is not None else None,
    )
    frames = analysis.trial_dataframes
    rows = {
        t.trial_id: {
            "config": t.config,
            "status": t.status,
            "error": t.get_error() and str(t.get_error()),
            "results": frames[t.trial_id].to_dict("list") if t.trial_id in frames else {},
        }
        for t in analysis.trials
    }
    args.out.write_text(json.dumps(rows, default=str))
    print("DONE", flush=True)
    time.sleep(args.linger)


class ProgressLog(tune.Callback):
    """Appends each result as it reaches Tune to a file (a JSON line), for the test to wait on."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        keys = ("training_iteration", "pack_id", "tenant", "error")
        line = {"trial_id": trial.trial_id, **{k: result.get(k) for k in keys}}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


class StopAllAfter(tune.Stopper):
    """Ends the experiment at its ``results``-th result."""

    def __init__(self, results: int) -> None:
        self.results, self.seen = results, 0

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.seen += 1
        return False

    def stop_all(self) -> bool:
        return self.seen >= self.results


def stopper(args: argparse.Namespace):
    if args.until is not None:
        return lambda trial_id, result: args.until.exists()
    if args.stop_all_after is not None:
        return StopAllAfter(args.stop_all_after)
    return None


def wait_for_live(tenant: str, members: str) -> None:
    """Until TENANT has N members training in the service (which the first sweep starts)."""
    while True:
        try:
            status = ray.get(ray.get_actor("service", namespace="modelbatch").status.remote())
        except ValueError:  # no service yet
            status = {"tenants": {}}
        if status["tenants"].get(tenant, {}).get("live", 0) >= int(members):
            return
        time.sleep(0.2)


if __name__ == "__main__":
    main()
