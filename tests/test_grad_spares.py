"""The loop backend's gradients on CPU reuse their memory (modelbatch._grad_spares), never a tensor
someone else holds, and are the same gradients as without it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from models import CNN, seeded

import modelbatch as mb
from modelbatch import _grad_spares

N = 3


def _pack(backend: str = "loop") -> tuple[mb.ModelBatch, mb.optim.Optimizer, torch.Tensor, torch.Tensor]:
    batch = mb.ModelBatch([seeded(CNN, i) for i in range(N)], backend=backend)
    opt = mb.optim.Adam(batch, lr=[1e-3, 3e-3, 1e-2])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, 1, 8, 8, generator=gen)
    y = torch.randint(0, 3, (N, 8), generator=gen)
    return batch, opt, x, y


def _loss(batch: mb.ModelBatch, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return batch.compute_loss(batch(x, in_dims=0), y, F.cross_entropy, target_in_dims=0).sum()


def _train(batch, opt, x, y, steps: int) -> list[dict[str, int]]:
    """``steps`` steps; the gradients' addresses at each."""
    addresses = []
    for _ in range(steps):
        opt.zero_grad()
        _loss(batch, x, y).backward()
        addresses.append({k: p.grad.data_ptr() for k, p in batch.stacked_parameters().items()})
        opt.step()
    return addresses


def test_the_loop_backend_trains_in_the_same_gradient_memory_with_the_same_results_as_vmap() -> None:
    loop, vmapped = _pack("loop"), _pack("vmap")
    addresses = _train(*loop, steps=4)
    _train(*vmapped, steps=4)
    assert addresses[1] == addresses[2] == addresses[3], "the gradients did not reuse their memory"
    for name, p in loop[0].stacked_parameters().items():
        torch.testing.assert_close(p, vmapped[0].stacked_parameters()[name], rtol=1e-5, atol=1e-6)


def test_a_gradient_the_user_keeps_after_zero_grad_is_never_overwritten() -> None:
    batch, opt, x, y = _pack()
    _train(batch, opt, x, y, steps=1)
    params = batch.stacked_parameters()
    kept = params["head.weight"].grad  # a name on it
    view = params["conv1.weight"].grad[0]  # a view of it
    kept_before, view_before = kept.clone(), view.clone()
    opt.zero_grad()
    x.mul_(2.0)  # another input: other gradients
    _loss(batch, x, y).backward()
    assert torch.equal(kept, kept_before) and torch.equal(view, view_before)
    assert params["head.weight"].grad.data_ptr() != kept.data_ptr()
    new_storage = params["conv1.weight"].grad.untyped_storage().data_ptr()
    assert new_storage != view.untyped_storage().data_ptr()  # a new tensor, not the viewed one
    assert not torch.equal(params["head.weight"].grad, kept)


def test_accumulation_autograd_grad_and_double_backward_give_torchs_gradients() -> None:
    batch, opt, x, y = _pack()
    _train(batch, opt, x, y, steps=2)  # every parameter now has a spare
    params = batch.stacked_parameters()
    opt.zero_grad()
    expected = torch.autograd.grad(_loss(batch, x, y), list(params.values()))
    _loss(batch, x, y).backward()
    _loss(batch, x, y).backward()  # accumulates into the first gradients
    for g, p in zip(expected, params.values()):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-6, atol=1e-7)
    opt.zero_grad()
    grads = torch.autograd.grad(_loss(batch, x, y), list(params.values()), create_graph=True)
    penalty = sum((g**2).sum() for g in grads)
    penalty.backward()  # through the unbind's backward: a graph, not a spare
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    for g, again in zip(expected, grads):
        torch.testing.assert_close(again.detach(), g, rtol=1e-6, atol=1e-7)


def test_a_spare_goes_with_its_pack() -> None:
    batch, opt, x, y = _pack()
    _train(batch, opt, x, y, steps=2)
    opt.zero_grad()
    ids = {id(p) for p in batch.stacked_parameters().values()}
    assert ids <= set(_grad_spares._spares)
    del batch, opt
    assert not ids & set(_grad_spares._spares)
