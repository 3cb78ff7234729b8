"""The main job, examples/sweep.py: real (small) Ray Tune sweeps with MLflow, interrupted and resumed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SWEEP = [sys.executable, str(ROOT / "examples" / "sweep.py"), "--cpus", "2"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def check_outputs(out: Path, members: int, epochs: int) -> pd.DataFrame:
    history = pd.read_parquet(out / "history.parquet")
    assert history["trial_id"].nunique() == members
    for trial_id, rows in history.groupby("trial_id"):
        iterations = rows["training_iteration"].tolist()
        assert iterations == list(range(1, len(iterations) + 1)), (trial_id, iterations)
        assert len(iterations) <= epochs
        # status: finished = all epochs, stopped early = ASHA ended it before (no member errors here)
        assert set(rows["status"]) == {"finished" if len(iterations) == epochs else "stopped early"}
    assert re.fullmatch(r"MLP (64-64|128-128)-10( p=0\.2)? #[0-9a-f]{6}", history["pack"].iloc[0])
    assert {"loss", "val_loss", "val_acc", "config/lr", "config/width", "config/dropout"} <= set(history)
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = json.loads((out / "best.json").read_text())
    assert best["trial_id"] in set(history["trial_id"])
    assert best["val_loss"] == pytest.approx(history["val_loss"].min())
    return history


def check_mlflow(tracking_uri: str, history: pd.DataFrame, searcher: str) -> str:
    """One FINISHED parent with the sweep's params and summary; one complete child run per member;
    the sweep's saved UI view selects exactly those members. Returns the view's address."""
    import base64
    import zlib

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("modelbatch-digits")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["trial_id"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1, [(r.info.run_name, r.info.status) for r in parents]
    parent = parents[0]
    members = history["trial_id"].nunique()
    assert parent.info.status == "FINISHED" and len(runs) == 1 + members
    assert parent.data.params["searcher"] == searcher
    assert parent.data.params["space/lr"] == "loguniform(0.0001, 0.03)"
    assert parent.data.metrics["members"] == members
    assert parent.data.metrics["best_val_loss"] == pytest.approx(history["val_loss"].min())
    for trial_id, rows in history.groupby("trial_id"):
        run = children[trial_id]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert re.fullmatch(r"m\d{3} lr=\d\.\de-0\d wd=\de-0\d w=(64|128) p=0\.[02]", run.info.run_name)
        assert run.data.tags["status"] == rows["status"].iloc[0]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
        assert sorted(steps) == rows["training_iteration"].tolist()  # complete, each report once
        assert run.data.metrics["best_val_loss"] == pytest.approx(rows["val_loss"].min())
        assert "best_val_loss" not in run.data.tags and "step" not in run.data.metrics
    (key, view), *others = [(k, json.loads(v)) for k, v in experiment.tags.items() if "ViewState" in k]
    assert not others and view["name"] == parent.info.run_name
    state = json.loads(zlib.decompress(base64.b64decode(view["state"].removeprefix("deflate;"))))
    found = client.search_runs([experiment.experiment_id], state["searchFilter"], max_results=1000)
    assert {r.info.run_id for r in found} == {r.info.run_id for r in children.values()}
    (plot,) = [c for c in state["compareRunCharts"] if c["type"] == "PARALLEL"]
    assert plot["selectedParams"] == ["lr", "weight_decay", "width", "dropout"]
    assert plot["selectedMetrics"] == ["best_val_loss"]
    view_id = key.removeprefix("mlflow.sharedViewState.")
    return (
        f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?viewStateShareKey={view_id}"
        "&compareRunsMode=CHART&workflowType=machine_learning"
    )


def check_raw_logs(experiment: Path, history: pd.DataFrame, members: int, sessions: int = 2) -> None:
    """Tune's own per-trial logs: every member completed once, nothing lost across the sessions."""
    raw = [pd.read_csv(p) for p in experiment.glob("*/progress.csv")]
    assert len(raw) == members
    for frame in raw:
        iterations = frame["training_iteration"].tolist()
        assert sorted(set(iterations)) == list(range(1, max(iterations) + 1))
        # Tune restores a trial from the last checkpoint it registered before a Ctrl-C, so the
        # report in flight at that moment may be made again (the history keeps the first, as MLflow).
        assert len(iterations) - len(set(iterations)) <= sessions - 1
    assert len(history) == sum(frame["training_iteration"].nunique() for frame in raw)


