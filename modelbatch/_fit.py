"""mb.fit: train many configs of one recipe as packs, without Ray; history as a DataFrame."""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from ._architecture import architecture_signature, build_model, member_seed, pack_label
from ._deprecated import renamed_kwarg
from ._hparams import check_positive_int
from ._recipe import Recipe
from ._trainer import PackTrainer
from .callbacks import Callback, Progress, check_callbacks

if TYPE_CHECKING:
    from ._mlflow import MLflowLogger


def fit(
    recipe: Recipe,
    configs: Sequence[Mapping[str, Any]],
    reports: int = 10,
    *,
    callbacks: Iterable[Callback] = (),
    n_slots: int | None = None,
    progress: bool | None = None,
    nan_guard: bool = True,
    mlflow: bool | Mapping[str, Any] | MLflowLogger | None = None,
    capacity: int | None = None,
) -> pd.DataFrame:
    """Train every config of ``recipe`` for ``reports`` reports, packed; one row per member per report.

    Configs whose models have the same parameter shapes and module settings share a pack (a
    dropout module's rate is per member: configs differing only in it share one); others get
    packs of their own. A member's seed is ``config["seed"]`` (default: its index in
    ``configs``): it seeds the model's initialization and the member's own dropout stream, so a
    config trained here equals the same config trained alone with ``fit(recipe, [config])``
    (and, on the CPU, a plain torch loop after ``torch.manual_seed(seed); model = recipe.model(config)``
    on the same batches).
    Each pack has ``n_slots`` slots (``None``: one per config of its architecture); with fewer
    slots than configs, members train in waves: a stopped member's slot is refilled by the next
    config at once. ``capacity=`` is the deprecated name of ``n_slots=`` (FutureWarning; removed
    in the next release).
    ``mlflow=True`` (MLflow's default tracking URI), a dict of :class:`mb.MLflowLogger` arguments
    or a logger logs the sweep to MLflow: one parent run, one child run per member.

    Returns:
        A DataFrame with columns ``member``, ``pack`` (the label of the member's architecture,
        as in a sweep's results), ``training_iteration``, ``step``, ``loss``, the
        validation metrics (``val_loss``, ``val_<metric>``), ``status`` (``running`` or, on a
        member's last row, why it stopped: ``finished``, ``early stopped: ...``, ``errored: ...``)
        and ``config/<key>`` for every config key.

    Example:
        >>> import torch, modelbatch as mb
        >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> recipe = mb.Recipe(model=lambda cfg: torch.nn.Linear(4, 3), optimizer="adam",
        ...     loss=torch.nn.functional.cross_entropy, train_data=(X, y), val_data=(X, y),
        ...     batch_size=16, steps_per_report=4, metrics={"acc": mb.metrics.accuracy})
        >>> history = mb.fit(recipe, [{"lr": 1e-3}, {"lr": 1e-2}], reports=3, progress=False)
        >>> history.shape[0], sorted(history["member"].unique().tolist())
        (6, [0, 1])
    """
    api = "mb.fit"
    if not isinstance(recipe, Recipe):
        raise TypeError(f"{api}: expected a mb.Recipe as first argument, got {type(recipe).__name__}.")
    if isinstance(configs, Mapping) or not isinstance(configs, Iterable):
        raise TypeError(
            f"{api}: configs must be a list of config dicts, one per member; got a single "
            f"{type(configs).__name__}. Wrap it: [{configs!r}]."
        )
    configs = list(configs)
    for i, config in enumerate(configs):
        if not isinstance(config, Mapping):
            raise TypeError(
                f"{api}: config {i} is a {type(config).__name__}, not a dict; pass one dict per member, "
                "e.g. [{'lr': 0.1}, {'lr': 0.01}]."
            )
    configs = [dict(c) for c in configs]
    if not configs:
        raise ValueError(f"{api}: got no configs; pass a list with at least one config dict.")
    check_positive_int(api, "reports", reports)
    n_slots = renamed_kwarg(api, "capacity", "n_slots", capacity, n_slots)
    if n_slots is not None:
        check_positive_int(api, "n_slots", n_slots, alternative="None")
    for i, config in enumerate(configs):
        config.setdefault("seed", i)
        member_seed(config, i, api)
        recipe.hparams(config, api=f"{api}: config {i}")
    callbacks = check_callbacks(api, callbacks)
    groups = _group_by_architecture(
        recipe, configs
    )  # builds every model: a bad config raises before any start
    if progress is None:
        progress = sys.stderr.isatty()
    if progress:
        callbacks.append(Progress(total=len(configs) * reports))
    mlflow_callback = None
    if mlflow is not None and mlflow is not False:
        from ._mlflow import fit_callback

        mlflow_callback = fit_callback(mlflow)
        callbacks.append(mlflow_callback)
    for cb in callbacks:
        cb.on_fit_start(dict(enumerate(configs)))
    rows: list[dict[str, Any]] = []
    try:
        for group in groups:
            _train_group(recipe, configs, group, reports, n_slots or len(group), callbacks, rows, nan_guard)
    except BaseException as exc:
        if mlflow_callback is not None:
            mlflow_callback.on_fit_interrupted(exc)
        raise
    history = pd.DataFrame(rows)
    for cb in callbacks:
        cb.on_fit_end(history)
    return history


def _group_by_architecture(recipe: Recipe, configs: list[dict[str, Any]]) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        signature = architecture_signature(build_model(recipe, config, config["seed"], f"mb.fit: config {i}"))
        groups.setdefault(signature, []).append(i)
    return list(groups.values())


def _train_group(
    recipe: Recipe,
    configs: list[dict[str, Any]],
    group: list[int],
    reports: int,
    n_slots: int,
    callbacks: list[Callback],
    rows: list[dict[str, Any]],
    nan_guard: bool,
) -> None:
    trainer = PackTrainer(recipe, min(n_slots, len(group)), example_config=configs[group[0]])
    label = pack_label(trainer.signature)
    for cb in callbacks:
        if hasattr(cb, "on_pack_start"):
            cb.on_pack_start(trainer)
    pending = deque(group)
    last: dict[int, dict[str, Any]] = {}
    while pending and trainer.free_slots():
        member = pending.popleft()
        trainer.add(member, configs[member])
    while trainer.live():
        results = trainer.train_report()
        for member, report in results.items():
            row = {"member": member, "pack": label, **report, "status": "running"}
            row.update({f"config/{k}": v for k, v in configs[member].items()})
            rows.append(row)
            last[member] = row
        ended = trainer.after_report(results, callbacks, max_reports=reports, nan_guard=nan_guard)
        for member, end in ended.items():
            last[member]["status"] = end.status
            trainer.remove(member)
            if pending:
                nxt = pending.popleft()
                trainer.add(nxt, configs[nxt])
