"""Cluster simulator: the packing service's own slot policy at 64-1,024 GPUs, against three baselines.

Drives :class:`tune_integration._policy.FairShare` (imported, the code the service runs) with a
simulated clock, simulated GPUs (one slot server each) and simulated sweeps, and compares on the
same trace of sweeps:

* ``service``: every sweep shares every GPU through FairShare (one tenant weight 1 each), members
  packed per (sweep, architecture) on a GPU, the GPU's packs taking turns in order (today's
  slot server: its device lock is first come first served);
* ``service-time``: the same, but the GPU's next turn goes to the pack that has had the least
  device time so far (a new pack starts level with the least): a proposal for the slot server;
* ``exclusive`` (baseline a, today): one sweep owns the whole cluster at a time, first come first
  served, packed;
* ``partitions`` (baseline b): each tenant owns 1/n of the GPUs; its sweeps share them, packed;
* ``tune`` (baseline c): plain Tune with fractional GPUs: every member its own process
  (``--tune-gpu-fraction``, default 0.25: 4 per GPU), no packing, members served first come first
  served over the whole cluster (one pending-trial queue, as Ray places trials when resources free).

The model. A GPU's packs take turns; a turn trains one epoch (the report interval) of every
member of one pack (``k`` members of one sweep and architecture) and takes ``epoch_s * k /
speedup(k)``, where ``epoch_s`` is the sweep's epoch of one member alone on a GPU and
``speedup(k)`` the pack's measured speedup over a plain loop of ``k`` models
(``benchmarks/results/engine-cpu-2core-x86_64-ab.json``, the interleaved A/B column ``ab_speedup``
of ``--model``, log-linear in N between the measured N = 1, 16, 64, 256; these are CPU figures,
no GPU was measured). For ``tune`` the speedup is 1: a GPU time-sliced between processes runs
them one after another, as engine.py's loop column does. A member granted a slot joins its
pack's next turn. Tune's own per-result cost and process starts are not modelled.

The trace (``--seed``): ``n`` tenants (``--tenants``, default GPUs/32, at least 4); sweeps of a
uniformly drawn tenant arrive as a Poisson process over ``--hours`` at the rate whose expected
work as plain training (each config's epochs alone on a GPU) is ``--load`` times the cluster's
GPU-seconds (the realized ``offered_load`` varies: sizes are heavy-tailed); each has a
bounded-Pareto size (alpha 1.1, 8..4,096 configs), 1, 2 or 4 architectures, a log-normal epoch
(median 60 s, sigma ``--epoch-sigma`` 0.8) and ASHA-like stopping (grace 1, reduction 3, max 27
epochs: a third of the configs go on at each rung; which ones is drawn). Or ``--trace CSV``: a
Philly / Alibaba PAI shaped job log (see :func:`load_trace`).

Reported per policy and cluster size: mean and p95 sweep completion time (arrival to its last
member's end); GPU utilization (share of GPU-seconds in a turn) under load (while the arrived,
unfinished members are at least as many as the GPUs) and overall; slot occupancy; members per
pack; Jain's index of the slot-seconds of the tenants backlogged through each ``--window-s``;
finish-time fairness rho = completion time / the sweep's completion time alone on ``1/n`` of the
cluster under the same system (packed, or unpacked for ``tune``): the max over tenants of their
sweeps' mean, the p95 and max over sweeps. Also the policy's time per GPU turn (releases and
grants) in the largest ``service`` run, and :func:`tick_benchmark` at 1,024 GPUs and 10,240 live
members. The JSON records ``os.getloadavg()``: timings from a loaded machine say little.

    python benchmarks/cluster_sim.py                   # 64, 256, 1,024 GPUs, 5 policies (minutes)
    python benchmarks/cluster_sim.py --quick           # 64 GPUs, a short trace (seconds)
    python benchmarks/cluster_sim.py --gpus 256 --trace philly.csv --tenants 8
"""

from __future__ import annotations

