"""Recipe: how to train ONE member from its config; the engine packs many of them."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from . import optim as mb_optim
from ._backends import BACKENDS
from ._hparams import check_positive_int
from .data._source import check_data
from .data._stream import check_loader_kwargs

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
    trained alone. Optimizer hyperparameters sit at the top level of the config or in a nested
    dict under ``"optimizer"`` or ``"optim"`` (``{"optim": {"lr": 0.01}}``); one set in both
    places raises.

    Args:
        model: ``config -> nn.Module``. Called under ``torch.manual_seed(config["seed"])``.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"`` or a :mod:`modelbatch.optim` class.
        loss: ``(outputs, targets) -> scalar`` for one member's batch (mean reduction).
        train_data: ``(X, y)`` tensors, or a map-style ``torch.utils.data.Dataset`` whose items
            are ``(x, y)`` pairs; each member draws its own shuffled batches of it. Tensors move
            to the device once; a dataset is streamed: every step, the union of the members'
            batches is loaded by one ``DataLoader`` (``num_workers``, ``pin_memory``,
            ``loader_kwargs``) and routed to the members on the device. Either way member ``i``
            sees the batches of ``DataLoader(data, batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(seed_i))``.
        val_data: optional ``(X, y)`` or ``Dataset`` evaluated at every report (``val_loss``,
            ``val_<metric>``); a dataset is streamed in batches too.
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
            see :class:`~modelbatch.ModelBatch`). Results are bitwise reproducible, with ``"auto"``
            too: its choice depends on the pack and device type, never on timings.
        num_workers: ``DataLoader`` worker processes that load a dataset ahead of the training
            step (kept alive between reports); ``0`` loads in the training process. Results do
            not depend on it.
        pin_memory: pin loaded batches for fast copies to the GPU (``None``: when training on CUDA).
        loader_kwargs: further ``DataLoader`` arguments for a dataset (``prefetch_factor``,
            ``multiprocessing_context``, ``worker_init_fn``, ``collate_fn``, ...); not those that
            decide the batches (``batch_size``, ``shuffle``, ``sampler``, ...).

    Example:
        >>> import torch, modelbatch as mb
        >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> recipe = mb.Recipe(model=lambda cfg: torch.nn.Linear(4, 3), optimizer="adam",
        ...     loss=torch.nn.functional.cross_entropy, train_data=(X, y), val_data=(X, y),
        ...     batch_size=16, steps_per_report=4, metrics={"acc": mb.metrics.accuracy})
        >>> recipe.hparams({"lr": 0.1, "seed": 3})["lr"]
        0.1

        A map-style dataset (here computing samples from the index) is streamed instead:

        >>> class Squares(torch.utils.data.Dataset):
        ...     def __len__(self): return 64
        ...     def __getitem__(self, i): return torch.tensor([i / 64.0]), torch.tensor([(i / 64.0) ** 2])
        >>> recipe = mb.Recipe(model=lambda cfg: torch.nn.Linear(1, 1), optimizer="sgd",
        ...     loss=torch.nn.functional.mse_loss, train_data=Squares(), val_data=Squares(),
        ...     batch_size=16, steps_per_report=4, num_workers=0)
        >>> mb.fit(recipe, [{"lr": 0.1}, {"lr": 0.01}], reports=2, progress=False).shape[0]
        4
    """

    model: Callable[[Mapping[str, Any]], nn.Module]
    optimizer: str | type[mb_optim.Optimizer]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train_data: Data | Dataset
    val_data: Data | Dataset | None = None
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
    num_workers: int = 0
    pin_memory: bool | None = None
    loader_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str | None:
        """A content hash of the training problem: two recipes with the same fingerprint train
        every config the same (data, model and loss code, optimizer, batch size, every setting).

        Functions count by their code, constants and the globals they use, not by the file that
        defines them, so the same recipe built by two users' scripts matches; ``None`` when the
        recipe holds something whose behaviour cannot be captured (then it matches nothing). The
        packing service lets members of sweeps with equal fingerprints share packs.

        Example:
            >>> import torch, modelbatch as mb
            >>> X, y = torch.randn(8, 2), torch.randn(8, 1)
            >>> make = lambda: mb.Recipe(model=lambda cfg: torch.nn.Linear(2, 1), optimizer="sgd",
            ...     loss=torch.nn.functional.mse_loss, train_data=(X, y), batch_size=4)
            >>> make().fingerprint() == make().fingerprint()
            True
            >>> make().fingerprint() == mb.Recipe(**{**vars(make()), "batch_size": 2}).fingerprint()
            False
        """
        from ._fingerprint import fingerprint

        return fingerprint({f.name: getattr(self, f.name) for f in fields(self)})

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
            check_positive_int(api, name, getattr(self, name))
        self.train_data = check_data(api, "train_data", self.train_data)
        if self.val_data is not None:
            self.val_data = check_data(api, "val_data", self.val_data)
        workers = self.num_workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"{api}: num_workers must be an int >= 0, got {self.num_workers!r}.")
        if self.pin_memory is not None and not isinstance(self.pin_memory, bool):
            raise TypeError(f"{api}: pin_memory must be True, False or None, got {self.pin_memory!r}.")
        self.loader_kwargs = check_loader_kwargs(api, self.loader_kwargs)
        if self.val_subset is not None and self.val_data is None:
            raise ValueError(f"{api}: val_subset needs val_data (for k-fold, pass val_data=train_data).")
        if self.order not in ("member", "shared"):
            raise ValueError(f"{api}: order must be 'member' or 'shared', got {self.order!r}.")
        for name, fn in self.metrics.items():
            if not callable(fn):
                raise TypeError(f"{api}: metric {name!r} is not callable.")
        _check_options(api, self)

    @property
    def optimizer_class(self) -> type[mb_optim.Optimizer]:
        """The :mod:`modelbatch.optim` class this recipe trains with."""
        if isinstance(self.optimizer, str):
            return OPTIMIZERS[self.optimizer.lower()]
        return self.optimizer

    def hparam_names(self) -> list[str]:
        """The per-member hyperparameters of the optimizer (what a config may set)."""
        return list(self.optimizer_class.hparam_bounds)

    def hparams(self, config: Mapping[str, Any], api: str = "mb.Recipe") -> dict[str, float]:
        """This config's optimizer hyperparameters: from the config, ``optimizer_defaults`` or the class.

        A value that is not a number or lies outside the optimizer's range raises, its message
        starting with ``api`` (e.g. ``"mb.fit: config 3"``).
        """
        cls = self.optimizer_class
        defaults = _constructor_defaults(cls)
        out = {}
        for name in self.hparam_names():
            value, source = _lookup_config(api, config, name), ""
            if value is None:
                value, source = _lookup(self.optimizer_defaults, name), " from optimizer_defaults"
            if value is None:
                value, source = defaults[name], ""
            out[name] = _check_hparam(api, cls, name, value, source)
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