class Sweep:
    """examples/sweep.py in a subprocess; stderr read in the background (the progress bar fills it)."""

    def __init__(self, cwd: Path, args: list[str], command: list[str] | None = None) -> None:
        self.process = subprocess.Popen(
            command or [*SWEEP, *args],
            cwd=cwd,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.errors: list[str] = []
        self.reader = threading.Thread(
            target=lambda: self.errors.extend(iter(lambda: self.process.stderr.read(256), ""))
        )
        self.reader.start()

    def interrupt_when(self, ready, timeout: float = 300, freeze_servers: bool = False) -> tuple[str, str]:
        """SIGINT (what Ctrl-C sends) once ``ready()``; (stdout, stderr) after it exited.

        ``freeze_servers``: the sweep's slot servers are stopped (SIGSTOP) from the moment
        ``ready()`` holds until Tune has taken the Ctrl-C, so that no member can finish in between:
        a pack trains these small members fast, and a near-the-end Ctrl-C once reached Tune only
        after the last member had ended (the sweep then completes, exit 0).
        """
        frozen: list[int] = []
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.process.poll() is None and not ready():
                time.sleep(0.05)
            if freeze_servers:
                frozen = slot_servers(self.process.pid)
                assert frozen, "no slot server process found under the sweep's driver"
                for pid in frozen:
                    os.kill(pid, signal.SIGSTOP)
            assert self.process.poll() is None, "the sweep ended before it could be interrupted"
            self.process.send_signal(signal.SIGINT)
            taken = time.monotonic() + 60
            while frozen and self.process.poll() is None and time.monotonic() < taken:
                if "Stop signal received" in "".join(self.errors):  # Tune logs it in its SIGINT handler
                    break
                time.sleep(0.05)
        finally:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        try:
            stdout = self.process.stdout.read()
            self.process.wait(timeout=180)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.reader.join(timeout=30)
        return stdout, "".join(self.errors)


def slot_servers(driver: int) -> list[int]:
    """The PIDs of the slot server actors (``ray::SlotServer``) among the processes under ``driver``
    (its local Ray's raylet and workers), read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    under, found = {driver}, True
    while found:
        found = False
        for pid, parent in parents.items():
            if parent in under and pid not in under:
                under.add(pid)
                found = True
    servers = []
    for pid in under - {driver}:
        with contextlib.suppress(OSError):
            if (Path("/proc") / str(pid) / "cmdline").read_bytes().startswith(b"ray::SlotServer"):
                servers.append(pid)
    return servers


def near_the_end(sweep: Sweep, experiment: Path, members: int):
    """Near the end: every member but the last two has its trial folder, and this session has had
    a report (a resumed session finds the last one's folders at once). A pack trains these small
    members fast: waiting for the last folder, a sweep once ended first, and the first Ctrl-C, sent
    at the first report shown, lands a few epochs later (the sweep needs members enough to go on).
    """

    def ready() -> bool:
        started = len([p for p in experiment.glob("modelbatch_member_*") if p.is_dir()]) >= members - 2
        return started and "best val_loss" in "".join(sweep.errors)

    return ready


def continue_command(stdout: str) -> list[str]:
    """The printed ``Continue with:`` command, run with this interpreter."""
    command = shlex.split(stdout.split("Continue with: ", 1)[1].splitlines()[0])
    assert command[0] == "python" and command[1].endswith("examples/sweep.py")
    return [sys.executable, *command[1:]]


def check_asha(experiment: Path, history: pd.DataFrame, epochs: int) -> None:
    """ASHA's rungs, as Tune saved them at the end of the last session, hold every member that
    reached each rung (those of earlier sessions too) at its value there; replaying each rung in
    the order ASHA filled it gives exactly the members that stopped at that rung."""
    import numpy as np
    from ray import cloudpickle

    # the last session's file (named by its start time; a final sync rewrites every session's file)
    newest = max(experiment.glob("callback-states-*.pkl"))
    states = cloudpickle.loads(newest.read_bytes())
    (scheduler,) = [s["scheduler"] for s in states.values() if isinstance(s, dict) and "scheduler" in s]
    (bracket,) = scheduler["_brackets"]
    last = history.groupby("trial_id")["training_iteration"].max().to_dict()
    value = history.set_index(["trial_id", "training_iteration"])["val_loss"]
    for milestone, recorded in bracket._rungs:
        assert set(recorded) == {t for t, n in last.items() if n >= milestone}, milestone
        earlier: list[float] = []
        for trial_id, reward in recorded.items():
            assert reward == pytest.approx(-value[trial_id, milestone])  # ASHA maximizes -val_loss
            if milestone < epochs:
                cutoff = np.nanpercentile(earlier, 100 * (1 - 1 / 3)) if earlier else None
                stopped = cutoff is not None and reward < cutoff
                assert (last[trial_id] == milestone) == stopped, (trial_id, milestone, last[trial_id])
            earlier.append(reward)


def check_wandb(out: Path, history: pd.DataFrame) -> None:
    """One W&B run per member in the sweep's group, every report once, the member's status at the end."""
    from wandb_files import read_runs

    runs = {run.summary["trial_id"]: run for run in read_runs(out).values()}
    assert set(runs) == set(history["trial_id"])
    for trial_id, rows in history.groupby("trial_id"):
        run = runs[trial_id]
        assert (run.project, run.group) == ("modelbatch-digits", "digits-sweep")
        assert re.fullmatch(r"m\d{3} lr=\d\.\de-0\d wd=\de-0\d w=(64|128) p=0\.[02]", run.name)
        assert run.config["lr"] == rows["config/lr"].iloc[0]
        assert run.steps("val_loss") == list(zip(rows["training_iteration"], rows["val_loss"]))
        assert run.summary["status"] == rows["status"].iloc[0]


def run_continue_command(stdout: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the printed ``Continue with:`` command as a user would paste it."""
    return subprocess.run(
        continue_command(stdout), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600
    )


def test_ctrl_c_at_ray_start_mid_sweep_and_near_the_end_then_the_printed_command_completes(tmp_path) -> None:
    """The README's main job interrupted the three ways a user does it, each session continued with the
    command it printed: Ctrl-C while Ray starts (nothing ran), after this session's first report, near
    the end; the fourth session completes the sweep (Optuna searcher, W&B offline, MLflow's default
    store). Ray sessions are the cost here: one sweep covers every interrupt point."""
    args = ["--num-samples", "16", "--epochs", "6", "--out", "out", "--slots", "4", "--searcher", "optuna"]
    args += ["--seed", "3", "--wandb", "offline"]
    experiment = tmp_path / "out" / "digits-sweep"
    state = experiment / "sweep_args.json"  # written just before Ray starts
    stdout, stderr = Sweep(tmp_path, args).interrupt_when(state.exists)
    assert "Interrupted while" in stdout and "Traceback" not in stderr, stdout[-2000:] + stderr[-3000:]

    mid = Sweep(tmp_path, [], command=continue_command(stdout))
    stdout, stderr = mid.interrupt_when(lambda: "best val_loss" in "".join(mid.errors))  # a report came
    assert mid.process.returncode == 130, stdout[-3000:] + stderr[-3000:]
    assert "Traceback" not in stderr, stdout[-2000:] + stderr[-3000:]  # no Tune state yet: afresh
    assert not (tmp_path / "out" / "history.parquet").exists()
    line = stdout.split("Continue with: ", 1)[1].splitlines()[0]
    for flag in ("--resume", "--searcher optuna", "--seed 3", "--slots 4", "--num-samples 16", "--epochs 6"):
        assert flag in line, (flag, line)
    assert "--cpus 2" in line and "--wandb offline" in line, line

    again = subprocess.run([*SWEEP, *args], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert again.returncode == 2 and "already holds a sweep; continue it with --resume" in again.stderr
    other = subprocess.run(
        [*SWEEP, "--resume", "--out", "out", "--epochs", "9"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert other.returncode == 2 and "--epochs 9 differs from the sweep's --epochs 6" in other.stderr

    near_end = Sweep(tmp_path, [], command=continue_command(stdout))
    stdout, stderr = near_end.interrupt_when(near_the_end(near_end, experiment, 16), freeze_servers=True)
    assert near_end.process.returncode == 130, stdout[-3000:] + stderr[-3000:]
    assert "(resumed)" in stdout and "searcher optuna" in stdout, stdout[-3000:]
    assert "Tune saved the sweep" in stdout and "Traceback" not in stderr, stdout[-2000:] + stderr[-3000:]

    result = run_continue_command(stdout, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "(resumed)" in result.stdout and "searcher optuna" in result.stdout
    assert "best config:" in result.stdout
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in result.stdout
    assert "members done" in result.stderr  # the live progress bar
    for noise in ("Token authentication", "tensorboard --logdir", "Configuration for experiment", " INFO "):
        assert noise not in result.stdout + result.stderr, noise
    history = check_outputs(tmp_path / "out", members=16, epochs=6)
    check_raw_logs(experiment, history, members=16, sessions=3)
    check_asha(experiment, history, epochs=6)
    view_url = check_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", history, "optuna")
    check_wandb(tmp_path / "out", history)
    assert "W&B (offline): project 'modelbatch-digits', group 'digits-sweep'" in result.stdout
    assert "/wandb/offline-run-*" in result.stdout.split("upload them: wandb sync ", 1)[-1]
    assert f"parallel coordinates of lr, weight_decay, width, dropout): {view_url}" in result.stdout


def test_resumed_asha_decides_as_the_uninterrupted_one() -> None:
    """Tune does not save the scheduler: the example's callback does, so ASHA keeps its rungs on resume."""
    import importlib.util
    import pickle
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    spec = importlib.util.spec_from_file_location("sweep_example", ROOT / "examples" / "sweep.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    def asha() -> ASHAScheduler:
        return ASHAScheduler(metric="val_loss", mode="min", max_t=6, grace_period=2, reduction_factor=3)

    def report(scheduler: ASHAScheduler, tid: str, value: float) -> str:
        trial = SimpleNamespace(trial_id=tid)
        if tid not in scheduler._trial_info:
            scheduler.on_trial_add(None, trial)
        return scheduler.on_trial_result(None, trial, {"training_iteration": 2, "val_loss": value})

    before = asha()
    assert [report(before, f"t{i}", v) for i, v in enumerate([0.3, 0.2, 0.1])] == [
        TrialScheduler.CONTINUE
    ] * 3
    state = pickle.loads(pickle.dumps(example.keep_scheduler_state(before).get_state()))  # what Tune saves
    resumed = asha()
    example.keep_scheduler_state(resumed).set_state(state)
    assert report(resumed, "late", 0.9) == report(before, "late", 0.9) == TrialScheduler.STOP
    assert report(asha(), "late", 0.9) == TrialScheduler.CONTINUE  # what a fresh ASHA did on resume
