"""Issue 19, "capturable step": ``torch.compile(fullgraph=True)`` of ``opt.step`` compiles once.

With ``capturable=True`` the optimizer keeps its hyperparameters and step counts in tensors on
the parameters' device and computes every member's row from them (the rows of members that do
not update are kept), so one graph serves every step while the lr schedule changes every step
and a member leaves (``batch.freeze``) and joins again (``batch.unfreeze``). The reference is the
default (host-side) step of the same optimizer: the capturable step equals it bitwise here, and
its compiled graph equals it run eagerly.

The default step stays host-side by design (``modelbatch/_host.py``): it reads ``batch.active``
and the hyperparameters as Python lists and picks a kernel per value, so under dynamo it breaks
the graph; the last test pins that it is still exact when compiled with those breaks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import nn
from torch.nn import functional as F

import modelbatch as mb

N, B, STEPS, FREEZE_AT, UNFREEZE_AT, LEAVER = 4, 6, 20, 7, 13, 2

OPTIMIZERS: dict[str, Callable[..., mb.optim.Optimizer]] = {
    "adamw": lambda b, **kw: mb.optim.AdamW(
        b, lr=[1e-2, 3e-3, 1e-3, 3e-4], weight_decay=[0.0, 0.1, 0.01, 0.0], **kw
    ),
    "adam_amsgrad_l2": lambda b, **kw: mb.optim.Adam(
        b,
        lr=[1e-2, 3e-3, 1e-3, 3e-4],
        betas=([0.9, 0.8, 0.9, 0.5], 0.999),
        weight_decay=[0, 1e-2, 0, 0],
        amsgrad=True,
        **kw,
    ),
    "sgd_momentum": lambda b, **kw: mb.optim.SGD(
        b,
        lr=[0.1, 0.05, 0.02, 0.01],
        momentum=[0.9, 0.0, 0.5, 0.8],
        dampening=[0.0, 0.0, 0.1, 0.0],
        weight_decay=[0.0, 1e-2, 0.0, 1e-3],
        **kw,
    ),
    "sgd_nesterov_maximize": lambda b, **kw: mb.optim.SGD(
        b, lr=0.05, momentum=[0.9, 0.8, 0.7, 0.6], nesterov=True, maximize=True, **kw
    ),
    "rmsprop_centered": lambda b, **kw: mb.optim.RMSprop(
        b, lr=[1e-2, 1e-3, 1e-2, 1e-3], momentum=[0.0, 0.9, 0.5, 0.0], centered=True, **kw
    ),
}


def _models() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)) for _ in range(N)]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, N, B, 4, generator=g), torch.randn(STEPS, N, B, 3, generator=g)


def _train(
    models: list[nn.Module],
    kind: str,
    *,
    capturable: bool,
    compile_step=lambda step: step,
    participating: torch.Tensor | None = None,
) -> tuple[mb.ModelBatch, mb.optim.Optimizer]:
    """20 steps, the lr changing every step (cosine, a period per member), member 2 away for 6."""
    batch = mb.ModelBatch(copy.deepcopy(models))
    opt = OPTIMIZERS[kind](batch, capturable=capturable)
    sched = mb.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=[20, 10, 15, 5])
    step = compile_step(opt.step)
    x, y = _data()
    for t in range(STEPS):
        if t == FREEZE_AT:
            batch.freeze(LEAVER)
        if t == UNFREEZE_AT:
            batch.unfreeze(LEAVER)
        opt.zero_grad()
        out = batch(x[t], in_dims=0, participating=participating)
        batch.compute_loss(out, y[t], F.mse_loss, target_in_dims=0).sum().backward()
        step() if participating is None else step(mask=participating)
        sched.step(mask=participating)
    return batch, opt


def _assert_bitwise(got: mb.ModelBatch, want: mb.ModelBatch, what: str) -> None:
    want_params = want.stacked_parameters()
    for name, p in got.stacked_parameters().items():
        assert torch.equal(p, want_params[name]), f"{name} differs from {what}"


@pytest.mark.parametrize(
    "participating", [None, torch.tensor([True, False, True, True])], ids=["all", "mask"]
)
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_capturable_step_equals_the_default_step(kind: str, participating: torch.Tensor | None) -> None:
    models = _models()
    want, want_opt = _train(models, kind, capturable=False, participating=participating)
    got, got_opt = _train(models, kind, capturable=True, participating=participating)
    _assert_bitwise(got, want, "the default step")
    assert got_opt.steps.tolist() == want_opt.steps.tolist()
    for name, state in want_opt.state.items():
        for key, t in state.items():
            assert torch.equal(got_opt.state[name][key], t), f"{name}.{key}"
    if participating is not None:  # a member outside the mask never moved
        for name, p in got.stacked_parameters().items():
            assert torch.equal(p[1], torch.stack([dict(m.named_parameters())[name] for m in models])[1])


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_fullgraph_capturable_step_compiles_once(kind: str) -> None:
    models = _models()
    want, _ = _train(models, kind, capturable=True)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    frames: list[int] = []

    def compile_step(step):
        compiled = torch.compile(step, backend=counter, fullgraph=True)

        def counted() -> None:
            compiled()
            frames.append(counter.frame_count)

        return counted

    got, _ = _train(models, kind, capturable=True, compile_step=compile_step)
    assert frames[0] == 1
    assert frames[-1] == 1, f"recompiled: graphs after each step {frames}"
    _assert_bitwise(got, want, "the capturable step run eagerly")


def test_capturable_state_round_trips_and_continues_bitwise() -> None:
    models = _models()
    want, want_opt = _train(models, "adamw", capturable=True)
    state = want_opt.state_dict()
    assert state["flags"]["capturable"] is True
    batch = mb.ModelBatch(copy.deepcopy(models))
    batch.load_state_dict(want.state_dict())
    again = mb.optim.AdamW.from_state_dict(batch, state)
    assert again.capturable
    assert again.steps.device == again.hparams["lr"].device == batch.stacked_parameters()["0.weight"].device
    x, y = _data()
    for opt, pack in ((want_opt, want), (again, batch)):
        opt.zero_grad()
        pack.compute_loss(pack(x[0], in_dims=0), y[0], F.mse_loss, target_in_dims=0).sum().backward()
        opt.step()
    _assert_bitwise(batch, want, "the optimizer it was saved from")


def test_capturable_step_refuses_a_mask_of_the_wrong_length() -> None:
    batch = mb.ModelBatch(_models())
    opt = mb.optim.SGD(batch, lr=0.1, capturable=True)
    x, y = _data()
    batch.compute_loss(batch(x[0], in_dims=0), y[0], F.mse_loss, target_in_dims=0).sum().backward()
    with pytest.raises(ValueError, match=r"mb\.optim\.SGD\.step: the mask has 3 values but the pack has 4"):
        opt.step(mask=torch.tensor([True, False, True]))


@pytest.mark.parametrize("kind", ["adamw", "sgd_momentum"])
def test_default_step_compiled_with_graph_breaks_is_exact(kind: str) -> None:
    models = _models()
    want, _ = _train(models, kind, capturable=False)
    torch._dynamo.reset()
    got, _ = _train(
        models, kind, capturable=False, compile_step=lambda step: torch.compile(step, backend="eager")
    )
    _assert_bitwise(got, want, "the uncompiled step")


def test_a_capturable_schedule_reads_no_hyperparameter_tensor(monkeypatch) -> None:
    """On a device the schedule would sync on every read: it works from the optimizer's host copy.

    A CPU-only run cannot see a device read, so the test records every ``tolist``/``item`` of the
    optimizer's hyperparameter tensors during the steps (set_hparam, as PBT does, included).
    """
    batch = mb.ModelBatch(_models())
    opt = mb.optim.SGD(batch, lr=[0.1, 0.05, 0.02, 0.01], momentum=0.9, capturable=True)
    sched = mb.optim.lr_scheduler.ExponentialLR(opt, gamma=[0.9, 0.8, 0.7, 0.6])
    watched = {id(t) for t in opt.hparams.values()}
    reads: list[str] = []
    for method in ("tolist", "item"):
        original = getattr(torch.Tensor, method)

        def spy(self, *args, _original=original, _name=method, **kwargs):
            if id(self) in watched:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, spy)
    x, y = _data()
    lrs = []
    for t in range(6):
        if t == 3:
            opt.set_hparam("lr", 0.5, member=1)
        opt.zero_grad()
        batch.compute_loss(batch(x[t], in_dims=0), y[t], F.mse_loss, target_in_dims=0).sum().backward()
        opt.step()
        sched.step()
        lrs.append(opt.hparam_list("lr")[1])
    monkeypatch.undo()
    assert reads == []
    assert {id(t) for t in opt.hparams.values()} == watched  # written in place, never replaced
    assert opt.hparams["lr"].tolist() == opt.hparam_list("lr")
    assert lrs[3] == 0.5 * 0.8  # the schedule went on from the lr that set_hparam gave member 1
    assert opt.hparam_list("lr")[0] == pytest.approx(0.1 * 0.9**6, rel=1e-15)


def test_a_capturable_step_compiles_with_inductor_in_reduce_overhead_mode() -> None:
    """What a GPU user runs: the step through inductor (CUDA graphs on a GPU); on CPU its kernels may fuse
    the update's operations, so the result is compared to the eager step to float32 rounding."""
    models = _models()
    want, _ = _train(models, "adamw", capturable=True)
    torch._dynamo.reset()
    got, _ = _train(
        models,
        "adamw",
        capturable=True,
        compile_step=lambda step: torch.compile(step, fullgraph=True, mode="reduce-overhead"),
    )
    want_params = want.stacked_parameters()
    for name, p in got.stacked_parameters().items():
        torch.testing.assert_close(p, want_params[name], rtol=1e-5, atol=1e-6)