import argparse
import bisect
import csv
import heapq
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tune_integration._policy import FairShare  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ENGINE_AB = RESULTS / "engine-cpu-2core-x86_64-ab.json"
POLICIES = ("service", "service-time", "exclusive", "partitions", "tune")
RUNGS = (1, 3, 9, 27)  # ASHA grace 1, reduction 3, max_t 27
SIZES = (8, 4096)
PARETO_ALPHA = 1.1
EPOCH_MEDIAN_S, EPOCH_SIGMA = 60.0, 0.8
BUCKET_S = 300.0  # resolution of the utilization series


# ---------------------------------------------------------------------------- speed of a pack
def pack_speedup(model: str, path: Path = ENGINE_AB) -> Callable[[int], float]:
    """``speedup(k)``: a pack of ``k`` members' speed over a loop of ``k`` models, as measured."""
    rows = sorted(
        (r["n"], r["ab_speedup"]) for r in json.loads(path.read_text())["rows"] if r["model"] == model
    )
    if not rows:
        raise SystemExit(f"cluster_sim: no {model!r} rows in {path}; pick --model from its models")
    ns, values = [math.log(n) for n, _ in rows], [v for _, v in rows]

    def speedup(k: int) -> float:
        x = math.log(k)
        if x <= ns[0]:
            return values[0]
        if x >= ns[-1]:
            return values[-1]
        i = bisect.bisect_right(ns, x)
        w = (x - ns[i - 1]) / (ns[i] - ns[i - 1])
        return values[i - 1] + w * (values[i] - values[i - 1])

    return speedup


# ---------------------------------------------------------------------------- the trace
@dataclass
class Sweep:
    id: int
    tenant: str
    arrival: float
    budgets: list[int]  # epochs each config trains before ASHA stops it
    epoch_s: float
    keys: int  # architectures


def asha_budgets(n: int, rng: random.Random) -> list[int]:
    """Epochs per config: ceil(n / 3^r) configs reach rung r (in an order drawn by ``rng``)."""
    budgets = [RUNGS[0]] * n
    for r, epochs in enumerate(RUNGS[1:], start=1):
        for i in range(math.ceil(n / 3**r)):
            budgets[i] = epochs
    rng.shuffle(budgets)
    return budgets


def sweep_size(rng: random.Random) -> int:
    low, high = SIZES
    u = rng.random()  # bounded Pareto by inversion
    x = (
        -(u * high**PARETO_ALPHA - u * low**PARETO_ALPHA - high**PARETO_ALPHA) / (high * low) ** PARETO_ALPHA
    ) ** (-1 / PARETO_ALPHA)
    return max(low, min(high, round(x)))


def gpu_seconds(sweep: Sweep) -> float:
    """The sweep's work as plain training: each config's epochs alone on a GPU."""
    return sum(sweep.budgets) * sweep.epoch_s


def draw_sweep(
    rng: random.Random, tenants: int, sweep_id: int = 0, arrival: float = 0.0, sigma: float = EPOCH_SIGMA
) -> Sweep:
    n = sweep_size(rng)
    epoch_s = EPOCH_MEDIAN_S * math.exp(rng.gauss(0.0, sigma))
    tenant = f"t{rng.randrange(tenants)}"
    return Sweep(sweep_id, tenant, arrival, asha_budgets(n, rng), epoch_s, rng.choice((1, 2, 4)))


def mean_gpu_seconds(samples: int = 20_000) -> float:
    """A drawn sweep's expected work (:func:`gpu_seconds`), by Monte Carlo with a fixed seed."""
    rng = random.Random(12345)
    return statistics.fmean(gpu_seconds(draw_sweep(rng, 1)) for _ in range(samples))


def make_trace(
    gpus: int, tenants: int, hours: float, load: float, seed: int, sigma: float = EPOCH_SIGMA
) -> list[Sweep]:
    """Poisson arrivals over ``hours`` at the rate whose expected work is ``load`` times the
    cluster's GPU-seconds (as plain training: one member alone per GPU)."""
    rng = random.Random(seed)
    rate = load * gpus / mean_gpu_seconds()  # sweeps per second
    sweeps, t = [], rng.expovariate(rate)
    while t < hours * 3600.0:
        sweeps.append(draw_sweep(rng, tenants, len(sweeps), t, sigma))
        t += rng.expovariate(rate)
    return sweeps


