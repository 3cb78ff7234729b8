"""mb.estimate_memory: exact weights, gradients and optimizer state; activations measured and linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import CNN, MLP
from torch import nn

import modelbatch as mb


def _saved_bytes(batch: mb.ModelBatch, x: torch.Tensor) -> int:
    """Bytes of the storages autograd saves in a real pack's forward (weights, buffers, input left out)."""
    held = {t.untyped_storage().data_ptr() for t in [*batch.parameters(), *batch.buffers(), x]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in held:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        batch(x, in_dims=0)
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_grads_and_adam_state_are_exact_for_an_mlp(dtype: torch.dtype) -> None:
    est = mb.estimate_memory(MLP, (32, 8), optimizer="adam", n=6, dtype=dtype)
    size = torch.finfo(dtype).bits // 8
    n_params = sum(p.numel() for p in MLP().parameters())
    assert est.params == est.grads == n_params * size
    assert est.buffers == 0

    batch = mb.ModelBatch([MLP().to(dtype) for _ in range(6)])
    opt = mb.optim.Adam(batch, lr=[1e-3] * 6)
    batch.compute_loss(
        batch(torch.randn(32, 8, dtype=dtype)), torch.randint(0, 3, (32,)), F.cross_entropy
    ).sum().backward()
    opt.step()
    moments = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values())
    assert moments == 2 * 6 * est.params
    counters = sum(t.numel() * t.element_size() for t in [opt.steps, *opt.hparams.values()])
    assert est.optimizer_state * 6 == moments + counters


def test_optimizer_choices() -> None:
    plain = mb.estimate_memory(MLP, (4, 8), optimizer="sgd")
    momentum = mb.estimate_memory(MLP, (4, 8), optimizer=lambda b: mb.optim.SGD(b, lr=0.1, momentum=0.9))
    none = mb.estimate_memory(MLP, (4, 8), optimizer=None)
    assert none.optimizer_state == 0
    assert momentum.optimizer_state - plain.optimizer_state == plain.params  # one momentum buffer
    with pytest.raises(ValueError, match=r"^mb.estimate_memory: unknown optimizer 'lamb'"):
        mb.estimate_memory(MLP, (4, 8), optimizer="lamb")
    with pytest.raises(
        ValueError, match=r"^mb.estimate_memory: n \(members in the pack\) must be a positive int, got 0"
    ):
        mb.estimate_memory(MLP, (4, 8), n=0)


def test_activations_scale_with_batch_size_and_match_a_real_pack() -> None:
    small = mb.estimate_memory(CNN, (16, 1, 8, 8), n=8)
    large = mb.estimate_memory(CNN, (32, 1, 8, 8), n=8)
    assert 1.9 < large.activations / small.activations < 2.1
    assert 1.9 < large.activations_loop / small.activations_loop < 2.1
    assert 0 < large.activations_loop <= large.activations
    for n in (4, 16):
        batch = mb.ModelBatch([CNN() for _ in range(n)], backend="vmap")
        measured = _saved_bytes(batch, torch.randn(n, 32, 1, 8, 8))
        assert abs(n * large.activations - measured) <= 0.05 * measured, (n, large.activations, measured)


def test_totals_by_backend() -> None:
    est = mb.estimate_memory(CNN, (32, 1, 8, 8), n=16)
    assert est.workspace > 0
    assert est.total == est.total_for("vmap") == est.total_for("auto")
    assert est.total_for("loop") <= est.total_for("chunked", 4) < est.total_for("chunked", 8) < est.total
    held = est.params + est.buffers + est.grads + est.optimizer_state + est.activations
    assert est.total_for("chunked", 4) == 16 * held + 4 * est.workspace
    with pytest.raises(ValueError, match=r"^mb.MemoryEstimate.total_for: unknown backend 'jit'"):
        est.total_for("jit")


def test_example_tensor_for_integer_inputs() -> None:
    def factory() -> nn.Module:
        return nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(8 * 12, 2))

    est = mb.estimate_memory(factory, torch.randint(0, 50, (16, 12)), optimizer="adamw", n=4)
    assert est.params == (50 * 8 + 8 * 12 * 2 + 2) * 4
    assert est.activations > 0
