"""Driver time per member result: tune_integration.MLflowCallback vs Ray's MLflowLoggerCallback, same sweep.

First, without Ray: the caller's time per report of the engine's ``MLflowLogger`` (``log_member``
of 16 members x 125 reports, 6 values each, the writer thread flushing every 50 ms meanwhile), then
every point counted in the store. Then one Tune sweep (function trainables, FIFO so every run has
the same results) per callback, timing what the Tune driver spends inside the callback's hooks
(``time.perf_counter`` around each hook). The final flush at the end of the sweep
(``on_experiment_end``) is reported separately and also spread over all results. Every point is
then counted in the store.

    python benchmarks/mlflow_logging.py                  # sqlite store (MLflow 3's default kind)
    python benchmarks/mlflow_logging.py --store server   # a local `mlflow server` on 127.0.0.1
    python benchmarks/mlflow_logging.py --logger-only    # only MLflowLogger's time per report (no Ray)
    python benchmarks/mlflow_logging.py --quick          # 4 members x 10 reports; 4 trials x 3 results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import ray
from mlflow import MlflowClient
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from modelbatch._mlflow import MLflowLogger  # noqa: E402
from tune_integration.mlflow import MLflowCallback  # noqa: E402

HOOKS = (
    "setup",
    "on_trial_start",
    "on_trial_result",
    "on_trial_complete",
    "on_trial_error",
    "on_experiment_end",
)


def member(config):
    for i in range(1, config["iterations"] + 1):
        tune.report({f"m{j}": (j + 1) / (i + config["i"]) for j in range(config["metrics"])})


def timed(callback):
    """Wrap the callback's hooks (instance attributes win over the class's)."""
    times = {h: [] for h in HOOKS}
    for hook in HOOKS:
        original = getattr(callback, hook)

        def wrapper(*args, _original=original, _hook=hook, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                times[_hook].append(time.perf_counter() - start)

        setattr(callback, hook, wrapper)
    return callback, times


def logger_cost(uri: str, members: int, reports: int) -> dict:
    """The caller's time per ``MLflowLogger.log_member`` while the writer thread flushes every 50 ms."""
    logger = MLflowLogger(uri, "bench-logger", flush_interval=0.05)
    logger.start()
    for m in range(members):
        logger.start_member(m, {"lr": 0.1 * m})
    report = {"loss": 0.5, "val_loss": 0.6, "val_acc": 0.9, "time_total_s": 3.0, "slot": 3, "step": 7}
    start = time.perf_counter()
    for it in range(1, reports + 1):
        for m in range(members):
            logger.log_member(m, report, step=it)
    per_report = (time.perf_counter() - start) / (members * reports)
    start = time.perf_counter()
    logger.close()
    close_s = time.perf_counter() - start
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench-logger")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    points = sum(len(client.get_metric_history(r.info.run_id, k)) for r in runs for k in report)
    return {
        "members": members,
        "reports": reports,
        "us_per_report": 1e6 * per_report,
        "close_ms": 1e3 * close_s,
        "points_in_store": points,
        "points_expected": members * reports * len(report),
    }


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root}/db.sqlite",
        "--default-artifact-root",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(  # without MLflow 3's job runner (eight processes tracking never uses)
        cmd,
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1):
                return proc, uri
        except OSError:
            time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("mlflow server did not start")


