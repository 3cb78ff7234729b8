"""Running a benchmark script as a user would, for the tests that keep benchmarks/ from rotting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(
    script: str, out: Path, *args: str, timeout: float = 300
) -> tuple[dict[str, Any], subprocess.CompletedProcess]:
    """``python benchmarks/<script> *args --out out`` in a subprocess; its JSON report and the run.

    A non-zero exit fails the calling test with the end of the script's output.
    """
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done
