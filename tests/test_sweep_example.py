"""The main job, examples/sweep.py: a real (small) Ray Tune sweep with MLflow, interrupted and resumed."""

from __future__ import annotations

import json
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


def check_outputs(out: Path, members: int, epochs: int) -> pd.DataFrame:
    history = pd.read_parquet(out / "history.parquet")
    assert history["trial_id"].nunique() == members
    for trial_id, rows in history.groupby("trial_id"):
        iterations = rows["training_iteration"].tolist()
        assert iterations == list(range(1, len(iterations) + 1)), (trial_id, iterations)
        assert len(iterations) <= epochs
    assert {"loss", "val_loss", "val_acc", "config/lr", "config/width", "config/dropout"} <= set(history)
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = json.loads((out / "best.json").read_text())
    assert best["trial_id"] in set(history["trial_id"])
    assert best["val_loss"] == pytest.approx(history["val_loss"].min())
    return history


def mlflow_runs(tracking_uri: str) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs(experiment_names=["modelbatch-digits"], output_format="pandas")


def test_sweep_runs_end_to_end_with_mlflow_parquet_and_plot(tmp_path) -> None:
    result = subprocess.run(
        [*SWEEP, "--num-samples", "6", "--epochs", "3", "--out", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "best config:" in result.stdout
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in result.stdout
    assert "members done" in result.stderr  # the live progress bar
    check_outputs(tmp_path / "out", members=6, epochs=3)

    runs = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(children) == 6 and len(runs) == 7  # one parent run for the sweep, one child per member
    assert set(children["status"]) == {"FINISHED"}


def test_ctrl_c_stops_cleanly_and_resume_finishes_every_member_once(tmp_path) -> None:
    args = ["--num-samples", "8", "--epochs", "6", "--out", "out", "--slots", "4"]
    process = subprocess.Popen(
        [*SWEEP, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(iter(lambda: process.stderr.read(256), "")))
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:  # until the first member reported
            if "best val_loss" in "".join(errors):
                break
            time.sleep(0.2)
        assert process.poll() is None, "the sweep ended before it could be interrupted"
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        stdout = process.stdout.read()
        process.wait(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(timeout=30)
    stderr = "".join(errors)
    assert process.returncode == 130, stdout[-3000:] + stderr[-3000:]
    assert "--resume" in stdout and not (tmp_path / "out" / "history.parquet").exists()

    resumed = subprocess.run(
        [*SWEEP, *args, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    history = check_outputs(tmp_path / "out", members=8, epochs=6)
    experiment = tmp_path / "out" / "digits-sweep"
    raw = [pd.read_csv(p) for p in experiment.glob("*/progress.csv")]
    assert len(raw) == 8
    for frame in raw:  # every member completed once; nothing lost across the two runs
        iterations = frame["training_iteration"].tolist()
        assert sorted(set(iterations)) == list(range(1, max(iterations) + 1))
        # Tune restores a trial from the last checkpoint it registered before the Ctrl-C, so the
        # report in flight at that moment may be made again (the history keeps the last one).
        assert len(iterations) - len(set(iterations)) <= 1
    assert len(history) == sum(frame["training_iteration"].nunique() for frame in raw)