def run_one(kind: str, uri: str, args: argparse.Namespace, workdir: Path) -> dict:
    experiment = f"bench-{kind}"
    if kind == "modelbatch":
        callback = MLflowCallback(uri, experiment, flush_interval=args.flush_interval)
    else:
        callback = MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment, save_artifact=False)
    callback, times = timed(callback)
    start = time.perf_counter()
    tune.run(
        member,
        config={
            "i": tune.grid_search(list(range(args.samples))),
            "iterations": args.iterations,
            "metrics": args.metrics,
        },
        resources_per_trial={"cpu": 0.1},
        max_concurrent_trials=4,
        reuse_actors=True,
        verbose=0,
        storage_path=str(workdir / f"ray-{kind}"),
        callbacks=[callback],
    )
    wall = time.perf_counter() - start
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    points = sum(
        len(client.get_metric_history(r.info.run_id, f"m{j}")) for r in runs for j in range(args.metrics)
    )
    results = len(times["on_trial_result"])
    per_result = times["on_trial_result"]
    all_hooks = sum(sum(v) for v in times.values())
    return {
        "callback": kind,
        "results": results,
        "runs": len(runs),
        "points_in_store": points,
        "points_expected": args.samples * args.iterations * args.metrics,
        "on_trial_result_ms_mean": 1e3 * statistics.mean(per_result),
        "on_trial_result_ms_p50": 1e3 * statistics.median(per_result),
        "on_trial_result_ms_p99": 1e3 * sorted(per_result)[int(0.99 * (results - 1))],
        "final_flush_ms": 1e3 * sum(times["on_experiment_end"]),
        "all_hooks_ms_per_result": 1e3 * all_hooks / results,
        "hooks_ms_total": {h: 1e3 * sum(v) for h, v in times.items()},
        "sweep_wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=["sqlite", "server"], default="sqlite")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--metrics", type=int, default=8)
    parser.add_argument("--flush-interval", type=float, default=1.0)
    parser.add_argument("--members", type=int, default=16, help="MLflowLogger part: members")
    parser.add_argument("--reports", type=int, default=125, help="MLflowLogger part: reports per member")
    parser.add_argument("--logger-only", action="store_true", help="only the MLflowLogger part (no Ray)")
    parser.add_argument("--quick", action="store_true", help="4 members x 10 reports; 4 trials x 3 results")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.members, args.reports, args.samples, args.iterations = 4, 10, 4, 3
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-bench-"))
    os.chdir(workdir)  # Ray's callback may fall back to ./mlruns or ./mlflow.db
    server = None
    if args.store == "server":
        server, uri = start_server(workdir)
    else:
        uri = f"sqlite:///{workdir}/mlflow.db"
        MlflowClient(uri).search_experiments()  # create the schema before timing anything
    rows = []
    try:
        logger = logger_cost(uri, args.members, args.reports)
        print(
            f"MLflowLogger: {logger['us_per_report']:.1f} us of the caller's time per member report "
            f"({args.members} members x {args.reports} reports), close {logger['close_ms']:.0f} ms, "
            f"points {logger['points_in_store']}/{logger['points_expected']}",
            flush=True,
        )
        if not args.logger_only:
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            try:
                rows = [run_one(kind, uri, args, workdir) for kind in ("modelbatch", "ray")]
            finally:
                ray.shutdown()
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
    report = {
        "benchmark": "mlflow_logging",
        "store": args.store,
        "command": ["benchmarks/mlflow_logging.py", *sys.argv[1:]],
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_1m": os.getloadavg()[0],
        },
        "versions": {"mlflow": mlflow.__version__, "ray": ray.__version__},
        "logger": logger,
        "results": rows,
    }
    if rows:
        ours, theirs = rows
        report["sweep"] = {
            "samples": args.samples,
            "iterations": args.iterations,
            "metrics_per_result": args.metrics,
            "scheduler": "FIFO",
            "max_concurrent_trials": 4,
        }
        report["ratio_on_trial_result"] = theirs["on_trial_result_ms_mean"] / ours["on_trial_result_ms_mean"]
        report["ratio_all_hooks"] = theirs["all_hooks_ms_per_result"] / ours["all_hooks_ms_per_result"]
    suffix = ("-logger" if args.logger_only else "") + ("-quick" if args.quick else "")
    out = Path(args.out or Path(__file__).parent / "results" / f"mlflow_logging-{args.store}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        print(
            f"{row['callback']:>10}: on_trial_result {row['on_trial_result_ms_mean']:.3f} ms/result "
            f"(p99 {row['on_trial_result_ms_p99']:.3f}), all hooks incl. final flush "
            f"{row['all_hooks_ms_per_result']:.3f} ms/result, points {row['points_in_store']}/"
            f"{row['points_expected']}, sweep {row['sweep_wall_s']:.1f} s"
        )
    if rows:
        print(
            f"Ray's MLflowLoggerCallback / MLflowCallback: {report['ratio_on_trial_result']:.0f}x per "
            f"result (on_trial_result), {report['ratio_all_hooks']:.0f}x over all hooks"
        )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
