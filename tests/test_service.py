"""The packing service shared by several drivers' sweeps on one Ray cluster (drivers as subprocesses).

One node of 2 CPUs (``ray.cluster_utils.Cluster``), no GPU: the service runs one CPU slot server
that every sweep shares; member trials take 0.01 CPU each.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402
from tune_recipes import assert_matches_fit, open_sweeps, recipe  # noqa: E402

from tune_integration._server import SlotLost  # noqa: E402
from tune_integration._service import IDLE_STOP_S, LEASE_S, NAMESPACE, SERVICE_NAME, server_name  # noqa: E402

pytestmark = pytest.mark.slow
DRIVER = Path(__file__).with_name("service_driver.py")


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def start_driver(cluster, out: Path, tenant: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(DRIVER), cluster.address, str(out), tenant, *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(driver: subprocess.Popen, timeout: float = 400) -> str:
    try:
        output, _ = driver.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        driver.kill()
        output, _ = driver.communicate()
        raise AssertionError(f"the driver did not finish:\n{output[-3000:]}") from None
    assert driver.returncode == 0, output[-3000:]
    return output


def wait_for(condition, timeout: float, what: str, every: float = 0.5):
    """Poll ``condition()`` until it is truthy; returns it and the seconds it took."""
    start = time.monotonic()
    while True:
        value = condition()
        if value:
            return value, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f} s; the service then: {status_brief()}")
        time.sleep(every)


def status_brief() -> dict | None:
    """The service's tenants (live, queued, share) and servers (live, parked, evictions), to say why
    a wait failed."""
    status = service_status()
    if status is None:
        return None
    keys = ("live", "parked", "evictions", "restarted", "tenants")
    return {
        "tenants": {n: {k: t[k] for k in ("live", "queued", "share")} for n, t in status["tenants"].items()},
        "servers": [{k: s.get(k) for k in keys} for s in status["servers"]],
        "sweeps": status["sweeps"],
    }


def service_status() -> dict | None:
    try:
        return ray.get(ray.get_actor(SERVICE_NAME, namespace=NAMESPACE).status.remote())
    except (ValueError, ray.exceptions.RayActorError):
        return None


def stop_service() -> None:
    """Stop a service an earlier test's sweep left to stop when idle (tested once, by the killed driver)."""
    try:
        service = ray.get_actor(SERVICE_NAME, namespace=NAMESPACE)
    except ValueError:
        return
    with contextlib.suppress(ray.exceptions.RayActorError):  # it was stopping already
        ray.get(service.stop.remote())
    wait_for(lambda: service_status() is None, 60, "the earlier service stopped")


def tenants_open() -> set[str]:
    return {sweep["tenant"] for sweep in open_sweeps().values()}


def live_members(tenant: str) -> int:
    status = service_status() or {"tenants": {}}
    return status["tenants"].get(tenant, {}).get("live", 0)


def read(out: Path) -> dict:
    return json.loads(out.read_text())


def cli(cluster, *argv: str) -> str:
    command = [sys.executable, "-m", "tune_integration", "service", *argv, "--address", cluster.address]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_the_service_command_starts_shows_and_stops_a_long_lived_service(cluster):
    started = cli(cluster, "start", "--slots-per-gpu", "3", "--weight", "alice=3")
    assert "started; it runs until `modelbatch service stop`" in started
    status = cli(cluster, "status")
    assert "cpu  up  slots 3" in status and "alice  weight 3" in status
    assert json.loads(cli(cluster, "status", "--json"))["settings"]["idle_stop_s"] is None  # long-lived
    assert "stopped" in cli(cluster, "stop")
    assert service_status() is None and "no packing service runs" in cli(cluster, "status")
    total = ray.cluster_resources()["CPU"]
    wait_for(lambda: ray.available_resources().get("CPU") == total, 30, "every CPU free again")


def test_two_drivers_share_one_server_at_the_same_time_and_every_member_is_exact(cluster, tmp_path):
    outs = {t: tmp_path / f"{t}.json" for t in ("alice", "bob")}
    drivers = [start_driver(cluster, out, t, "--samples", "4", "--reports", "3") for t, out in outs.items()]
    for driver in drivers:
        finish(driver)
    rec = recipe()
    spans = {}
    pack_tenants: dict[str, set] = {}
    for tenant, out in outs.items():
        trials = read(out)
        assert len(trials) == 4 and all(t["status"] == "TERMINATED" for t in trials.values())
        times = []
        for trial in trials.values():
            frame = pd.DataFrame(trial["results"])
            assert set(frame["tenant"]) == {tenant} and set(frame["server"]) == {0}  # one shared server
            assert_matches_fit(rec, trial["config"], frame)  # float64, also when packed with bob's
            times += frame["timestamp"].tolist()
            for pack in frame["pack_id"]:
                pack_tenants.setdefault(pack, set()).add(tenant)
        spans[tenant] = (min(times), max(times))
    (a0, a1), (b0, b1) = spans.values()
    assert a0 <= b1 and b0 <= a1  # both sweeps trained at the same time
    assert {"alice", "bob"} in pack_tenants.values()  # one recipe: their members shared a pack
    assert open_sweeps() == {}


