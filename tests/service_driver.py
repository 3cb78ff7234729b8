"""A sweep driver for the packing-service tests, run as its own process (one Ray job per driver).

``python service_driver.py ADDRESS OUT TENANT [--samples N] [--reports N] [--slots N] [--weight W]
[--priority P] [--time-budget S] [--linger S] [--after TENANT:N] [--barrier DIR:N]``: connects to
the cluster at ADDRESS, runs a sweep of the tests' recipe as TENANT and writes every trial's results to OUT
(JSON). ``--linger`` keeps the process (and its searcher) alive that long after Tune returns, as a
notebook would; ``--after`` starts the sweep once TENANT has N members training in the service;
``--barrier`` once N drivers (this one included) got there (files in DIR).
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
from tune_recipes import recipe

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
    args = parser.parse_args()
    ray.init(address=args.address, log_to_driver=False)
    if args.after is not None:
        wait_for_live(*args.after.split(":"))
    if args.barrier is not None:
        folder, drivers = args.barrier.rsplit(":", 1)
        (Path(folder) / args.tenant).touch()
        while len(list(Path(folder).iterdir())) < int(drivers):
            time.sleep(0.1)
    searcher = ModelBatchSearcher(
        recipe(),
        slots_per_gpu=args.slots,
        reports=args.reports,
        tenant=args.tenant,
        weight=args.weight,
        priority=args.priority,
        random_state=sum(map(ord, args.tenant)),
    )
    space = {"lr": tune.loguniform(1e-3, 3e-2), "seed": tune.randint(0, 10_000)}
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
    )
    frames = analysis.trial_dataframes
    rows = {
        t.trial_id: {"config": t.config, "status": t.status, "results": frames[t.trial_id].to_dict("list")}
        for t in analysis.trials
        if t.trial_id in frames
    }
    args.out.write_text(json.dumps(rows, default=str))
    print("DONE", flush=True)
    time.sleep(args.linger)


def wait_for_live(tenant: str, members: str) -> None:
    service = ray.get_actor("service", namespace="modelbatch")
    while ray.get(service.status.remote())["tenants"].get(tenant, {}).get("live", 0) < int(members):
        time.sleep(0.2)


if __name__ == "__main__":
    main()
