"""Bad input across the public API: a clear error naming the API and the fix, before anything starts.

One table: ``(id, call, exception type, regex of the message)``. ``call(ctx)`` gets a per-case
scratch directory (the working directory too) and raises. After each case the test checks that
nothing was left half-started: no file in the scratch directory but those the case made on
purpose (no MLflow store, no half-written checkpoint) and, once Ray runs, no sweep left open in
the packing service.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from ray import tune
from torch import nn
from tune_recipes import XV, YV, Net, X, Y, open_sweeps, recipe

import modelbatch as mb
from tune_integration import MLflowCallback, ModelBatchSearcher
from tune_integration._sampler import SpaceSampler

SPACE = {"lr": tune.loguniform(1e-3, 1e-1), "hidden": tune.choice([8, 16]), "seed": tune.randint(0, 99)}
CONFIGS = [{"lr": 1e-2, "hidden": 8, "seed": 0}, {"lr": 3e-3, "hidden": 8, "seed": 1}]


@dataclass
class Ctx:
    tmp: Path
    keep: set[str] = field(default_factory=set)  # files a case writes on purpose (a checkpoint to load)


def _ray(fn: Callable[[Ctx], Any]) -> Callable[[Ctx], Any]:
    fn.needs_ray = True
    return fn


def _pack(n: int = 4, width: int = 2) -> mb.ModelBatch:
    return mb.ModelBatch([nn.Linear(3, width) for _ in range(n)])


def _fit(r: mb.Recipe, configs: list, **kw: Any) -> Any:
    return mb.fit(r, configs, **{"reports": 1, "progress": False, **kw})


def _sqlite(ctx: Ctx) -> str:
    return f"sqlite:///{ctx.tmp}/mlflow.db"


class Linear3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3))
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


def _not_always_a_module(cfg: dict) -> Any:
    return Net(cfg["hidden"]) if cfg["hidden"] == 8 else Net  # the class, not an instance


def _checkpoint(ctx: Ctx, optimizer: bool = True) -> Path:
    batch = _pack()
    path = ctx.tmp / "pack.pt"
    mb.save(path, batch, mb.optim.Adam(batch, lr=0.1) if optimizer else None)
    ctx.keep.add(path.name)
    return path


def load_into_other_class(ctx: Ctx) -> None:
    mb.load(_checkpoint(ctx), mb.ModelBatch([Linear3() for _ in range(4)]))


def load_into_other_shapes(ctx: Ctx) -> None:
    mb.load(_checkpoint(ctx), _pack(width=5))


def load_into_other_optimizer(ctx: Ctx) -> None:
    path, batch = _checkpoint(ctx), _pack()
    before = batch.stack.weight.detach().clone()
    try:
        mb.load(path, batch, mb.optim.SGD(batch, lr=0.1))
    finally:  # the optimizer is checked before anything is loaded into the batch
        assert torch.equal(batch.stack.weight, before), "a failed mb.load changed the batch"


def load_not_a_checkpoint(ctx: Ctx) -> None:
    path = ctx.tmp / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    ctx.keep.add(path.name)
    mb.load(path)


def save_with_foreign_optimizer(ctx: Ctx) -> None:
    mb.save(ctx.tmp / "pack.pt", _pack(), mb.optim.SGD(_pack(), lr=0.1))


def fit_mlflow_missing_key(ctx: Ctx) -> None:
    mlflow = {"tracking_uri": _sqlite(ctx), "experiment_name": "bad"}
    _fit(recipe(model=lambda cfg: Net(cfg["width"])), CONFIGS, mlflow=mlflow)


def fit_mlflow_bad_lr_in_last_config(ctx: Ctx) -> None:
    mlflow = {"tracking_uri": _sqlite(ctx), "experiment_name": "bad"}
    _fit(recipe(), [*CONFIGS, {"lr": -1.0}], n_slots=1, mlflow=mlflow)


class _LockedCallback(mb.callbacks.Callback):
    def __init__(self) -> None:
        self.lock = threading.Lock()


def searcher_recipe_with_lock(ctx: Ctx) -> None:
    lock = threading.Lock()
    ModelBatchSearcher(recipe(model=lambda cfg: lock and Net()))


def searcher_recipe_with_open_file(ctx: Ctx) -> None:
    ctx.keep.add("log.txt")
    with open(ctx.tmp / "log.txt", "w") as log:
        ModelBatchSearcher(recipe(loss=lambda o, t: log.write("") and F.cross_entropy(o, t)))


def _tune_run(ctx: Ctx, searcher: ModelBatchSearcher, **kw: Any) -> Any:
    args = dict(
        config=SPACE,
        num_samples=2,
        search_alg=searcher,
        metric="val_loss",
        mode="min",
        stop={"training_iteration": 1},
        storage_path=str(ctx.tmp / "ray_results"),
        verbose=0,
    )
    return tune.run(searcher.trainable(), **{**args, **kw})


@_ray
def tune_num_samples_0(ctx: Ctx) -> None:
    _tune_run(ctx, ModelBatchSearcher(recipe(), slots_per_gpu=2), num_samples=0)


@_ray
def tune_unknown_metric(ctx: Ctx) -> None:
    callback = MLflowCallback(_sqlite(ctx), "bad")
    _tune_run(ctx, ModelBatchSearcher(recipe(), slots_per_gpu=2), metric="val_f1", callbacks=[callback])


@_ray
def tune_bad_mode(ctx: Ctx) -> None:
    _tune_run(ctx, ModelBatchSearcher(recipe(), slots_per_gpu=2), mode="best")


@_ray
def tune_space_lacks_key(ctx: Ctx) -> None:
    _tune_run(ctx, ModelBatchSearcher(recipe(model=lambda cfg: Net(cfg["width"])), slots_per_gpu=2))


@_ray
def tune_space_builds_no_module(ctx: Ctx) -> None:
    _tune_run(ctx, ModelBatchSearcher(recipe(model=_not_always_a_module), slots_per_gpu=2))


@_ray
def tune_negative_lr_in_space(ctx: Ctx) -> None:
    space = {**SPACE, "lr": tune.uniform(-1.0, -0.5)}
    _tune_run(ctx, ModelBatchSearcher(recipe(), slots_per_gpu=2), config=space)


@_ray
def tune_negative_lr_from_sample_from(ctx: Ctx) -> None:
    space = {**SPACE, "lr": tune.sample_from(lambda config: -0.5 if config["hidden"] == 16 else 0.01)}
    _tune_run(ctx, ModelBatchSearcher(recipe(), slots_per_gpu=2), config=space)


@_ray
def tune_lr_nested_where_not_read(ctx: Ctx) -> None:
    space = {**SPACE, "train": {"lr": tune.loguniform(1e-3, 1e-1)}}
    del space["lr"]
    _tune_run(ctx, ModelBatchSearcher(recipe(), slots_per_gpu=2), config=space)


@_ray
def tune_lr_at_top_level_and_under_optim(ctx: Ctx) -> None:
    space = {**SPACE, "optim": {"lr": tune.grid_search([1e-3, 1e-2])}}
    _tune_run(ctx, ModelBatchSearcher(recipe(), slots_per_gpu=2), config=space)


@_ray
def tune_with_parameters_around_the_relay(ctx: Ctx) -> None:
    searcher = ModelBatchSearcher(recipe(), slots_per_gpu=2)
    trainable = tune.with_parameters(searcher.trainable(), data=X, labels=Y)
    tune.run(
        trainable,
        config=SPACE,
        search_alg=searcher,
        metric="val_loss",
        mode="min",
        verbose=0,
        storage_path=str(ctx.tmp / "ray_results"),
    )


@_ray
def tune_auto_slots_with_a_searcher_that_suggests_nothing_yet(ctx: Ctx) -> None:
    from ray.tune.search import Searcher

    class Later(Searcher):  # waits for results before its first config
        def suggest(self, trial_id):
            return None

    inner = Later(metric="val_loss", mode="min")
    _tune_run(ctx, ModelBatchSearcher(recipe(), searcher=inner, slots_per_gpu="auto"), config=None)


@_ray
def searcher_mode_directly(ctx: Ctx) -> None:
    ModelBatchSearcher(recipe(), slots_per_gpu=2).set_search_properties("val_loss", "best", SPACE)


BAD = [
    # ---- ModelBatch
    (
        "pack: empty list",
        lambda ctx: mb.ModelBatch([]),
        ValueError,
        r"^mb.ModelBatch: got an empty list.*at least one",
    ),
    (
        "pack: one module",
        lambda ctx: mb.ModelBatch(nn.Linear(3, 2)),
        TypeError,
        r"^mb.ModelBatch: expected a list of nn.Module",
    ),
    (
        "pack: other classes",
        lambda ctx: mb.ModelBatch([nn.Linear(3, 2), Linear3()]),
        TypeError,
        r"^mb.ModelBatch: all models must be of the same class.*one ModelBatch per",
    ),
    (
        "pack: other shapes",
        lambda ctx: mb.ModelBatch([nn.Linear(3, 2), nn.Linear(3, 4)]),
        ValueError,
        r"^mb.ModelBatch: model 1 has weight of shape \[4, 3\].*one ModelBatch each",
    ),
    (
        "pack: other settings",
        lambda ctx: mb.ModelBatch([nn.LeakyReLU(0.1), nn.LeakyReLU(0.2)]),
        ValueError,
        r"^mb.ModelBatch: model 1 has negative_slope = 0.2.*one ModelBatch per setting",
    ),
    (
        "pack: unknown backend",
        lambda ctx: mb.ModelBatch([nn.Linear(3, 2)], backend="cuda"),
        ValueError,
        r"^mb.ModelBatch: unknown backend 'cuda'; valid options are 'auto', 'vmap'",
    ),
    (
        "pack: chunk_size 0",
        lambda ctx: mb.ModelBatch([nn.Linear(3, 2)], backend="chunked", chunk_size=0),
        ValueError,
        r"^mb.ModelBatch: chunk_size must be a positive int, got 0",
    ),
    (
        "pack: set_backend",
        lambda ctx: _pack().set_backend("fast"),
        ValueError,
        r"^mb.ModelBatch.set_backend: unknown backend 'fast'",
    ),
    (
        "forward: per-member wrong N",
        lambda ctx: _pack()(torch.randn(3, 5, 3), in_dims=0),
        ValueError,
        r"^mb.ModelBatch.forward: per-member input 0 .* pack size N=4 on dim 0, got \[3, 5, 3\]",
    ),
    (
        "forward: in_dims 1",
        lambda ctx: _pack()(torch.randn(5, 3), in_dims=1),
        ValueError,
        r"^mb.ModelBatch.forward: in_dims must be None or 0",
    ),
    (
        "loss: targets of another batch",
        lambda ctx: _pack().compute_loss(torch.randn(4, 5, 2), torch.randn(7, 2), F.mse_loss),
        ValueError,
        r"^mb.ModelBatch.compute_loss: targets of shape \[7, 2\] match neither",
    ),
    (
        "loss: reduction none",
        lambda ctx: _pack().compute_loss(
            torch.randn(4, 5, 2), torch.randn(5, 2), lambda o, t: F.mse_loss(o, t, reduction="none")
        ),
        ValueError,
        r"^mb.ModelBatch.compute_loss: loss_fn must return one scalar per member.*reduction='mean'",
    ),
    (
        "loss: backward without sum",
        lambda ctx: (
            _pack().compute_loss(_pack()(torch.randn(5, 3)), torch.randn(5, 2), F.mse_loss).backward()
        ),
        RuntimeError,
        r"call losses.sum\(\).backward\(\)",
    ),
    (
        "member index out of range",
        lambda ctx: _pack().member(4),
        IndexError,
        r"^mb.ModelBatch.member: member 4 is out of range for a pack of 4",
    ),
    (
        "freeze index out of range",
        lambda ctx: _pack().freeze(-5),
        IndexError,
        r"^mb.ModelBatch.freeze: member -5 is out of range",
    ),
    (
        "load_member: other shapes",
        lambda ctx: _pack().load_member(0, nn.Linear(3, 5).state_dict()),
        ValueError,
        r"^mb.ModelBatch.load_member: weight has shape \[5, 3\] but the pack expects \[2, 3\]",
    ),
    (
        "load_member: other keys",
        lambda ctx: _pack().load_member(0, {"w": torch.zeros(2, 3)}),
        KeyError,
        r"ModelBatch.load_member: the state does not match.*same model class",
    ),
    (
        "load_member: other class",
        lambda ctx: _pack().load_member(0, Linear3()),
        TypeError,
        r"^mb.ModelBatch.load_member: expected a Linear, got Linear3",
    ),
    # ---- optimizers
    (
        "optim: on a list of models",
        lambda ctx: mb.optim.SGD([nn.Linear(3, 2)], lr=0.1),
        TypeError,
        r"^mb.optim.SGD: expected a ModelBatch.*Build the pack first",
    ),
    (
        "optim: lr -1",
        lambda ctx: mb.optim.SGD(_pack(), lr=-1),
        ValueError,
        r"^mb.optim.SGD: lr of member 0 is -1.0; it must be >= 0",
    ),
    (
        "optim: lr nan",
        lambda ctx: mb.optim.Adam(_pack(), lr=[1e-3, math.nan, 1e-3, 1e-3]),
        ValueError,
        r"^mb.optim.Adam: lr of member 1 is nan; it must be finite",
    ),
    (
        "optim: weight_decay < 0",
        lambda ctx: mb.optim.AdamW(_pack(), weight_decay=-0.1),
        ValueError,
        r"^mb.optim.AdamW: weight_decay of member 0 is -0.1; it must be >= 0",
    ),
    (
        "optim: beta2 = 1",
        lambda ctx: mb.optim.Adam(_pack(), betas=(0.9, 1.0)),
        ValueError,
        r"^mb.optim.Adam: beta2 of member 0 is 1.0; it must be < 1.0",
    ),
    (
        "optim: beta1 < 0",
        lambda ctx: mb.optim.Adam(_pack(), betas=(-0.1, 0.99)),
        ValueError,
        r"^mb.optim.Adam: beta1 of member 0 is -0.1; it must be >= 0",
    ),
    (
        "optim: three betas",
        lambda ctx: mb.optim.Adam(_pack(), betas=(0.9, 0.99, 0.9)),
        ValueError,
        r"^mb.optim.Adam: betas must be a pair",
    ),
    (
        "optim: eps < 0",
        lambda ctx: mb.optim.RMSprop(_pack(), eps=-1e-8),
        ValueError,
        r"^mb.optim.RMSprop: eps of member 0 is -1e-08; it must be >= 0",
    ),
    (
        "optim: momentum < 0",
        lambda ctx: mb.optim.SGD(_pack(), momentum=-0.5),
        ValueError,
        r"^mb.optim.SGD: momentum of member 0 is -0.5; it must be >= 0",
    ),
    (
        "optim: nesterov without momentum",
        lambda ctx: mb.optim.SGD(_pack(), lr=0.1, nesterov=True),
        ValueError,
        r"^mb.optim.SGD: nesterov momentum requires momentum > 0",
    ),
    (
        "optim: per-member list of wrong length",
        lambda ctx: mb.optim.SGD(_pack(), lr=[0.1, 0.2]),
        ValueError,
        r"^mb.optim.SGD: lr has 2 values but the pack has 4 members.*one value for every member",
    ),
    (
        "optim: set_hparam unknown",
        lambda ctx: mb.optim.SGD(_pack(), lr=0.1).set_hparam("beta1", 0.9),
        KeyError,
        r"mb.optim.SGD.set_hparam: unknown hyperparameter 'beta1'; known",
    ),
    (
        "optim: load another class's state",
        lambda ctx: mb.optim.SGD(_pack(), lr=0.1).load_state_dict(mb.optim.Adam(_pack()).state_dict()),
        ValueError,
        r"^mb.optim.SGD.load_state_dict: .*load it into the optimizer class it was saved from",
    ),
    (
        "clip: negative max_norm",
        lambda ctx: mb.clip_grad_norm_(_pack(), -1.0),
        ValueError,
        r"^mb.clip_grad_norm_: max_norm of member 0 is -1.0",
    ),
    (
        "schedule: step_size 0",
        lambda ctx: mb.optim.lr_scheduler.StepLR(mb.optim.SGD(_pack(), lr=0.1), step_size=0),
        ValueError,
        r"^mb.optim.lr_scheduler.StepLR: step_size of member 0 is 0; it must be an integer >= 1",
    ),
    (
        "amp: init_scale 0",
        lambda ctx: mb.amp.GradScaler(_pack(), init_scale=0),
        ValueError,
        r"^mb.amp.GradScaler: init_scale must be > 0",
    ),
    # ---- checkpoints
    (
        "load: another class",
        load_into_other_class,
        ValueError,
        r"^mb.load: the checkpoint holds Linear models but the batch holds Linear3",
    ),
    (
        "load: another shape",
        load_into_other_shapes,
        RuntimeError,
        r"^mb.ModelBatch.load_state_dict: the checkpoint does not fit this pack.*model class it was saved",
    ),
    (
        "load: another optimizer",
        load_into_other_optimizer,
        TypeError,
        r"^mb.load: the checkpoint holds a Adam state but the optimizer is a SGD.*saved class",
    ),
    (
        "load: not a checkpoint",
        load_not_a_checkpoint,
        ValueError,
        r"^mb.load: .*junk.pt' is not a ModelBatch checkpoint written by mb.save",
    ),
    (
        "save: optimizer of another pack",
        save_with_foreign_optimizer,
        ValueError,
        r"^mb.save: the optimizer belongs to another pack",
    ),
    # ---- data
    (
        "sampler: batch_size 0",
        lambda ctx: mb.data.MemberSampler(100, 4, batch_size=0),
        ValueError,
        r"^mb.data.MemberSampler: batch_size must be a positive int, got 0",
    ),
    (
        "bootstrap: n_members 0",
        lambda ctx: mb.data.bootstrap(100, n_members=0),
        ValueError,
        r"^mb.data.bootstrap: n_members must be a positive int, got 0",
    ),
    (
        "kfold: k 1",
        lambda ctx: mb.data.kfold(100, 1),
        ValueError,
        r"^mb.data.kfold: k must be an int with 2 <= k",
    ),
    (
        "memory: n 0",
        lambda ctx: mb.estimate_memory(lambda: nn.Linear(3, 2), torch.randn(4, 3), n=0),
        ValueError,
        r"^mb.estimate_memory: n \(members in the pack\) must be a positive int, got 0",
    ),
    # ---- Recipe
    (
        "recipe: unknown optimizer",
        lambda ctx: recipe(optimizer="adamax"),
        ValueError,
        r"^mb.Recipe: unknown optimizer 'adamax'; choose one of \['adam', 'adamw', 'rmsprop', 'sgd'\]",
    ),
    (
        "recipe: X and y lengths",
        lambda ctx: recipe(train_data=(X, Y[:10])),
        ValueError,
        r"^mb.Recipe: train_data has 192 inputs but 10 targets",
    ),
    (
        "recipe: val X and y lengths",
        lambda ctx: recipe(val_data=(XV, YV[:5])),
        ValueError,
        r"^mb.Recipe: val_data has 48 inputs but 5 targets",
    ),
    (
        "recipe: batch_size 0",
        lambda ctx: recipe(batch_size=0),
        ValueError,
        r"^mb.Recipe: batch_size must be a positive int, got 0",
    ),
    (
        "recipe: steps_per_report -1",
        lambda ctx: recipe(steps_per_report=-1),
        ValueError,
        r"^mb.Recipe: steps_per_report must be a positive int, got -1",
    ),
    (
        "recipe: metric not callable",
        lambda ctx: recipe(metrics={"acc": "accuracy"}),
        TypeError,
        r"^mb.Recipe: metric 'acc' is not callable",
    ),
    (
        "recipe: unknown backend",
        lambda ctx: recipe(backend="gpu"),
        ValueError,
        r"^mb.Recipe: unknown backend 'gpu'; valid options are",
    ),
    (
        "recipe: dtype a string",
        lambda ctx: recipe(dtype="float64"),
        TypeError,
        r"^mb.Recipe: dtype must be a floating torch.dtype.*torch.float64",
    ),
    (
        "recipe: grad_clip < 0",
        lambda ctx: recipe(grad_clip=-1.0),
        ValueError,
        r"^mb.Recipe: grad_clip must be a finite number >= 0 or None, got -1.0",
    ),
    (
        "recipe: default lr < 0",
        lambda ctx: recipe(optimizer_defaults={"lr": -1}),
        ValueError,
        r"^mb.Recipe: lr = -1.0 from optimizer_defaults is out of range; mb.optim.AdamW needs lr >= 0",
    ),
    (
        "recipe: default of another optimizer",
        lambda ctx: recipe(optimizer="adam", optimizer_defaults={"momentum": 0.9}),
        ValueError,
        r"^mb.Recipe: optimizer_defaults has 'momentum', which mb.optim.Adam does not take"
        r".*known: \['amsgrad', 'beta1'",
    ),
    # ---- mb.fit
    (
        "fit: not a recipe",
        lambda ctx: mb.fit({"model": 1}, CONFIGS),
        TypeError,
        r"^mb.fit: expected a mb.Recipe",
    ),
    (
        "fit: no configs",
        lambda ctx: mb.fit(recipe(), []),
        ValueError,
        r"^mb.fit: got no configs; pass a list with at least one config dict",
    ),
    (
        "fit: configs not dicts",
        lambda ctx: mb.fit(recipe(), [0.1, 0.2]),
        TypeError,
        r"^mb.fit: config 0 is a float, not a dict",
    ),
    (
        "fit: one config dict",
        lambda ctx: mb.fit(recipe(), {"lr": 0.1}),
        TypeError,
        r"^mb.fit: configs must be a list of config dicts.*\[\{'lr': 0.1\}\]",
    ),
    (
        "fit: lr at the top level and under optim",
        lambda ctx: _fit(recipe(), [{"lr": 0.1}, {"lr": 0.1, "optim": {"lr": 0.2}}]),
        ValueError,
        r"^mb.fit: config 1: lr is set in config and config\['optim'\]; set it in one place",
    ),
    (
        "fit: reports 0",
        lambda ctx: mb.fit(recipe(), CONFIGS, reports=0),
        ValueError,
        r"^mb.fit: reports must be a positive int, got 0",
    ),
    (
        "fit: n_slots 0",
        lambda ctx: mb.fit(recipe(), CONFIGS, n_slots=0),
        ValueError,
        r"^mb.fit: n_slots must be a positive int or None",
    ),
    (
        "fit: n_slots and its deprecated name capacity",
        lambda ctx: mb.fit(recipe(), CONFIGS, n_slots=2, capacity=2),
        ValueError,
        r"^mb.fit: got both n_slots=2 and capacity=2; pass only n_slots=",
    ),
    (
        "fit: reports True",
        lambda ctx: mb.fit(recipe(), CONFIGS, reports=True),
        ValueError,
        r"^mb.fit: reports must be a positive int, got True",
    ),
    (
        "fit: seed not an int",
        lambda ctx: mb.fit(recipe(), [{"seed": "a"}]),
        TypeError,
        r"^mb.fit: config seed must be an int, got 'a'",
    ),
    (
        "fit: callback not a Callback",
        lambda ctx: _fit(recipe(), CONFIGS, callbacks=[len]),
        TypeError,
        r"^mb.fit: callback 0 \(builtin_function_or_method\) is not a mb.callbacks.Callback",
    ),
    (
        "fit: early stopping mode",
        lambda ctx: mb.callbacks.EarlyStopping("val_loss", mode="best"),
        ValueError,
        r"^mb.callbacks.EarlyStopping: mode must be 'min' or 'max'",
    ),
    (
        "fit: early stopping patience True",
        lambda ctx: mb.callbacks.EarlyStopping("val_loss", patience=True),
        ValueError,
        r"^mb.callbacks.EarlyStopping: patience must be a positive int, got True",
    ),
    (
        "fit: early stopping metric",
        lambda ctx: _fit(recipe(), CONFIGS[:1], callbacks=[mb.callbacks.EarlyStopping("val_f1")]),
        KeyError,
        r"not 'val_f1'",
    ),
    (
        "fit: lr -1 in a config",
        lambda ctx: _fit(recipe(), [*CONFIGS, {"lr": -1.0}]),
        ValueError,
        r"^mb.fit: config 2: lr = -1.0 is out of range; mb.optim.AdamW needs lr >= 0",
    ),
    (
        "fit: lr nan in a config",
        lambda ctx: _fit(recipe(), [{"lr": math.nan}]),
        ValueError,
        r"^mb.fit: config 0: lr = nan is out of range; .*finite",
    ),
    (
        "fit: betas in a config",
        lambda ctx: _fit(recipe(), [{"betas": (0.9, 1.0)}]),
        ValueError,
        r"^mb.fit: config 0: beta2 = 1.0 is out of range; mb.optim.AdamW needs 0.0 <= beta2 < 1.0",
    ),
    (
        "fit: lr a string in a config",
        lambda ctx: _fit(recipe(), [{"lr": "fast"}]),
        TypeError,
        r"^mb.fit: config 0: lr = 'fast' is not a number",
    ),
    (
        "fit: config lacks a key",
        lambda ctx: _fit(recipe(model=lambda cfg: Net(cfg["width"])), CONFIGS),
        KeyError,
        r"mb.fit: config 0: the model factory reads cfg\['width'\], which the config lacks "
        r"\(it has \['hidden', 'lr', 'seed'\]\).*cfg.get\('width', default\)",
    ),
    (
        "fit: factory returns no module",
        lambda ctx: _fit(recipe(model=_not_always_a_module), [*CONFIGS, {"hidden": 16}]),
        TypeError,
        r"^mb.fit: config 2: model\(config\) must return an nn.Module, got type",
    ),
    (
        "fit: mlflow not a logger",
        lambda ctx: _fit(recipe(), CONFIGS, mlflow="yes"),
        TypeError,
        r"^mb.fit: mlflow must be True, a dict of mb.MLflowLogger arguments",
    ),
    (
        "fit: mlflow, config lacks a key",
        fit_mlflow_missing_key,
        KeyError,
        r"mb.fit: config 0: the model factory reads cfg\['width'\]",
    ),
    (
        "fit: mlflow, bad lr in a later wave",
        fit_mlflow_bad_lr_in_last_config,
        ValueError,
        r"^mb.fit: config 2: lr = -1.0 is out of range",
    ),
    (
        "pack trainer: n_slots 0",
        lambda ctx: mb.PackTrainer(recipe(), 0, {}),
        ValueError,
        r"^mb.PackTrainer: n_slots must be a positive int, got 0",
    ),
    (
        "pack trainer: n_slots True",
        lambda ctx: mb.PackTrainer(recipe(), True, {}),
        ValueError,
        r"^mb.PackTrainer: n_slots must be a positive int, got True",
    ),
    (
        "pack trainer: n_slots and its deprecated name capacity",
        lambda ctx: mb.PackTrainer(recipe(), 2, {}, capacity=2),
        ValueError,
        r"^mb.PackTrainer: got both n_slots=2 and capacity=2; pass only n_slots=",
    ),
    (
        "pack trainer: no example_config",
        lambda ctx: mb.PackTrainer(recipe(), n_slots=2),
        TypeError,
        r"^mb.PackTrainer: missing example_config, a config of the pack's architecture",
    ),
    (
        "PackTrainer.add: seed not an int",
        lambda ctx: mb.PackTrainer(recipe(), 2, {}).add("a", {"seed": 1.5}),
        TypeError,
        r"^mb.PackTrainer.add: config seed must be an int, got 1.5",
    ),
    # ---- ModelBatchSearcher (construction: no Ray needed)
    (
        "searcher: a dict recipe",
        lambda ctx: ModelBatchSearcher({"model": "mlp"}),
        TypeError,
        r"^ModelBatchSearcher: recipe must be a mb.Recipe",
    ),
    (
        "searcher: a module recipe",
        lambda ctx: ModelBatchSearcher(nn.Linear(2, 2)),
        TypeError,
        r"^ModelBatchSearcher: recipe must be a mb.Recipe",
    ),
    (
        "searcher: slots_per_gpu 0",
        lambda ctx: ModelBatchSearcher(recipe(), slots_per_gpu=0),
        ValueError,
        r"^ModelBatchSearcher: slots_per_gpu must be a positive int or 'auto', got 0",
    ),
    (
        "searcher: slots_per_gpu -2",
        lambda ctx: ModelBatchSearcher(recipe(), slots_per_gpu=-2),
        ValueError,
        r"^ModelBatchSearcher: slots_per_gpu must be a positive int",
    ),
    (
        "searcher: slots_per_gpu True",
        lambda ctx: ModelBatchSearcher(recipe(), slots_per_gpu=True),
        ValueError,
        r"^ModelBatchSearcher: slots_per_gpu must be a positive int",
    ),
    (
        "searcher: slots_per_gpu 'max'",
        lambda ctx: ModelBatchSearcher(recipe(), slots_per_gpu="max"),
        ValueError,
        r"^ModelBatchSearcher: slots_per_gpu must be a positive int",
    ),
    (
        "searcher: a search algorithm",
        lambda ctx: ModelBatchSearcher(recipe(), searcher=tune.search.BasicVariantGenerator()),
        TypeError,
        r"^ModelBatchSearcher: searcher must be a Tune Searcher instance",
    ),
    (
        "searcher: a searcher class",
        lambda ctx: ModelBatchSearcher(recipe(), searcher=SpaceSampler),
        TypeError,
        r"^ModelBatchSearcher: searcher must be a Tune Searcher instance",
    ),
    (
        "searcher: auto with a factory",
        lambda ctx: ModelBatchSearcher(lambda n_slots, config: None),
        ValueError,
        r"^ModelBatchSearcher: slots_per_gpu='auto' measures a member of a mb.Recipe",
    ),
    (
        "searcher: park_after_s 0",
        lambda ctx: ModelBatchSearcher(recipe(), park_after_s=0),
        ValueError,
        r"^ModelBatchSearcher: park_after_s must be a positive number of seconds",
    ),
    (
        "searcher: reports 0",
        lambda ctx: ModelBatchSearcher(recipe(), reports=0),
        ValueError,
        r"^ModelBatchSearcher: reports must be a positive int or None",
    ),
    (
        "searcher: checkpoint_every 1.5",
        lambda ctx: ModelBatchSearcher(recipe(), checkpoint_every=1.5),
        ValueError,
        r"^ModelBatchSearcher: checkpoint_every must be a positive int or None",
    ),
    (
        "searcher: group_ahead -1",
        lambda ctx: ModelBatchSearcher(recipe(), group_ahead=-1),
        ValueError,
        r"^ModelBatchSearcher: group_ahead must be an int >= 0 or None",
    ),
    (
        "searcher: tenant ''",
        lambda ctx: ModelBatchSearcher(recipe(), tenant=""),
        ValueError,
        r"^ModelBatchSearcher: tenant must be a non-empty str or None",
    ),
    (
        "searcher: weight 0",
        lambda ctx: ModelBatchSearcher(recipe(), weight=0),
        ValueError,
        r"^ModelBatchSearcher: weight must be a positive number",
    ),
    (
        "searcher: max_slots True",
        lambda ctx: ModelBatchSearcher(recipe(), max_slots=True),
        ValueError,
        r"^ModelBatchSearcher: max_slots must be a positive int or None",
    ),
    (
        "searcher: priority 1.5",
        lambda ctx: ModelBatchSearcher(recipe(), priority=1.5),
        ValueError,
        r"^ModelBatchSearcher: priority must be an int",
    ),
    (
        "searcher: recipe closes over a lock",
        searcher_recipe_with_lock,
        TypeError,
        r"^ModelBatchSearcher: the recipe cannot be pickled"
        r".*cannot pickle '_thread.lock'.*inside the function",
    ),
    (
        "searcher: recipe closes over a file",
        searcher_recipe_with_open_file,
        TypeError,
        r"^ModelBatchSearcher: the recipe cannot be pickled.*not opened for reading.*inside the function",
    ),
    (
        "searcher: a Tune callback as callbacks",
        lambda ctx: ModelBatchSearcher(recipe(), callbacks=[tune.Callback()]),
        TypeError,
        r"^ModelBatchSearcher: callback 0 \(Callback\) is not a mb.callbacks.Callback.*"
        r"Tune callbacks .* go to tune.run\(callbacks=\.\.\.\)",
    ),
    (
        "searcher: one callback, not a list",
        lambda ctx: ModelBatchSearcher(recipe(), callbacks=mb.callbacks.EarlyStopping()),
        TypeError,
        r"^ModelBatchSearcher: callbacks must be a list of mb.callbacks.Callback",
    ),
    (
        "searcher: a callback holding a lock",
        lambda ctx: ModelBatchSearcher(recipe(), callbacks=[_LockedCallback()]),
        TypeError,
        r"^ModelBatchSearcher: the callbacks cannot be pickled.*cannot pickle '_thread.lock'",
    ),
    # ---- ModelBatchSearcher with tune.run (Ray): nothing may be left running
    (
        "tune: num_samples 0",
        tune_num_samples_0,
        ValueError,
        r"^ModelBatchSearcher: num_samples is 0; .*num_samples >= 1",
    ),
    (
        "tune: metric not reported",
        tune_unknown_metric,
        ValueError,
        r"^ModelBatchSearcher: metric 'val_f1' is not among the results.*'val_acc'.*metrics=",
    ),
    (
        "tune: mode not min/max",
        tune_bad_mode,
        ValueError,
        r"The `mode` parameter passed to `tune.run\(...\)` must be one of \['min', 'max'\]",
    ),
    (
        "searcher: mode not min/max",
        searcher_mode_directly,
        ValueError,
        r"^ModelBatchSearcher: mode must be 'min' or 'max', got 'best'",
    ),
    (
        "tune: space lacks a key",
        tune_space_lacks_key,
        KeyError,
        r"ModelBatchSearcher: config .*: the model factory reads cfg\['width'\], "
        r"which the config lacks.*search space",
    ),
    (
        "tune: space builds no module",
        tune_space_builds_no_module,
        TypeError,
        r"^ModelBatchSearcher: config .*hidden.*16.*: model\(config\) must return an nn.Module, got type",
    ),
    (
        "tune: negative lr in the space",
        tune_negative_lr_in_space,
        ValueError,
        r"^ModelBatchSearcher: config .*: lr = -0\.\d+ is out of range; mb.optim.AdamW needs lr >= 0",
    ),
    (
        "tune: sample_from gives a negative lr",  # checked as resolved in the trial
        tune_negative_lr_from_sample_from,
        ValueError,
        r"^ModelBatchSearcher: config .*'hidden': 16.*: lr = -0\.5 is out of range",
    ),
    (
        "tune: lr nested where the Recipe does not read it",
        tune_lr_nested_where_not_read,
        ValueError,
        r"^ModelBatchSearcher: the search space sets config\['train'\]\['lr'\], but mb.Recipe reads .*"
        r"'optimizer' or 'optim'.*write it as \{'lr': ...\} or \{'optim': \{'lr': ...\}\}",
    ),
    (
        "tune: lr at the top level and under optim",
        tune_lr_at_top_level_and_under_optim,
        ValueError,
        r"^ModelBatchSearcher: config .*: lr is set in config and config\['optim'\]; set it in one place",
    ),
    (
        "tune: with_parameters around the member trial",
        tune_with_parameters_around_the_relay,
        ValueError,
        r"^ModelBatchSearcher: tune.with_parameters\(searcher.trainable\(\), data=..., labels=...\) "
        r".*Put the data into the Recipe",
    ),
    (
        "tune: auto slots with a searcher that suggests nothing yet",
        tune_auto_slots_with_a_searcher_that_suggests_nothing_yet,
        ValueError,
        r"^ModelBatchSearcher: slots_per_gpu='auto' measures members on the first configs of the "
        r"sweep, but the inner searcher Later suggested none before the sweep started; pass an int",
    ),
]


def _left_behind(tmp: Path, keep: set[str]) -> list[str]:
    """Paths under ``tmp`` but those kept; Tune's experiment folder may hold only its storage marker.

    ``tune.run`` writes ``<storage>/<experiment>/.validate_storage_marker`` before it asks the
    searcher anything; no trial folder or experiment state may follow a bad input.
    """
    left = []
    for path in sorted(tmp.rglob("*")):
        parts = path.relative_to(tmp).parts
        if parts[0] in keep:
            continue
        tune_marker = parts[0] == "ray_results" and (
            (path.is_dir() and len(parts) <= 2)
            or (len(parts) == 3 and parts[2] == ".validate_storage_marker")
        )
        if not tune_marker:
            left.append("/".join(parts))
    return left


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()


@pytest.mark.parametrize(("case", "call", "exc", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, call, exc, message, tmp_path, monkeypatch, request) -> None:
    if getattr(call, "needs_ray", False):
        request.getfixturevalue("ray_session")
    monkeypatch.chdir(tmp_path)  # anything written to the working directory lands here too
    ctx = Ctx(tmp_path)
    with pytest.raises(exc, match=message):
        call(ctx)
    assert _left_behind(tmp_path, ctx.keep) == []
    assert open_sweeps() == {}  # a sweep that failed to start left the packing service
