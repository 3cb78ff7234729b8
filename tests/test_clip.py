"""mb.clip_grad_norm_ equals torch.nn.utils.clip_grad_norm_ applied to each member's model alone."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import modelbatch as mb
from modelbatch._clip import clip_grad_norm_

N = 5


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _pack_with_grads(dtype: torch.dtype, grad_scales: list[float], seed: int = 0):
    """A pack and N reference models with the same random gradients (member i's scaled by grad_scales[i])."""
    torch.manual_seed(seed)
    models = [_net().to(dtype) for _ in range(N)]
    for model, s in zip(models, grad_scales):
        for p in model.parameters():
            p.grad = torch.randn_like(p) * s
    batch = mb.ModelBatch(models)
    for name, p in batch.stacked_parameters().items():
        p.grad = torch.stack([dict(m.named_parameters())[name].grad for m in models])
    return batch, models


def _pack_grads(batch: mb.ModelBatch) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in batch.stacked_parameters().items()}


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_matches_torch_per_member(norm_type: float, dtype: torch.dtype, rtol: float) -> None:
    # member 0 has a tiny norm (untouched); the others are clipped to different max norms
    batch, models = _pack_with_grads(dtype, [1e-4, 1.0, 3.0, 0.5, 10.0])
    max_norm = [1.0, 0.5, 2.0, 0.1, 7.0]
    before = _pack_grads(batch)
    norms = clip_grad_norm_(batch, max_norm, norm_type=norm_type)
    assert norms.shape == (N,) and norms.dtype == dtype
    for i, model in enumerate(models):
        expected = nn.utils.clip_grad_norm_(model.parameters(), max_norm[i], norm_type=norm_type)
        torch.testing.assert_close(norms[i], expected, rtol=rtol, atol=0)
        for name, p in model.named_parameters():
            torch.testing.assert_close(batch.stacked_parameters()[name].grad[i], p.grad, rtol=rtol, atol=0)
    for name, g in _pack_grads(batch).items():
        assert torch.equal(g[0], before[name][0]), "a member under its max_norm must be untouched"
        assert not torch.equal(g[1], before[name][1])


def test_scalar_max_norm_and_returned_norms_are_before_clipping() -> None:
    batch, models = _pack_with_grads(torch.float64, [0.1, 1.0, 2.0, 5.0, 20.0])
    norms = clip_grad_norm_(batch, 1.0)
    expected = torch.stack([nn.utils.clip_grad_norm_(m.parameters(), 1.0) for m in models])
    torch.testing.assert_close(norms, expected, rtol=1e-12, atol=0)
    after = clip_grad_norm_(batch, math.inf)  # inf: measure only
    torch.testing.assert_close(after, torch.clamp(expected, max=1.0), rtol=1e-5, atol=0)


def test_params_without_grad_are_skipped() -> None:
    batch, models = _pack_with_grads(torch.float64, [1.0] * N)
    batch.stacked_parameters()["0.bias"].grad = None
    for m in models:
        m[0].bias.grad = None
    norms = clip_grad_norm_(batch, 0.3)
    for i, m in enumerate(models):
        torch.testing.assert_close(
            norms[i], nn.utils.clip_grad_norm_(m.parameters(), 0.3), rtol=1e-12, atol=0
        )
    assert batch.stacked_parameters()["0.bias"].grad is None


def test_no_grads_returns_zeros() -> None:
    batch = mb.ModelBatch([_net() for _ in range(3)])
    assert torch.equal(clip_grad_norm_(batch, 1.0), torch.zeros(3))


def test_nonfinite_names_members() -> None:
    batch, _ = _pack_with_grads(torch.float32, [1.0] * N)
    grads = batch.stacked_parameters()["2.weight"].grad
    grads[1, 0, 0] = math.inf
    grads[3, 1, 1] = math.nan
    before = _pack_grads(batch)
    with pytest.raises(RuntimeError, match=r"^mb\.clip_grad_norm_:.*members \[1, 3\]"):
        clip_grad_norm_(batch, 1.0, error_if_nonfinite=True)
    for name, g in _pack_grads(batch).items():
        torch.testing.assert_close(g, before[name], rtol=0, atol=0, equal_nan=True)  # raised before clipping
    norms = clip_grad_norm_(batch, 1.0)  # without the check: like torch, only the bad members turn non-finite
    assert torch.isfinite(norms).tolist() == [True, False, True, False, True]


@pytest.mark.parametrize(
    ("max_norm", "error", "match"),
    [
        ([1.0, 2.0], ValueError, "has 2 values but the pack has 5"),
        (-1.0, ValueError, "must be >= 0"),
        (math.nan, ValueError, "must be finite"),
        ("big", TypeError, "must be a number"),
    ],
)
def test_bad_max_norm(max_norm: object, error: type, match: str) -> None:
    batch, _ = _pack_with_grads(torch.float32, [1.0] * N)
    with pytest.raises(error, match=rf"^mb\.clip_grad_norm_:.*{match}"):
        clip_grad_norm_(batch, max_norm)


def test_not_a_batch() -> None:
    with pytest.raises(TypeError, match=r"^mb\.clip_grad_norm_: expected a ModelBatch"):
        clip_grad_norm_(_net(), 1.0)


def test_inf_max_norm_per_member_measures_only() -> None:
    batch, _ = _pack_with_grads(torch.float64, [1.0] * N)
    before = _pack_grads(batch)
    clip_grad_norm_(batch, [math.inf, 0.1, math.inf, 0.1, math.inf])
    after = _pack_grads(batch)
    for name in before:
        assert torch.equal(after[name][[0, 2, 4]], before[name][[0, 2, 4]])
        assert not torch.equal(after[name][1], before[name][1])
