"""No host sync in a steady training step: counted with ``mb.testing.HostSyncCounter``.

Each test runs a few warm-up steps (optimizer state is created, ``batch.active`` is read once), then
counts the ops that would make the host wait for a CUDA device during more steps. The count must
be 0, except where a sync is needed to keep the results exact; those are asserted exactly:

* ``GradScaler.step``: which members overflowed is known on the device only, and every member's
  step count (``opt.steps``: Adam's bias corrections, SGD's first momentum step, checkpoints)
  depends on it. The optimizer reads the ``[N]`` mask once per step, as ``torch.amp.GradScaler``
  reads ``found_inf.item()``.
* ``clip_grad_norm_(..., error_if_nonfinite=True)``: raising needs the norms on the host (one read,
  as in torch); the default ``False`` costs none.
* ``PackTrainer`` reads its ``[N]`` metrics once per report (``train_report``), not once per step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import modelbatch as mb
from modelbatch.testing import HostSyncCounter

N, B, WARMUP, COUNTED = 4, 6, 3, 3

OPTIMIZERS = {
    "sgd": lambda b: mb.optim.SGD(b, lr=[0.1, 0.05, 0.02, 0.01]),
    "sgd_momentum": lambda b: mb.optim.SGD(
        b, lr=[0.1, 0.05, 0.02, 0.01], momentum=[0.9, 0.0, 0.5, 0.8], dampening=[0.0, 0.0, 0.1, 0.0]
    ),
    "sgd_nesterov": lambda b: mb.optim.SGD(
        b, lr=0.05, momentum=[0.9, 0.8, 0.7, 0.6], weight_decay=[0.0, 1e-3, 0.0, 1e-2], nesterov=True
    ),
    "adam": lambda b: mb.optim.Adam(
        b, lr=[1e-2, 3e-3, 1e-3, 3e-4], betas=([0.9, 0.8, 0.9, 0.5], 0.999), weight_decay=[0, 1e-2, 0, 0]
    ),
    "adam_amsgrad_maximize": lambda b: mb.optim.Adam(
        b, lr=[1e-3, 2e-3, 3e-3, 4e-3], amsgrad=True, maximize=True
    ),
    "adamw": lambda b: mb.optim.AdamW(b, lr=[1e-2, 3e-3, 1e-3, 3e-4], weight_decay=[0.0, 0.1, 0.01, 0.0]),
    "rmsprop": lambda b: mb.optim.RMSprop(b, lr=[1e-2, 1e-3, 1e-2, 1e-3], momentum=[0.0, 0.9, 0.5, 0.0]),
    "rmsprop_centered": lambda b: mb.optim.RMSprop(b, lr=1e-3, weight_decay=[0, 1e-2, 0, 0], centered=True),
}


def _batch(seed: int = 0) -> mb.ModelBatch:
    torch.manual_seed(seed)  # BatchNorm: the frozen/participating paths write buffers back
    models = [nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)) for _ in range(N)]
    return mb.ModelBatch(models)


def _data(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(steps, N, B, 4, generator=g), torch.randn(steps, N, B, 3, generator=g)


def _step(batch, opt, x, y, *, sched=None, clip=None, scaler=None, participating=None) -> None:
    out = batch(x, in_dims=0, participating=participating)
    losses = batch.compute_loss(out, y, F.mse_loss, target_in_dims=0)
    (losses if scaler is None else scaler.scale(losses)).sum().backward()
    if scaler is not None:
        scaler.unscale_(opt)
    if clip is not None:
        mb.clip_grad_norm_(batch, clip)
    if scaler is None:
        opt.step(mask=participating)
    else:
        scaler.step(opt, mask=participating)
        scaler.update()
    if sched is not None:
        sched.step(mask=participating)
    opt.zero_grad()


def _syncs_per_step(run_step) -> dict[str, int]:
    """Warm up, then the syncs of ``COUNTED`` steps, per step (each count must divide evenly)."""
    for t in range(WARMUP):
        run_step(t)
    with HostSyncCounter() as probe:
        for t in range(WARMUP, WARMUP + COUNTED):
            run_step(t)
    assert all(c % COUNTED == 0 for c in probe.counts.values()), dict(probe.counts)
    return {name: c // COUNTED for name, c in probe.counts.items()}


def test_every_exported_optimizer_is_covered() -> None:
    exported = {
        cls
        for cls in vars(mb.optim).values()
        if isinstance(cls, type) and issubclass(cls, mb.optim.Optimizer) and cls is not mb.optim.Optimizer
    }
    covered = {type(make(_batch())) for make in OPTIMIZERS.values()}
    assert exported <= covered, exported - covered


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("variant", ["plain", "frozen", "participating", "frozen+participating"])
def test_no_sync_in_a_steady_step(name: str, variant: str) -> None:
    """Forward, loss, backward, per-member clipping, optimizer and per-member lr schedule: 0 syncs."""
    batch = _batch()
    opt = OPTIMIZERS[name](batch)
    sched = mb.optim.lr_scheduler.StepLR(opt, step_size=[1, 2, 3, 1], gamma=[0.9, 0.5, 0.8, 0.99])
    if "frozen" in variant:
        batch.freeze(1)
    participating = torch.tensor([True, True, False, True]) if "participating" in variant else None
    x, y = _data(WARMUP + COUNTED)

    def run(t: int) -> None:
        _step(
            batch,
            opt,
            x[t],
            y[t],
            sched=sched,
            clip=[0.5, 1.0, float("inf"), 0.1],
            participating=participating,
        )

    assert _syncs_per_step(run) == {}


@pytest.mark.parametrize(
    "make",
    [
        lambda o: mb.optim.lr_scheduler.CosineAnnealingLR(o, T_max=[5, 10, 20, 40]),
        lambda o: mb.optim.lr_scheduler.LinearLR(o, start_factor=[0.5, 0.25, 0.1, 1.0], total_iters=4),
        lambda o: mb.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.01, 0.02, 0.03, 0.04], total_steps=20),
        lambda o: mb.optim.lr_scheduler.PerMember(
            o, lambda i, t: torch.optim.lr_scheduler.ExponentialLR(t, 0.9)
        ),
    ],
    ids=["cosine", "linear", "one_cycle", "per_member"],
)
def test_no_sync_with_each_schedule(make) -> None:
    batch = _batch()
    opt = mb.optim.Adam(batch, lr=[1e-2, 3e-3, 1e-3, 3e-4])
    sched = make(opt)
    batch.freeze(2)
    x, y = _data(WARMUP + COUNTED)
    assert _syncs_per_step(lambda t: _step(batch, opt, x[t], y[t], sched=sched)) == {}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("frozen", [False, True])
def test_grad_scaler_reads_its_overflow_mask_once_per_step(name: str, frozen: bool) -> None:
    """The documented exception: the optimizer reads the scaler's [N] overflow mask (one sync).

    On a device this is one device-to-host copy; on this CPU-only machine the engine reports it
    (``to_host``). Everything else of the step (scale, unscale, clip, update, schedule) costs none.
    """
    batch = _batch()
    opt = OPTIMIZERS[name](batch)
    sched = mb.optim.lr_scheduler.ExponentialLR(opt, gamma=[0.9, 0.8, 0.99, 0.5])
    scaler = mb.amp.GradScaler(batch, init_scale=[2.0**8, 2.0**10, 2.0**4, 1.0], growth_interval=2)
    if frozen:
        batch.freeze(0)
    x, y = _data(WARMUP + COUNTED)

    def run(t: int) -> None:
        _step(batch, opt, x[t], y[t], sched=sched, clip=1.0, scaler=scaler)

    assert _syncs_per_step(run) == {"to_host": 1}


@pytest.mark.parametrize("name", ["adamw", "sgd_momentum", "rmsprop"])
def test_a_capturable_step_does_not_even_read_the_overflow_mask(name: str) -> None:
    """``capturable=True``: the step runs from device tensors, so the scaler's mask is not read either."""
    batch = _batch()
    opt = OPTIMIZERS[name](batch)
    opt = type(opt).from_state_dict(batch, {**opt.state_dict(), "flags": {**opt.flags, "capturable": True}})
    sched = mb.optim.lr_scheduler.ExponentialLR(opt, gamma=[0.9, 0.8, 0.99, 0.5])
    scaler = mb.amp.GradScaler(batch, init_scale=[2.0**8, 2.0**10, 2.0**4, 1.0], growth_interval=2)
    batch.freeze(0)
    x, y = _data(WARMUP + COUNTED)

    def run(t: int) -> None:
        _step(batch, opt, x[t], y[t], sched=sched, clip=1.0, scaler=scaler)

    assert _syncs_per_step(run) == {}


