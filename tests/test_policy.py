"""The packing service's slot policy (pure Python): weighted fair shares, caps, priority, packing.

Driven with a fake clock, as the cluster simulator drives it: members hold a slot for a fixed
time, then leave, and their tenant asks again at once (every tenant always has work queued).
"""

from __future__ import annotations

import itertools

import pytest

from tune_integration._policy import FairShare


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Contention:
    """Simulated sweeps on ``policy``: each member holds its slot ``hold`` seconds, then leaves and
    its sweep queues a new one at once (a sweep keeps the members it was given queued)."""

    def __init__(self, policy: FairShare, clock: Clock, hold: float = 1.0, preempt: bool = False) -> None:
        self.policy, self.clock, self.hold, self.preempt = policy, clock, hold, preempt
        self.ids = itertools.count()
        self.started: dict[str, float] = {}
        self.resume: dict[str, float] = {}  # parked member -> how long it had held its slot

    def queue(self, sweep: str, members: int) -> None:
        for _ in range(members):
            self.policy.request(f"{sweep}/{next(self.ids)}", sweep)
        self._assign()

    def run(self, seconds: float) -> None:
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now += 0.25 * self.hold
            for member in [m for m, t in self.started.items() if self.clock.now - t >= self.hold]:
                del self.started[member]
                self.policy.release(member)
                self.policy.request(f"{member.split('/')[0]}/{next(self.ids)}", member.split("/")[0])
            self._assign()

    def _assign(self) -> None:
        for member, _ in self.policy.assign():
            self.started[member] = self.clock.now
        if self.preempt:  # a parked member queues again, its time so far kept (exact resume)
            for parked, granted, _ in self.policy.preempt():
                held = self.clock.now - self.started.pop(parked)
                self.policy.request(parked, parked.split("/")[0])
                self.resume[parked] = held
                self.started[granted] = self.clock.now - self.resume.pop(granted, 0.0)


def contended(policy: FairShare, clock: Clock, sweeps: dict[str, int], seconds: float) -> Contention:
    sim = Contention(policy, clock)
    for sweep, members in sweeps.items():
        sim.queue(sweep, members)
    sim.run(seconds)
    return sim


def two_tenants(weights=(1.0, 3.0), n_slots=8, **kw):
    clock = Clock()
    policy = FairShare(clock=clock)
    for server in range(2):
        policy.add_server(server, n_slots)
    policy.add_sweep("a", "alice", caps={0: n_slots, 1: n_slots}, weight=weights[0], **kw.get("a", {}))
    policy.add_sweep("b", "bob", caps={0: n_slots, 1: n_slots}, weight=weights[1], **kw.get("b", {}))
    return policy, clock


def test_weights_one_to_three_give_slot_seconds_one_to_three():
    policy, clock = two_tenants()
    contended(policy, clock, {"a": 20, "b": 20}, seconds=50)
    shares = policy.shares(window_s=60)
    assert shares["bob"] / shares["alice"] == pytest.approx(3.0, rel=0.2)
    assert policy.live() == 16  # every slot used


def test_an_idle_tenant_leaves_its_share_to_the_others():
    policy, clock = two_tenants()
    contended(policy, clock, {"a": 20, "b": 0}, seconds=10)
    assert policy.live(tenant="alice") == 16 and policy.shares()["alice"] == pytest.approx(1.0)


def test_a_late_tenant_reaches_its_share_once_slots_turn_over():
    policy, clock = two_tenants(weights=(1.0, 1.0))
    sim = contended(policy, clock, {"a": 20}, seconds=5)
    assert policy.live(tenant="alice") == 16
    sim.queue("b", 20)
    sim.run(1.0)  # one hold time after bob arrives
    assert policy.live(tenant="bob") == 8 and policy.live(tenant="alice") == 8


def test_max_slots_is_never_exceeded_and_the_rest_goes_to_others():
    policy, clock = two_tenants(weights=(1.0, 1.0), b={"max_slots": 3})
    contended(policy, clock, {"a": 20, "b": 20}, seconds=10)
    assert policy.live(tenant="bob") == 3 and policy.live(tenant="alice") == 13


def test_a_higher_priority_takes_free_slots_first():
    policy, clock = two_tenants(weights=(1.0, 1.0), a={"priority": 1})
    contended(policy, clock, {"a": 20, "b": 20}, seconds=10)
    assert policy.live(tenant="alice") == 16 and policy.live(tenant="bob") == 0


