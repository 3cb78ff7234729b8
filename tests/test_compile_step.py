"""Issue 19, "capturable step": ``torch.compile(fullgraph=True)`` of ``opt.step`` compiles once.

The target: hyperparameters, step counters and schedules live in tensors, so one graph serves
every step while the lr schedule changes every step and a member leaves (``batch.freeze``) and
joins again (``batch.unfreeze``); the compiled step equals the uncompiled one bitwise.

Today the step is host-side by design (``modelbatch/_host.py``): ``host_list`` compares
``batch.active._version`` (an unbacked SymInt under dynamo: ``fullgraph=True`` raises a UserError),
it reads the ``[N]`` hyperparameters and step counts as Python lists (``Tensor.tolist()`` on float
tensors: a graph break dynamo cannot trace), picks a kernel per value (``StepValues.uniform``
and ``.any`` compare Python floats: a guard on each value, so a new lr recompiles), and indexes
the updating rows (a frozen member changes every shape: another recompile). The fullgraph test is
therefore a strict xfail; the second test pins what does hold today: the compiled step (with its
graph breaks) gives bitwise the uncompiled results.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import nn
from torch.nn import functional as F

import modelbatch as mb

N, B, STEPS, FREEZE_AT, UNFREEZE_AT, LEAVER = 4, 6, 20, 7, 13, 2

OPTIMIZERS = {
    "adamw": lambda b: mb.optim.AdamW(b, lr=[1e-2, 3e-3, 1e-3, 3e-4], weight_decay=[0.0, 0.1, 0.01, 0.0]),
    "sgd_momentum": lambda b: mb.optim.SGD(
        b, lr=[0.1, 0.05, 0.02, 0.01], momentum=[0.9, 0.0, 0.5, 0.8], dampening=[0.0, 0.0, 0.1, 0.0]
    ),
}


def _models() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)) for _ in range(N)]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, N, B, 4, generator=g), torch.randn(STEPS, N, B, 3, generator=g)


def _train(models: list[nn.Module], kind: str, compile_step) -> mb.ModelBatch:
    """20 steps, the lr changing every step (cosine, a period per member), member 2 away for 6."""
    batch = mb.ModelBatch(copy.deepcopy(models))
    opt = OPTIMIZERS[kind](batch)
    sched = mb.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=[20, 10, 15, 5])
    step = compile_step(opt.step)
    x, y = _data()
    for t in range(STEPS):
        if t == FREEZE_AT:
            batch.freeze(LEAVER)
        if t == UNFREEZE_AT:
            batch.unfreeze(LEAVER)
        opt.zero_grad()
        batch.compute_loss(batch(x[t]), y[t], F.mse_loss).sum().backward()
        step()
        sched.step()
    return batch


def _assert_bitwise(got: mb.ModelBatch, want: mb.ModelBatch) -> None:
    want_params = want.stacked_parameters()
    for name, p in got.stacked_parameters().items():
        assert torch.equal(p, want_params[name]), f"{name} differs from the uncompiled step"


@pytest.mark.xfail(
    strict=True,
    raises=(torch._dynamo.exc.UserError, torch._dynamo.exc.Unsupported),
    reason="issue 19: opt.step reads batch.active's _version and the hyperparameters with tolist()",
)
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_fullgraph_step_compiles_once(kind: str) -> None:
    models = _models()
    want = _train(models, kind, lambda step: step)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    frames: list[int] = []

    def compile_step(step):
        compiled = torch.compile(step, backend=counter, fullgraph=True)

        def counted() -> None:
            compiled()
            frames.append(counter.frame_count)

        return counted

    got = _train(models, kind, compile_step)
    assert frames[0] >= 1
    assert frames[-1] == frames[0], f"recompiled: graphs per step {frames}"
    _assert_bitwise(got, want)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_compiled_step_with_graph_breaks_is_exact(kind: str) -> None:
    models = _models()
    want = _train(models, kind, lambda step: step)
    torch._dynamo.reset()
    got = _train(models, kind, lambda step: torch.compile(step, backend="eager"))
    _assert_bitwise(got, want)
