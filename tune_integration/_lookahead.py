"""Group members by architecture: draw a few configs ahead and hand out those that fill a pack.

A slot server trains one pack per architecture (configs whose models differ in shapes or module
settings, e.g. width or dropout, cannot share a pack). Handed out in the inner searcher's order,
a mixed space spreads a server's few slots over many packs of one member each, and nothing is
vectorized. :class:`GroupingLookahead` keeps up to ``ahead`` configs drawn from the inner
searcher waiting and gives Tune the one whose architecture most live members share.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

from ray.tune.search import Searcher

Key = Hashable | None
"""A config's architecture key (``None``: unknown, groups with nothing)."""


class GroupingLookahead(Searcher):
    """A Searcher wrapper that draws up to ``ahead`` configs ahead and groups them by ``key(config)``.

    Each suggestion goes to the waiting config whose key most live trials share (then the key
    most waiting configs share, then the oldest); a config passed over ``2 * ahead`` times goes
    first, so none waits for ever. Draws ahead only once two keys have been seen: a space of one
    architecture is suggested one config at a time, as without this wrapper.

    The inner searcher sees its own trial ids (``"<prefix><n>"``, one per draw) for the configs it
    suggests; results, completions and pauses of the Tune trial are passed on under that id. At
    most ``num_samples`` configs are drawn, so none is left waiting at the end of a sweep.
    """

    def __init__(self, searcher: Searcher, key: Callable[[dict[str, Any]], Key], ahead: int = 0) -> None:
        self.searcher = searcher  # Tune walks ``.searcher`` chains (to find the ConcurrencyLimiter)
        self.key = key
        self.ahead = ahead
        self.prefix = "mb_ahead_"
        self.waiting: list[dict[str, Any]] = []  # {"id", "config", "key", "passes"}, oldest first
        self.inner_ids: dict[str, str] = {}  # Tune trial id -> inner searcher's trial id
        self.live_keys: dict[str, Key] = {}  # Tune trial id -> key, until the trial completes
        self.keys_seen: set[Key] = set()
        self.drawn = 0
        self.limit: int | None = None
        self.exhausted = False
        super().__init__()

    @property
    def metric(self) -> str | None:
        return self.searcher.metric

    @property
    def mode(self) -> str | None:
        return self.searcher.mode

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        samples = spec.get("num_samples")
        self.limit = samples if isinstance(samples, int) and samples > 0 else None
        try:
            return self.searcher.set_search_properties(metric, mode, config, **spec)
        except TypeError:  # a searcher written before Tune passed ``**spec``
            return self.searcher.set_search_properties(metric, mode, config)

    def reset(self) -> None:
        """Forget the configs and trials of an earlier sweep (the inner searcher keeps its own state)."""
        self.waiting, self.inner_ids, self.live_keys = [], {}, {}
        self.keys_seen, self.drawn, self.exhausted = set(), 0, False

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """The inner searcher may hold the waiting configs too; the ConcurrencyLimiter above limits Tune's."""
        self.searcher.set_max_concurrency(max_concurrent + self.ahead)
        return False

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        self._draw()
        if not self.waiting:
            done = self.exhausted or (self.limit is not None and self.drawn >= self.limit)
            return Searcher.FINISHED if done else None
        chosen = self.waiting.pop(self._pick())
        for entry in self.waiting:
            entry["passes"] += 1
        self.inner_ids[trial_id] = chosen["id"]
        self.live_keys[trial_id] = chosen["key"]
        return chosen["config"]

    def peek(self, n: int) -> list[dict[str, Any]]:
        """Draw up to ``n`` configs now (fewer where the inner searcher has no more yet) and return
        the waiting ones; they are handed out later as any drawn ahead."""
        while len(self.waiting) < n and self._may_draw() and self._draw_one():
            pass
        return [entry["config"] for entry in self.waiting[:n]]

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(self.inner_ids.get(trial_id, trial_id), result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.live_keys.pop(trial_id, None)
        inner_id = self.inner_ids.pop(trial_id, trial_id)
        self.searcher.on_trial_complete(inner_id, result=result, error=error)

    def add_evaluated_point(self, *args: Any, **kwargs: Any) -> None:
        self.searcher.add_evaluated_point(*args, **kwargs)

    def on_pause(self, trial_id: str) -> None:
        self.searcher.on_pause(self.inner_ids.get(trial_id, trial_id))

    def on_unpause(self, trial_id: str) -> None:
        self.searcher.on_unpause(self.inner_ids.get(trial_id, trial_id))

    def get_state(self) -> dict[str, Any]:
        names = ("ahead", "waiting", "inner_ids", "live_keys", "keys_seen", "drawn", "limit", "exhausted")
        return {name: getattr(self, name) for name in names}

    def set_state(self, state: dict[str, Any]) -> None:
        ahead = self.ahead  # today's setting, like the servers' n_slots
        self.__dict__.update(state)
        self.ahead = ahead

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)

    # ------------------------------------------------------------------ internals
    def _draw(self) -> None:
        """Fill the waiting list: one config, or ``ahead`` more once two architectures were seen."""
        while self._may_draw():
            target = 1 + (self.ahead if len(self.keys_seen) > 1 else 0)
            if len(self.waiting) >= target or not self._draw_one():
                return

    def _may_draw(self) -> bool:
        return not self.exhausted and (self.limit is None or self.drawn < self.limit)

    def _draw_one(self) -> bool:
        """Ask the inner searcher for one config and keep it waiting; ``False``: it gave none."""
        inner_id = f"{self.prefix}{self.drawn}"
        config = self.searcher.suggest(inner_id)
        if config == Searcher.FINISHED:
            self.exhausted = True
        if not isinstance(config, dict):  # FINISHED, or None: the inner searcher is not ready yet
            return False
        self.drawn += 1
        key = self.key(config)
        self.keys_seen.add(key)
        self.waiting.append({"id": inner_id, "config": config, "key": key, "passes": 0})
        return True

    def _pick(self) -> int:
        overdue = [i for i, e in enumerate(self.waiting) if e["passes"] >= 2 * max(self.ahead, 1)]
        if overdue:
            return overdue[0]
        live = Counter(k for k in self.live_keys.values() if k is not None)
        waiting = Counter(e["key"] for e in self.waiting if e["key"] is not None)
        return max(
            range(len(self.waiting)),
            key=lambda i: (live[self.waiting[i]["key"]], waiting[self.waiting[i]["key"]], -i),
        )
