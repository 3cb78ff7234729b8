"""The scale benchmarks: their ``--quick`` runs (so they cannot rot) and the simulator's model checked
against what can be computed by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from benchmark_runs import run_benchmark

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import cluster_sim  # noqa: E402


def test_cluster_sim_quick_runs_every_policy_to_the_end(tmp_path):
    out = tmp_path / "sim.json"
    report, _ = run_benchmark("cluster_sim.py", out, "--quick")
    assert out.with_suffix(".png").stat().st_size > 0
    assert len(report["loadavg_start"]) == 3
    (result,) = report["results"]
    assert set(result["policies"]) == set(cluster_sim.POLICIES)
    for row in result["policies"].values():
        assert 0 < row["gpu_util_overall"] <= 1 and row["rho_max_sweeps"] >= row["rho_p95_sweeps"] > 0
        assert row["grants"] == result["configs"]  # every config trained, each with one grant
    bench = report["tick_benchmark"]
    assert bench["live_members"] == bench["servers"] * bench["slots_per_server"]
    assert bench["grants_per_tick"] == bench["slots_per_server"]  # each tick refills the GPU it freed


def sweep(
    i: int, budgets: list[int], epoch_s: float = 10.0, keys: int = 1, tenant: str = "t0", at: float = 0.0
):
    return cluster_sim.Sweep(i, tenant, at, budgets, epoch_s, keys)


def test_a_sweep_alone_takes_its_packs_epochs():
    """8 configs, one architecture, on 1 GPU with 16 slots: one pack of 8 trains 3 epochs, then
    ASHA's survivor (27 epochs) trains alone; a round is an epoch of each pack at the measured speedup."""
    speedup = cluster_sim.pack_speedup("mlp")
    trace = [sweep(0, [1] * 7 + [3])]
    run = cluster_sim.simulate(trace, 1, 16, "service", speedup, ["t0"])
    expected = 10.0 * 8 / speedup(8) + 2 * 10.0 / speedup(1)
    assert run.finish[0] == pytest.approx(expected)


def test_without_packing_one_gpu_is_busy_for_exactly_the_work():
    """Plain Tune on one GPU with everything queued at time 0: the GPU never idles and time-slices
    members, so the last sweep ends after the trace's total GPU-seconds."""
    trace = [sweep(0, [1, 3, 9], 10.0), sweep(1, [1, 1], 25.0, tenant="t1"), sweep(2, [27], 4.0)]
    run = cluster_sim.simulate(trace, 1, 4, "tune", cluster_sim.pack_speedup("mlp"), ["t0", "t1"])
    assert max(run.finish.values()) == pytest.approx(sum(cluster_sim.gpu_seconds(s) for s in trace))
    assert sum(run.busy_s) == pytest.approx(max(run.finish.values()))


def test_one_sweep_at_a_time_waits_for_the_cluster():
    speedup = cluster_sim.pack_speedup("mlp")
    trace = [sweep(0, [3] * 4), sweep(1, [1] * 4, at=1.0)]
    alone = cluster_sim.simulate([trace[0]], 4, 16, "service", speedup, ["t0"]).finish[0]
    run = cluster_sim.simulate(trace, 4, 16, "exclusive", speedup, ["t0"])
    assert run.finish[0] == pytest.approx(alone) and run.finish[1] > run.finish[0]
    shared = cluster_sim.simulate(trace, 4, 16, "service", speedup, ["t0"])
    assert shared.finish[1] < run.finish[1]