def test_a_late_tenant_gets_its_share_at_once_by_parking_members_that_then_continue(cluster, tmp_path):
    """Weights 1:3 on a 4-slot server held by members that train until the test ends them: the
    late, heavier tenant's members take 3 of the 4 slots as soon as they join (not when the early
    members end); the parked early members continue afterwards, every iteration once (exactly:
    tests/test_packs.py)."""
    stop_service()  # else `start` keeps the last test's service, which stops when idle
    cli(cluster, "start", "--slots-per-gpu", "4")
    outs = {t: tmp_path / f"{t}.json" for t in ("early", "late")}
    until = {t: tmp_path / f"{t}-ends" for t in outs}  # each tenant's members train until then
    try:
        early = start_driver(
            cluster, outs["early"], "early", "--samples", "4", "--slots", "4", "--reports", "100000",
            "--until", str(until["early"]),
        )  # fmt: skip
        # The late members train until the test ends them too: with a fixed number of reports the
        # first one once finished before the third one's trial had started (load), so the late
        # tenant never held its 3 slots at once and the wait failed.
        late = start_driver(
            cluster, outs["late"], "late", "--samples", "3", "--slots", "4", "--reports", "100000",
            "--weight", "3", "--after", "early:4", "--until", str(until["late"]),
        )  # fmt: skip
        try:
            try:  # 7 relay trials start first: ~40 s a phase beside two busy loops
                wait_for(
                    lambda: live_members("late") == 3 and live_members("early") == 1,
                    600,
                    "the late tenant's share",
                )
                wait_for(
                    lambda: service_status()["servers"][0]["evictions"] >= 3, 60, "3 early members evicted"
                )
            finally:
                until["late"].touch()
            finish(late)
        finally:
            until["early"].touch()
        finish(early)
    finally:
        cli(cluster, "stop")
    rec = recipe()
    for tenant, out in outs.items():
        trials = read(out)
        assert len(trials) == {"early": 4, "late": 3}[tenant]
        for trial in trials.values():
            frame = pd.DataFrame(trial["results"])
            iterations = frame["training_iteration"].tolist()
            assert iterations == list(range(1, len(iterations) + 1))  # each once, none missing
            if tenant == "late":
                assert_matches_fit(rec, trial["config"], frame)