def test_a_sweep_holds_at_most_its_slots_on_each_server():
    policy = FairShare(clock=Clock())
    policy.add_server(0, None)  # sized for its sweeps
    policy.add_sweep("a", "alice", caps={0: 2})
    policy.add_sweep("b", "bob", caps={0: 3})
    for i in range(5):
        policy.request(f"a{i}", "a")
        policy.request(f"b{i}", "b")
    policy.assign()
    assert policy.server_slots(0) == 3 and policy.live() == 3
    assert policy.live(sweep="a") <= 2


def test_members_go_to_the_server_training_their_architecture():
    policy = FairShare(clock=Clock())
    for server in range(2):
        policy.add_server(server, 4)
    policy.add_sweep("s", "t", caps={0: 4, 1: 4})
    policy.request("x", "s", key="k1")
    policy.request("y", "s", key="k2")
    assert dict(policy.assign()) == {"x": 0, "y": 1}  # most free slots first
    policy.request("x2", "s", key="k1")
    policy.request("y2", "s", key="k2")
    assert dict(policy.assign()) == {"x2": 0, "y2": 1}  # then with their architecture


def test_among_equal_tenants_the_oldest_placeable_request_goes_first():
    """Alice's oldest request has no room (its sweep's cap is 0), so her candidate is a later one:
    Bob's request, older than that candidate, goes first."""
    policy = FairShare(clock=Clock())
    policy.add_server(0, 1)
    policy.add_sweep("a1", "alice", caps={0: 0})
    policy.add_sweep("b", "bob", caps={0: 1})
    policy.add_sweep("a2", "alice", caps={0: 1})
    for member, sweep in [("a1-0", "a1"), ("b-0", "b"), ("a2-0", "a2")]:
        policy.request(member, sweep)
    assert policy.assign() == [("b-0", 0)]


def test_closing_a_sweep_or_losing_a_server_frees_its_slots():
    policy, _ = two_tenants(n_slots=2)
    for i in range(4):
        policy.request(f"a{i}", "a")
    policy.assign()
    assert policy.live(sweep="a") == 4
    assert sorted(policy.remove_server(1)) == ["a1", "a3"]
    assert policy.live() == 2
    assert sorted(policy.remove_sweep("a")) == ["a0", "a2"]
    assert policy.live() == 0 and policy.queued() == 0
    with pytest.raises(KeyError, match="no open sweep"):
        policy.request("late", "a")


def preempting(policy: FairShare, parked: list[str]) -> list[tuple[str, str, int]]:
    """``policy.preempt()``; each parked member queues again at once, as its relay does."""
    moves = policy.preempt()
    for member, _, _ in moves:
        parked.append(member)
        policy.request(member, member.split("/")[0])
    return moves


def test_a_late_tenant_takes_its_share_at_once_from_members_that_never_leave():
    """Members that hold their slot for good (long training): bob gets his 3/4 by parking alice's."""
    policy, _ = two_tenants(weights=(1.0, 3.0), n_slots=4)
    for i in range(10):
        policy.request(f"a/{i}", "a")
    policy.assign()
    assert policy.live(tenant="alice") == 8
    for i in range(10):
        policy.request(f"b/{i}", "b")
    assert policy.assign() == []  # no free slot
    parked: list[str] = []
    moves = preempting(policy, parked)
    assert len(moves) == 6 and all(m.startswith("a/") for m in parked)
    assert all(g.startswith("b/") for _, g, _ in moves)
    assert policy.live(tenant="bob") == 6 and policy.live(tenant="alice") == 2
    assert preempting(policy, parked) == [] and policy.assign() == []  # stable: no move undoes another
    assert set(parked) == {"a/7", "a/6", "a/5", "a/4", "a/3", "a/2"}  # the newest of alice's first


def test_preemption_keeps_equal_shares_stable_and_respects_max_slots_and_keep():
    policy, _ = two_tenants(weights=(1.0, 1.0), n_slots=2, b={"max_slots": 1})
    for i in range(4):
        policy.request(f"a/{i}", "a")
    policy.assign()
    for i in range(3):
        policy.request(f"b/{i}", "b")
    assert policy.preempt(keep={"a/0", "a/1", "a/2", "a/3"}) == []  # all joining: none may be parked
    moves = policy.preempt()
    assert len(moves) == 1 and policy.live(tenant="bob") == 1  # max_slots 1
    policy.request(moves[0][0], "a")
    assert policy.preempt() == []  # alice 3 vs bob 1 but bob is at max_slots


