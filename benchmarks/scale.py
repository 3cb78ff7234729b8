"""How a slot server's cost grows with its members: one pack of N tiny MLPs, N = 1..256, on this machine.

Of issue 18's on-machine measurements this covers one: the members of one slot server. A server's
engine side (:class:`tune_integration._packs.Packs`, what a SlotServer actor runs in its worker
thread; no Ray here) hosts N members of one architecture (MLP 64-32-10, AdamW, batch 64, 4 steps
per report, float32, CPU) and trains them report after report. Per N: the median time of one
report of the pack (``Packs.train``: training, metrics, each member's result and, with
``--checkpoint-every 1``, its checkpoint bytes), that time per member, and the server's own part
outside training (``Packs.train`` minus the pack's ``train_report``: results and checkpoints).

The Tune driver's side (cost per result and memory per trial vs plain Tune, a relay's cost, when
it saturates) is measured by ``benchmarks/driver_scale.py``.

The JSON records ``os.getloadavg()`` before and after: figures from a loaded machine say little.

    python benchmarks/scale.py                  # N = 1, 4, 16, 64, 256
    python benchmarks/scale.py --quick          # N = 1 and 8, 3 reports
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import modelbatch as mb  # noqa: E402
from tune_integration._packs import Packs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def make_model(config: dict) -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def recipe() -> mb.Recipe:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1024, 64, generator=g), torch.randint(0, 10, (1024,), generator=g)
    return mb.Recipe(
        model=make_model,
        optimizer="adamw",
        loss=F.cross_entropy,
        train_data=(x, y),
        val_data=(x[:128], y[:128]),
        batch_size=64,
        steps_per_report=4,
        device="cpu",
    )


def measure(members: int, reports: int, checkpoint_every: int | None) -> dict:
    """One server's pack of ``members``: median seconds per report, in all and outside training."""
    packs = Packs(recipe(), slots=members, checkpoint_every=checkpoint_every)
    for i in range(members):
        pid = packs.join(f"m{i}", {"lr": 1e-3 * (1 + i % 7), "seed": i}, None)
    pack = packs.packs[pid]
    inner, train_report = [], pack.train_report

    def timed() -> dict:
        start = time.perf_counter()
        out = train_report()
        inner.append(time.perf_counter() - start)
        return out

    pack.train_report = timed
    where = {"server": 0, "node": "local", "tenant": "bench"}
    packs.train(pid, where)  # warm-up: first steps, allocations
    inner.clear()
    total = []
    for _ in range(reports):
        start = time.perf_counter()
        packs.train(pid, where)
        total.append(time.perf_counter() - start)
    report_s, training_s = statistics.median(total), statistics.median(inner)
    return {
        "members": members,
        "report_ms": 1e3 * report_s,
        "report_ms_per_member": 1e3 * report_s / members,
        "outside_training_ms": 1e3 * (report_s - training_s),
        "backend": pack.batch.backend_choice["training"],
        "reports_timed": reports,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--reports", type=int, default=10)
    parser.add_argument(
        "--checkpoint-every", type=int, default=1, help="reports between checkpoints; 0: none"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="N = 1 and 8, 3 reports")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.members, args.reports = [1, 8], 3
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    rows = []
    for n in args.members:
        rows.append(measure(n, args.reports, args.checkpoint_every or None))
        row = rows[-1]
        print(
            f"{n:4d} members: {row['report_ms']:8.2f} ms per report, "
            f"{row['report_ms_per_member']:6.3f} ms per member, "
            f"{row['outside_training_ms']:6.2f} ms outside training ({row['backend']})",
            flush=True,
        )
    report = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "torch": torch.__version__,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "command": ["benchmarks/scale.py", *(argv if argv is not None else sys.argv[1:])],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "slot_server": rows,
    }
    out = args.out or RESULTS / f"scale-slot-server{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