def test_grad_scaler_with_a_host_participation_mask() -> None:
    batch = _batch()
    opt = mb.optim.AdamW(batch, lr=[1e-2, 3e-3, 1e-3, 3e-4])
    scaler = mb.amp.GradScaler(batch, init_scale=2.0**8)
    participating = torch.tensor([True, False, True, True])
    x, y = _data(WARMUP + COUNTED)

    def run(t: int) -> None:
        _step(batch, opt, x[t], y[t], scaler=scaler, participating=participating)

    assert _syncs_per_step(run) == {"to_host": 1}


def test_clip_error_if_nonfinite_reads_the_norms_once() -> None:
    batch = _batch()
    x, y = _data(1)
    batch.compute_loss(batch(x[0], in_dims=0), y[0], F.mse_loss, target_in_dims=0).sum().backward()
    with HostSyncCounter() as probe:
        mb.clip_grad_norm_(batch, [1.0, 0.5, 2.0, 0.1])
    assert probe.total == 0
    with HostSyncCounter() as probe:
        mb.clip_grad_norm_(batch, 1.0, error_if_nonfinite=True)
    assert dict(probe.counts) == {"to_host": 1}


def test_freeze_costs_one_read_of_the_active_flags() -> None:
    """``batch.active`` is read on the host only after it changed: once, not once per step."""
    batch = _batch()
    opt = mb.optim.SGD(batch, lr=0.1, momentum=0.9)
    x, y = _data(WARMUP + COUNTED + 1)
    _syncs_per_step(lambda t: _step(batch, opt, x[t], y[t]))
    batch.freeze(3)
    with HostSyncCounter() as probe:
        _step(batch, opt, x[-1], y[-1])
    assert dict(probe.counts) == {"to_host": 1}
    assert opt.steps.tolist() == [WARMUP + COUNTED + 1] * 3 + [WARMUP + COUNTED]


