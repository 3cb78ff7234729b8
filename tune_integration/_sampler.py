"""SpaceSampler: the inner searcher when none is given; random/grid samples of the Tune search space."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
from ray import cloudpickle
from ray.tune.search import Searcher
from ray.tune.search.variant_generator import generate_variants


class SpaceSampler(Searcher):
    """Suggests configs sampled from the Tune search space, like Tune's default generator.

    ``grid_search`` values are cycled, one pass of the grid after another as Tune's default
    generator runs them (ModelBatchSearcher has Tune run grid points x ``num_samples`` trials).
    """

    def __init__(self, random_state: Any = None) -> None:
        super().__init__()
        self.space: dict[str, Any] | None = None
        self.rng = np.random.default_rng(random_state)
        self.suggested = 0
        self._variants: Iterator[dict[str, Any]] | None = None

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        self.space = copy.deepcopy(config) if config else self.space
        self._variants = None
        return True

    def samples(self, n: int) -> list[dict[str, Any]]:
        """Up to ``n`` distinct configs of the space (to size slots), without consuming suggestions."""
        if not self.space:
            return []
        rng, out = copy.deepcopy(self.rng), {}
        for _ in range(n):
            for _, spec in generate_variants(copy.deepcopy(self.space), random_state=rng):
                out.setdefault(repr(spec), spec)
        return list(out.values())[:n]

    def suggest(self, trial_id: str) -> dict[str, Any]:
        if not self.space:
            raise ValueError(
                "ModelBatchSearcher: no search space; pass it to tune.run(config=...) or "
                "tune.Tuner(param_space=...), or wrap a searcher that has its own space."
            )
        if self._variants is None:
            self._variants = self._cycle()
        self.suggested += 1
        return next(self._variants)

    def _cycle(self) -> Iterator[dict[str, Any]]:
        while True:
            for _, spec in generate_variants(copy.deepcopy(self.space), random_state=self.rng):
                yield spec

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def get_state(self) -> dict[str, Any]:
        return {
            "space": self.space,
            "suggested": self.suggested,
            "rng": self.rng,
            "metric": self._metric,
            "mode": self._mode,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if "space" not in state or "rng" not in state:
            raise ValueError(
                "ModelBatchSearcher: the saved searcher state is not a random/grid sampler's (the sweep "
                "was started with another inner searcher, e.g. OptunaSearch); resume it with the "
                "searcher it started with."
            )
        self.space, self.suggested, self.rng = state["space"], state["suggested"], state["rng"]
        self._metric, self._mode = state["metric"], state["mode"]
        self._variants = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_variants": None}  # a generator does not pickle; a new pass starts

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            cloudpickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(cloudpickle.load(f))