COLUMNS = {
    "arrival": ("submit_time", "submitted_time", "arrival", "start_time"),
    "gpus": ("num_gpu", "gpus", "gpu_num", "plan_gpu"),
    "duration": ("duration", "run_time", "runtime"),
    "user": ("user", "user_name", "tenant", "vc"),
}


def load_trace(path: Path, tenants: int, seed: int) -> list[Sweep]:
    """Sweeps from a job log CSV shaped like the Philly or Alibaba PAI traces.

    Columns (first name found): arrival ``submit_time``/``start_time`` (seconds, any origin),
    GPUs ``num_gpu``/``gpus``/``plan_gpu`` (PAI's ``plan_gpu`` is in percent of a GPU),
    duration ``duration``/``run_time`` or ``end_time - start_time``, user ``user``/``vc``
    (optional). Each job becomes one sweep of ``8 * gpus`` configs (8..4,096) whose work alone
    unpacked (its configs' epochs times its epoch) is the job's GPU-seconds; users map onto
    ``tenants`` tenants by a stable hash, jobs without a user onto a drawn one.
    """
    rng = random.Random(seed)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"cluster_sim: {path} has no rows")
    found = {role: next((c for c in names if c in rows[0]), None) for role, names in COLUMNS.items()}
    if found["duration"] is None and {"start_time", "end_time"} <= rows[0].keys():
        found["duration"] = "end_time - start_time"
    missing = [role for role in ("arrival", "gpus", "duration") if found[role] is None]
    if missing:
        raise SystemExit(
            f"cluster_sim: {path} has no column for {missing}; name them one of "
            + "; ".join(f"{role}: {', '.join(COLUMNS[role])}" for role in missing)
        )
    sweeps, start = [], None
    for row in rows:
        try:
            arrival = float(row[found["arrival"]])
            gpus = float(row[found["gpus"]]) / (100.0 if found["gpus"] == "plan_gpu" else 1.0)
            if found["duration"] == "end_time - start_time":
                duration = float(row["end_time"]) - float(row["start_time"])
            else:
                duration = float(row[found["duration"]])
        except ValueError:
            continue  # PAI leaves unfinished jobs' times empty
        if gpus <= 0 or duration <= 0:
            continue
        start = arrival if start is None else min(start, arrival)
        user = row.get(found["user"]) if found["user"] else None
        tenant = (
            f"t{int.from_bytes(user.encode(), 'little') % tenants}" if user else f"t{rng.randrange(tenants)}"
        )
        n = max(SIZES[0], min(SIZES[1], round(8 * gpus)))
        budgets = asha_budgets(n, rng)
        sweeps.append(
            Sweep(0, tenant, arrival, budgets, gpus * duration / sum(budgets), rng.choice((1, 2, 4)))
        )
    sweeps.sort(key=lambda s: s.arrival)
    for i, sweep in enumerate(sweeps):
        sweep.id, sweep.arrival = i, sweep.arrival - start
    return sweeps


# ---------------------------------------------------------------------------- the simulation
@dataclass
class Run:
    """What one simulation recorded."""

    finish: dict[int, float] = field(default_factory=dict)  # sweep -> its last member's end
    busy_s: list[float] = field(default_factory=list)  # per bucket: GPU-seconds in a tick
    live_s: list[float] = field(default_factory=list)  # per bucket: slot-seconds held
    loaded_s: list[float] = field(default_factory=list)  # per bucket: seconds under load (module docstring)
    busy_loaded_s: float = 0.0
    jain: list[tuple[float, float]] = field(default_factory=list)  # (window end, Jain's index)
    decisions_s: list[float] = field(default_factory=list)  # policy time per GPU tick
    grants: int = 0
    events: int = 0
    pack_sq: float = 0.0  # sum over ticks and packs of k^2 (members per pack, member-weighted)
    pack_n: float = 0.0


