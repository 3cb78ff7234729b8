"""The examples run end to end (small settings)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_extracted_member_matches() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--members", "16", "--epochs", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "member" in result.stdout.lower()


def test_kfold_example_reports_every_config() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "kfold.py"),
            "--folds",
            "3",
            "--reports",
            "2",
            "--steps-per-report",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("(3 folds)") == 6 and "best config" in result.stdout
