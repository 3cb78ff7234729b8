"""Who gets the next free slot: weighted fair shares of the slot servers among tenants.

Pure Python, no Ray: the packing service (:mod:`._service`) calls it on every join, release
and server change, and a cluster simulator can drive the same code with its own clock.

Terms:

* a **server** has ``capacity`` slots (members training at once over all its packs); capacity
  ``None`` sizes it for its sweeps: the most slots any open sweep has on it;
* a **sweep** (one ``ModelBatchSearcher`` run) belongs to a **tenant** and may hold at most
  ``caps[server]`` slots on each server (its ``slots_per_gpu`` there);
* a **tenant** has a ``weight``, an optional ``max_slots`` over all its sweeps, and a ``priority``.

A queued member gets a slot when a server has room for it (under the server's capacity and
its sweep's cap there, and within the server's memory budget by the measured memory of its
sweep's members and data, where measured) and its tenant is under ``max_slots``. Among the tenants with such
members, slots go first to the highest ``priority``, then to the tenant holding the fewest
slots per unit of weight, then to the oldest request: under contention every tenant's share
of the slots tends to its share of the weights, and a tenant with nothing queued leaves its
share to the others (work-conserving). A member goes to the server that already trains most
members of its key (its architecture within its recipe: so packs fill, across sweeps of one
recipe too), then to the one with most free slots.

A tenant that arrives at a full cluster does not wait for slots to turn over: :meth:`FairShare.preempt`
moves slots to it from tenants over their share, one at a time while the move makes the shares more
even (the donor holds more slots per unit of weight than the receiver will after the move), and
from any tenant of a lower ``priority``. The service parks the members that lose their slot (their
state kept; they queue again and continue exactly), so no member is killed to make room.

Slot-seconds (slots held, integrated over the clock) are kept per tenant for status and fairness
reports (:meth:`FairShare.shares`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

SHARE_WINDOW_S = 60.0
"""The window of :meth:`FairShare.shares` (slot-seconds over the last minute)."""
HISTORY_EVERY_S = 1.0
"""Resolution of the slot-seconds history behind :meth:`FairShare.shares`."""


@dataclass
class Tenant:
    name: str
    weight: float = 1.0
    max_slots: int | None = None
    priority: int = 0
    slot_seconds: float = 0.0


@dataclass
class _Sweep:
    tenant: str
    caps: dict[int, int] = field(default_factory=dict)
    member_bytes: dict[int, int] = field(default_factory=dict)  # server -> one member's memory there
    data_bytes: dict[int, int] = field(default_factory=dict)  # server -> its recipe's data there


@dataclass
class _Request:
    member: str
    sweep: str
    key: str | None
    order: int


class FairShare:
    """The slot assignment state of one service (see the module docstring).

    Example:
        >>> policy = FairShare(clock=lambda: 0.0)
        >>> policy.add_server(0, capacity=4)
        >>> policy.add_sweep("a", tenant="alice", weight=1.0, caps={0: 4})
        >>> policy.add_sweep("b", tenant="bob", weight=3.0, caps={0: 4})
        >>> for i in range(4):
        ...     policy.request(f"a{i}", "a")
        ...     policy.request(f"b{i}", "b")
        >>> sorted(m for m, _ in policy.assign())
        ['a0', 'b0', 'b1', 'b2']
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.capacity: dict[int, int | None] = {}
        self.memory: dict[int, int | None] = {}  # server -> bytes its packs may fill
        self.tenants: dict[str, Tenant] = {}
        self.sweeps: dict[str, _Sweep] = {}
        self.placed: dict[str, tuple[str, int]] = {}  # member -> (sweep, server)
        self.keys: dict[str, str | None] = {}  # placed member -> architecture key
        self.queue: dict[str, _Request] = {}
        self.granted: dict[str, int] = {}  # placed member -> when (for the newest-first choice of preempt)
        self._order = 0
        self._now = clock()
        self._history: deque[tuple[float, dict[str, float]]] = deque()

    # ------------------------------------------------------------------ servers and sweeps
    def add_server(self, server: int, capacity: int | None) -> None:
        self.capacity[server] = capacity

    def remove_server(self, server: int) -> list[str]:
        """Forget a server (it died for good); returns the members it held (their slots are freed)."""
        self._advance()
        self.capacity.pop(server, None)
        for sweep in self.sweeps.values():
            sweep.caps.pop(server, None)
        lost = [m for m, (_, s) in self.placed.items() if s == server]
        for member in lost:
            self.release(member)
        return lost

    def add_sweep(
        self,
        sweep: str,
        tenant: str,
        caps: dict[int, int],
        weight: float = 1.0,
        max_slots: int | None = None,
        priority: int = 0,
    ) -> None:
        """Open a sweep of ``tenant`` with ``caps[server]`` slots at most on each server.

        The tenant's weight, ``max_slots`` and priority become the ones given (the latest sweep's).
        """
        self._advance()
        known = self.tenants.get(tenant)
        self.tenants[tenant] = Tenant(
            tenant, weight, max_slots, priority, known.slot_seconds if known is not None else 0.0
        )
        self.sweeps[sweep] = _Sweep(tenant, dict(caps))

    def set_cap(
        self, sweep: str, server: int, cap: int, member_bytes: int | None = None, data_bytes: int = 0
    ) -> None:
        """The sweep's slots on a server (one that joined after it opened, too), and the measured
        memory of one of its members and of its data there (``None``: not measured, admitted by slots)."""
        self.sweeps[sweep].caps[server] = cap
        if member_bytes is not None:
            self.sweeps[sweep].member_bytes[server] = member_bytes
            self.sweeps[sweep].data_bytes[server] = data_bytes

    def set_memory(self, server: int, budget: int | None) -> None:
        """The bytes the server's packs may fill (``None``: no memory limit, slots only)."""
        self.memory[server] = budget

    def memory_used(self, server: int, leaving: str | None = None) -> int:
        """Measured bytes the server's members hold: each member, plus each sweep's data once."""
        used, sweeps = 0, set()
        for member, (sweep, srv) in self.placed.items():
            if srv != server or member == leaving:
                continue
            used += self.sweeps[sweep].member_bytes.get(server, 0)
            sweeps.add(sweep)
        return used + sum(self.sweeps[s].data_bytes.get(server, 0) for s in sweeps)

    def remove_sweep(self, sweep: str) -> list[str]:
        """Close a sweep: its queued members are dropped and its placed members' slots freed (returned)."""
        self._advance()
        for member in [m for m, r in self.queue.items() if r.sweep == sweep]:
            del self.queue[member]
        placed = [m for m, (s, _) in self.placed.items() if s == sweep]
        for member in placed:
            self.release(member)
        self.sweeps.pop(sweep, None)
        return placed

    # ------------------------------------------------------------------ members
    def request(self, member: str, sweep: str, key: str | None = None) -> None:
        """Queue ``member`` of ``sweep`` for a slot (``key``: what it packs with, its architecture
        within its recipe; members of one key go to the same server when they can)."""
        if sweep not in self.sweeps:
            raise KeyError(f"FairShare: no open sweep {sweep!r}")
        self._order += 1
        self.queue[member] = _Request(member, sweep, key, self._order)

    def cancel(self, member: str) -> None:
        """Drop a queued request (its member gave up waiting)."""
        self.queue.pop(member, None)

    def release(self, member: str) -> int | None:
        """Free the member's slot (or drop its request); returns the server it was on."""
        self.queue.pop(member, None)
        if member not in self.placed:
            return None
        self._advance()  # the slot-seconds it held up to now
        self.keys.pop(member, None)
        self.granted.pop(member, None)
        return self.placed.pop(member)[1]

    def assign(self) -> list[tuple[str, int]]:
        """Give free slots to queued members, fairly (module docstring); returns ``(member, server)``."""
        grants = []
        while True:
            grant = self._next_grant()
            if grant is None:
                return grants
            request, server = grant
            self._place(request, server)
            grants.append((request.member, server))

    def preempt(self, keep: Iterable[str] = ()) -> list[tuple[str, str, int]]:
        """Move slots from tenants over their share (or of a lower priority) to tenants waiting.

        Call it after :meth:`assign` (free slots go first). A queued member with no room anywhere
        takes the slot of a placed member of another tenant on a server where its sweep has room:
        one of a lower ``priority``, else of the tenant holding the most slots per unit of weight,
        as long as that tenant holds more per unit of weight than the receiver will after the
        move (so a move is never undone by the next). The newest placed member
        of the donor is chosen; ``keep`` lists members that must not be chosen (still joining).

        Returns ``(parked, granted, server)`` per move: ``parked`` lost its slot (released here;
        the caller parks it and queues it again), ``granted`` holds it now.
        """
        keep = set(keep)
        moves = []
        while True:
            move = self._next_move(keep)
            if move is None:
                return moves
            parked, request, server = move
            self.release(parked)
            self._place(request, server)
            moves.append((parked, request.member, server))

    # ------------------------------------------------------------------ accounting
    def live(self, tenant: str | None = None, sweep: str | None = None, server: int | None = None) -> int:
        """Slots held, filtered by tenant, sweep and server."""
        return sum(
            1
            for s, srv in self.placed.values()
            if (sweep is None or s == sweep)
            and (tenant is None or self.sweeps[s].tenant == tenant)
            and (server is None or srv == server)
        )

    def queued(self, tenant: str | None = None, sweep: str | None = None) -> int:
        return sum(
            1
            for r in self.queue.values()
            if (sweep is None or r.sweep == sweep)
            and (tenant is None or self.sweeps[r.sweep].tenant == tenant)
        )

    def server_capacity(self, server: int) -> int:
        """The server's slots: its own capacity, or the most slots an open sweep has on it."""
        capacity = self.capacity.get(server)
        if capacity is not None:
            return capacity
        return max((sw.caps.get(server, 0) for sw in self.sweeps.values()), default=0)

    def shares(self, window_s: float = SHARE_WINDOW_S) -> dict[str, float]:
        """Each tenant's fraction of the slot-seconds held over the last ``window_s`` seconds."""
        self._advance()
        now, current = self._now, self._totals()
        base = self._totals_at(now - window_s)
        used = {name: current[name] - base.get(name, 0.0) for name in current}
        total = sum(used.values())
        return {name: (u / total if total > 0 else 0.0) for name, u in used.items()}

    # ------------------------------------------------------------------ internals
    def _totals_at(self, when: float) -> dict[str, float]:
        """Each tenant's slot-seconds at ``when``, interpolated between the history's entries (between
        events the slots held are constant, so the totals grow linearly); ``{}`` before the first."""
        before = after = None
        for entry in self._history:
            if entry[0] <= when:
                before = entry
            else:
                after = entry
                break
        if before is None:
            return {} if after is None or when < after[0] else after[1]
        if after is None:
            return before[1]
        f = (when - before[0]) / (after[0] - before[0])
        return {n: v + f * (after[1].get(n, 0.0) - v) for n, v in before[1].items()} | {
            n: f * v for n, v in after[1].items() if n not in before[1]
        }

    def _totals(self) -> dict[str, float]:
        return {name: t.slot_seconds for name, t in self.tenants.items()}

    def _advance(self) -> None:
        now = self.clock()
        dt = now - self._now
        if dt > 0:
            for _, (sweep, _) in self.placed.items():
                self.tenants[self.sweeps[sweep].tenant].slot_seconds += dt
            self._now = now
        if not self._history or now - self._history[-1][0] >= HISTORY_EVERY_S:  # not on every event
            self._history.append((now, self._totals()))
        while len(self._history) > 1 and self._history[1][0] <= now - 2 * SHARE_WINDOW_S:
            self._history.popleft()  # keeps one entry at or before the oldest window start

    def _place(self, request: _Request, server: int) -> None:
        self._advance()
        del self.queue[request.member]
        self.placed[request.member] = (request.sweep, server)
        self.keys[request.member] = request.key
        self._order += 1
        self.granted[request.member] = self._order

    def _under_max(self, tenant: Tenant) -> bool:
        return tenant.max_slots is None or self.live(tenant=tenant.name) < tenant.max_slots

    def _fits(self, sweep: str, server: int, leaving: str | None = None) -> bool:
        """Whether one more member of ``sweep`` fits the server's memory (``leaving``'s freed)."""
        budget, need = self.memory.get(server), self.sweeps[sweep].member_bytes.get(server)
        if budget is None or need is None:
            return True
        placed_here = any(
            s == sweep and srv == server and m != leaving for m, (s, srv) in self.placed.items()
        )
        data = 0 if placed_here else self.sweeps[sweep].data_bytes.get(server, 0)
        return self.memory_used(server, leaving) + need + data <= budget

    def _room(self, sweep: str) -> list[int]:
        """Servers with a free slot (and the memory) for a member of ``sweep``."""
        caps = self.sweeps[sweep].caps
        return [
            server
            for server in self.capacity
            if self.live(server=server) < self.server_capacity(server)
            and self.live(sweep=sweep, server=server) < caps.get(server, 0)
            and self._fits(sweep, server)
        ]

    def _next_grant(self) -> tuple[_Request, int] | None:
        candidates: dict[str, tuple[_Request, list[int]]] = {}  # tenant -> its oldest placeable request
        for request in sorted(self.queue.values(), key=lambda r: r.order):
            tenant = self.tenants[self.sweeps[request.sweep].tenant]
            if tenant.name in candidates:
                continue
            if not self._under_max(tenant):
                continue
            room = self._room(request.sweep)
            if room:
                candidates[tenant.name] = (request, room)
        if not candidates:
            return None

        def rank(name: str) -> tuple:
            tenant = self.tenants[name]
            return (-tenant.priority, self.live(tenant=name) / tenant.weight, candidates[name][0].order)

        request, room = candidates[min(candidates, key=rank)]
        return request, self._server_for(request, room)

    def _next_move(self, keep: set[str]) -> tuple[str, _Request, int] | None:
        """The best (parked member, request, server) of :meth:`preempt`, or ``None``."""
        oldest: dict[str, _Request] = {}  # tenant -> its oldest request that may take a slot
        for request in sorted(self.queue.values(), key=lambda r: r.order):
            tenant = self.tenants[self.sweeps[request.sweep].tenant]
            if tenant.name not in oldest and self._under_max(tenant):
                oldest[tenant.name] = request

        def load(name: str, extra: int = 0) -> float:
            return (self.live(tenant=name) + extra) / self.tenants[name].weight

        for name in sorted(oldest, key=lambda n: (-self.tenants[n].priority, load(n), oldest[n].order)):
            request, receiver = oldest[name], self.tenants[name]
            caps = self.sweeps[request.sweep].caps
            servers = {s for s in self.capacity if self.live(sweep=request.sweep, server=s) < caps.get(s, 0)}
            victims = []
            for member, (sweep, server) in self.placed.items():
                donor = self.tenants[self.sweeps[sweep].tenant]
                if server not in servers or donor.name == name or member in keep:
                    continue
                lower = donor.priority < receiver.priority
                fair = donor.priority == receiver.priority and load(donor.name) > load(name, 1)
                if (lower or fair) and self._fits(request.sweep, server, leaving=member):
                    rank = (donor.priority, -load(donor.name), -self.granted[member])
                    victims.append((rank, member, server))
            if victims:
                _, member, server = min(victims)
                return member, request, server
        return None

    def _server_for(self, request: _Request, room: Iterable[int]) -> int:
        def same(server: int) -> int:  # keys name the architecture and what may share its packs
            return sum(
                1
                for m, (_, srv) in self.placed.items()
                if srv == server and request.key is not None and self.keys[m] == request.key
            )

        def free(server: int) -> int:
            return self.server_capacity(server) - self.live(server=server)

        return max(room, key=lambda s: (same(s), free(s), -s))