def test_the_probe_sees_syncs_inside_torch_functions() -> None:
    grads = [torch.nn.Parameter(torch.ones(3))]
    grads[0].grad = torch.ones(3)
    with HostSyncCounter() as probe:
        torch.nn.utils.clip_grad_norm_(grads, 1.0, error_if_nonfinite=True)
        _ = bool(torch.isfinite(grads[0].grad).all())
        _ = grads[0].grad.nonzero()
        _ = torch.repeat_interleave(torch.tensor([1, 2]))
        _ = torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        _ = torch.unique(torch.tensor([1, 1, 2]))
        _ = torch.equal(grads[0].grad, grads[0].grad)
    assert probe.counts["_local_scalar_dense"] >= 2  # torch's error_if_nonfinite check, then bool()
    assert probe.counts["nonzero"] == 1 and probe.counts["repeat_interleave"] == 1
    assert probe.counts["equal"] == 1 and probe.total >= 6


# ------------------------------------------------------------------ PackTrainer / mb.fit
def _trainer(steps_per_report: int, **validation) -> mb.PackTrainer:
    def make(config):
        torch.manual_seed(config["seed"])
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    X, y = torch.randn(96, 4, generator=torch.Generator().manual_seed(0)), torch.randint(0, 3, (96,))
    recipe = mb.Recipe(
        model=make,
        train_data=(X, y),
        loss=F.cross_entropy,
        optimizer="adamw",
        batch_size=8,
        steps_per_report=steps_per_report,
        grad_clip=1.0,
        lr_schedule=lambda config, o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=config["gamma"]),
        **validation,
    )
    configs = [{"seed": i, "lr": 1e-2 * (i + 1), "gamma": 0.9 + 0.03 * i} for i in range(3)]
    trainer = mb.PackTrainer(recipe, n_slots=4, example_config=configs[0])
    for i, config in enumerate(configs):  # three live members, one empty (frozen) slot
        trainer.add(f"m{i}", config)
    return trainer


def test_pack_trainer_syncs_per_report_do_not_grow_with_its_steps() -> None:
    """Steps sync nothing; the report boundary reads the metrics: a constant count per report."""
    counts = {}
    for steps in (2, 8):
        trainer = _trainer(steps)
        trainer.train_report()  # warm-up: optimizer state, schedules, the active flags
        with HostSyncCounter() as probe:
            trainer.train_report()
        counts[steps] = dict(probe.counts)
    assert counts[2] == counts[8] == {"to_host": 1}, counts  # the [N] train losses, once per report


def _accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.argmax(-1) == y).to(torch.float64).mean()


@pytest.mark.parametrize("subsets", [False, True], ids=["whole_set", "val_subset"])
def test_pack_trainer_reads_its_validation_once_per_report(subsets: bool) -> None:
    """Validation loss and metrics, over several chunks and members: one read, however many of either."""
    g = torch.Generator().manual_seed(2)
    Xv, yv = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    validation = {"val_data": (Xv, yv), "metrics": {"acc": _accuracy}}
    if subsets:  # members' subsets of different sizes (k-fold style)
        validation["val_subset"] = lambda config: torch.arange(config["seed"], 40, 2 + config["seed"])
    trainer = _trainer(2, **validation)
    trainer.train_report()
    with HostSyncCounter() as probe:
        reports = trainer.evaluate(chunk=7)  # 40 samples: 6 chunks
    assert dict(probe.counts) == {"to_host": 1}
    assert all(0.0 <= reports["val_acc"][slot] <= 1.0 for slot in range(3))
    with HostSyncCounter() as probe:
        trainer.train_report()
    assert dict(probe.counts) == {"to_host": 2}  # the train losses, then the validation


def test_pack_trainer_step_syncs_nothing() -> None:
    trainer = _trainer(4)
    trainer.train_report()
    step_fn = trainer._train_step
    per_step = []

    def counted(*args, **kwargs):
        with HostSyncCounter() as probe:
            result = step_fn(*args, **kwargs)
        per_step.append(dict(probe.counts))
        return result

    trainer._train_step = counted
    trainer.train_report()
    assert per_step == [{}] * 4


def test_probe_counts_are_per_probe_and_nested() -> None:
    t = torch.ones(2)
    with HostSyncCounter() as outer:
        with HostSyncCounter() as inner:
            bool(t.all())
        t.tolist()  # not dispatched on the host: not counted
    assert inner.total == 1 and outer.total == 1
    assert copy.copy(dict(outer.counts)) == {"_local_scalar_dense": 1}