def test_a_tenant_whose_recipe_breaks_or_members_diverge_touches_only_its_own_members(cluster, tmp_path):
    """Three tenants on one 4-slot server: bob's members train until the others are done; eve's
    members share bob's packs (one recipe) and half of them diverge (NaN); mal's recipe raises
    mid-sweep in its own pack. Bob's members and eve's healthy ones train on exactly; eve's
    diverged members end at their first report with why; mal's trials fail with mal's error.
    The server is killed once one of eve's members diverged (in a pack with bob's) and eve trains
    on: every tenant's members continue from their checkpoints on the server Ray restarts, each
    iteration once."""
    stop_service()
    outs = {t: tmp_path / f"{t}.json" for t in ("bob", "eve", "mal")}
    until = tmp_path / "others-done"
    common = ["--samples", "2", "--slots", "4", "--after", "bob:2"]
    bob = start_driver(
        cluster,
        outs["bob"],
        "bob",
        "--samples",
        "4",
        "--slots",
        "4",
        "--reports",
        "100000",
        "--until",
        str(until),
    )
    progress = tmp_path / "eve-progress.jsonl"  # eve's results as they reach Tune

    def diverged() -> set[str]:
        lines = progress.read_text().splitlines() if progress.exists() else []
        return {r["trial_id"] for r in map(json.loads, lines) if r["error"]}

    try:
        eve = start_driver(
            cluster, outs["eve"], "eve", *common, "--reports", "20", "--nan", "--progress", str(progress)
        )
        mal = start_driver(
            cluster, outs["mal"], "mal", *common, "--reports", "20", "--loss-fails-after", "24"
        )
        # Before the kill the server has one pack of bob's recipe, bob's members always in it (his
        # share); after it, a diverging member may rejoin the restarted server before bob's do.
        wait_for(
            lambda: diverged() and live_members("eve") and live_members("bob"),
            300,
            "an eve member diverged, and eve and bob training",
        )
        diverged_before_kill = diverged()
        ray.kill(ray.get_actor(server_name(0), namespace=NAMESPACE), no_restart=False)
        finish(eve)
        finish(mal)
    finally:
        until.touch()
    finish(bob)
    assert service_status()["servers"][0]["restarted"]
    rec = recipe()
    pack_tenants: dict[str, set] = {}
    trials = {tenant: read(out) for tenant, out in outs.items()}
    for rows in trials.values():
        for trial in rows.values():
            for pack, tenant in zip(trial["results"].get("pack_id", []), trial["results"].get("tenant", [])):
                pack_tenants.setdefault(pack, set()).add(tenant)
    for tenant in ("bob", "eve"):
        assert len(trials[tenant]) == 4 and all(t["status"] == "TERMINATED" for t in trials[tenant].values())
        for trial_id, trial in trials[tenant].items():
            frame = pd.DataFrame(trial["results"])
            if math.isnan(trial["config"].get("scale", 1.0)):
                assert frame["training_iteration"].tolist() == [1]
                assert frame["error"].tolist() == ["non-finite loss (nan) at report 1"]
                if trial_id in diverged_before_kill:  # it diverged in a pack with bob's
                    assert "bob" in pack_tenants[frame["pack_id"].iloc[0]]
            else:
                its = frame["training_iteration"].tolist()
                assert its == list(range(1, len(its) + 1)) and (tenant == "bob" or len(its) == 20)
                assert_matches_fit(rec, trial["config"], frame)  # bob's: parked and continued too
    assert len(trials["mal"]) == 2
    for trial in trials["mal"].values():
        assert trial["status"] == "ERROR"
        assert "FailingLoss: this recipe breaks after 24 steps" in trial["error"]
    assert any(trial["results"] for trial in trials["mal"].values())  # it broke mid-sweep
    assert {tuple(sorted(t)) for t in pack_tenants.values()} >= {("bob", "eve"), ("mal",)}
    assert all(t == {"mal"} for t in pack_tenants.values() if "mal" in t)  # mal packed only with mal
    assert open_sweeps() == {}


def test_sweeps_ended_in_every_way_leave_within_30_s_and_the_idle_service_then_frees_its_cpu(
    cluster, tmp_path
):
    """Five drivers at once: one killed (SIGKILL), and four that live on after Tune returned, one
    interrupted (SIGINT), one out of time (``time_budget_s``), one ended by a stopper (all trials,
    of ``num_samples=-1``) and one by a trial's error (``fail_fast``). Each sweep leaves the
    service within 30 s of its end; the service, idle then, stops and every CPU is free again."""
    linger = ["--samples", "2", "--reports", "1000", "--linger", "120"]
    outs = {t: tmp_path / f"{t}.json" for t in ("killed", "ctrl-c", "budget", "stopper", "error")}
    drivers = {
        "killed": start_driver(cluster, outs["killed"], "killed", "--samples", "2", "--reports", "1000"),
        "ctrl-c": start_driver(cluster, outs["ctrl-c"], "ctrl-c", *linger),
        "budget": start_driver(cluster, outs["budget"], "budget", *linger, "--time-budget", "15"),
        "stopper": start_driver(
            cluster, outs["stopper"], "stopper", *linger, "--samples", "-1", "--stop-all-after", "10"
        ),
        "error": start_driver(
            cluster, outs["error"], "error", *linger, "--loss-fails-after", "20", "--fail-fast"
        ),
    }
    ended: dict[str, float] = {}  # when each sweep ended (wall clock)
    closed: dict[str, float] = {}
    try:
        wait_for(lambda: live_members("killed") >= 1 and live_members("ctrl-c") >= 1, 300, "members training")
        drivers["killed"].send_signal(signal.SIGKILL)
        ended["killed"] = time.time()
        drivers["ctrl-c"].send_signal(signal.SIGINT)

        def all_closed() -> bool:
            for tenant, out in outs.items():
                if tenant not in ended and out.exists():  # written when Tune returned
                    ended[tenant] = out.stat().st_mtime
                if tenant in ended and tenant not in closed and tenant not in tenants_open():
                    closed[tenant] = time.time()
            return len(closed) == len(outs)

        wait_for(all_closed, 240, "every sweep closed")
        for tenant, at in closed.items():
            assert at - ended[tenant] <= 30, tenant
        assert all(drivers[t].poll() is None for t in outs if t != "killed")  # still live
        assert {t["status"] for t in read(outs["error"]).values()} >= {"ERROR"}
    finally:
        for driver in drivers.values():
            driver.kill()
            driver.communicate()
    last_closed = max(closed.values())
    # nothing holds a CPU once the service has been idle IDLE_STOP_S
    wait_for(lambda: service_status() is None, IDLE_STOP_S + 60, "the idle service stopped")
    total = ray.cluster_resources()["CPU"]
    wait_for(lambda: ray.available_resources().get("CPU") == total, 30, "every CPU free again")
    assert time.time() - last_closed <= 60 + LEASE_S


