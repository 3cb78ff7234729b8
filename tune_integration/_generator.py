"""The search algorithm a ModelBatchSearcher runs under in Tune, which population-based training accepts.

Tune wraps every ``Searcher`` passed as ``search_alg`` in a ``SearchGenerator``, and
``PopulationBasedTraining`` (and ``PB2``) refuse any ``SearchGenerator`` ("Search algorithms cannot be
used with PopulationBasedTraining schedulers"): an adaptive searcher's suggestions would compete with
the scheduler's own exploit and explore. A ModelBatchSearcher's suggestions are only the initial
population (as Tune's default ``BasicVariantGenerator``'s, which PBT accepts); the scheduler then
mutates its members' configs, and the slot servers continue each exploited member from the donor's
state with its new config. So the searcher turns the ``SearchGenerator`` Tune made around it into a
:class:`PackedSearchGenerator`: the same object and behaviour under a class that is not a subclass.
"""

from __future__ import annotations

from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.search import SearchAlgorithm, SearchGenerator

from ._space import tune_run_locals, tune_search_generator

_NOT_COPIED = ("__dict__", "__weakref__", "__module__", "__qualname__", "__doc__")

PackedSearchGenerator = type(
    "PackedSearchGenerator",
    (SearchAlgorithm,),
    {
        **{name: value for name, value in vars(SearchGenerator).items() if name not in _NOT_COPIED},
        "__module__": __name__,
        "__doc__": "Tune's ``SearchGenerator`` (its methods, unchanged) as a ``SearchAlgorithm`` "
        "that ``PopulationBasedTraining`` accepts (see the module docstring).",
    },
)


def accept_population_based_training(searcher: object) -> None:
    """Let the running ``tune.run``'s scheduler be PBT / PB2: its ``SearchGenerator`` around ``searcher``
    becomes a :class:`PackedSearchGenerator` (idempotent; nothing outside a Tune run, nor under
    another scheduler: every other sweep keeps Tune's own class)."""
    if not isinstance(tune_run_locals().get("scheduler"), PopulationBasedTraining):
        return
    generator = tune_search_generator(searcher)
    if generator is not None and type(generator) is SearchGenerator:
        generator.__class__ = PackedSearchGenerator
