"""benchmarks/gpu_suite.py: its ``--smoke`` run (every code path on CPU) writes a complete JSON.

No timing is asserted: the figures of a smoke run on a shared CPU mean nothing; the structure does.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from benchmark_runs import run_benchmark

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_suite  # noqa: E402


@pytest.mark.slow
def test_smoke_run_writes_every_section_and_every_engine_cell(tmp_path):
    out = tmp_path / "suite.json"
    report, _ = run_benchmark("gpu_suite.py", out, "--smoke")
    assert report["smoke"] is True and "perf_counter" in report["timing"]
    sections = report["sections"]
    assert set(sections) == set(gpu_suite.SECTIONS)
    for name, section in sections.items():
        assert not section["status"].startswith(("error", "pending", "skipped")), (name, section["status"])

    engine = sections["engine"]
    assert "no CUDA" in engine["streams_note"]
    cells = {(r["model"], r["n"], r["dtype"]): r["methods"] for r in engine["rows"]}
    for model in gpu_suite.MODELS:
        for n in (1, 4):
            for dtype in ("fp32", "bf16"):
                methods = cells[(model, n, dtype)]
                assert set(methods) == set(gpu_suite.METHODS), (model, n, dtype)
                for method, cell in methods.items():
                    if "ms" in cell:
                        assert cell["timed_steps"] >= 2 and cell["member_steps_per_s"] > 0
                        assert cell["bytes_moved_per_step"] > 0 and cell["bandwidth_fraction"] is not None
                    else:  # not measured: then it says why
                        assert cell.get("skipped") or cell.get("error"), (model, n, dtype, method)
    graph_pack = cells[("mlp", 4, "fp32")]["pack_graph"]
    assert "ms" in graph_pack and "eagerly" in graph_pack["graph"]  # the capturable step, not captured on CPU
    mlp_pack = cells[("mlp", 4, "fp32")]["pack"]
    assert "ms" not in mlp_pack or mlp_pack["backend"] == "vmap"  # auto's choice for a dense CPU pack
    assert "Batching rule" in cells[("lstm", 1, "fp32")]["func"]["error"]  # raw torch.func has no LSTM

    bandwidth = sections["bandwidth"]
    assert bandwidth["peak_from"] == "measured copy" and bandwidth["peak_tb_s"] > 0

    slots = sections["slots"]
    assert slots["auto_slots"] >= 1 and slots["largest_fit"] == 6 and slots["smallest_fail"] == 7
    assert [p["n"] for p in slots["probes"]] == [1, 2, 4, 8, 6, 7]  # doubling, then bisection

    (row,) = sections["sweep"]["rows"]
    assert row["configs"] == 4
    for side in ("tune", "modelbatch"):
        run = row[side]
        assert run["errored"] == 0 and run["trials_started"] >= 1, (side, run)
        # Each run is capped by its share of the section's budget (time); on a loaded machine the cap
        # may end it first, which the row says (hit_cap). Uncapped, every config ran and trained.
        if not run["hit_cap"]:
            assert run["trials_started"] == 4 and run["epochs_trained"] >= 1, (side, run)
    assert row["modelbatch"]["slots"]


def test_a_spent_time_budget_skips_every_cell_and_says_so():
    """Past its deadline a model's rows are all there, each cell "skipped: time budget"."""
    rows = gpu_suite.engine_model_rows(
        "mlp",
        torch.device("cpu"),
        gpu_suite.SMOKE,
        ["fp32", "bf16"],
        list(gpu_suite.METHODS),
        peak_tb_s=None,
        deadline=time.monotonic() - 1.0,
    )
    assert [(r["n"], r["dtype"]) for r in rows] == [(1, "fp32"), (1, "bf16"), (4, "fp32"), (4, "bf16")]
    for row in rows:
        assert row["methods"] == {m: {"skipped": "time budget"} for m in gpu_suite.METHODS}


def test_peak_bandwidth_comes_from_the_table_only_for_the_listed_devices():
    assert gpu_suite.table_peak_tb_s("NVIDIA H200") == ("H200", 4.8)
    assert gpu_suite.table_peak_tb_s("NVIDIA H100 80GB HBM3") == ("H100 SXM", 3.35)
    assert gpu_suite.table_peak_tb_s("NVIDIA H100 PCIe") is None  # 2.0 TB/s: measured instead
    assert gpu_suite.table_peak_tb_s("NVIDIA A100-SXM4-80GB") is None
    assert gpu_suite.table_peak_tb_s(None) is None