def test_a_cluster_without_a_cpu_left_for_member_trials_says_so_at_once(tmp_path):
    code = f"""
import sys; sys.path.insert(0, {str(DRIVER.parent)!r})
import ray
from ray import tune
from tune_recipes import recipe
from tune_integration import ModelBatchSearcher
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
searcher = ModelBatchSearcher(recipe(), slots_per_gpu=2)
tune.run(searcher.trainable(), config={{"lr": 0.01}}, search_alg=searcher, metric="val_loss", mode="min",
         storage_path={str(tmp_path)!r}, verbose=0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "the cluster's 1 CPUs all go to slot servers" in out.stderr, out.stderr[-3000:]


def open_sweeps_as_drivers(service, tenants: dict[str, dict], options: dict) -> dict[str, str]:
    """Open one sweep per tenant as its driver's searcher would: ``tenants[name]`` holds its
    ``weight``, ``max_slots``, ``priority`` and ``slots``; returns each tenant's sweep id."""
    from ray import cloudpickle

    sweeps = {}
    for tenant, settings in tenants.items():
        spec = {"job_id": f"job-{tenant}", "tenant": tenant, "recipe": cloudpickle.dumps(recipe())}
        spec |= {"weight": 1.0, "max_slots": None, "priority": 0, **settings, "options": options}
        sweeps[tenant] = ray.get(service.open_sweep.remote(spec))["sweep"]
    return sweeps


def member_after_member(service, tenant: str, worker: int, stop: threading.Event, reports: int = 2) -> None:
    """What relay trials of ``tenant`` do one after another: join, train ``reports`` reports (queueing
    again when parked for another tenant), leave; until the service stops at the end of the test."""
    for n in itertools.count():
        trial = f"{tenant}-{worker}-{n}"
        try:
            config = {"lr": 0.01, "seed": n}
            server, sweep, _ = ray.get(service.join.remote(f"job-{tenant}", trial, config, None, None))
            results = 0
            while results < reports:
                try:
                    reply = ray.get(server.next_result.remote(sweep, trial))
                except SlotLost:  # evicted as it finished its last report: join again, as a relay does
                    server, sweep, _ = ray.get(
                        service.join.remote(f"job-{tenant}", trial, config, None, None)
                    )
                    continue
                if "parked" in reply:  # preempted for the other tenant: queue again, as a relay does
                    join = service.join.remote(f"job-{tenant}", trial, config, reply["parked"], None)
                    server, sweep, _ = ray.get(join)
                else:
                    results += 1
            ray.get(service.release.remote(sweep, trial))
        except ray.exceptions.RayError:
            if stop.is_set():  # the service stopped at the end of the test
                return
            raise


class Members:
    """Threads running :func:`member_after_member` for each tenant; stopped with the service."""

    def __init__(self, service) -> None:
        self.service, self.stop, self.threads = service, threading.Event(), []

    def start(self, tenant: str, in_flight: int, reports: int = 2) -> None:
        for worker in range(in_flight):
            args = (self.service, tenant, worker, self.stop, reports)
            thread = threading.Thread(target=member_after_member, args=args, daemon=True)
            thread.start()
            self.threads.append(thread)

    def close(self) -> None:
        self.stop.set()
        ray.get(self.service.stop.remote())
        for thread in self.threads:  # their calls fail now that the service stopped; none may outlive Ray
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in self.threads)


