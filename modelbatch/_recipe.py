"""Recipe: how to train ONE member from its config; the engine packs many of them."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import optim as mb_optim

OPTIMIZERS: dict[str, type[mb_optim.Optimizer]] = {
    "sgd": mb_optim.SGD,
    "adam": mb_optim.Adam,
    "adamw": mb_optim.AdamW,
    "rmsprop": mb_optim.RMSprop,
}

Data = tuple[torch.Tensor, torch.Tensor]
ScheduleFactory = Callable[[Mapping[str, Any], torch.optim.Optimizer], Any]


@dataclass
class Recipe:
    """How to train one member from its config: model, optimizer, loss, data and reporting.

    A pack trains many configs of one recipe at once; every member reads its own
    hyperparameters from its config (optimizer hyperparameters by name — ``lr``,
    ``weight_decay``, ``momentum``, ``beta1``/``beta2`` or ``betas``, ``eps``, ``alpha``,
    ``dampening`` — plus ``seed``), so that a member trained in a pack equals the same config
    trained alone.

    Args:
        model: ``config -> nn.Module``. Called under ``torch.manual_seed(config["seed"])``.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"`` or a :mod:`modelbatch.optim` class.
        loss: ``(outputs, targets) -> scalar`` for one member's batch (mean reduction).
        train_data: ``(X, y)`` tensors; each member draws its own shuffled batches of it.
        val_data: optional ``(X, y)`` evaluated at every report (``val_loss``, ``val_<metric>``).
        batch_size: samples per member per step.
        steps_per_report: optimizer steps between two reports.
        metrics: ``{name: fn(outputs, targets) -> scalar}``, e.g. ``{"acc": mb.metrics.accuracy}``.
        optimizer_defaults: hyperparameters used when a config does not give them.
        lr_schedule: optional ``(config, torch_optimizer) -> torch LRScheduler`` built per member;
            it is stepped once per optimizer step.
        subset: optional ``config -> index tensor`` of the training samples that member uses
            (k-fold, class subsets); ``None`` uses all of ``train_data``.
        val_subset: optional ``config -> index tensor`` into ``val_data``: that member is
            validated on those samples only (k-fold: pass ``val_data=train_data`` and the fold).
        grad_clip: clip each member's gradient to this norm (or the config's ``grad_clip``).
        order: ``"member"`` (each member its own shuffle, from its seed) or ``"shared"`` (one
            order for every member: a different experiment from training each alone).
        dtype, device: where members train (``device=None``: CUDA when available).
        backend: how the pack runs its members (``"auto"``, ``"vmap"``, ``"chunked"``, ``"loop"``;
            see :class:`~modelbatch.ModelBatch`). Results are bitwise reproducible for a fixed backend.

    Example:
        >>> import torch, modelbatch as mb
        >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> recipe = mb.Recipe(model=lambda cfg: torch.nn.Linear(4, 3), optimizer="adam",
        ...     loss=torch.nn.functional.cross_entropy, train_data=(X, y), val_data=(X, y),
        ...     batch_size=16, steps_per_report=4, metrics={"acc": mb.metrics.accuracy})
        >>> recipe.hparams({"lr": 0.1, "seed": 3})["lr"]
        0.1
    """

    model: Callable[[Mapping[str, Any]], nn.Module]
    optimizer: str | type[mb_optim.Optimizer]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train_data: Data
    val_data: Data | None = None
    batch_size: int = 32
    steps_per_report: int = 50
    metrics: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    optimizer_defaults: Mapping[str, Any] = field(default_factory=dict)
    lr_schedule: ScheduleFactory | None = None
    subset: Callable[[Mapping[str, Any]], torch.Tensor | None] | None = None
    val_subset: Callable[[Mapping[str, Any]], torch.Tensor] | None = None
    grad_clip: float | None = None
    order: str = "member"
    dtype: torch.dtype = torch.float32
    device: str | torch.device | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        api = "mb.Recipe"
        if not callable(self.model):
            raise TypeError(
                f"{api}: model must be a function config -> nn.Module, got {type(self.model).__name__}."
            )
        if isinstance(self.optimizer, str):
            if self.optimizer.lower() not in OPTIMIZERS:
                raise ValueError(
                    f"{api}: unknown optimizer {self.optimizer!r}; choose one of {sorted(OPTIMIZERS)} "
                    "or pass a modelbatch.optim class."
                )
        elif not (isinstance(self.optimizer, type) and issubclass(self.optimizer, mb_optim.Optimizer)):
            raise TypeError(
                f"{api}: optimizer must be a name or a modelbatch.optim class, got {self.optimizer!r}."
            )
        if not callable(self.loss):
            raise TypeError(f"{api}: loss must be callable (outputs, targets) -> scalar.")
        for name in ("batch_size", "steps_per_report"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{api}: {name} must be a positive int, got {value!r}.")
        self.train_data = _check_data(api, "train_data", self.train_data)
        if self.val_data is not None:
            self.val_data = _check_data(api, "val_data", self.val_data)
        if self.val_subset is not None and self.val_data is None:
            raise ValueError(f"{api}: val_subset needs val_data (for k-fold, pass val_data=train_data).")
        if self.order not in ("member", "shared"):
            raise ValueError(f"{api}: order must be 'member' or 'shared', got {self.order!r}.")
        for name, fn in self.metrics.items():
            if not callable(fn):
                raise TypeError(f"{api}: metric {name!r} is not callable.")

    @property
    def optimizer_class(self) -> type[mb_optim.Optimizer]:
        """The :mod:`modelbatch.optim` class this recipe trains with."""
        if isinstance(self.optimizer, str):
            return OPTIMIZERS[self.optimizer.lower()]
        return self.optimizer

    def hparam_names(self) -> list[str]:
        """The per-member hyperparameters of the optimizer (what a config may set)."""
        return list(self.optimizer_class.hparam_bounds)

    def hparams(self, config: Mapping[str, Any]) -> dict[str, float]:
        """This config's optimizer hyperparameters: from the config, ``optimizer_defaults`` or the class."""
        defaults = _constructor_defaults(self.optimizer_class)
        out = {}
        for name in self.hparam_names():
            value = _lookup(config, name)
            if value is None:
                value = _lookup(self.optimizer_defaults, name)
            if value is None:
                value = defaults[name]
            out[name] = float(value)
        return out

    def flags(self) -> dict[str, bool]:
        """Pack-wide boolean optimizer options (nesterov, amsgrad, ...) from ``optimizer_defaults``."""
        sig = inspect.signature(self.optimizer_class.__init__)
        return {
            k: bool(v)
            for k, v in self.optimizer_defaults.items()
            if k in sig.parameters and isinstance(v, bool)
        }

    def resolve_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _lookup(config: Mapping[str, Any], name: str) -> Any:
    if name in config:
        return config[name]
    if name in ("beta1", "beta2") and "betas" in config:
        return config["betas"][0 if name == "beta1" else 1]
    return None


def _constructor_defaults(cls: type[mb_optim.Optimizer]) -> dict[str, float]:
    params = inspect.signature(cls.__init__).parameters
    out = {name: p.default for name, p in params.items() if name in cls.hparam_bounds}
    if "betas" in params:
        out["beta1"], out["beta2"] = params["betas"].default
    return out


def _check_data(api: str, name: str, data: Any) -> Data:
    if not isinstance(data, Sequence) or len(data) != 2:
        raise TypeError(f"{api}: {name} must be a pair (X, y) of tensors with the same first dimension.")
    X, y = (torch.as_tensor(t) for t in data)
    if X.shape[0] != y.shape[0]:
        raise ValueError(
            f"{api}: {name} has {X.shape[0]} inputs but {y.shape[0]} targets; X and y must have the same "
            "batch (first) dimension."
        )
    if X.shape[0] == 0:
        raise ValueError(f"{api}: {name} is empty.")
    return X, y
