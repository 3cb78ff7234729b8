"""Who gets the next free slot: weighted fair shares of the slot servers among tenants.

Pure Python, no Ray: the packing service (:mod:`._service`) calls it on every join, release
and server change, and a cluster simulator can drive the same code with its own clock.

Terms:

* a **server** has ``n_slots`` slots (members training at once over all its packs); ``n_slots``
  ``None`` sizes it for its sweeps: the most slots any open sweep has on it;
* a **sweep** (one ``ModelBatchSearcher`` run) belongs to a **tenant** and may hold at most
  ``caps[server]`` slots on each server (its ``slots_per_gpu`` there);
* a **tenant** has a ``weight``, an optional ``max_slots`` over all its sweeps, and a ``priority``.

A queued member gets a slot when a server has room for it (under the server's ``n_slots`` and
its sweep's cap there, and within the server's memory budget by the measured memory of its
sweep's members and data, where measured) and its tenant is under ``max_slots``. Among the tenants with such
members, slots go first to the highest ``priority``, then to the tenant holding the fewest
slots per unit of weight, then to the oldest request: under contention every tenant's share
of the slots tends to its share of the weights, and a tenant with nothing queued leaves its
share to the others (work-conserving). A member goes to the server that already trains most
members of its key (its architecture within its recipe: so packs fill, across sweeps of one
recipe too), then to the one with most free slots.

A tenant that arrives at a full cluster does not wait for slots to turn over: :meth:`FairShare.preempt`
moves slots to it from tenants over their share, one member at a time while the move makes the
shares more even (the donor holds more slots per unit of weight than the receiver will after the
move), and from any tenant of a lower ``priority``. A member that needs more memory than one slot
frees takes the slots of as many members of one server as it needs, each from a donor that still
held more than the receiver will before giving it. The service parks the members that lose their
slot (their state kept; they queue again and continue exactly), so no member is killed to make room.

Slot-seconds (slots held, integrated over the clock) are kept per tenant for status and fairness
reports (:meth:`FairShare.shares`).

Every decision reads counts kept up to date on each change (slots held per server, per sweep, per
tenant, per sweep on a server, per sweep and architecture on a server), never a scan of all
members; each tenant's placed members in grant order (:meth:`FairShare.preempt` takes a donor's
newest first, and looks further only while memory or ``keep`` rules members out); each sweep's
queue in request order; each server's size and whether it has a free slot.
A cluster simulator drives it at a thousand servers and ten thousand members. So a member is
placed and freed only through ``_place``/``_unplace``, queued and unqueued only through
``_enqueue``/``_dequeue``, and a server is resized through ``_resize``, which keep all of these.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterable
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
        >>> policy.add_server(0, n_slots=4)
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
        self.n_slots: dict[int, int | None] = {}  # server -> its own slots (None: sized by sweeps)
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
        # slots held (only _place and _unplace change them); a count that falls to 0 is deleted
        self._on_server: dict[int, int] = {}
        self._of_sweep: dict[str, int] = {}
        self._of_tenant: dict[str, int] = {}
        self._members_of: dict[str, dict[str, None]] = {}  # tenant -> its placed members, oldest grant first
        self._sweep_on_server: dict[tuple[str, int], int] = {}
        self._packs: dict[str, dict[int, int]] = {}  # key -> server -> members
        self._waiting: dict[str, OrderedDict[str, _Request]] = {}  # sweep -> its requests, oldest first
        self._slots: dict[int, int] = {}  # server -> server_slots(server)
        self._free: set[int] = set()  # servers holding fewer members than their slots
        self._heap: list[tuple[int, int]] = []  # (-free slots, server) of every free server, and stale ones

    # ------------------------------------------------------------------ servers and sweeps
    def add_server(self, server: int, n_slots: int | None) -> None:
        self.n_slots[server] = n_slots
        self._resize(server)

    def remove_server(self, server: int) -> list[str]:
        """Forget a server (it died for good); returns the members it held (their slots are freed)."""
        self._advance()
        self.n_slots.pop(server, None)
        for sweep in self.sweeps.values():
            sweep.caps.pop(server, None)
        lost = [m for m, (_, s) in self.placed.items() if s == server]
        for member in lost:
            self.release(member)
        self._slots.pop(server, None)
        self._free.discard(server)
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
        reopened = self.sweeps.get(sweep)
        if reopened is not None and reopened.tenant != tenant:  # its slots move to the new tenant
            held = self._of_sweep.get(sweep, 0)
            _add(self._of_tenant, reopened.tenant, -held)
            _add(self._of_tenant, tenant, held)
            moved = [m for m, (sw, _) in self.placed.items() if sw == sweep]
            for member in moved:
                self._members_of[reopened.tenant].pop(member)
            if not self._members_of.get(reopened.tenant, True):
                del self._members_of[reopened.tenant]
            if moved:
                members = [*self._members_of.get(tenant, ()), *moved]
                self._members_of[tenant] = dict.fromkeys(sorted(members, key=self.granted.__getitem__))
        self.sweeps[sweep] = _Sweep(tenant, dict(caps))
        self._waiting.setdefault(sweep, OrderedDict())
        self._resize_sized_by_sweeps()

    def set_cap(
        self, sweep: str, server: int, cap: int, member_bytes: int | None = None, data_bytes: int = 0
    ) -> None:
        """The sweep's slots on a server (one that joined after it opened, too), and the measured
        memory of one of its members and of its data there (``None``: not measured, admitted by slots)."""
        self.sweeps[sweep].caps[server] = cap
        if member_bytes is not None:
            self.sweeps[sweep].member_bytes[server] = member_bytes
            self.sweeps[sweep].data_bytes[server] = data_bytes
        if server in self.n_slots:
            self._resize(server)

    def set_memory(self, server: int, budget: int | None) -> None:
        """The bytes the server's packs may fill (``None``: no memory limit, slots only)."""
        self.memory[server] = budget

    def memory_used(self, server: int, leaving: str | Collection[str] | None = None) -> int:
        """Measured bytes the server's members hold: each member, plus each sweep's data once
        (``leaving``: as if that member, or those members, had left)."""
        gone = self._leaving(server, leaving)
        used = 0
        for name, sweep in self.sweeps.items():
            held = self._sweep_on_server.get((name, server), 0) - gone.get(name, 0)
            if held > 0:
                used += held * sweep.member_bytes.get(server, 0) + sweep.data_bytes.get(server, 0)
        return used

    def remove_sweep(self, sweep: str) -> list[str]:
        """Close a sweep: its queued members are dropped and its placed members' slots freed (returned)."""
        self._advance()
        for member in list(self._waiting.get(sweep, ())):
            self._dequeue(member)
        placed = [m for m, (s, _) in self.placed.items() if s == sweep] if self._of_sweep.get(sweep) else []
        for member in placed:
            self.release(member)
        self.sweeps.pop(sweep, None)
        self._waiting.pop(sweep, None)
        self._resize_sized_by_sweeps()
        return placed

    # ------------------------------------------------------------------ members
    def request(self, member: str, sweep: str, key: str | None = None) -> None:
        """Queue ``member`` of ``sweep`` for a slot (``key``: what it packs with, its architecture
        within its recipe; members of one key go to the same server when they can)."""
        if sweep not in self.sweeps:
            raise KeyError(f"FairShare: no open sweep {sweep!r}")
        self._order += 1
        self._enqueue(_Request(member, sweep, key, self._order))

    def cancel(self, member: str) -> None:
        """Drop a queued request (its member gave up waiting)."""
        self._dequeue(member)

    def release(self, member: str) -> int | None:
        """Free the member's slot (or drop its request); returns the server it was on."""
        self._dequeue(member)
        if member not in self.placed:
            return None
        self._advance()  # the slot-seconds it held up to now
        return self._unplace(member)

    def assign(self) -> list[tuple[str, int]]:
        """Give free slots to queued members, fairly (module docstring); returns ``(member, server)``."""
        grants = []
        while True:
            grant = self._next_grant()
            if grant is None:
                return grants
            request, server = grant
            self._advance()
            self._dequeue(request.member)
            self._place(request.member, request.sweep, server, request.key)
            grants.append((request.member, server))

    def preempt(self, keep: Iterable[str] = ()) -> list[tuple[str, str, int]]:
        """Move slots from tenants over their share (or of a lower priority) to tenants waiting.

        Call it after :meth:`assign` (free slots go first). A queued member with no room anywhere
        takes the slot of a placed member of another tenant on a server where its sweep has room:
        one of a lower ``priority``, else of the tenant holding the most slots per unit of weight,
        as long as that tenant holds more per unit of weight than the receiver will after the
        move (so a move is never undone by the next). The newest placed member of the donor is
        chosen; ``keep`` lists members that must not be chosen (still joining). When no single
        member frees the memory the receiver needs, the fewest members of one server that do are
        chosen, in the same order, each from a donor that held more than the receiver will before
        giving it.

        Returns ``(parked, granted, server)`` per parked member: ``parked`` lost its slot (released
        here; the caller parks it and queues it again), ``granted`` holds a slot there now (one
        member may take the slots of several).
        """
        keep = set(keep)
        moves = []
        while True:
            move = self._next_move(keep)
            if move is None:
                return moves
            parked, request, server = move
            for member in parked:
                self.release(member)
            self._dequeue(request.member)
            self._place(request.member, request.sweep, server, request.key)
            moves += [(member, request.member, server) for member in parked]

    # ------------------------------------------------------------------ accounting
    def live(self, tenant: str | None = None, sweep: str | None = None, server: int | None = None) -> int:
        """Slots held, filtered by tenant, sweep and server."""
        if sweep is not None:
            if tenant is not None and (sweep not in self.sweeps or self.sweeps[sweep].tenant != tenant):
                return 0
            if server is None:
                return self._of_sweep.get(sweep, 0)
            return self._sweep_on_server.get((sweep, server), 0)
        if tenant is not None:
            if server is None:
                return self._of_tenant.get(tenant, 0)
            return sum(
                self._sweep_on_server.get((name, server), 0)
                for name, sw in self.sweeps.items()
                if sw.tenant == tenant
            )
        if server is not None:
            return self._on_server.get(server, 0)
        return len(self.placed)

    def queued(self, tenant: str | None = None, sweep: str | None = None) -> int:
        """Requests waiting for a slot, filtered by tenant and sweep."""
        if sweep is not None:
            if tenant is not None and (sweep not in self.sweeps or self.sweeps[sweep].tenant != tenant):
                return 0
            return len(self._waiting.get(sweep, ()))
        if tenant is not None:
            return sum(len(self._waiting[name]) for name, sw in self.sweeps.items() if sw.tenant == tenant)
        return len(self.queue)

    def server_slots(self, server: int) -> int:
        """The server's slots: its own ``n_slots``, or the most slots an open sweep has on it."""
        own = self.n_slots.get(server)
        if own is not None:
            return own
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
    def _place(self, member: str, sweep: str, server: int, key: str | None) -> None:
        """Give ``member`` a slot of ``sweep`` on ``server`` (moving it if it held one)."""
        if member in self.placed:
            self._count(member, -1)
        self.placed[member] = (sweep, server)
        self.keys[member] = key
        self._order += 1
        self.granted[member] = self._order
        self._count(member, +1)

    def _unplace(self, member: str) -> int:
        """Free the slot ``member`` holds; returns its server."""
        self._count(member, -1)
        self.keys.pop(member, None)
        self.granted.pop(member, None)
        return self.placed.pop(member)[1]

    def _enqueue(self, request: _Request) -> None:
        """Queue ``request`` (replacing its member's earlier one) behind every request before it."""
        earlier = self.queue.get(request.member)
        if earlier is not None:
            self._waiting[earlier.sweep].pop(request.member, None)
        self.queue[request.member] = request
        self._waiting[request.sweep][request.member] = request

    def _dequeue(self, member: str) -> None:
        request = self.queue.pop(member, None)
        if request is not None:
            self._waiting[request.sweep].pop(member, None)

    def _resize(self, server: int) -> None:
        """Recompute the server's slots (:meth:`server_slots`) and whether one is free."""
        self._slots[server] = self.server_slots(server)
        self._refree(server)

    def _resize_sized_by_sweeps(self) -> None:
        for server, own in self.n_slots.items():
            if own is None:
                self._resize(server)

    def _refree(self, server: int) -> None:
        spare = self._spare(server) if server in self._slots else 0
        if spare > 0:
            self._free.add(server)
            heapq.heappush(self._heap, (-spare, server))
            if len(self._heap) > 4 * len(self._free) + 64:  # mostly stale: rebuild
                self._heap = [(-self._spare(s), s) for s in self._free]
                heapq.heapify(self._heap)
        else:
            self._free.discard(server)

    def _count(self, member: str, sign: int) -> None:
        sweep, server = self.placed[member]
        _add(self._on_server, server, sign)
        _add(self._of_sweep, sweep, sign)
        _add(self._of_tenant, self.sweeps[sweep].tenant, sign)
        members = self._members_of.setdefault(self.sweeps[sweep].tenant, {})
        if sign > 0:
            members[member] = None
        else:
            members.pop(member, None)
            if not members:
                del self._members_of[self.sweeps[sweep].tenant]
        _add(self._sweep_on_server, (sweep, server), sign)
        key = self.keys.get(member)
        if key is not None:
            pack = self._packs.setdefault(key, {})
            _add(pack, server, sign)
            if not pack:
                del self._packs[key]
        self._refree(server)

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
            for name, held in self._of_tenant.items():
                self.tenants[name].slot_seconds += held * dt
            self._now = now
        if not self._history or now - self._history[-1][0] >= HISTORY_EVERY_S:  # not on every event
            self._history.append((now, self._totals()))
        while len(self._history) > 1 and self._history[1][0] <= now - 2 * SHARE_WINDOW_S:
            self._history.popleft()  # keeps one entry at or before the oldest window start

    def _spare(self, server: int) -> int:
        return self._slots[server] - self._on_server.get(server, 0)

    def _fits(self, sweep: str, server: int) -> bool:
        """Whether ``server`` has a free slot (and the memory) for a member of ``sweep``."""
        held = self._sweep_on_server.get((sweep, server), 0)
        return (
            server in self._free
            and held < self.sweeps[sweep].caps.get(server, 0)
            and self._memory_fits(sweep, server)
        )

    def _memory_fits(self, sweep: str, server: int, leaving: str | Collection[str] | None = None) -> bool:
        """Whether one more member of ``sweep`` fits the server's memory budget (``leaving``'s freed)."""
        budget, need = self.memory.get(server), self.sweeps[sweep].member_bytes.get(server)
        if budget is None or need is None:
            return True
        held = self._sweep_on_server.get((sweep, server), 0) - self._leaving(server, leaving).get(sweep, 0)
        data = 0 if held > 0 else self.sweeps[sweep].data_bytes.get(server, 0)
        return self.memory_used(server, leaving) + need + data <= budget

    def _leaving(self, server: int, leaving: str | Collection[str] | None) -> dict[str, int]:
        """How many of ``leaving`` each sweep holds on ``server``."""
        members = () if leaving is None else (leaving,) if isinstance(leaving, str) else leaving
        gone: dict[str, int] = {}
        for member in members:
            sweep, where = self.placed.get(member, (None, None))
            if where == server:
                gone[sweep] = gone.get(sweep, 0) + 1
        return gone

    def _has_room(self, sweep: str) -> bool:
        caps, held = self.sweeps[sweep].caps, self._sweep_on_server
        if len(caps) < len(self._free):
            servers = (s for s, cap in caps.items() if s in self._free and held.get((sweep, s), 0) < cap)
        else:
            servers = (s for s in self._free if held.get((sweep, s), 0) < caps.get(s, 0))
        return any(self._memory_fits(sweep, s) for s in servers)

    def _next_move(self, keep: set[str]) -> tuple[list[str], _Request, int] | None:
        """The best (members to park, request, server) of :meth:`preempt`, or ``None``."""
        oldest: dict[str, _Request] = {}  # tenant -> its oldest request that may take a slot
        for waiting in self._waiting.values():
            if not waiting:
                continue
            request = next(iter(waiting.values()))
            tenant = self.tenants[self.sweeps[request.sweep].tenant]
            if tenant.max_slots is not None and self._of_tenant.get(tenant.name, 0) >= tenant.max_slots:
                continue
            if tenant.name not in oldest or request.order < oldest[tenant.name].order:
                oldest[tenant.name] = request

        def load(name: str, extra: int = 0) -> float:
            return (self._of_tenant.get(name, 0) + extra) / self.tenants[name].weight

        def may_give(donor: Tenant, receiver: Tenant, given: int = 0) -> bool:
            """Whether ``donor``, having given ``given`` slots for this move, may give one more."""
            if donor.name == receiver.name:
                return False
            if donor.priority != receiver.priority:
                return donor.priority < receiver.priority
            return load(donor.name, -given) > load(receiver.name, 1)

        holding = [self.tenants[name] for name in self._of_tenant]
        for name in sorted(oldest, key=lambda n: (-self.tenants[n].priority, load(n), oldest[n].order)):
            request, receiver = oldest[name], self.tenants[name]
            donors = {d.name for d in holding if may_give(d, receiver)}
            if not donors:  # checked per tenant before any member is looked at
                continue
            caps = self.sweeps[request.sweep].caps
            servers = {
                s for s in self.n_slots if self._sweep_on_server.get((request.sweep, s), 0) < caps.get(s, 0)
            }
            # The newest member of each donor that makes room alone (it ranks first among the
            # donor's members: a lower priority first, then the donor most over its share, then
            # the newest), found without a scan of every placed member.
            single = []
            for donor in donors:
                rank = (self.tenants[donor].priority, -load(donor))
                for member in reversed(self._members_of[donor]):
                    server = self.placed[member][1]
                    if member in keep or server not in servers:
                        continue
                    if self._memory_fits(request.sweep, server, leaving=member):
                        single.append(((*rank, -self.granted[member]), member, server))
                        break
            if single:
                _, member, server = min(single)
                return [member], request, server
            candidates: dict[int, list[tuple[tuple, str, str]]] = {}  # server -> (rank, member, donor)
            for donor in donors:
                for member in self._members_of[donor]:
                    server = self.placed[member][1]
                    if member not in keep and server in servers:
                        rank = (self.tenants[donor].priority, -load(donor), -self.granted[member])
                        candidates.setdefault(server, []).append((rank, member, donor))
            several = []  # the fewest members of one server whose slots together make room
            for server, ranked in candidates.items():
                victims: list[str] = []
                given: dict[str, int] = {}
                for _, member, donor in sorted(ranked):
                    if not may_give(self.tenants[donor], receiver, given.get(donor, 0)):
                        continue
                    victims.append(member)
                    given[donor] = given.get(donor, 0) + 1
                    if self._memory_fits(request.sweep, server, leaving=victims):
                        several.append((len(victims), server, victims))
                        break
            if several:
                _, server, victims = min(several)
                return victims, request, server
        return None

    def _next_grant(self) -> tuple[_Request, int] | None:
        # Tenants in rank order (priority, then slots per weight); a tenant's candidate is the
        # oldest request among its sweeps with room (room depends on the sweep only, max_slots on
        # the tenant only); among tenants of the first rank that has one, the oldest request wins.
        # A tenant's oldest request bounds its candidate, so tenants of one rank are tried oldest
        # first and the search ends at the first tenant whose oldest request is younger than the best.
        if not self._free:
            return None
        oldest: dict[str, list[_Request]] = {}  # tenant -> the oldest request of each of its sweeps
        for waiting in self._waiting.values():
            if waiting:
                request = next(iter(waiting.values()))
                oldest.setdefault(self.sweeps[request.sweep].tenant, []).append(request)
        rank = {}
        for name, requests in oldest.items():
            tenant = self.tenants[name]
            held = self._of_tenant.get(name, 0)
            if tenant.max_slots is None or held < tenant.max_slots:
                rank[name] = (-tenant.priority, held / tenant.weight, min(r.order for r in requests))
        best: tuple[tuple, _Request] | None = None  # (its tenant's rank, request)
        for name in sorted(rank, key=rank.__getitem__):
            if best is not None and (rank[name][:2] != best[0][:2] or rank[name][2] > best[1].order):
                break
            request = next((r for r in sorted(oldest[name], key=_order) if self._has_room(r.sweep)), None)
            if request is not None and (best is None or request.order < best[1].order):
                best = (rank[name], request)
        if best is None:
            return None
        return best[1], self._server_for(best[1])

    def _server_for(self, request: _Request) -> int:
        """Of the servers with room: most members of the request's key (its architecture within its
        recipe), then most free slots, then the lowest index."""
        sweep = request.sweep
        pack = self._packs.get(request.key, {}) if request.key is not None else {}
        near = pack if len(pack) <= len(self._free) else [s for s in self._free if s in pack]
        best = max(
            (s for s in near if self._fits(sweep, s)),
            key=lambda s: (pack[s], self._spare(s), -s),
            default=None,
        )
        if best is not None:
            return best
        caps = self.sweeps[sweep].caps
        if len(caps) < len(self._free):
            return max((s for s in caps if self._fits(sweep, s)), key=lambda s: (self._spare(s), -s))
        # The top of the heap of free servers (most free slots, lowest index) that fits the sweep.
        # Every free server has an entry with its current free slots; other entries are stale.
        heap, passed = self._heap, []
        try:
            while True:
                spare, server = heap[0]
                if server not in self._free or -spare != self._spare(server):
                    heapq.heappop(heap)
                elif self._fits(sweep, server):
                    return server
                else:
                    passed.append(heapq.heappop(heap))
        finally:
            for entry in passed:
                heapq.heappush(heap, entry)


def _order(request: _Request) -> int:
    return request.order


def _add(counts: dict, key, n: int) -> None:
    """``counts[key] += n``, deleting the entry when it reaches 0 (counts of gone servers do not pile up)."""
    total = counts.get(key, 0) + n
    if total:
        counts[key] = total
    else:
        counts.pop(key, None)
