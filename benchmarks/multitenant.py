"""Two users' sweeps on one Ray cluster: at the same time through the packing service vs one after the other.

Each sweep is the main job (``examples/sweep.py``: its search space, ASHA, MLflow, ``--num-samples``
configs each, default 32) run as its own driver process connected to one cluster
(``ray.cluster_utils.Cluster``: one node with ``--cpus`` CPUs and ``--gpus`` fake GPUs). Sides:

- ``sequential``: sweep A, then sweep B (what a cluster serving one sweep at a time gives);
- ``concurrent``: A and B started together, both tenants of the one packing service.

Reported per side: the makespan (first start to last end) and each sweep's own wall time (from its
driver's start to its exit, Ray connection and imports included), in a JSON under
``benchmarks/results/`` and a table.

    python benchmarks/multitenant.py                  # 32 configs x 2 sweeps, both sides (~6 min on 2 CPUs)
    python benchmarks/multitenant.py --configs 8 --epochs 3 --no-save   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TENANTS = ("alice", "bob")


def start_sweep(address: str, tenant: str, out: Path, args: argparse.Namespace) -> subprocess.Popen:
    command = [
        sys.executable,
        str(ROOT / "examples" / "sweep.py"),
        "--address",
        address,
        "--num-samples",
        str(args.configs),
        "--epochs",
        str(args.epochs),
        "--out",
        str(out / tenant),
        "--name",
        tenant,
        "--seed",
        str(TENANTS.index(tenant)),
        "--tracking-uri",
        f"sqlite:///{out / tenant}-mlflow.db",
    ]
    env = {**os.environ, "USER": tenant, "PYTHONUNBUFFERED": "1"}
    log = open(out / f"{tenant}.log", "w")  # noqa: SIM115 - closed by the caller through the process
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=out)


def wait(process: subprocess.Popen, tenant: str, out: Path) -> None:
    if process.wait() != 0:
        raise RuntimeError(
            f"multitenant: sweep {tenant} failed:\n{(out / f'{tenant}.log').read_text()[-3000:]}"
        )


def run_side(side: str, address: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"multitenant-{side}-") as directory:
        out = Path(directory)
        start = time.monotonic()
        walls = {}
        if side == "sequential":
            for tenant in TENANTS:
                began = time.monotonic()
                wait(start_sweep(address, tenant, out, args), tenant, out)
                walls[tenant] = time.monotonic() - began
        else:
            processes = {t: (start_sweep(address, t, out, args), time.monotonic()) for t in TENANTS}
            for tenant, (process, began) in processes.items():
                wait(process, tenant, out)
                walls[tenant] = time.monotonic() - began
        makespan = time.monotonic() - start
    return {
        "side": side,
        "makespan_s": round(makespan, 1),
        **{f"{t}_wall_s": round(w, 1) for t, w in walls.items()},
    }


def machine() -> dict[str, Any]:
    import ray
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| side | makespan | alice | bob |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['side']} | {r['makespan_s']} s | {r['alice_wall_s']} s | {r['bob_wall_s']} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=32, help="configs per sweep")
    parser.add_argument("--epochs", type=int, default=20, help="ASHA max_t of each sweep")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=0, help="fake GPUs of the node (torch stays on the CPU)")
    parser.add_argument("--sides", nargs="+", default=["sequential", "concurrent"])
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus, "num_gpus": args.gpus})
    try:
        rows = [run_side(side, cluster.address, args) for side in args.sides]
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(table(rows))
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = f"multitenant-cpu-{args.cpus}core-{platform.machine()}.json"
        config = {k: v for k, v in vars(args).items() if k != "no_save"}
        (RESULTS / name).write_text(
            json.dumps({"machine": machine(), "config": config, "rows": rows}, indent=2)
        )
        print(f"written: benchmarks/results/{name}")


if __name__ == "__main__":
    main()
