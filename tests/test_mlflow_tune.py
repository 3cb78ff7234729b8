"""MLflowCallback on real Tune sweeps (ASHA, 16 trials), a real sqlite store and a real `mlflow server`,
which one test stops mid-sweep and restarts: no metric point may be lost. WandBCallback logs the first
sweep too, in W&B's offline mode: the same runs, histories and statuses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from mlflow import MlflowClient

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402

from tune_integration import WandBCallback  # noqa: E402
from tune_integration.mlflow import MLflowCallback  # noqa: E402

pytestmark = pytest.mark.slow
MAX_T = 8


# MLflow 3's server also starts a job runner (eight huey consumer processes) that tracking never uses.
SERVER_ENV = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServer:
    """`mlflow server` on 127.0.0.1 in its own process group (it forks uvicorn and a job runner)."""

    def __init__(self, root: Path) -> None:
        self.root, self.proc = root, None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> None:
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root}/db.sqlite",
            "--default-artifact-root",
            str(self.root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        with open(self.root / "server.log", "a") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                cmd, cwd=self.root, stdout=log, stderr=log, start_new_session=True, env=SERVER_ENV
            )
        if wait:
            self.wait()

    def wait(self) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM to the server's own process group (start_new_session: its id is the server's pid)."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not _live_members(pgid):
                break
            os.killpg(pgid, sig)
            deadline = time.monotonic() + 3
            while _live_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
        self.proc.wait(5)
        self.proc = None


def _live_members(pgid: int) -> list[int]:
    """Processes of the group that still run (zombies left to init do not count); Linux /proc."""
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _, group = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(group) == pgid and state != "Z":
            live.append(int(entry))
    return live


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One tracking server and one Ray cluster for the module, started side by side."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(root)
    server.start(wait=False)
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    try:
        server.wait()
        yield server
    finally:
        ray.shutdown()
        server.stop()


class Recorder(tune.Callback):
    """What Tune delivered, to compare MLflow against."""

    def __init__(self) -> None:
        self.results = defaultdict(list)
        self.times: list[float] = []
        self.configs, self.tags = {}, {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.results[trial.trial_id].append(
            (result["training_iteration"], result["loss"], result["val"]["acc"], result["done"])
        )
        self.configs[trial.trial_id], self.tags[trial.trial_id] = trial.config, trial.experiment_tag
        self.times.append(time.monotonic())


def member(config):
    """A function trainable that reports member tags the way ModelBatch's relay trials do."""
    for i in range(1, MAX_T + 1):
        if config["i"] == 0 and i == 3:  # the best member: ASHA would not stop it
            raise ValueError("boom at 3")
        loss = (1 + (7 * config["i"]) % 16) / i  # trials start in grid order; their quality is shuffled
        tags = {"pack": f"pack-{config['i'] % 2}", "slot": config["i"] // 2, "signature": "MLP-abc"}
        metrics = {"loss": loss, "val": {"acc": 1 - loss / 20}, "modelbatch": tags}
        if i % 4 == 0:
            with tempfile.TemporaryDirectory() as directory:
                Path(directory, "state.txt").write_text(f"{config['i']}:{i}")
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
        else:
            tune.report(metrics)
        time.sleep(config["sleep"])


def _sweep(tmp_path, callbacks, samples=16, sleep=0.0):
    return tune.run(
        member,
        name="member_sweep",
        config={"i": tune.grid_search(list(range(samples))), "sleep": sleep, "net": {"width": 32}},
        scheduler=ASHAScheduler(metric="loss", mode="min", max_t=MAX_T, grace_period=1, reduction_factor=2),
        resources_per_trial={"cpu": 0.1},
        verbose=0,
        storage_path=str(tmp_path / "ray"),
        callbacks=callbacks,
        raise_on_failed_trial=False,
        max_concurrent_trials=4,
        reuse_actors=True,
    )


def _check_store(uri: str, experiment: str, rec: Recorder, artifacts: bool = False) -> None:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["trial_id"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1 and len(runs) == 1 + len(rec.results) == 17
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["members"] == 16
    best_loss = min(loss for points in rec.results.values() for _, loss, _, _ in points)
    assert parent.data.metrics["best_loss"] == best_loss
    most = max(points[-1][0] for points in rec.results.values())
    for tid, points in rec.results.items():
        run = children[tid]
        config = rec.configs[tid]
        number = int(rec.tags[tid].split("_", 1)[0])  # readable: Tune's trial number and config values
        assert run.info.run_name == f"m{number:03d} i={config['i']} sleep={config['sleep']:.2g} net/width=32"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params == {"i": str(config["i"]), "sleep": str(config["sleep"]), "net/width": "32"}
        loss = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
        acc = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/acc"))
        assert loss == [(it, v) for it, v, _, _ in points]
        assert acc == [(it, a) for it, _, a, _ in points]
        tags = run.data.tags
        assert (tags["pack"], tags["slot"], tags["signature"]) == (
            f"pack-{config['i'] % 2}",
            str(config["i"] // 2),
            "MLP-abc",
        )
        assert tags["node"]
        assert run.data.metrics["best_loss"] == min(v for _, v, _, _ in points)
        assert run.data.metrics["best_iteration"] == min(points, key=lambda p: p[1])[0]
        assert "best_loss" not in tags and "step" not in run.data.metrics
        last_it = points[-1][0]
        if artifacts:
            logged = client.list_artifacts(run.info.run_id, "checkpoint")
            assert [a.path for a in logged] == (["checkpoint/state.txt"] if last_it >= 4 else [])
        if config["i"] == 0:
            assert (tags["status"], run.info.status) == ("errored", "FAILED")
            assert "boom at 3" in tags["status_reason"]
        elif last_it == most:
            assert (tags["status"], run.info.status) == ("finished", "FINISHED")
        else:
            assert (tags["status"], run.info.status) == ("stopped early", "FINISHED")
    statuses = [r.data.tags["status"] for r in children.values()]
    assert statuses.count("stopped early") >= 4 and statuses.count("finished") >= 1  # ASHA did stop some


def _check_wandb(root: Path, rec: Recorder, sqlite: str) -> None:
    """W&B's runs say what MLflow's do: names, config, every point, member tags, statuses."""
    from wandb_files import read_runs

    client = MlflowClient(sqlite)
    exp = client.get_experiment_by_name("sweep")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = {r.data.tags["trial_id"]: r for r in runs if "trial_id" in r.data.tags}
    runs = {run.summary["trial_id"]: run for run in read_runs(root).values()}
    assert sorted(runs) == sorted(rec.results)
    assert {run.group for run in runs.values()} == {"member_sweep"} and {
        r.project for r in runs.values()
    } == {"p"}
    for tid, points in rec.results.items():
        run, ml = runs[tid], children[tid]
        tags = ml.data.tags
        reopened = tags["status_reason"].startswith("reached")  # re-opened at the end to say "finished"
        assert run.name == ml.info.run_name and run.files == 1 + reopened
        assert run.config == rec.configs[tid]
        assert run.steps("loss") == [(it, v) for it, v, _, _ in points]
        assert run.steps("val/acc") == [(it, a) for it, _, a, _ in points]
        assert all("step" not in row and "done" not in row for row in run.history)
        assert (run.summary["status"], run.summary["status_reason"]) == (
            tags["status"],
            tags["status_reason"],
        )
        assert (run.summary["pack"], str(run.summary["slot"]), run.summary["node"]) == (
            tags["pack"],
            tags["slot"],
            tags["node"],
        )


def test_asha_sweep_logs_nested_runs_to_sqlite_and_a_server(tmp_path, mlflow_server, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    sqlite = f"sqlite:///{tmp_path}/mlflow.db"
    rec = Recorder()
    callbacks = [
        rec,
        MLflowCallback(
            sqlite, "sweep", metric="loss", log_artifacts=True, artifact_location=str(tmp_path / "a")
        ),
        MLflowCallback(mlflow_server.uri, "sweep", metric="loss", flush_interval=0.3),
        WandBCallback("p", mode="offline", dir=tmp_path / "wb"),
    ]
    start = time.perf_counter()
    _sweep(tmp_path, callbacks)
    print(f"16-trial ASHA sweep, two MLflowCallbacks, a WandBCallback: {time.perf_counter() - start:.1f} s")
    assert len(rec.results) == 16
    _check_store(sqlite, "sweep", rec, artifacts=True)
    _check_store(mlflow_server.uri, "sweep", rec)
    _check_wandb(tmp_path / "wb", rec, sqlite)


def test_server_stopped_mid_sweep_and_restarted_loses_no_point(
    tmp_path, mlflow_server, monkeypatch, caplog
) -> None:
    """The server goes down after the first results and comes back (same port, same db) once three
    more results came in while it was away (counted, not timed)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast: our own retry loop is tested
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    outage = {"down": None, "up": None}
    down_at: list[int] = []  # the result count when the server was down
    back = threading.Event()

    class Outage(tune.Callback):
        count = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            Outage.count += 1
            if Outage.count == 12:  # some points have reached the server by now
                # Down before the driver goes on (every trial reports at least once: 16 results or more, so
                # at least three come after this one whatever the machine's load).
                mlflow_server.stop()
                outage["down"] = time.monotonic()
                down_at.append(Outage.count)
                restarter.start()
            if down_at and Outage.count >= down_at[0] + 3:
                back.set()

    def restart():
        back.wait()  # results keep coming in while the server is away
        mlflow_server.start()  # same port, same database
        outage["up"] = time.monotonic()

    restarter = threading.Thread(target=restart, daemon=True)

    rec = Recorder()
    cb = MLflowCallback(mlflow_server.uri, "outage", metric="loss", flush_interval=0.2, close_timeout=120)
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="modelbatch.mlflow"):
        _sweep(tmp_path, [rec, Outage(), cb], sleep=0.2)
    back.set()  # (the sweep ended with fewer results after the outage: the count below fails)
    if restarter.is_alive():
        restarter.join(120)
    assert outage["down"] is not None and outage["up"] is not None
    print(
        f"outage {outage['down'] - start:.1f} s to {outage['up'] - start:.1f} s; sweep and final flush "
        f"{time.monotonic() - start:.1f} s; last result at {rec.times[-1] - start:.1f} s"
    )
    assert any("will retry" in r.message for r in caplog.records)  # the outage was seen
    results_while_down = [t for t in rec.times if outage["down"] < t < outage["up"]]
    print(f"{len(results_while_down)} of {len(rec.times)} results came while the server was down")
    assert len(results_while_down) >= 3
    _check_store(mlflow_server.uri, "outage", rec)
