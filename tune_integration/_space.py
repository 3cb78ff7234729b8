"""Tune's placeholders in a sweep's configs, resolved on the driver the way Tune resolves them.

``tune.run`` / ``Tuner.fit`` replace every non-primitive value of the search space (a
``tune.sample_from`` function, a class, a callable, any object) with a placeholder
``("__fn_ph" | "__ref_ph", hash)`` before a searcher sees the space, and resolve a trial's config
(``resolve_placeholders``) only when Tune adds the trial: member trials get real values, but the
configs the searcher samples or suggests on the driver hold placeholders. Tune hands searchers
no resolver map, so :func:`tune_run_locals` reads it from the ``tune.run`` call on the stack
(ray 2.x keeps it in the local ``placeholder_resolvers``); without it, configs that hold
placeholders are left unchecked rather than rejected.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from typing import Any

from ray.tune.impl.placeholder import _FunctionResolver, _RefResolver, resolve_placeholders
from ray.tune.search import SearchAlgorithm, Searcher
from ray.tune.search.variant_generator import generate_variants

from ._service import is_tune_run

TOKENS = (_FunctionResolver.TOKEN, _RefResolver.TOKEN)
Resolvers = Mapping[tuple, list]
"""Tune's map from a placeholder's path in the space to its resolvers."""


def is_placeholder(value: Any) -> bool:
    """Whether ``value`` is one of Tune's placeholders ``("__fn_ph" | "__ref_ph", hash)``."""
    return isinstance(value, tuple) and len(value) == 2 and value[0] in TOKENS and isinstance(value[1], str)


def placeholders(config: Any, kinds: tuple[str, ...] = TOKENS) -> bool:
    """Whether ``config`` holds a placeholder of ``kinds`` anywhere (in nested dicts, lists, tuples)."""
    if is_placeholder(config):
        return config[0] in kinds
    if isinstance(config, Mapping):
        return any(placeholders(v, kinds) for v in config.values())
    if isinstance(config, (list, tuple)):
        return any(placeholders(v, kinds) for v in config)
    return False


def tune_run_locals() -> Mapping[str, Any]:
    """The local variables of the ``ray.tune.tune.run`` call on this thread's stack (``{}``: none).

    Searchers are called from inside ``tune.run`` (``Tuner.fit`` calls it too): when Tune tells
    them the search space and whenever it asks for a config.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if is_tune_run(frame):
            return frame.f_locals
        frame = frame.f_back
    return {}


def tune_resolvers() -> Resolvers | None:
    """The placeholder resolvers of the running ``tune.run`` (``None``: not inside one, or none)."""
    resolvers = tune_run_locals().get("placeholder_resolvers")
    return resolvers if isinstance(resolvers, Mapping) and resolvers else None


def resolve(
    config: Mapping[str, Any], resolvers: Resolvers | None, *, sample: bool = True
) -> dict[str, Any] | None:
    """A copy of ``config`` with Tune's placeholders resolved as in a trial; ``None`` where some stay.

    ``sample=False`` resolves the objects (``__ref_ph``) but not the ``sample_from`` functions
    (``__fn_ph``): Tune draws those afresh in each trial, so a draw made here says nothing about
    the trial's value; such a config gives ``None``.
    """
    out = copy.deepcopy(dict(config))
    if not placeholders(out):
        return out
    if resolvers:
        kept = resolvers if sample else {p: r for p, r in resolvers.items() if _refs_only(r)}
        resolve_placeholders(out, kept)
    return None if placeholders(out) else out


def _refs_only(resolvers: list) -> bool:
    return all(isinstance(r, _RefResolver) for r in resolvers)


def grid_points(space: Mapping[str, Any]) -> int:
    """Configs in one pass over the space's ``grid_search`` values (1 without one)."""
    return sum(1 for _ in generate_variants(copy.deepcopy(dict(space))))


def tune_search_generator(searcher: Searcher) -> SearchAlgorithm | None:
    """The running ``tune.run``'s ``SearchGenerator`` around ``searcher`` (``None``: none found).

    Also once it is a ``PackedSearchGenerator`` (the same object, see :mod:`._generator`).
    """
    generator = tune_run_locals().get("search_alg")
    if not isinstance(generator, SearchAlgorithm) or not isinstance(
        getattr(generator, "searcher", None), Searcher
    ):
        return None
    inner = generator.searcher
    while inner is not searcher and isinstance(getattr(inner, "searcher", None), Searcher):
        inner = inner.searcher  # e.g. the ConcurrencyLimiter of max_concurrent_trials
    return generator if inner is searcher else None
