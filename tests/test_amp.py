"""mb.amp.GradScaler: one loss scale per member, each member as its own torch.amp.GradScaler."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import modelbatch as mb
from modelbatch._batch import MemberLosses
from modelbatch._clip import clip_grad_norm_
from modelbatch.amp import GradScaler

N, B = 4, 8


def _models(seed: int = 0, n: int = N) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)) for _ in range(n)]


def _data(steps: int, n: int = N, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(steps, n, B, 4, generator=g), torch.randn(steps, n, B, 3, generator=g)


def _poison(grad: torch.Tensor, value: float) -> None:
    with torch.no_grad():
        grad.view(-1)[0] = value


def _pack_step(batch, opt, scaler, x, y, overflow=(), clip=None) -> None:
    losses = batch.compute_loss(batch(x, in_dims=0), y, F.mse_loss, target_in_dims=0)
    scaler.scale(losses).sum().backward()
    for i, value in overflow:
        _poison(batch.stacked_parameters()["0.weight"].grad[i], value)
    if clip is not None:
        scaler.unscale_(opt)
        clip_grad_norm_(batch, clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


# ------------------------------------------------------------------ (a) isolation
def test_overflow_in_one_member_skips_only_that_member() -> None:
    models = _models()
    x, y = _data(2)
    runs = {}
    for name, overflow in [("clean", ()), ("member2_inf", ((2, math.inf),))]:
        batch = mb.ModelBatch(copy.deepcopy(models))
        opt = mb.optim.Adam(batch, lr=1e-2)
        scaler = GradScaler(batch, init_scale=2.0**10, growth_interval=1)
        _pack_step(batch, opt, scaler, x[0], y[0])  # one clean step: optimizer state exists
        before = {k: v.detach().clone() for k, v in batch.stacked_parameters().items()}
        state_before = opt.state_dict()
        _pack_step(batch, opt, scaler, x[1], y[1], overflow)
        runs[name] = (batch, opt, scaler, before, state_before)

    batch, opt, scaler, before, state_before = runs["member2_inf"]
    clean_batch, _, clean_scaler, _, _ = runs["clean"]
    others = [0, 1, 3]
    for name, p in batch.stacked_parameters().items():
        assert torch.equal(p[2], before[name][2]), f"{name}: the overflowing member must not move"
        assert torch.equal(p[others], clean_batch.stacked_parameters()[name][others]), name
        for key, t in opt.state[name].items():
            assert torch.equal(t[2], state_before["state"][name][key][2]), f"{name}.{key} of member 2 changed"
    assert opt.steps.tolist() == [2.0, 2.0, 1.0, 2.0]
    assert scaler.get_scale().tolist() == [2.0**12, 2.0**12, 2.0**10, 2.0**12]
    assert clean_scaler.get_scale().tolist() == [2.0**12] * N
    assert scaler.get_growth_tracker().tolist() == [0, 0, 0, 0]


# ------------------------------------------------------------------ (b) equivalence with torch
@pytest.mark.parametrize("clip", [None, 0.05])
def test_each_member_equals_its_own_torch_grad_scaler(clip: float | None) -> None:
    steps = 30
    lrs = [1e-2, 3e-3, 2e-2, 5e-3]
    init_scales = [2.0**10, 2.0**126, 2.0**8, 2.0**16]  # member 1 overflows by itself at first
    forced = {3: [(0, math.inf)], 7: [(2, math.nan), (3, math.inf)], 8: [(2, -math.inf)], 20: [(0, math.nan)]}
    models = _models()
    x, y = _data(steps)
    y = 10 * y  # losses ~100: 2**126 * loss overflows float32

    batch = mb.ModelBatch(copy.deepcopy(models))
    opt = mb.optim.Adam(batch, lr=lrs)
    scaler = GradScaler(batch, init_scale=init_scales, growth_interval=3)
    pack_scales = []
    for t in range(steps):
        _pack_step(batch, opt, scaler, x[t], y[t], forced.get(t, ()), clip)
        pack_scales.append(scaler.get_scale().tolist())

    for i, model in enumerate(copy.deepcopy(models)):
        ref_opt = torch.optim.Adam(model.parameters(), lr=lrs[i])
        ref_scaler = torch.amp.GradScaler("cpu", init_scale=init_scales[i], growth_interval=3)
        for t in range(steps):
            ref_scaler.scale(F.mse_loss(model(x[t, i]), y[t, i])).backward()
            for j, value in forced.get(t, ()):
                if j == i:
                    _poison(model[0].weight.grad, value)
            if clip is not None:
                ref_scaler.unscale_(ref_opt)
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            ref_scaler.step(ref_opt)
            ref_scaler.update()
            ref_opt.zero_grad()
            assert pack_scales[t][i] == ref_scaler.get_scale(), f"member {i}, step {t}"
        member = batch.member(i)
        for name, p in model.named_parameters():
            torch.testing.assert_close(dict(member.named_parameters())[name], p, msg=f"member {i} {name}")
    assert min(s[1] for s in pack_scales) < 2.0**126, "member 1 should have overflowed by itself"
    assert max(s[2] for s in pack_scales) > 2.0**8, "member 2's scale should have grown"


# ------------------------------------------------------------------ (c) state_dict
def test_state_dict_round_trip() -> None:
    models = _models()
    x, y = _data(8)
    batch = mb.ModelBatch(copy.deepcopy(models), backend="vmap")  # bitwise: one backend
    opt = mb.optim.Adam(batch, lr=1e-2)
    scaler = GradScaler(batch, init_scale=2.0**8, growth_interval=2)
    for t in range(4):
        _pack_step(batch, opt, scaler, x[t], y[t], [(t % N, math.inf)])
    buffer = io.BytesIO()
    torch.save({"scaler": scaler.state_dict(), "opt": opt.state_dict(), "batch": batch.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    batch2 = mb.ModelBatch(_models(seed=5), backend="vmap")
    batch2.load_state_dict(saved["batch"])
    opt2 = mb.optim.Adam(batch2, lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    scaler2 = GradScaler(batch2, growth_factor=4.0, growth_interval=100)
    scaler2.load_state_dict(saved["scaler"])
    assert torch.equal(scaler2.get_scale(), scaler.get_scale())
    assert torch.equal(scaler2.get_growth_tracker(), scaler.get_growth_tracker())
    assert (scaler2.get_growth_factor(), scaler2.get_growth_interval()) == (2.0, 2)
    for t in range(4, 8):
        _pack_step(batch, opt, scaler, x[t], y[t], [(1, math.nan)])
        _pack_step(batch2, opt2, scaler2, x[t], y[t], [(1, math.nan)])
        assert torch.equal(scaler2.get_scale(), scaler.get_scale())
    for name, p in batch.stacked_parameters().items():
        assert torch.equal(batch2.stacked_parameters()[name], p), name


def test_load_state_dict_errors_and_torch_state() -> None:
    scaler = GradScaler(3)
    with pytest.raises(RuntimeError, match=r"^mb\.amp\.GradScaler\.load_state_dict: the state dict is empty"):
        scaler.load_state_dict({})
    with pytest.raises(ValueError, match="holds 4 scales but the pack has 3"):
        scaler.load_state_dict(GradScaler(4).state_dict())
    scaler.load_state_dict(torch.amp.GradScaler("cpu", init_scale=128.0, growth_interval=7).state_dict())
    assert scaler.get_scale().tolist() == [128.0] * 3
    assert scaler.get_growth_interval() == 7


# ------------------------------------------------------------------ (d) disabled
def test_disabled_is_a_pass_through() -> None:
    models = _models()
    x, y = _data(1)
    plain, scaled = (mb.ModelBatch(copy.deepcopy(models)) for _ in range(2))
    plain_opt, opt = mb.optim.Adam(plain, lr=1e-2), mb.optim.Adam(scaled, lr=1e-2)
    scaler = GradScaler(scaled, enabled=False)
    assert not scaler.is_enabled()

    plain.compute_loss(plain(x[0], in_dims=0), y[0], F.mse_loss).sum().backward()
    plain_opt.step()
    losses = scaled.compute_loss(scaled(x[0], in_dims=0), y[0], F.mse_loss)
    assert scaler.scale(losses) is losses
    losses.sum().backward()
    grads = {k: p.grad.clone() for k, p in scaled.stacked_parameters().items()}
    scaler.unscale_(opt)
    for k, p in scaled.stacked_parameters().items():
        assert torch.equal(p.grad, grads[k])
    scaler.step(opt)
    scaler.update()
    for k, p in scaled.stacked_parameters().items():
        assert torch.equal(p, plain.stacked_parameters()[k])
    assert torch.equal(scaler.get_scale(), torch.ones(N))
    assert scaler.state_dict() == {}
    scaler.load_state_dict({})
    scaler.reset_member(1)


# ------------------------------------------------------------------ slots, masks, errors
def test_frozen_member_keeps_its_scale_and_reset_member() -> None:
    batch = mb.ModelBatch(_models())
    opt = mb.optim.SGD(batch, lr=0.1)
    scaler = GradScaler(batch, init_scale=[1.0, 2.0, 4.0, 8.0], growth_interval=1)
    x, y = _data(2)
    batch.freeze(3)
    _pack_step(batch, opt, scaler, x[0], y[0], [(3, math.inf), (1, math.inf)])
    assert scaler.get_scale().tolist() == [2.0, 1.0, 8.0, 8.0]
    scaler.reset_member(0)
    scaler.reset_member(-2)
    assert scaler.get_scale().tolist() == [1.0, 1.0, 4.0, 8.0]
    with pytest.raises(IndexError, match=r"^mb\.amp\.GradScaler\.reset_member: member 4 is out of range"):
        scaler.reset_member(4)


def test_user_mask_is_combined() -> None:
    batch = mb.ModelBatch(_models())
    opt = mb.optim.Adam(batch, lr=1e-2)
    scaler = GradScaler(batch)
    x, y = _data(1)
    losses = batch.compute_loss(batch(x[0], in_dims=0), y[0], F.mse_loss)
    scaler.scale(losses).sum().backward()
    _poison(batch.stacked_parameters()["2.bias"].grad[0], math.nan)
    scaler.step(opt, mask=torch.tensor([True, True, False, True]))
    scaler.update()
    assert opt.steps.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert scaler.get_scale().tolist() == [2.0**15] + [2.0**16] * 3


def test_scale_keeps_the_sum_guard_and_checks_shape() -> None:
    batch = mb.ModelBatch(_models())
    scaler = GradScaler(batch, init_scale=4.0)
    x, y = _data(1)
    losses = batch.compute_loss(batch(x[0], in_dims=0), y[0], F.mse_loss)
    scaled = scaler.scale(losses)
    assert isinstance(scaled, MemberLosses)
    assert torch.equal(scaled, losses * 4.0)
    with pytest.raises(RuntimeError, match=r"losses\.sum\(\)\.backward\(\)"):
        scaled.backward()
    with pytest.raises(
        ValueError, match=r"^mb\.amp\.GradScaler\.scale: expected the \[N=4\] per-member losses"
    ):
        scaler.scale(losses.sum())


def test_call_order_errors() -> None:
    batch = mb.ModelBatch(_models())
    opt = mb.optim.Adam(batch)
    scaler = GradScaler(batch)
    with pytest.raises(RuntimeError, match=r"^mb\.amp\.GradScaler\.update: no inf checks"):
        scaler.update()
    x, y = _data(1)
    scaler.scale(batch.compute_loss(batch(x[0], in_dims=0), y[0], F.mse_loss)).sum().backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match=r"step\(\) has already been called"):
        scaler.step(opt)
    with pytest.raises(RuntimeError, match="closures are not supported"):
        scaler.step(opt, closure=lambda: None)
    with pytest.raises(ValueError, match="scaler has 2"):
        GradScaler(2).step(opt)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"growth_factor": 1.0}, "growth_factor must be"),
        ({"backoff_factor": 1.5}, "backoff_factor must be"),
        ({"growth_interval": 0}, "growth_interval must be"),
        ({"init_scale": [1.0, 2.0]}, "init_scale has 2 values but the pack has 4"),
        ({"init_scale": 0.0}, "init_scale must be > 0"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=rf"^mb\.amp\.GradScaler: {match}"):
        GradScaler(4, **kwargs)


def test_fp16_grads_are_rejected() -> None:
    batch = mb.ModelBatch([nn.Linear(2, 1).half() for _ in range(2)])
    opt = mb.optim.SGD(batch, lr=0.1)
    scaler = GradScaler(batch)
    for p in batch.stacked_parameters().values():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="attempting to unscale FP16 gradients"):
        scaler.unscale_(opt)


def test_growth_stops_below_float32_overflow_as_torch() -> None:
    batch = mb.ModelBatch(_models(n=2))
    opt = mb.optim.SGD(batch, lr=0.0)
    scaler = GradScaler(batch, init_scale=[2.0**126, 1.0], growth_interval=1)
    model = _models(n=1)[0]
    ref_opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ref = torch.amp.GradScaler("cpu", init_scale=2.0**126, growth_interval=1)
    ref.scale(torch.zeros(()))  # starts the lazily created scale
    for _ in range(3):
        for p in [*batch.stacked_parameters().values(), *model.parameters()]:
            p.grad = torch.zeros_like(p)
        scaler.step(opt)
        scaler.update()
        ref.step(ref_opt)
        ref.update()
        assert scaler.get_scale()[0].item() == ref.get_scale()
    assert scaler.get_scale().tolist() == [2.0**127, 8.0]
    assert scaler.get_growth_tracker().tolist() == [0, 0]