def test_a_higher_priority_tenant_parks_lower_priority_members():
    policy, _ = two_tenants(weights=(5.0, 1.0), n_slots=2, b={"priority": 1})
    for i in range(4):
        policy.request(f"a/{i}", "a")
    policy.assign()
    for i in range(3):
        policy.request(f"b/{i}", "b")
    parked: list[str] = []
    preempting(policy, parked)
    assert policy.live(tenant="bob") == 3 and policy.live(tenant="alice") == 1
    assert preempting(policy, parked) == []  # alice's requeued members cannot park bob's


def test_with_long_members_a_late_tenant_gets_its_share_at_once_and_keeps_it():
    policy, clock = two_tenants(n_slots=4)
    sim = Contention(policy, clock, hold=50.0, preempt=True)  # members hold slots far longer than the test
    sim.queue("a", 20)
    sim.run(5)
    assert policy.live(tenant="alice") == 8
    sim.queue("b", 20)  # bob's share at once, not after alice's members finish
    assert policy.live(tenant="bob") == 6 and policy.live(tenant="alice") == 2
    sim.run(20)
    shares = policy.shares(window_s=20)
    assert shares["bob"] / shares["alice"] == pytest.approx(3.0, rel=0.05)


def memory_bound(alice: tuple[int, int], bob: tuple[int, int]) -> FairShare:
    """One 16-slot server with 100 bytes for packs; alice's and bob's sweeps with (member, data) bytes."""
    policy = FairShare(clock=Clock())
    policy.add_server(0, n_slots=16)
    policy.set_memory(0, 100)
    for sweep, tenant, (member_bytes, data_bytes) in (("a", "alice", alice), ("b", "bob", bob)):
        policy.add_sweep(sweep, tenant, caps={0: 16})
        policy.set_cap(sweep, 0, 16, member_bytes=member_bytes, data_bytes=data_bytes)
    return policy


def test_members_are_admitted_by_their_measured_memory_within_the_servers_budget():
    policy = memory_bound(alice=(30, 10), bob=(20, 0))  # 10 + 3 * 30 = 100 fits, 4 do not
    for i in range(5):
        policy.request(f"a/{i}", "a")
    policy.assign()
    assert policy.live(sweep="a") == 3 and policy.memory_used(0) == 100
    policy.request("b/0", "b")
    assert policy.assign() == []  # 100 + 20 > 100 although slots are free
    (parked, granted, _), *more = policy.preempt()  # alice 3 > bob 1: one of hers makes room for bob's
    assert granted == "b/0" and parked.startswith("a/") and not more
    assert policy.memory_used(0) == 10 + 2 * 30 + 20
    policy.set_cap("b", 0, 16, member_bytes=80)
    policy.request("b/1", "b")
    assert policy.assign() == [] and policy.preempt() == []  # alice 2 vs bob 1: she may give none


def test_a_member_that_needs_the_memory_of_two_parks_two_while_that_keeps_the_shares_even():
    policy = memory_bound(alice=(20, 0), bob=(50, 0))
    for i in range(4):
        policy.request(f"a/{i}", "a")
    policy.assign()
    policy.request("b/0", "b")
    assert policy.assign() == [] and policy.memory_used(0) == 80  # 80 + 50 > 100
    parked: list[str] = []
    moves = preempting(policy, parked)  # one of alice's frees 20 bytes: not enough; two free 40
    assert moves == [("a/3", "b/0", 0), ("a/2", "b/0", 0)]  # alice's newest two, no more
    assert policy.memory_used(0) == 2 * 20 + 50 and policy.live(tenant="bob") == 1
    assert preempting(policy, parked) == [] and policy.assign() == []  # stable: 90 + 20 > 100
    policy.request("b/1", "b")  # alice 2 vs bob 1: giving two would leave alice below bob
    assert policy.preempt() == [] and policy.live(tenant="alice") == 2


def test_without_measured_memory_members_are_admitted_by_slots_alone():
    policy = FairShare(clock=Clock())
    policy.add_server(0, n_slots=4)
    policy.set_memory(0, 1)
    policy.add_sweep("a", "alice", caps={0: 4})
    for i in range(4):
        policy.request(f"a/{i}", "a")
    assert len(policy.assign()) == 4


