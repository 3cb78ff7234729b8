"""GroupingLookahead: suggests waiting configs so that live members share architectures; loses none."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")
from ray import cloudpickle
from ray.tune.search import Searcher

from tune_integration._lookahead import GroupingLookahead


class Recording(Searcher):
    """An inner searcher suggesting ``archs`` in order (config ``{"arch", "n"}``) and recording calls."""

    def __init__(self, archs: str) -> None:
        super().__init__(metric="val_loss", mode="min")
        self.archs, self.suggested, self.results, self.completed = archs, {}, [], []
        self.max_concurrent = None

    def suggest(self, trial_id: str) -> dict | str | None:
        n = len(self.suggested)
        if n >= len(self.archs):
            return Searcher.FINISHED
        self.suggested[trial_id] = {"arch": self.archs[n], "n": n}
        return dict(self.suggested[trial_id])

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self.max_concurrent = max_concurrent
        return True

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.results.append((trial_id, result["x"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.completed.append(trial_id)


def lookahead(archs: str, ahead: int, num_samples: int | None = None) -> tuple[GroupingLookahead, Recording]:
    inner = Recording(archs)
    wrapper = GroupingLookahead(inner, key=lambda config: config["arch"], ahead=ahead)
    wrapper.set_search_properties("val_loss", "min", {}, num_samples=num_samples or len(archs))
    return wrapper, inner


def test_free_slots_go_to_the_architecture_most_live_members_share():
    wrapper, _ = lookahead("ababababab", ahead=4)
    first = [wrapper.suggest(f"t{i}")["arch"] for i in range(4)]
    assert first == ["a"] * 4  # in the inner order they would alternate
    wrapper.on_trial_complete("t0")
    assert wrapper.suggest("t4")["arch"] == "a" and wrapper.suggest("t5")["arch"] == "b"  # no "a" waits


def test_ahead_zero_keeps_the_inner_order():
    wrapper, _ = lookahead("abab", ahead=0)
    assert [wrapper.suggest(f"t{i}")["arch"] for i in range(4)] == list("abab")


def test_one_architecture_is_drawn_one_config_at_a_time():
    wrapper, inner = lookahead("aaaa", ahead=8)
    for i in range(3):
        wrapper.suggest(f"t{i}")
        assert len(inner.suggested) == i + 1  # an adaptive searcher sees every result it can


def test_every_config_is_suggested_once_and_no_more_than_num_samples_are_drawn():
    wrapper, inner = lookahead("abcabcaabbccab", ahead=3, num_samples=10)
    seen = []
    for i in range(12):
        config = wrapper.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            break
        seen.append(config["n"])
        if i % 2:
            wrapper.on_trial_complete(f"t{i - 1}")
    assert sorted(seen) == list(range(10)) and len(inner.suggested) == 10
    assert wrapper.suggest("late") == Searcher.FINISHED


def test_a_config_of_a_rare_architecture_waits_at_most_two_lookaheads():
    wrapper, _ = lookahead("b" + "a" * 30, ahead=2)
    order = []
    for i in range(12):
        order.append(wrapper.suggest(f"t{i}")["arch"])
        if i >= 1:
            wrapper.on_trial_complete(f"t{i - 1}")
    assert "b" in order[: 1 + 2 * 2 + 1]


def test_the_inner_searcher_gets_results_and_completions_under_its_own_ids():
    wrapper, inner = lookahead("abab", ahead=2)
    wrapper.set_max_concurrency(4)
    assert inner.max_concurrent == 6  # its configs waiting here count too
    configs = {f"t{i}": wrapper.suggest(f"t{i}") for i in range(4)}
    by_n = {c["n"]: inner_id for inner_id, c in inner.suggested.items()}
    for trial_id, config in configs.items():
        wrapper.on_trial_result(trial_id, {"x": config["n"]})
        wrapper.on_trial_complete(trial_id)
    assert sorted(inner.results) == sorted((by_n[n], n) for n in range(4))
    assert sorted(inner.completed) == sorted(by_n.values())


def test_state_round_trip_keeps_the_waiting_configs_and_id_map():
    wrapper, inner = lookahead("abababab", ahead=4)
    given = [wrapper.suggest(f"t{i}")["n"] for i in range(2)]
    state = cloudpickle.loads(cloudpickle.dumps(wrapper.get_state()))
    restored = GroupingLookahead(inner, key=lambda config: config["arch"], ahead=4)
    restored.set_state(state)
    assert [e["config"]["n"] for e in restored.waiting] == [e["config"]["n"] for e in wrapper.waiting]
    rest = []
    while (config := restored.suggest(f"r{len(rest)}")) != Searcher.FINISHED:
        rest.append(config["n"])
    assert sorted(given + rest) == list(range(8))
    restored.on_trial_complete("t0")
    assert inner.completed == [wrapper.inner_ids["t0"]]
