"""Vectorized optimizers vs one torch.optim optimizer per member."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from models import CNN, MLP, seeded

import modelbatch as mb
from modelbatch.testing import OPTIMIZERS, _compare, assert_pack_matches_sequential, member_hparams

N = 5
# Every numeric hyperparameter differs per member; mixes of zero / non-zero values hit the where() paths.
CONFIGS = {
    "sgd": ("sgd", {"lr": [0.1, 0.05, 0.02, 0.01, 0.3]}),
    "sgd-momentum": (
        "sgd",
        {
            "lr": [0.1, 0.05, 0.02, 0.01, 0.3],
            "momentum": [0.9, 0.0, 0.5, 0.99, 0.8],
            "dampening": [0.0, 0.1, 0.5, 0.0, 0.2],
        },
    ),
    "sgd-nesterov-wd": (
        "sgd",
        {
            "lr": [0.1, 0.05, 0.02, 0.01, 0.3],
            "momentum": [0.9, 0.7, 0.5, 0.99, 0.8],
            "weight_decay": [0.0, 1e-2, 1e-3, 0.1, 0.0],
            "nesterov": True,
        },
    ),
    "adam": (
        "adam",
        {
            "lr": [1e-3, 3e-3, 1e-2, 3e-4, 2e-2],
            "betas": ([0.9, 0.8, 0.95, 0.5, 0.6], [0.999, 0.99, 0.9, 0.98, 0.995]),
            "eps": [1e-8, 1e-6, 1e-7, 1e-8, 1e-5],
            "weight_decay": [0.0, 1e-2, 0.0, 1e-3, 0.1],
        },
    ),
    "adam-amsgrad": ("adam", {"lr": [1e-3, 3e-3, 1e-2, 3e-4, 2e-2], "amsgrad": True}),
    "adamw": ("adamw", {"lr": [1e-3, 3e-3, 1e-2, 3e-4, 2e-2], "weight_decay": [0.0, 1e-2, 0.1, 0.5, 1e-3]}),
    "rmsprop": (
        "rmsprop",
        {
            "lr": [1e-3, 3e-3, 1e-2, 3e-4, 2e-3],
            "alpha": [0.99, 0.9, 0.95, 0.5, 0.999],
            "momentum": [0.0, 0.9, 0.5, 0.0, 0.3],
            "weight_decay": [0.0, 1e-2, 0.0, 1e-3, 0.1],
        },
    ),
    # lr 1e-2 with centered momentum is chaotic: a 1e-15 nudge moves torch.optim itself by 1e-2 in 200 steps.
    "rmsprop-centered": (
        "rmsprop",
        {"lr": [1e-3, 3e-3, 2e-3, 3e-4, 5e-4], "momentum": 0.9, "centered": True},
    ),
    "adam-maximize": ("adam", {"lr": [1e-3, 3e-3, 1e-2, 3e-4, 2e-2], "maximize": True}),
}


def _packed_and_alone(name: str, dtype: torch.dtype):
    kind, hparams = CONFIGS[name]
    models = [seeded(MLP, i).to(dtype) for i in range(N)]
    alone = [copy.deepcopy(m) for m in models]
    batch = mb.ModelBatch(models)
    packed_cls, torch_cls = OPTIMIZERS[kind]
    opt = packed_cls(batch, **hparams)
    torch_opts = [torch_cls(m.parameters(), **member_hparams(hparams, i, N)) for i, m in enumerate(alone)]
    return batch, opt, alone, torch_opts


def _set_random_grads(batch: mb.ModelBatch, alone: list, gen: torch.Generator) -> None:
    for name, p in batch.stacked_parameters().items():
        grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.grad = grad.clone()
        for i, m in enumerate(alone):
            m.get_parameter(name).grad = grad[i].clone()


# CPU_PIECE_BYTES as set: whole tensors; one member per piece; pieces of whole and cut tensors mixed
PIECES = {"whole": None, "one-member-pieces": 64, "mixed-pieces": 3000}


@pytest.mark.parametrize("pieces", sorted(PIECES))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_optimizer_step_is_bitwise_equal_to_torch_optim_float32(name: str, pieces: str, monkeypatch) -> None:
    if PIECES[pieces] is not None:
        monkeypatch.setattr(mb.optim._base, "CPU_PIECE_BYTES", PIECES[pieces])
    batch, opt, alone, torch_opts = _packed_and_alone(name, torch.float32)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        _set_random_grads(batch, alone, gen)
        opt.step()
        for o in torch_opts:
            o.step()
    for pname, stacked in batch.stacked_parameters().items():
        for i, m in enumerate(alone):
            assert torch.equal(stacked[i], m.get_parameter(pname)), f"{name}: {pname} of member {i} differs"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_step_in_pieces_leaves_the_same_state_as_a_whole_step(name: str, monkeypatch) -> None:
    """Every moment and buffer, not only the parameters: the pieces make the whole step's choices."""
    runs = []
    for piece_bytes in (None, 64, 3000):
        if piece_bytes is not None:
            monkeypatch.setattr(mb.optim._base, "CPU_PIECE_BYTES", piece_bytes)
        batch, opt, alone, _ = _packed_and_alone(name, torch.float32)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            _set_random_grads(batch, alone, gen)
            opt.step()
        runs.append((batch.stacked_parameters(), opt.state_dict()["state"]))
    (params, state), rest = runs[0], runs[1:]
    assert any(state.values()) or name == "sgd", "the optimizer keeps no state to compare"
    for other_params, other_state in rest:
        assert all(torch.equal(params[k], other_params[k]) for k in params)
        assert other_state.keys() == state.keys()
        for pname, st in state.items():
            for key, t in st.items():
                assert torch.equal(t, other_state[pname][key]), f"{name}: {pname}.{key} differs in pieces"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shared_hparams_and_masked_steps_are_bitwise_equal_to_torch_optim(name: str) -> None:
    """Hyperparameters shared by all members run the scalar kernels (``torch._foreach_*`` where the
    optimizer has them); a mask runs them on a subset of rows. Both stay bitwise equal."""
    kind, hparams = CONFIGS[name]
    shared = member_hparams(hparams, 0, N)
    models = [seeded(MLP, i) for i in range(N)]
    alone = [copy.deepcopy(m) for m in models]
    batch = mb.ModelBatch(models)
    packed_cls, torch_cls = OPTIMIZERS[kind]
    opt = packed_cls(batch, **shared)
    torch_opts = [torch_cls(m.parameters(), **shared) for m in alone]
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        _set_random_grads(batch, alone, gen)
        mask = torch.tensor([True, step % 2 == 0, True, False, True])
        opt.step(mask=None if step == 0 else mask)
        for o, on in zip(torch_opts, mask.tolist() if step else [True] * N):
            if on:
                o.step()
    for pname, stacked in batch.stacked_parameters().items():
        for i, m in enumerate(alone):
            assert torch.equal(stacked[i], m.get_parameter(pname)), f"{name}: {pname} of member {i} differs"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mlp_200_steps_float64_matches_sequential(name: str) -> None:
    kind, hparams = CONFIGS[name]
    X, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    # maximize ascends the loss it is given: give it the negated loss so that training converges.
    loss_fn = (lambda out, t: -F.cross_entropy(out, t)) if hparams.get("maximize") else F.cross_entropy
    report = assert_pack_matches_sequential(
        lambda i: seeded(MLP, i),
        (X, y),
        optimizer=kind,
        hparams=hparams,
        loss_fn=loss_fn,
        n_members=N,
        steps=200,
        rtol=1e-10,
    )
    assert report.max_rel_diff <= 1e-10