OPTIMIZER_KEYS = ("optimizer", "optim")
"""Config keys of a nested dict of optimizer hyperparameters (``{"optim": {"lr": 0.01}}``)."""


def _lookup_config(api: str, config: Mapping[str, Any], name: str) -> Any:
    """``name`` from the top level of ``config`` or its dict under an ``OPTIMIZER_KEYS`` key (one of them)."""
    places = {
        "": config,
        **{f"[{k!r}]": config[k] for k in OPTIMIZER_KEYS if isinstance(config.get(k), Mapping)},
    }
    found = {where: value for where, sub in places.items() if (value := _lookup(sub, name)) is not None}
    if len(found) > 1:
        where = " and ".join(f"config{w}" for w in found)
        raise ValueError(f"{api}: {name} is set in {where}; set it in one place.")
    return next(iter(found.values()), None)


def _lookup(config: Mapping[str, Any], name: str) -> Any:
    if name in config:
        return config[name]
    if name in ("beta1", "beta2") and "betas" in config:
        return config["betas"][0 if name == "beta1" else 1]
    return None


def _check_hparam(api: str, cls: type[mb_optim.Optimizer], name: str, value: Any, source: str) -> float:
    opt = f"mb.optim.{cls.__name__}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{api}: {name} = {value!r}{source} is not a number; {opt} takes a float {name}."
        ) from None
    low, high, inclusive = cls.hparam_bounds[name]
    op = "<=" if inclusive else "<"
    bounds = {
        (True, True): f"{low} <= {name} {op} {high}",
        (True, False): f"{name} >= {low}",
        (False, True): f"{name} {op} {high}",
        (False, False): f"a finite {name}",
    }[(low is not None, high is not None)]
    finite = math.isfinite(number)
    if (
        not finite
        or (low is not None and number < low)
        or (high is not None and (number > high or (number == high and not inclusive)))
    ):
        needs = bounds if finite or bounds.startswith("a finite") else f"a finite {bounds}"
        fix = "optimizer_defaults" if source else "the config (or search space)"
        raise ValueError(
            f"{api}: {name} = {number!r}{source} is out of range; {opt} needs {needs}. Fix it in {fix}."
        )
    return number


def _check_options(api: str, recipe: Recipe) -> None:
    """The recipe-wide options: optimizer_defaults, grad_clip, dtype, backend."""
    cls = recipe.optimizer_class
    params = inspect.signature(cls.__init__).parameters
    known = {*recipe.hparam_names(), *(p for p in params if p not in ("self", "batch"))}
    for key in recipe.optimizer_defaults:
        if key not in known:
            raise ValueError(
                f"{api}: optimizer_defaults has {key!r}, which mb.optim.{cls.__name__} does not take; "
                f"known: {sorted(known)}. Drop it or choose the optimizer that takes it."
            )
    recipe.hparams({})  # the defaults themselves must be in range
    clip = recipe.grad_clip
    if clip is not None and (
        isinstance(clip, bool)
        or not isinstance(clip, (int, float))
        or not (math.isfinite(clip) and clip >= 0)
    ):
        raise ValueError(f"{api}: grad_clip must be a finite number >= 0 or None, got {clip!r}.")
    if not (isinstance(recipe.dtype, torch.dtype) and recipe.dtype.is_floating_point):
        raise TypeError(
            f"{api}: dtype must be a floating torch.dtype such as torch.float32 or torch.float64, "
            f"got {recipe.dtype!r}."
        )
    if recipe.backend not in BACKENDS:
        valid = ", ".join(repr(b) for b in BACKENDS)
        raise ValueError(f"{api}: unknown backend {recipe.backend!r}; valid options are {valid}.")


def _constructor_defaults(cls: type[mb_optim.Optimizer]) -> dict[str, float]:
    params = inspect.signature(cls.__init__).parameters
    out = {name: p.default for name, p in params.items() if name in cls.hparam_bounds}
    if "betas" in params:
        out["beta1"], out["beta2"] = params["betas"].default
    return out