class Cluster:
    """``gpus`` slot servers driven by one FairShare under ``policy`` (module docstring)."""

    def __init__(
        self,
        gpus: int,
        slots: int,
        policy: str,
        speedup: Callable[[int], float],
        tenants: list[str],
        trace: list[Sweep],
        bucket_s: float = BUCKET_S,
        window_s: float = 600.0,
        timed: bool = False,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"cluster_sim: policy {policy!r} is not one of {POLICIES}")
        self.gpus, self.policy_name, self.tenants, self.timed = gpus, policy, tenants, timed
        self.time_turns = policy == "service-time"
        self.trace, self._sweeps = trace, {s.id: s for s in trace}
        self.slots = slots
        self.speedup = (lambda k: 1.0) if policy == "tune" else speedup
        self.now = 0.0
        self.policy = FairShare(clock=lambda: self.now)
        for g in range(gpus):
            self.policy.add_server(g, slots)
        per = max(1, gpus // len(tenants))
        self.partition = {t: range(i * per % gpus, i * per % gpus + per) for i, t in enumerate(tenants)}
        self.members: list[dict[str, tuple[Sweep, str]]] = [{} for _ in range(gpus)]  # server -> member
        self.packs: list[dict[tuple[int, str], dict[str, None]]] = [{} for _ in range(gpus)]  # in turn order
        self.attained: list[dict[tuple[int, str], float]] = [{} for _ in range(gpus)]  # pack -> device-s
        self.in_tick: list[tuple | None] = [None] * gpus  # (pack, its members, duration) training now
        self.done: dict[str, int] = {}
        self.budget: dict[str, int] = {}
        self.remaining: dict[int, int] = {}
        self.unopened: list[Sweep] = []  # exclusive: sweeps waiting for the cluster, in arrival order
        self.unopened_members = Counter()  # tenant -> members of its sweeps not yet opened
        self.held = Counter()  # tenant -> slots held (own count: the tune baseline queues as one tenant)
        self.held_s = Counter()  # tenant -> slot-seconds
        self.busy = 0
        self.unfinished = 0  # arrived members not done
        self.run = Run()
        self.bucket_s, self.window_s = bucket_s, window_s
        self._events: list = []
        self._seq = 0
        self._last = 0.0
        self._window = (0.0, Counter(), set())

    # -------------------------------------------------------------- events
    def _push(self, t: float, kind: int, data) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, data))

    def simulate(self) -> Run:
        for sweep in self.trace:
            self._push(sweep.arrival, 0, sweep)
        while self._events:
            t, _, kind, data = heapq.heappop(self._events)
            self._integrate(t)
            self.now = t
            self.run.events += 1
            start = time.perf_counter()
            if kind == 0:
                self._arrive(data)
                self._grant()
            else:
                self._tick_end(data, start)
        return self.run

    def _arrive(self, sweep: Sweep) -> None:
        self.remaining[sweep.id] = len(sweep.budgets)
        self.unfinished += len(sweep.budgets)
        if self.policy_name == "exclusive":
            self.unopened.append(sweep)
            self.unopened_members[sweep.tenant] += len(sweep.budgets)
            if len(self.policy.sweeps) == 0:
                self._open(self.unopened.pop(0))
        else:
            self._open(sweep)

    def _open(self, sweep: Sweep) -> None:
        if self.policy_name == "exclusive":
            self.unopened_members[sweep.tenant] -= len(sweep.budgets)
        servers = self.partition[sweep.tenant] if self.policy_name == "partitions" else range(self.gpus)
        tenant = (
            "ray" if self.policy_name == "tune" else sweep.tenant
        )  # tune: one queue, first come first served
        sid = str(sweep.id)
        self.policy.add_sweep(sid, tenant, caps=dict.fromkeys(servers, self.slots))
        for i, epochs in enumerate(sweep.budgets):
            member = f"{sid}/{i}"
            self.budget[member] = epochs
            self.policy.request(member, sid, key=str(i % sweep.keys))

    def _grant(self) -> None:
        granted = set()
        for member, server in self.policy.assign():
            sweep_id, _, i = member.partition("/")
            sweep = self._sweeps[int(sweep_id)]
            key = str(int(i) % sweep.keys)
            self.members[server][member] = (sweep, key)
            pack = (sweep.id, key)
            if pack not in self.packs[server]:  # a new pack joins the turns
                self.packs[server][pack] = {}
                self.attained[server][pack] = min(self.attained[server].values(), default=0.0)
            self.packs[server][pack][member] = None
            self.held[sweep.tenant] += 1
            self.run.grants += 1
            granted.add(server)
        for server in sorted(granted):  # an idle GPU starts a round with all it was given
            if self.in_tick[server] is None:
                self._start(server)

    def _start(self, server: int) -> None:
        """The GPU's next pack trains one epoch of each of its members (one turn)."""
        packs = self.packs[server]
        # time turns: the pack with the least device time so far; else in turn: the longest waiting
        pack = min(packs, key=self.attained[server].__getitem__) if self.time_turns else next(iter(packs))
        members = list(packs[pack])
        k = len(members)
        duration = self._sweeps[pack[0]].epoch_s * k / self.speedup(k)
        self.run.pack_sq += k * k
        self.run.pack_n += k
        self.in_tick[server] = (pack, members, duration)
        self.busy += 1
        self._push(self.now + duration, 1, server)

    def _tick_end(self, server: int, start: float) -> None:
        self.busy -= 1
        pack, members, duration = self.in_tick[server]
        self.in_tick[server] = None
        packs = self.packs[server]
        for member in members:
            self.done[member] = self.done.get(member, 0) + 1
            if self.done[member] >= self.budget[member]:
                sweep, _ = self.members[server].pop(member)
                del packs[pack][member]
                self.policy.release(member)
                self.held[sweep.tenant] -= 1
                self.remaining[sweep.id] -= 1
                self.unfinished -= 1
                if self.remaining[sweep.id] == 0:
                    self._close(sweep)
        waiting = packs.pop(pack)
        attained = self.attained[server].pop(pack) + duration
        if waiting:  # to the back of the turns
            packs[pack] = waiting
            self.attained[server][pack] = attained
        self._grant()
        if self.timed:
            self.run.decisions_s.append(time.perf_counter() - start)
        if packs and self.in_tick[server] is None:
            self._start(server)

    def _close(self, sweep: Sweep) -> None:
        self.run.finish[sweep.id] = self.now
        self.policy.remove_sweep(str(sweep.id))
        if self.policy_name == "exclusive" and self.unopened:
            self._open(self.unopened.pop(0))

    # -------------------------------------------------------------- accounting
    def _backlogged(self) -> set[str]:
        if self.policy_name == "tune":
            waiting = Counter(self._sweeps[int(r.sweep)].tenant for r in self.policy.queue.values())
        else:
            waiting = Counter({t: self.policy.queued(tenant=t) for t in self.tenants})
        return {t for t in self.tenants if waiting[t] + self.unopened_members[t] > 0}

    def _integrate(self, t: float) -> None:
        live = sum(self.held.values())
        loaded = self.unfinished >= self.gpus  # enough members to keep every GPU busy
        while self._last < t:
            bucket = int(self._last // self.bucket_s)
            end = min(t, (bucket + 1) * self.bucket_s)
            dt = end - self._last
            while len(self.run.busy_s) <= bucket:
                self.run.busy_s.append(0.0)
                self.run.live_s.append(0.0)
                self.run.loaded_s.append(0.0)
            self.run.busy_s[bucket] += self.busy * dt
            self.run.live_s[bucket] += live * dt
            if loaded:
                self.run.loaded_s[bucket] += dt
                self.run.busy_loaded_s += self.busy * dt
            for tenant, n in self.held.items():
                self.held_s[tenant] += n * dt
            self._last = end
            if end >= self._window[0] + self.window_s:
                self._close_window(end)

    def _close_window(self, end: float) -> None:
        _, before, backlogged = self._window
        now_backlogged = self._backlogged()
        both = backlogged & now_backlogged
        shares = [self.held_s[t] - before[t] for t in both]
        if len(shares) >= 2 and sum(shares) > 0:
            self.run.jain.append((end, sum(shares) ** 2 / (len(shares) * sum(x * x for x in shares))))
        self._window = (end, Counter(self.held_s), now_backlogged)


def simulate(
    trace: list[Sweep],
    gpus: int,
    slots: int,
    policy: str,
    speedup: Callable[[int], float],
    tenants: list[str],
    timed: bool = False,
    **kw,
) -> Run:
    return Cluster(gpus, slots, policy, speedup, tenants, trace, timed=timed, **kw).simulate()


def alone_times(
    trace: list[Sweep], gpus: int, slots: int, policy: str, speedup: Callable[[int], float]
) -> dict[int, float]:
    """Each sweep's completion time alone on ``gpus`` GPUs (1/n of the cluster) under ``policy``."""
    system = "tune" if policy == "tune" else "service"
    times = {}
    for sweep in trace:
        alone = Sweep(sweep.id, sweep.tenant, 0.0, sweep.budgets, sweep.epoch_s, sweep.keys)
        run = simulate([alone], gpus, slots, system, speedup, [sweep.tenant], bucket_s=1e12, window_s=1e12)
        times[sweep.id] = run.finish[sweep.id]
    return times


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


def summarize(trace: list[Sweep], run: Run, alone: dict[int, float], gpus: int, slots: int) -> dict:
    jct = {s.id: run.finish[s.id] - s.arrival for s in trace}
    rho = {s.id: jct[s.id] / alone[s.id] for s in trace}
    by_tenant: dict[str, list[float]] = {}
    for s in trace:
        by_tenant.setdefault(s.tenant, []).append(rho[s.id])
    makespan = max(run.finish.values())
    loaded = sum(run.loaded_s)
    return {
        "sweeps": len(trace),
        "mean_completion_s": statistics.fmean(jct.values()),
        "p95_completion_s": p95(list(jct.values())),
        "makespan_s": makespan,
        "gpu_util_under_load": run.busy_loaded_s / (gpus * loaded) if loaded else None,
        "gpu_util_overall": sum(run.busy_s) / (gpus * makespan),
        "slot_occupancy_overall": sum(run.live_s) / (gpus * slots * makespan),
        "loaded_s": loaded,
        "jain_mean": statistics.fmean(j for _, j in run.jain) if run.jain else None,
        "jain_p5": statistics.quantiles([j for _, j in run.jain], n=20)[0] if len(run.jain) > 1 else None,
        "rho_max_over_tenants": max(statistics.fmean(v) for v in by_tenant.values()),
        "rho_p95_sweeps": p95(list(rho.values())),
        "rho_max_sweeps": max(rho.values()),
        "members_per_pack": run.pack_sq / run.pack_n,
        "grants": run.grants,
        "events": run.events,
        "series": {
            "gpu_util": [round(b / (gpus * BUCKET_S), 4) for b in run.busy_s],
            "rho_at_finish": sorted((round(run.finish[s.id]), round(rho[s.id], 3)) for s in trace),
        },
    }


# ---------------------------------------------------------------------------- policy speed
def tick_benchmark(
    servers: int = 1024,
    live: int = 10_000,
    sweeps: int = 64,
    tenants: int = 32,
    ticks: int = 2000,
    seed: int = 0,
) -> dict:
    """Time the policy's work for one GPU tick at ``servers`` GPUs holding ``live`` members.

    Every slot full (``ceil(live / servers)`` per GPU) and as many members again queued over
    ``sweeps`` sweeps of ``tenants`` tenants (2 architectures each); a tick frees one GPU's
    members (they finish), their sweeps queue as many new ones, and ``assign()`` refills.
    """
    rng = random.Random(seed)
    now = [0.0]
    policy = FairShare(clock=lambda: now[0])
    slots = math.ceil(live / servers)
    for g in range(servers):
        policy.add_server(g, slots)
    for s in range(sweeps):
        policy.add_sweep(f"s{s}", f"t{s % tenants}", caps=dict.fromkeys(range(servers), slots))
    ids = iter(range(10**9))

    def queue(n: int) -> None:
        for _ in range(n):
            s = rng.randrange(sweeps)
            policy.request(f"m{next(ids)}", f"s{s}", key=str(rng.randrange(2)))

    queue(2 * servers * slots)
    start = time.perf_counter()
    on: dict[int, list[str]] = {g: [] for g in range(servers)}
    for member, server in policy.assign():
        on[server].append(member)
    fill_s = time.perf_counter() - start
    times, cpu, grants = [], [], 0
    for _ in range(ticks):
        now[0] += 0.01
        server = rng.randrange(servers)
        start, start_cpu = time.perf_counter(), time.process_time()
        for member in on[server]:
            policy.release(member)
        queue(len(on[server]))
        on[server] = []
        for member, where in policy.assign():
            on[where].append(member)
            grants += 1
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    times.sort()
    cpu.sort()
    return {
        "servers": servers,
        "slots_per_server": slots,
        "live_members": policy.live(),
        "queued": policy.queued(),
        "sweeps": sweeps,
        "tenants": tenants,
        "initial_fill_s": fill_s,
        "tick_median_ms": 1e3 * times[len(times) // 2],
        "tick_p99_ms": 1e3 * times[int(0.99 * len(times))],
        "tick_max_ms": 1e3 * times[-1],
        "tick_cpu_median_ms": 1e3 * cpu[len(cpu) // 2],  # CPU time: less disturbed by a loaded machine
        "tick_cpu_p99_ms": 1e3 * cpu[int(0.99 * len(cpu))],
        "grants_per_tick": grants / ticks,
        "decisions_per_s": grants / sum(times),
    }


# ---------------------------------------------------------------------------- report
def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 7), squeeze=False, sharey="row")
    for col, result in enumerate(results):
        top, bottom = axes[0][col], axes[1][col]
        others = [r["makespan_s"] for name, r in result["policies"].items() if name != "exclusive"]
        right = 1.2 * max(others or [r["makespan_s"] for r in result["policies"].values()]) / 3600
        for name, row in result["policies"].items():
            label = name
            if row["makespan_s"] / 3600 > right:
                label += f" (to {row['makespan_s'] / 3600:.0f} h)"
            util = row["series"]["gpu_util"]
            top.plot([(i + 0.5) * BUCKET_S / 3600 for i in range(len(util))], util, label=label, lw=1)
            points = row["series"]["rho_at_finish"]
            bottom.scatter([t / 3600 for t, _ in points], [r for _, r in points], s=3, alpha=0.6, label=label)
        top.set_title(f"{result['gpus']} GPUs, {result['tenants']} tenants, {result['sweeps']} sweeps")
        top.set_ylabel("GPU utilization (5 min)")
        bottom.set_ylabel("ρ of each sweep at its end")
        bottom.set_yscale("log")
        bottom.set_ylim(0.2, 100)
        bottom.axhline(1.5, color="grey", ls="--", lw=0.8)
        bottom.set_xlabel("simulated hours")
        for ax in (top, bottom):
            ax.set_xlim(0, right)
        top.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: list[dict]) -> str:
    lines = [
        "| GPUs | policy | mean completion | p95 completion | GPU util under load | GPU util overall "
        "| members/pack | Jain (mean) | max ρ (tenants) | p95 ρ (sweeps) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for name, r in result["policies"].items():
            util = "–" if r["gpu_util_under_load"] is None else f"{100 * r['gpu_util_under_load']:.1f} %"
            jain = "–" if r["jain_mean"] is None else f"{r['jain_mean']:.3f}"
            pack = "–" if name == "tune" else f"{r['members_per_pack']:.1f}"  # tune: no packs
            lines.append(
                f"| {result['gpus']} | {name} | {r['mean_completion_s'] / 60:.1f} min "
                f"| {r['p95_completion_s'] / 60:.1f} min | {util} | {100 * r['gpu_util_overall']:.1f} % "
                f"| {pack} | {jain} | {r['rho_max_over_tenants']:.2f} "
                f"| {r['rho_p95_sweeps']:.2f} |"
            )
    return "\n".join(lines)


def run_size(gpus: int, args: argparse.Namespace) -> dict:
    """Every policy on one cluster size's trace."""
    speedup = pack_speedup(args.model)
    n = args.tenants or max(4, gpus // 32)
    tenants = [f"t{i}" for i in range(n)]
    if args.trace is not None:
        trace = load_trace(args.trace, n, args.seed)
    else:
        trace = make_trace(gpus, n, args.hours, args.load, args.seed, args.epoch_sigma)
    result = {
        "gpus": gpus,
        "tenants": n,
        "sweeps": len(trace),
        "configs": sum(len(s.budgets) for s in trace),
        "offered_load": sum(gpu_seconds(s) for s in trace) / (gpus * max(s.arrival for s in trace)),
        "policies": {},
    }
    alone: dict[str, dict[int, float]] = {}
    for name in args.policies:
        slots = round(1 / args.tune_gpu_fraction) if name == "tune" else args.slots_per_gpu
        system = "tune" if name == "tune" else "service"
        if system not in alone:
            alone[system] = alone_times(trace, max(1, gpus // n), slots, name, speedup)
        start = time.perf_counter()
        timed = name == "service"
        run = simulate(trace, gpus, slots, name, speedup, tenants, timed=timed, window_s=args.window_s)
        row = summarize(trace, run, alone[system], gpus, slots)
        row["sim_wall_s"] = time.perf_counter() - start
        if timed:
            d = sorted(run.decisions_s)
            row["decision_ms_per_tick"] = {
                "median": 1e3 * d[len(d) // 2],
                "p99": 1e3 * d[int(0.99 * len(d))],
                "max": 1e3 * d[-1],
            }
        result["policies"][name] = row
        util = row["gpu_util_under_load"] or 0.0
        print(
            f"{gpus} GPUs {name:>10}: mean {row['mean_completion_s'] / 60:7.1f} min, "
            f"util under load {util:.3f}, max rho {row['rho_max_over_tenants']:.2f} "
            f"({row['sim_wall_s']:.1f} s)",
            flush=True,
        )
    return result


def dumps(report: dict) -> str:
    """The report as indented JSON, each time series on one line (they are long)."""
    report, series = json.loads(json.dumps(report)), {}
    for result in report["results"]:
        for row in result["policies"].values():
            for name, values in row["series"].items():
                series[f"@series{len(series)}@"] = json.dumps(values, separators=(",", ":"))
                row["series"][name] = f"@series{len(series) - 1}@"
    text = json.dumps(report, indent=1)
    for mark, values in series.items():
        text = text.replace(f'"{mark}"', values)
    return text + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--tenants", type=int, default=None, help="default: GPUs / 32, at least 4")
    parser.add_argument("--slots-per-gpu", type=int, default=16)
    parser.add_argument("--tune-gpu-fraction", type=float, default=0.25)
    parser.add_argument("--hours", type=float, default=3.0, help="arrival window of the generated trace")
    parser.add_argument(
        "--load", type=float, default=1.0, help="expected work as plain training / GPU-seconds"
    )
    parser.add_argument(
        "--epoch-sigma", type=float, default=EPOCH_SIGMA, help="spread of sweeps' epoch times"
    )
    parser.add_argument("--model", default="mlp", help="engine.py model whose pack speedups are used")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--trace", type=Path, default=None, help="Philly / Alibaba PAI shaped CSV")
    parser.add_argument("--window-s", type=float, default=600.0, help="window of Jain's index")
    parser.add_argument("--ticks", type=int, default=2000, help="ticks of the policy micro-benchmark")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="64 GPUs, 30 simulated minutes at load 2")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="cluster sizes simulated in parallel processes")
    args = parser.parse_args(argv)
    if args.quick:
        args.gpus, args.hours, args.load, args.ticks = [64], 0.5, 2.0, 100
    load_start = os.getloadavg()
    speedup = pack_speedup(args.model)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(run_size, args.gpus, [args] * len(args.gpus)))
    else:
        results = [run_size(gpus, args) for gpus in args.gpus]
    bench_servers = 32 if args.quick else 1024
    bench = tick_benchmark(servers=bench_servers, live=bench_servers * 10, ticks=args.ticks, seed=args.seed)
    print(f"policy ticks at {bench_servers} GPUs: {json.dumps(bench)}")
    print(table(results))
    out = args.out or RESULTS / f"cluster_sim{'-quick' if args.quick else ''}.json"
    report = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "command": ["benchmarks/cluster_sim.py", *(argv if argv is not None else sys.argv[1:])],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "speedup_source": {
            "file": str(ENGINE_AB.relative_to(ROOT)),
            "model": args.model,
            "column": "ab_speedup",
            "speedup_at": {k: round(speedup(k), 3) for k in (1, 2, 4, 8, 16, 64)},
        },
        "results": results,
        "tick_benchmark": bench,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(report))
    if not args.no_plot:
        plot(results, out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