# ---------------------------------------------------------------------- the counts behind the decisions
class Reference:
    """The policy's rules recomputed from scratch out of ``policy``'s public state (its members, queue,
    sweeps, servers and tenants) on every call: what the incremental counts must always agree with."""

    def __init__(self, policy: FairShare) -> None:
        self.p = policy

    def live(self, tenant=None, sweep=None, server=None, placed=None) -> int:
        placed = self.p.placed if placed is None else placed
        return sum(
            1
            for s, srv in placed.values()
            if (sweep is None or s == sweep)
            and (tenant is None or self.p.sweeps[s].tenant == tenant)
            and (server is None or srv == server)
        )

    def queued(self, tenant=None, sweep=None) -> int:
        return sum(
            1
            for r in self.p.queue.values()
            if (sweep is None or r.sweep == sweep)
            and (tenant is None or self.p.sweeps[r.sweep].tenant == tenant)
        )

    def slots(self, server: int) -> int:
        own = self.p.n_slots.get(server)
        if own is not None:
            return own
        return max((sw.caps.get(server, 0) for sw in self.p.sweeps.values()), default=0)

    def assign(self) -> list[tuple[str, int]]:
        """The grants ``policy.assign()`` must make now, found by trying every request on every server."""
        placed, keys, queue = dict(self.p.placed), dict(self.p.keys), dict(self.p.queue)
        grants = []
        while True:
            best = None
            for request in sorted(queue.values(), key=lambda r: r.order):
                tenant = self.p.tenants[self.p.sweeps[request.sweep].tenant]
                held = self.live(tenant=tenant.name, placed=placed)
                if tenant.max_slots is not None and held >= tenant.max_slots:
                    continue
                caps = self.p.sweeps[request.sweep].caps
                room = [
                    s
                    for s in self.p.n_slots
                    if self.live(server=s, placed=placed) < self.slots(s)
                    and self.live(sweep=request.sweep, server=s, placed=placed) < caps.get(s, 0)
                ]
                rank = (-tenant.priority, held / tenant.weight, request.order)
                if room and (best is None or rank < best[0]):
                    best = (rank, request, room)
            if best is None:
                return grants
            _, request, room = best

            def prefer(s, request=request):  # keys name what packs together (across sweeps of one recipe)
                same = sum(
                    1
                    for m, (_, srv) in placed.items()
                    if srv == s and request.key is not None and keys[m] == request.key
                )
                return (same, self.slots(s) - self.live(server=s, placed=placed), -s)

            server = max(room, key=prefer)
            del queue[request.member]
            placed[request.member], keys[request.member] = (request.sweep, server), request.key
            grants.append((request.member, server))

    def preempt(self, keep: set[str]) -> list[tuple[str, str, int]]:
        """The moves ``policy.preempt(keep)`` must make now (no memory budgets: one member per move),
        found by ranking every placed member of every donor."""
        p = self.p
        placed, granted, queue = dict(p.placed), dict(p.granted), dict(p.queue)
        moves = []

        def load(name: str, extra: int = 0) -> float:
            return (self.live(tenant=name, placed=placed) + extra) / p.tenants[name].weight

        while True:
            oldest = {}
            for request in sorted(queue.values(), key=lambda r: r.order):
                tenant = p.tenants[p.sweeps[request.sweep].tenant]
                full = (
                    tenant.max_slots is not None
                    and self.live(tenant=tenant.name, placed=placed) >= tenant.max_slots
                )
                if not full:
                    oldest.setdefault(tenant.name, request)
            move = None
            for name in sorted(oldest, key=lambda n: (-p.tenants[n].priority, load(n), oldest[n].order)):
                request, receiver = oldest[name], p.tenants[name]
                caps = p.sweeps[request.sweep].caps
                victims = []
                for member, (sweep, server) in placed.items():
                    donor = p.tenants[p.sweeps[sweep].tenant]
                    if donor.name == name or member in keep:
                        continue
                    if self.live(sweep=request.sweep, server=server, placed=placed) >= caps.get(server, 0):
                        continue
                    if donor.priority == receiver.priority and not load(donor.name) > load(name, 1):
                        continue
                    if donor.priority > receiver.priority:
                        continue
                    victims.append(((donor.priority, -load(donor.name), -granted[member]), member, server))
                if victims:
                    _, member, server = min(victims)
                    move = (member, request, server)
                    break
            if move is None:
                return moves
            member, request, server = move
            del placed[member], queue[request.member]
            placed[request.member] = (request.sweep, server)
            granted[request.member] = max(granted.values(), default=0) + 1
            moves.append((member, request.member, server))

    def check(self) -> None:
        p = self.p
        for tenant in p.tenants:  # a tenant's placed members in grant order (preempt's newest first)
            mine = [
                m for m in sorted(p.granted, key=p.granted.get) if p.sweeps[p.placed[m][0]].tenant == tenant
            ]
            assert list(p._members_of.get(tenant, {})) == mine, tenant
        tenants, sweeps, servers = [*p.tenants, "nobody"], [*p.sweeps, "none"], [*p.n_slots, 99, None]
        for tenant, sweep, server in itertools.product([*tenants, None], [*sweeps, None], servers):
            assert p.live(tenant, sweep, server) == self.live(tenant, sweep, server), (tenant, sweep, server)
        for tenant, sweep in itertools.product([*tenants, None], [*sweeps, None]):
            assert p.queued(tenant, sweep) == self.queued(tenant, sweep), (tenant, sweep)
        for server in p.n_slots:
            assert p.server_slots(server) == self.slots(server), server