def test_weights_one_to_three_share_a_full_server_one_to_three(cluster):
    """Two sweeps (as two drivers' searchers open them) on a 4-slot service, each keeping more members
    waiting than its share: member after member joins as a relay does, trains 2 reports, and leaves."""
    from tune_integration._service import connect

    stop_service()
    service = connect({"slots_per_gpu": 4, "idle_stop_s": None})  # as `modelbatch service start` does
    options = {"example_configs": [], "checkpoint_every": None, "reports": 2, "park_after_s": 30.0}
    tenants = {"light": {"weight": 1.0, "slots": 3}, "heavy": {"weight": 3.0, "slots": 7}}
    open_sweeps_as_drivers(service, tenants, options)
    members = Members(service)
    try:
        for tenant, settings in tenants.items():
            members.start(tenant, settings["slots"])  # members kept in flight
        wait_for(lambda: (service_status()["tenants"]["light"]["slot_seconds"] or 0) > 1, 120, "training")
        start = {t: v["slot_seconds"] for t, v in service_status()["tenants"].items()}
        time.sleep(20)
        status = service_status()
        end = {t: v["slot_seconds"] for t, v in status["tenants"].items()}
        assert all(status["tenants"][t]["queued"] > 0 for t in tenants)  # both still kept members waiting
    finally:
        members.close()
    used = {t: end[t] - start[t] for t in tenants}
    assert used["heavy"] / used["light"] == pytest.approx(3.0, rel=0.2)


def test_max_slots_caps_a_tenant_and_a_higher_priority_takes_the_slots_it_asks_for(cluster):
    """On a 4-slot service: a tenant with ``max_slots=1`` never holds more than 1 while the other
    holds the rest; a tenant of ``priority=1`` that arrives then takes every slot it asks for, by
    parking the others' members, which train on and never leave by themselves (they queue again and
    would continue exactly: the late-tenant test)."""
    from tune_integration._service import connect

    stop_service()
    service = connect({"slots_per_gpu": 4, "idle_stop_s": None})
    options = {"example_configs": [], "checkpoint_every": None, "reports": None, "park_after_s": 30.0}
    tenants = {"capped": {"max_slots": 1, "slots": 4}, "free": {"slots": 4}}
    open_sweeps_as_drivers(service, tenants, options)
    members = Members(service)
    try:
        members.start("capped", 4, reports=10**9)
        members.start("free", 4, reports=10**9)

        def live() -> dict[str, int]:
            return {t: v["live"] for t, v in service_status()["tenants"].items()}

        wait_for(lambda: live() == {"capped": 1, "free": 3}, 120, "capped at 1, the rest to the other")
        for _ in range(20):  # capped keeps 3 more members waiting: the cap holds at every look
            assert live() == {"capped": 1, "free": 3}
            time.sleep(0.1)
        open_sweeps_as_drivers(service, {"urgent": {"priority": 1, "slots": 4}}, options)
        members.start("urgent", 4)
        wait_for(lambda: live()["urgent"] == 4, 120, "the higher priority holding every slot")

        def trained_on_the_server() -> dict[str, int]:  # evictions finish after the slots moved
            return {t: n for t, n in service_status()["servers"][0]["tenants"].items() if n}

        wait_for(lambda: trained_on_the_server() == {"urgent": 4}, 120, "only its members on the server")
        evictions = service_status()["servers"][0]["evictions"]
    finally:
        members.close()
    assert evictions >= 4  # every slot it took was a training member's


def test_members_are_admitted_by_measured_memory_and_one_too_large_for_a_server_says_so(cluster):
    """An operator's memory budget per server: a sweep whose single member does not fit is refused
    at open; one whose members fit two at a time trains two at a time although it has 4 slots."""
    import torch
    from ray import cloudpickle

    from tune_integration._packs import member_memory
    from tune_integration._service import connect

    stop_service()
    configs = [{"lr": 0.01, "seed": 0}]
    member, data = member_memory(recipe(), configs, torch.device("cpu"))
    options = {"example_configs": configs, "checkpoint_every": None, "reports": 1000, "park_after_s": 30.0}
    spec = {"tenant": "t", "weight": 1.0, "max_slots": None, "priority": 0, "slots": 4, "options": options}
    spec["recipe"] = cloudpickle.dumps(recipe())
    service = connect({"idle_stop_s": None, "memory_budget_gib": (data + member / 2) / 2**30})
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match=r"one member of this sweep needs ~.* GiB"):
            ray.get(service.open_sweep.remote({**spec, "job_id": "job-big"}))
    finally:
        ray.get(service.stop.remote())
    wait_for(lambda: service_status() is None, 60, "the service stopped")
    service = connect({"idle_stop_s": None, "memory_budget_gib": (data + 2.5 * member) / 2**30})
    try:
        sweep = ray.get(service.open_sweep.remote({**spec, "job_id": "job-fits"}))["sweep"]
        joins = [
            service.join.remote("job-fits", f"m{i}", {"lr": 0.01, "seed": i}, None, None) for i in range(4)
        ]
        admitted = {"tenant": "t", "slots": 4, "live": 2, "queued": 2}  # two wait: no memory for them
        wait_for(
            lambda: service_status()["sweeps"][sweep] == admitted, 120, "two members admitted, two queued"
        )
    finally:
        ray.get(service.stop.remote())
    del joins
