"""PyTorch Lightning: train a pack with ``lightning.Trainer`` (its loops, checkpoints, precision, loggers).

:class:`PackModule` is a ``LightningModule`` over a :class:`~modelbatch.ModelBatch`. It optimizes
manually (``automatic_optimization = False``) so that each member keeps what a pack gives it: its
own :mod:`modelbatch.optim` hyperparameters and state, its own gradient clipping, its own loss
scale under ``precision="16-mixed"`` (:class:`modelbatch.amp.GradScaler`) and its own lr schedule.
Metrics are logged per member (``train_loss/m3``, ``val_loss/m3``, ``val_acc/m3``) and as means over
the members still training (``train_loss``, ``val_loss``). :class:`MemberEarlyStopping` stops members
one by one; the Trainer stops when none is left.

Every member sees the batches of the Trainer's dataloaders: with a ``LightningDataModule`` all
members train on the same batches in the same order. ``mb.fit`` by default gives each member its own
shuffle; :class:`RecipeDataModule` feeds what ``mb.fit`` feeds with ``Recipe(order="shared")``, so a
config trained by ``PackModule.from_recipe`` equals the same config trained by ``mb.fit`` then.

Supported: one device (``devices=1``, strategy ``"auto"``/single device); precision ``"32-true"``,
``"64-true"``, ``"bf16-mixed"``, ``"16-mixed"`` (Lightning's own scaler is replaced by one scale per
member), ``"16-true"``, ``"bf16-true"``. Not supported: DDP, FSDP, DeepSpeed or any multi-device
strategy, Lightning's ``gradient_clip_val`` and ``accumulate_grad_batches`` (use ``grad_clip=``).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
    from lightning.pytorch.strategies import SingleDeviceStrategy
except ImportError as exc:  # pragma: no cover - exercised with lightning hidden from sys.modules
    raise ImportError(
        'modelbatch.lightning: needs lightning; pip install "modelbatch[integrations]"'
    ) from exc

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from ._architecture import member_seed
from ._batch import ModelBatch
from ._clip import clip_grad_norm_
from ._host import device_tensor, mark_device_data, to_host
from ._recipe import Recipe
from ._trainer import PackTrainer
from .amp import GradScaler
from .data._streams import _draw_epoch
from .optim import Optimizer
from .optim.lr_scheduler import PerMember

__all__ = ["MemberEarlyStopping", "PackModule", "RecipeDataModule"]

_API = "PackModule"
_SUPPORTED_PRECISION = "'32-true', '64-true', 'bf16-mixed', '16-mixed', 'bf16-true' or '16-true'"
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Placeholder(torch.optim.Optimizer):
    """What ``configure_optimizers`` hands Lightning: the pack's real optimizer is ``module.optimizer``.

    Lightning wraps only ``torch.optim`` optimizers, which cannot hold a per-member lr; this one
    owns a single dummy tensor and never changes anything.
    """

    def __init__(self) -> None:
        super().__init__([torch.zeros(1)], {"lr": 0.0})

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        return None if closure is None else closure()


class PackModule(pl.LightningModule):
    """A ``LightningModule`` that trains every member of a pack, each by its own optimizer settings.

    Build it from a pack and an optimizer (or a factory ``batch -> optimizer``), or with
    :meth:`from_recipe` from a :class:`modelbatch.Recipe` and one config per member (models,
    seeds, hyperparameters, clipping and schedules as ``mb.fit`` builds them). Batches are
    ``(x, y)`` shared by every member: ``training_step`` computes each member's loss
    (``batch.compute_loss``), backpropagates their sum (each member gets exactly its own
    gradient), clips per member and steps the members still training. Floating inputs and targets
    are cast to the pack's parameter dtype (as ``mb.fit`` casts its data to ``recipe.dtype``).

    Args:
        batch: the pack.
        optimizer: a :mod:`modelbatch.optim` optimizer over ``batch``, or ``batch -> optimizer``.
        loss: ``(outputs, targets) -> scalar`` for one member's batch (mean reduction).
        metrics: ``{name: fn(outputs, targets) -> scalar}`` logged per member as ``val_<name>/m<i>``.
        lr_schedule: a :class:`modelbatch.optim.lr_scheduler.PerMember` over the optimizer, or
            ``optimizer -> PerMember``; stepped after every optimizer step.
        grad_clip: clip each member's gradient norm to this (one value or one per member).
        nan_guard: a member whose training loss is NaN or infinite leaves the pack at once
            (its step is skipped), as ``mb.fit`` ends a diverged member.

    Attributes:
        stopped: ``{member index: reason}`` of the members that left the pack.
        optimizer: the pack's :mod:`modelbatch.optim` optimizer.
        scaler: the per-member :class:`modelbatch.amp.GradScaler` under ``"16-mixed"``, else ``None``.

    Checkpoints hold the stacked weights (``state_dict``), the optimizer, scaler and schedule
    states, every member's dropout stream and the stopped members: resuming from an epoch-end
    checkpoint (``trainer.fit(module, ckpt_path=...)``) continues bitwise as if never stopped.

    Example:
        >>> import torch, lightning.pytorch as pl, modelbatch as mb
        >>> from modelbatch.lightning import PackModule
        >>> X, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8)
        >>> batch = mb.ModelBatch([torch.nn.Linear(4, 1) for _ in range(3)])
        >>> module = PackModule(batch, lambda b: mb.optim.SGD(b, lr=[0.01, 0.1, 0.2]),
        ...                     loss=torch.nn.functional.mse_loss)
        >>> trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False,
        ...     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, loader, loader)
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("val_loss"))
        ['val_loss', 'val_loss/m0', 'val_loss/m1', 'val_loss/m2']
        >>> type(module.member(1)).__name__
        'Linear'
    """

    def __init__(
        self,
        batch: ModelBatch,
        optimizer: Optimizer | Callable[[ModelBatch], Optimizer],
        loss: Loss,
        *,
        metrics: Mapping[str, Loss] | None = None,
        lr_schedule: PerMember | Callable[[Optimizer], PerMember] | None = None,
        grad_clip: float | Sequence[float] | None = None,
        nan_guard: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(batch, ModelBatch):
            raise TypeError(
                f"{_API}: expected a mb.ModelBatch as first argument, got {type(batch).__name__}. "
                "Build the pack first: PackModule(mb.ModelBatch(models), optimizer, loss=...), or use "
                "PackModule.from_recipe(recipe, configs)."
            )
        self.automatic_optimization = False
        self.batch = batch
        opt = optimizer if isinstance(optimizer, Optimizer) else _built(optimizer, batch, "optimizer")
        if not isinstance(opt, Optimizer) or opt.batch is not batch:
            raise TypeError(
                f"{_API}: optimizer must be a modelbatch.optim optimizer over this pack (or a function "
                "batch -> optimizer), e.g. lambda b: mb.optim.Adam(b, lr=[1e-3, 1e-2]); got "
                f"{type(opt).__name__}."
            )
        self.optimizer = opt
        if lr_schedule is not None and not isinstance(lr_schedule, PerMember):
            lr_schedule = _built(lr_schedule, opt, "lr_schedule")
        if lr_schedule is not None and (
            not isinstance(lr_schedule, PerMember) or lr_schedule.optimizer is not opt
        ):
            raise TypeError(
                f"{_API}: lr_schedule must be a mb.optim.lr_scheduler.PerMember over the optimizer (or a "
                f"function optimizer -> PerMember); got {type(lr_schedule).__name__}."
            )
        self.lr_schedule = lr_schedule
        if not callable(loss):
            raise TypeError(f"{_API}: loss must be callable (outputs, targets) -> scalar.")
        self.loss_fn = loss
        self.metrics = dict(metrics or {})
        for name, fn in self.metrics.items():
            if not callable(fn):
                raise TypeError(f"{_API}: metric {name!r} is not callable.")
        self.grad_clip = grad_clip
        self.nan_guard = bool(nan_guard)
        self.stopped: dict[int, str] = {}
        self.scaler: GradScaler | None = None
        self._pending: dict[str, Any] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_recipe(cls, recipe: Recipe, configs: Sequence[Mapping[str, Any]]) -> PackModule:
        """One member per config, built as ``mb.fit`` builds it: same seeds, weights, hyperparameters.

        A config's seed is ``config["seed"]`` (default: its index); the recipe's optimizer,
        ``optimizer_defaults``, ``grad_clip`` (or the config's) and ``lr_schedule`` apply per member.
        Data comes from the Trainer (see :class:`RecipeDataModule` for the recipe's own data).

        Example:
            >>> import torch, modelbatch as mb
            >>> from modelbatch.lightning import PackModule
            >>> X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
            >>> recipe = mb.Recipe(model=lambda cfg: torch.nn.Linear(4, 3), optimizer="adam",
            ...     loss=torch.nn.functional.cross_entropy, train_data=(X, y), batch_size=8)
            >>> module = PackModule.from_recipe(recipe, [{"lr": 1e-3}, {"lr": 1e-2, "seed": 7}])
            >>> module.optimizer.hparams["lr"].tolist()
            [0.001, 0.01]
        """
        api = f"{_API}.from_recipe"
        if not isinstance(recipe, Recipe):
            raise TypeError(f"{api}: expected a mb.Recipe as first argument, got {type(recipe).__name__}.")
        if isinstance(configs, Mapping) or not isinstance(configs, Sequence) or not configs:
            raise TypeError(f"{api}: configs must be a non-empty list of config dicts, one per member.")
        if recipe.subset is not None or recipe.val_subset is not None:
            raise ValueError(
                f"{api}: the recipe gives each member its own samples (subset / val_subset), but a "
                "Lightning dataloader feeds every member the same batches. Train it with mb.fit."
            )
        configs = [dict(c) for c in configs]
        for i, config in enumerate(configs):
            config.setdefault("seed", i)
            member_seed(config, i, api)
            recipe.hparams(config, api=f"{api}: config {i}")
        trainer = PackTrainer(recipe, len(configs), example_config=configs[0])
        for i, config in enumerate(configs):
            trainer.add(i, config)
        clip = trainer._clip_norms()
        module = cls(
            trainer.batch,
            trainer.optimizer,
            recipe.loss,
            metrics=recipe.metrics,
            lr_schedule=trainer.schedule,
            grad_clip=clip,
        )
        module.configs = configs
        return module

    # ------------------------------------------------------------------ members
    @property
    def n(self) -> int:
        """Number of members in the pack."""
        return self.batch.n

    def member(self, index: int) -> nn.Module:
        """Member ``index`` as a plain module of the original class with its current weights."""
        return self.batch.member(index)

    def active_members(self) -> list[int]:
        """Indices of the members still training."""
        return [i for i, flag in enumerate(self.batch.active_flags()) if flag]

    def stop_member(self, index: int, reason: str) -> None:
        """Take member ``index`` out of training (its weights and optimizer state stay as they are).

        When no member is left, the Trainer stops (``trainer.should_stop = True``).
        """
        if index in self.stopped:
            return
        self.batch.freeze(index)
        self.stopped[index] = str(reason)
        if not self.active_members() and self._trainer is not None:
            self.trainer.should_stop = True

    def save_members(self, directory: str | os.PathLike) -> list[str]:
        """Save each member's ``state_dict`` as ``member_<i>.pt`` in ``directory``; returns the paths."""
        os.makedirs(directory, exist_ok=True)
        paths = []
        for i in range(self.n):
            path = os.path.join(os.fspath(directory), f"member_{i}.pt")
            torch.save(self.member(i).state_dict(), path)
            paths.append(path)
        return paths

    # ------------------------------------------------------------------ Lightning hooks
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every member on the shared input ``x``: ``[N, B, ...]``."""
        return self.batch(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _Placeholder()

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if not isinstance(trainer.strategy, SingleDeviceStrategy) or trainer.world_size != 1:
            raise RuntimeError(
                f"{_API}: strategy {type(trainer.strategy).__name__} with {trainer.world_size} process(es) "
                "is not supported; a pack already trains many models on one device. Use "
                "pl.Trainer(devices=1, strategy='auto'), and one Trainer (one pack) per device."
            )
        plugin = trainer.precision_plugin
        if type(plugin) not in (Precision, MixedPrecision, HalfPrecision, DoublePrecision):
            raise RuntimeError(
                f"{_API}: the precision plugin {type(plugin).__name__} is not supported; use "
                f"precision={_SUPPORTED_PRECISION}."
            )
        if isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
            # One loss scale per member replaces Lightning's single scale, which would skip every
            # member's step when one overflows; Lightning's scaler is detached so nothing scales twice.
            shared = plugin.scaler
            self.scaler = GradScaler(
                self.batch,
                init_scale=float(shared.get_scale()),
                growth_factor=shared.get_growth_factor(),
                backoff_factor=shared.get_backoff_factor(),
                growth_interval=shared.get_growth_interval(),
                enabled=shared.is_enabled(),
            )
            plugin.scaler = None

    def on_train_start(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self.optimizer.load_state_dict(pending["optimizer"])
        if self.lr_schedule is not None and pending["schedule"] is not None:
            self.lr_schedule.load_state_dict(pending["schedule"])
        if self.scaler is not None and pending["scaler"]:
            self.scaler.load_state_dict(pending["scaler"])
        for i, state in enumerate(pending["rng"]):
            self.batch.set_rng_state(i, state)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self._inputs(batch)
        opt = self.optimizer
        # Who trains is decided on the host (the cached flags: read again only after a member stopped),
        # so the forward, the optimizer and the schedule read no device values.
        participating = torch.tensor(self.batch.active_flags())
        opt.zero_grad()
        out = self.batch(x, participating=participating)
        losses = self.batch.compute_loss(out, y, self.loss_fn, target_in_dims=None)
        scaled = losses if self.scaler is None else self.scaler.scale(losses)
        self.manual_backward(scaled.sum())
        detached = losses.detach()
        if self.nan_guard:  # the guard's one read of the step: which losses are finite
            finite = to_host(mark_device_data(torch.isfinite(detached)))
            for i in [i for i, (p, f) in enumerate(zip(participating.tolist(), finite)) if p and not f]:
                value = float(detached[i])
                steps = int(self.optimizer.steps[i])  # its own steps: Lightning counts none here
                self.stop_member(i, f"errored: non-finite loss ({value}) at step {steps}")
            participating = participating & torch.tensor(self.batch.active_flags())
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if self.grad_clip is not None:
            clip_grad_norm_(self.batch, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(opt, mask=participating)
            self.scaler.update()
        else:
            opt.step(mask=participating)
        if self.lr_schedule is not None:
            self.lr_schedule.step(mask=participating)
        self._log_members("train_loss", detached, participating, batch_size=len(x), on_step=True)
        return detached.sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self._inputs(batch)
        active = torch.tensor(self.batch.active_flags())
        out = self.batch(x, participating=active)
        values = {"val_loss": self.batch.compute_loss(out, y, self.loss_fn, target_in_dims=None)}
        for name, fn in self.metrics.items():
            values[f"val_{name}"] = torch.vmap(fn, in_dims=(0, None))(out, y)
        for name, per_member in values.items():
            self._log_members(name, per_member.detach(), active, batch_size=len(x), on_step=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["modelbatch"] = {
            "n": self.n,
            "optimizer": self.optimizer.state_dict(),
            "schedule": None if self.lr_schedule is None else self.lr_schedule.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": [self.batch.rng_state(i) for i in range(self.n)],
            "stopped": dict(self.stopped),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("modelbatch")
        if state is None:
            raise KeyError(
                f"{_API}: the checkpoint holds no pack state (no 'modelbatch' entry); resume from a "
                "checkpoint saved while training a PackModule."
            )
        if state["n"] != self.n:
            raise ValueError(
                f"{_API}: the checkpoint holds {state['n']} members but this pack has {self.n}; build the "
                "module with the same number of members."
            )
        self.stopped = {int(k): v for k, v in state["stopped"].items()}
        self._pending = copy.deepcopy(state)  # loaded on train start, once the pack is on its device

    # ------------------------------------------------------------------ helpers
    def _inputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"{_API}: expected batches (x, y) from the dataloader, got {type(batch).__name__}"
                f"{f' of {len(batch)}' if isinstance(batch, (tuple, list)) else ''}. Use a "
                "TensorDataset(X, y) or a dataset whose items are (x, y) pairs."
            )
        dtype = next(iter(self.batch.stacked_parameters().values())).dtype
        return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t for t in batch)

    def _log_members(
        self, name: str, values: torch.Tensor, members: torch.Tensor, *, batch_size: int, on_step: bool
    ) -> None:
        live = [i for i, flag in enumerate(members.tolist()) if flag]  # host flags: no device read
        if not live:
            return
        logged = {f"{name}/m{i}": values[i] for i in live}
        logged[name] = values.index_select(0, device_tensor(live, torch.long, values.device)).mean()
        self.log_dict(logged, on_step=on_step, on_epoch=not on_step, batch_size=batch_size)


class MemberEarlyStopping(pl.Callback):
    """Stop each member of a :class:`PackModule` when its ``monitor`` has stopped improving.

    After every validation, member ``i``'s ``"<monitor>/m<i>"`` (e.g. ``val_loss/m3``) counts
    as an improvement when it beats the member's best by more than ``min_delta``; after
    ``patience`` validations without one (or at once for a NaN/inf value) the member leaves the
    pack (:meth:`PackModule.stop_member`): no more optimizer steps, no more logged losses. The
    Trainer goes on with the others and stops when every member has stopped.

    Example:
        >>> from modelbatch.lightning import MemberEarlyStopping
        >>> stopper = MemberEarlyStopping("val_loss", patience=2)
        >>> stopper.monitor, stopper.patience
        ('val_loss', 2)
    """

    def __init__(
        self, monitor: str = "val_loss", patience: int = 3, mode: str = "min", min_delta: float = 0.0
    ):
        api = "MemberEarlyStopping"
        if mode not in ("min", "max"):
            raise ValueError(f"{api}: mode must be 'min' or 'max', got {mode!r}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"{api}: patience must be an int >= 1, got {patience!r}.")
        if not (isinstance(min_delta, (int, float)) and math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"{api}: min_delta must be a finite number >= 0, got {min_delta!r}.")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, float(min_delta)
        self.best: dict[int, float] = {}
        self.wait: dict[int, int] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if not isinstance(pl_module, PackModule):
            raise TypeError(
                f"MemberEarlyStopping: works with a modelbatch.lightning.PackModule, got "
                f"{type(pl_module).__name__}; for one model use lightning's EarlyStopping."
            )
        for i in pl_module.active_members():
            key = f"{self.monitor}/m{i}"
            if key not in trainer.callback_metrics:
                raise KeyError(
                    f"MemberEarlyStopping: {key!r} was not logged; the module logs "
                    f"{sorted(k for k in trainer.callback_metrics if '/m' in k)[:6]}... Monitor one of "
                    "those names without the '/m<i>' suffix."
                )
            value = float(trainer.callback_metrics[key])
            epoch = trainer.current_epoch
            if not math.isfinite(value):
                pl_module.stop_member(
                    i, f"early stopped: non-finite {self.monitor} ({value}) at epoch {epoch}"
                )
                continue
            best = self.best.get(i)
            better = best is None or (
                value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta
            )
            if better:
                self.best[i], self.wait[i] = value, 0
                continue
            self.wait[i] = self.wait.get(i, 0) + 1
            if self.wait[i] >= self.patience:
                pl_module.stop_member(
                    i,
                    f"early stopped: {self.monitor} did not improve for {self.patience} validations "
                    f"(epoch {epoch}, best {self.best[i]:.6g})",
                )

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best), "wait": dict(self.wait)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = {int(k): float(v) for k, v in state_dict["best"].items()}
        self.wait = {int(k): int(v) for k, v in state_dict["wait"].items()}


class RecipeDataModule(pl.LightningDataModule):
    """A recipe's own data as Lightning dataloaders: the batches ``mb.fit`` feeds with ``order="shared"``.

    Training batches are those of ``DataLoader(train_data, recipe.batch_size, shuffle=True,
    generator=torch.Generator().manual_seed(0))`` iterated to its end epoch after epoch (Lightning
    stops an epoch's iterator before its end, which would change the next epoch's order: the order
    is drawn by a sampler here). The generator is saved in checkpoints, so resuming from an
    epoch-end checkpoint draws the next epochs' orders (a mid-epoch one restarts that epoch's
    order). Validation is the whole ``val_data`` in chunks of 4096 samples, in order. With
    ``steps_per_report`` equal to the steps of one epoch, epoch ``e`` here is report ``e`` of ``mb.fit``.

    Example:
        >>> import torch, modelbatch as mb
        >>> from modelbatch.lightning import RecipeDataModule
        >>> X, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> recipe = mb.Recipe(model=lambda cfg: torch.nn.Linear(4, 1), optimizer="sgd",
        ...     loss=torch.nn.functional.mse_loss, train_data=(X, y), val_data=(X, y), batch_size=8)
        >>> xb, yb = next(iter(RecipeDataModule(recipe).train_dataloader()))
        >>> xb.shape, yb.shape
        (torch.Size([8, 4]), torch.Size([8, 1]))
    """

    def __init__(self, recipe: Recipe, val_chunk: int = 4096) -> None:
        super().__init__()
        if not isinstance(recipe, Recipe):
            raise TypeError(f"RecipeDataModule: expected a mb.Recipe, got {type(recipe).__name__}.")
        self.recipe = recipe
        self.val_chunk = int(val_chunk)
        self.generator = torch.Generator().manual_seed(0)

    def train_dataloader(self) -> DataLoader:
        data = _dataset(self.recipe.train_data)
        return DataLoader(
            data, batch_size=self.recipe.batch_size, sampler=_SharedOrder(len(data), self.generator)
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.recipe.val_data is None:
            return []
        return DataLoader(_dataset(self.recipe.val_data), batch_size=self.val_chunk, shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])


class _SharedOrder(Sampler[int]):
    """Each epoch draws what a shuffled DataLoader over ``generator`` draws when iterated to its end."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator

    def __iter__(self) -> Any:
        return iter(_draw_epoch(self.generator, self.n).tolist())

    def __len__(self) -> int:
        return self.n


def _dataset(data: Any) -> Dataset:
    return TensorDataset(*data) if isinstance(data, (tuple, list)) else data


def _built(factory: Any, argument: Any, what: str) -> Any:
    if not callable(factory):
        raise TypeError(f"{_API}: {what} must be an object or a function building it, got {factory!r}.")
    return factory(argument)