SHAPES = [(seed, 3, 5, 5) for seed in range(4)] + [(seed, 8, 12, 8) for seed in range(2)]


@pytest.mark.parametrize("seed, tenants, sweeps, servers", SHAPES)
def test_counts_and_grants_agree_with_a_recount_under_random_operations(seed, tenants, sweeps, servers):
    """Servers, sweeps and members come and go at random (requests twice, releases of members that
    are queued, placed or unknown, a sweep reopened for another tenant, servers sized by their sweeps):
    after every operation each count agrees with a recount, every assign() grants exactly what trying
    every request on every server grants, and slot-seconds are those integrated here."""
    import random

    rng = random.Random(seed)
    clock = Clock()
    policy = FairShare(clock=clock)
    ref = Reference(policy)
    slot_seconds: dict[str, float] = {}
    members = [f"m{i}" for i in range(8 * servers)]
    granted = moved = 0
    for step in range(400):
        dt = rng.choice([0.0, 0.0, 0.3, 1.7])
        for sweep, _ in policy.placed.values():
            name = policy.sweeps[sweep].tenant
            slot_seconds[name] = slot_seconds.get(name, 0.0) + dt
        clock.now += dt
        op = rng.choices(
            ["server", "sweep", "cap", "request", "cancel", "release", "assign", "preempt", "lose", "close"],
            weights=[2, 2, 1, 12, 2, 6, 6, 3, 0.5, 0.5],
        )[0]
        if op == "server":
            policy.add_server(rng.randrange(servers), rng.choice([None, 1, 2, 4]))
        elif op == "sweep":
            policy.add_sweep(
                f"s{rng.randrange(sweeps)}",
                f"t{rng.randrange(tenants)}",
                caps={s: rng.randrange(4) for s in range(servers) if rng.random() < 0.8},
                weight=rng.choice([1.0, 2.0, 0.5]),
                max_slots=rng.choice([None, None, 3]),
                priority=rng.choice([0, 0, 1]),
            )
        elif op == "cap" and policy.sweeps:
            policy.set_cap(rng.choice(list(policy.sweeps)), rng.randrange(servers), rng.randrange(4))
        elif op == "request" and policy.sweeps:
            key = rng.choice([None, "k1", "k2"])
            policy.request(rng.choice(members), rng.choice(list(policy.sweeps)), key)
        elif op == "cancel":
            policy.cancel(rng.choice(members))
        elif op == "release":
            member = rng.choice(members)
            server = policy.placed[member][1] if member in policy.placed else None
            assert policy.release(member) == server
            assert member not in policy.placed and member not in policy.queue
        elif op == "assign":
            expected = ref.assign()
            assert policy.assign() == expected, step
            granted += len(expected)
        elif op == "preempt":
            keep = {m for m in policy.placed if rng.random() < 0.2}
            expected = ref.preempt(keep)
            assert policy.preempt(keep) == expected, step
            moved += len(expected)
        elif op == "lose" and policy.n_slots:
            server = rng.choice(list(policy.n_slots))
            held = [m for m, (_, s) in policy.placed.items() if s == server]
            assert policy.remove_server(server) == held
        elif op == "close" and policy.sweeps:
            sweep = rng.choice(list(policy.sweeps))
            held = [m for m, (s, _) in policy.placed.items() if s == sweep]
            assert policy.remove_sweep(sweep) == held
        ref.check()
    policy.shares()  # brings the slot-seconds up to the clock
    assert {n: t.slot_seconds for n, t in policy.tenants.items() if t.slot_seconds} == pytest.approx(
        {n: s for n, s in slot_seconds.items() if s}, rel=1e-9
    )
    assert granted >= 10  # the random walk did place members
    assert moved >= 1  # and did park some