@pytest.mark.parametrize("name", ["sgd-nesterov-wd", "adam", "adamw", "rmsprop"])
def test_cnn_batchnorm_200_steps_float64_matches_sequential(name: str) -> None:
    kind, hparams = CONFIGS[name]
    gen = torch.Generator().manual_seed(1)
    X, y = torch.randn(128, 1, 8, 8, generator=gen), torch.randint(0, 3, (128,), generator=gen)
    report = assert_pack_matches_sequential(
        lambda i: seeded(CNN, i),
        (X, y),
        optimizer=kind,
        hparams=hparams,
        n_members=N,
        steps=200,
        batch_size=16,
        rtol=1e-8,
    )
    assert {"bn1.running_mean", "bn2.running_var", "conv1.weight"} <= report.rel_diff.keys()


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda p: p.mul_(1 + 1e-9), r"members \[1\] differ"),  # off by a relative 1e-9
        (lambda p: p.fill_(math.nan), r"members \[1\] differ \(worst relative diff nan\)"),  # not <= rtol
    ],
    ids=["off-by-1e-9", "gone-nan"],
)
def test_conformance_check_catches_a_wrong_member(spoil, message) -> None:
    """The helper must fail when one member's update is slightly off, or NaN where its reference
    stays finite."""

    class SpoiledSGD(mb.optim.SGD):
        def _update(self, param, grad, state, values):
            super()._update(param, grad, state, values)
            spoil(param[1:2])

    X, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    original = OPTIMIZERS["sgd"]
    OPTIMIZERS["sgd"] = (SpoiledSGD, torch.optim.SGD)
    try:
        with pytest.raises(AssertionError, match=message):
            assert_pack_matches_sequential(lambda i: seeded(MLP, i), (X, y), optimizer="sgd", steps=3)
    finally:
        OPTIMIZERS["sgd"] = original


def test_per_member_targets_and_shared_input_match_alone() -> None:
    """Shared input, per-member targets: each member's gradient is exactly its own."""
    models = [seeded(MLP, i).double() for i in range(3)]
    alone = [copy.deepcopy(m) for m in models]
    batch = mb.ModelBatch(models)
    x = torch.randn(10, 8, dtype=torch.float64)
    ys = torch.randint(0, 3, (3, 10))
    batch.compute_loss(batch(x), ys, F.cross_entropy).sum().backward()
    for i, m in enumerate(alone):
        F.cross_entropy(m(x), ys[i]).backward()
        for name, p in batch.stacked_parameters().items():
            ref = m.get_parameter(name).grad
            torch.testing.assert_close(p.grad[i], ref, rtol=0, atol=1e-13 * float(ref.abs().max()))


def test_conformance_scales_each_tensor_by_its_kind() -> None:
    """A bias of zeros off by round-off is judged at the scale of the biases, not at its own."""
    torch.manual_seed(0)
    nn = torch.nn
    models = [nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double() for _ in range(2)]
    with torch.no_grad():
        for m in models:
            m[1].bias.zero_()
    batch = mb.ModelBatch(models)
    alone = [copy.deepcopy(m) for m in models]
    with torch.no_grad():
        alone[1][1].bias.add_(1e-14)  # round-off on a tensor whose own scale is 0
    report = _compare("api", batch, alone, rtol=1e-10, ignore=set())
    scale = max(float(m[0].bias.abs().max()) for m in models[1:])
    assert report.rel_diff["1.bias"] == pytest.approx(1e-14 / scale, rel=1e-6)
    with torch.no_grad():
        alone[1][0].weight.mul_(1 + 1e-6)  # a real difference still fails
    with pytest.raises(AssertionError, match=r"0.weight: members \[1\] differ"):
        _compare("api", batch, alone, rtol=1e-10, ignore=set())
