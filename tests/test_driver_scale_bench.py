"""benchmarks/driver_scale.py --quick: it runs both sides to the end and its JSON holds every figure,
each of a sane kind (counts that match the sweep, non-negative CPU and memory); nothing timed is asserted."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from benchmark_runs import run_benchmark

pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import driver_scale  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")  # once: xdist may run other modules between this one's tests
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("driver_scale") / "driver_scale.json"
    report, done = run_benchmark("driver_scale.py", out, "--quick", timeout=600)
    assert "ms driver CPU per result" in done.stdout
    return report


def test_the_report_says_where_and_how_it_ran(report):
    assert len(report["loadavg_start"]) == len(report["loadavg_end"]) == 3
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["ray"]
    config = report["config"]
    assert config["quick"] and (config["members"], config["results"], config["trials"]) == (2, 3, 0)
    assert set(report["sides"]) == set(driver_scale.SIDES)


def test_each_side_gets_every_result_and_a_cpu_split(report):
    for side, row in report["sides"].items():
        per = row["per_result"]
        assert per["side"] == side and per["errored"] == 0
        assert per["results"] == per["members"] * per["results_per_member"] == 6
        assert len(per["loadavg_start"]) == len(per["loadavg_end"]) == 3
        assert per["driver_cpu_ms_per_result"] > 0 and per["results_per_s"] > 0
        for split in (per["driver_cpu_ms_per_result_split"], per["driver_cpu_ms_per_result_split_steady"]):
            threads = {
                "mlflow_writer_thread",
                "sweep_heartbeat_thread",
                "other_python_threads",
                "ray_threads",
            }
            assert set(split) == {"tune", *driver_scale.PARTS, *threads, "all"}
            assert all(math.isfinite(v) for v in split.values())
            assert all(split[p] >= 0 for p in driver_scale.PARTS)
        processes = per["trial_processes"]
        assert 1 <= processes["processes"] <= per["members"]
        assert 0 < processes["uss_mb_median"] <= processes["rss_mb_median"]


def test_only_the_modelbatch_side_runs_the_searcher_and_its_callback(report):
    plain, packed = (report["sides"][s]["per_result"] for s in ("tune", "modelbatch"))
    assert all(plain["driver_cpu_ms_per_result_split"][p] == 0 for p in driver_scale.PARTS)
    assert all(plain["timed_calls"][p] == 0 for p in driver_scale.PARTS)
    calls = packed["timed_calls"]
    assert calls["searcher"] >= packed["members"] and calls["mlflow_callback"] >= packed["results"]
    assert calls["lookahead"] >= packed["members"]
    (server,) = packed["server_stats"]
    assert server["members_hosted"] == packed["members"] and server["live"] == 0
    assert plain["server_stats"] is None


def test_memory_is_attributed_per_finished_trial(report):
    for side, row in report["sides"].items():
        memory = row["memory"]
        assert memory["finished"] == memory["trials"] == 2 and memory["errored"] == 0
        assert memory["rss_start_mb"] > 0 and memory["rss_end_mb"] > 0
        assert set(memory["traced_bytes_per_trial"]) == set(driver_scale.HOLDERS)
        assert memory["traced_trials"] >= 1 and memory["tracemalloc_overhead_mb"] >= 0
        assert memory["live_tune_trial_objects"] >= memory["trials"]  # Tune keeps every finished Trial
        if side == "modelbatch":
            assert memory["searcher_completed_ids"] == memory["trials"]
        else:
            assert memory["traced_bytes_per_trial"]["tune_integration"] == 0


def test_the_relay_imports_no_torch_and_the_saturation_table_follows_its_model(report):
    (relay,) = report["imports"]
    assert relay["module"] == "tune_integration._relay" and not relay["imports_torch"]
    assert relay["import_cpu_s"] > 0 and relay["peak_rss_mb"] > 0
    assert relay["top_cumulative"] and all(t["cumulative_ms"] >= 0 for t in relay["top_cumulative"])
    saturation = report["saturation"]
    assert saturation["driver_max_results_per_s"] == pytest.approx(1e3 / saturation["driver_ms_per_result"])
    for row in saturation["rows"]:
        assert row["results_per_s"] == pytest.approx(
            min(row["results_per_s_offered"], saturation["driver_max_results_per_s"])
        )
        assert row["live_members"] == row["members_per_gpu"] * (8 if row["where"] == "8-GPU node" else 1)


def test_slope_and_import_parsing_helpers():
    assert driver_scale.slope([1.0, 3.0, 5.0, 7.0]) == pytest.approx(2.0)
    assert driver_scale.slope([4.0]) == 0.0
    match = driver_scale.IMPORT_LINE.match("import time:       250 |       1200 |   ray.tune")
    assert match and (int(match[2]), len(match[3]), match[4]) == (1200, 3, "ray.tune")