def test_partitions_keep_each_tenant_on_its_own_gpus():
    """t0's big sweep trains as it would alone on 2 GPUs, and t1's one member alone on one of the
    other two, untouched by t0's load."""
    speedup = cluster_sim.pack_speedup("mlp")
    trace = [sweep(0, [1] * 64, keys=4, tenant="t0"), sweep(1, [1], tenant="t1")]
    cluster = cluster_sim.Cluster(4, 16, "partitions", speedup, ["t0", "t1"], trace)
    cluster.simulate()
    assert cluster.partition == {"t0": range(0, 2), "t1": range(2, 4)}
    assert (
        cluster.run.finish[0] == cluster_sim.simulate([trace[0]], 2, 16, "service", speedup, ["t0"]).finish[0]
    )
    assert cluster.run.finish[1] == pytest.approx(10.0 / speedup(1))
    shared = cluster_sim.simulate(trace, 4, 16, "service", speedup, ["t0", "t1"])
    assert shared.finish[1] > cluster.run.finish[1]  # sharing, its member waits in a round with t0's packs


def test_a_pai_shaped_trace_becomes_sweeps_of_the_same_gpu_seconds(tmp_path):
    path = tmp_path / "pai.csv"
    path.write_text(
        "job_name,user,start_time,end_time,plan_gpu\n"
        "a,alice,1000,1600,100\n"
        "b,bob,1300,4300,800\n"
        "c,alice,,,100\n"  # unfinished: no times
        "d,carol,1200,1250,50\n"
    )
    sweeps = cluster_sim.load_trace(path, tenants=4, seed=0)
    assert [s.arrival for s in sweeps] == [0.0, 200.0, 300.0]
    assert [len(s.budgets) for s in sweeps] == [8, 8, 64]  # 8 configs per GPU, at least 8
    work = [cluster_sim.gpu_seconds(s) for s in sweeps]
    assert work == pytest.approx([600.0, 0.5 * 50, 8 * 3000])
    again = cluster_sim.load_trace(path, tenants=4, seed=1)
    assert [s.tenant for s in again] == [s.tenant for s in sweeps]  # users map onto tenants by a stable hash


def test_a_trace_without_the_columns_says_which_are_missing(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("when,gpus\n1,2\n")
    with pytest.raises(SystemExit, match=r"no column for \['arrival', 'duration'\]"):
        cluster_sim.load_trace(path, tenants=2, seed=0)


def test_equal_shares_give_a_jain_index_of_one():
    """Two tenants, each with a sweep of identical members, both always queued: the policy
    alternates their slots, so every window's shares are equal."""
    speedup = cluster_sim.pack_speedup("mlp")
    trace = [sweep(0, [1] * 400, tenant="t0"), sweep(1, [1] * 400, tenant="t1")]
    run = cluster_sim.simulate(trace, 2, 4, "service", speedup, ["t0", "t1"], window_s=20.0)
    assert run.jain and all(j == pytest.approx(1.0) for _, j in run.jain)
    exclusive = cluster_sim.simulate(trace, 2, 4, "exclusive", speedup, ["t0", "t1"], window_s=20.0)
    assert min(j for _, j in exclusive.jain) == pytest.approx(0.5)  # one tenant holds everything


def test_scale_quick_measures_a_slot_server_pack(tmp_path):
    out = tmp_path / "scale.json"
    report, _ = run_benchmark("scale.py", out, "--quick")
    assert len(report["loadavg_start"]) == 3 and len(report["loadavg_end"]) == 3
    rows = report["slot_server"]
    assert [r["members"] for r in rows] == [1, 8]
    for row in rows:
        assert 0 < row["outside_training_ms"] < row["report_ms"]
        assert row["report_ms_per_member"] == pytest.approx(row["report_ms"] / row["members"])


def test_mlflow_logging_quick_counts_the_loggers_points(tmp_path):
    """The MLflowLogger part of benchmarks/mlflow_logging.py (no Ray): it runs, and the store holds
    every point it logged; its time per report is printed and kept in the JSON, not asserted."""
    out = tmp_path / "mlflow.json"
    report, done = run_benchmark("mlflow_logging.py", out, "--logger-only", "--quick")
    assert "us of the caller's time per member report" in done.stdout
    logger = report["logger"]
    assert (logger["members"], logger["reports"]) == (4, 10)
    assert logger["points_in_store"] == logger["points_expected"] == 4 * 10 * 6
    assert logger["us_per_report"] > 0 and report["results"] == []
