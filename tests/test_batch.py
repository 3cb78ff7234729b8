"""ModelBatch: per-member state, member surgery, checkpoints and errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import CNN, MLP, seeded
from torch import nn

import modelbatch as mb


def _train_steps(batch: mb.ModelBatch, opt: mb.optim.Optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(batch.n, 16, 1, 8, 8, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (batch.n, 16), generator=gen)
        opt.zero_grad()
        batch.compute_loss(batch(x, in_dims=0), y, F.cross_entropy).sum().backward()
        opt.step()


def _cnn_pack(n: int = 4) -> mb.ModelBatch:
    return mb.ModelBatch([seeded(CNN, i).double() for i in range(n)], backend="vmap")  # bitwise: one backend


def _snapshot(batch: mb.ModelBatch, opt: mb.optim.Optimizer, i: int) -> dict[str, torch.Tensor]:
    tensors = {**batch.stacked_parameters(), **batch.stacked_buffers()}
    out = {name: t[i].detach().clone() for name, t in tensors.items()}
    for pname, state in opt.state.items():
        out.update({f"opt.{pname}.{k}": t[i].clone() for k, t in state.items()})
    out["opt.step"] = opt.steps[i].clone()
    return out


def test_frozen_member_is_bit_identical_and_others_train() -> None:
    batch = _cnn_pack()
    opt = mb.optim.Adam(batch, lr=[1e-2, 2e-2, 3e-2, 4e-2])
    _train_steps(batch, opt, 3)
    before = _snapshot(batch, opt, 1)
    other = _snapshot(batch, opt, 2)
    batch.freeze(1)
    _train_steps(batch, opt, 5, seed=1)
    after = _snapshot(batch, opt, 1)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"frozen member changed {name}"
    assert not torch.equal(other["conv1.weight"], batch.stack.conv1.weight[2])
    assert not torch.equal(other["bn1.running_mean"], batch.stack.bn1.running_mean[2])


def test_unfrozen_member_continues_like_one_that_never_paused() -> None:
    """Freezing then unfreezing = training that member for fewer steps; others unaffected."""
    paused, straight = _cnn_pack(3), _cnn_pack(3)
    opt_p, opt_s = mb.optim.SGD(paused, lr=0.05, momentum=0.9), mb.optim.SGD(straight, lr=0.05, momentum=0.9)
    _train_steps(paused, opt_p, 2)
    _train_steps(straight, opt_s, 2)
    paused.freeze(0)
    _train_steps(paused, opt_p, 2, seed=5)
    _train_steps(straight, opt_s, 2, seed=5)
    for name, t in straight.stacked_parameters().items():
        assert torch.equal(paused.stacked_parameters()[name][1:], t[1:].detach())
    paused.unfreeze(0)
    assert bool(paused.active.all())


def test_member_round_trip_returns_original_class_with_weights() -> None:
    batch = _cnn_pack()
    opt = mb.optim.AdamW(batch, lr=1e-2)
    _train_steps(batch, opt, 2)
    batch.eval()
    m = batch.member(2)
    assert type(m) is CNN and not m.training
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x), batch(x)[2], rtol=1e-12, atol=1e-12)
    reloaded = CNN().double()
    reloaded.load_state_dict(m.state_dict())
    assert torch.equal(reloaded.bn2.running_var, batch.stack.bn2.running_var[2])


def test_load_member_and_reset_member_equal_a_fresh_model_trained_alone() -> None:
    batch = mb.ModelBatch([seeded(MLP, i).double() for i in range(3)])
    opt = mb.optim.Adam(batch, lr=1e-2)
    x, y = torch.randn(32, 8, dtype=torch.float64), torch.randint(0, 3, (32,))

    def step():
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).sum().backward()
        opt.step()

    for _ in range(3):
        step()
    fresh = seeded(MLP, 99).double()
    alone = copy.deepcopy(fresh)
    batch.load_member(1, fresh)
    opt.reset_member(1)
    assert opt.steps[1] == 0
    torch_opt = torch.optim.Adam(alone.parameters(), lr=1e-2)
    for _ in range(4):
        step()
        torch_opt.zero_grad()
        F.cross_entropy(alone(x), y).backward()
        torch_opt.step()
    for name, p in alone.named_parameters():
        torch.testing.assert_close(
            batch.stacked_parameters()[name][1].detach(), p.detach(), rtol=1e-12, atol=0
        )


def test_load_member_accepts_state_dict() -> None:
    batch = mb.ModelBatch([seeded(MLP, i) for i in range(2)])
    donor = seeded(MLP, 7)
    batch.load_member(0, donor.state_dict())
    assert torch.equal(batch.stack.fc1.weight[0], donor.fc1.weight)


def test_save_load_round_trip_resumes_identically(tmp_path) -> None:
    batch = _cnn_pack(3)
    opt = mb.optim.Adam(batch, lr=[1e-2, 2e-2, 3e-2], betas=([0.9, 0.8, 0.7], 0.999))
    _train_steps(batch, opt, 2)
    batch.freeze(2)
    path = tmp_path / "pack.pt"
    mb.save(path, batch, opt, epoch=2)
    restored, restored_opt, extra = mb.load(path)
    assert extra == {"epoch": 2} and type(restored_opt) is mb.optim.Adam
    assert restored.active.tolist() == [True, True, False]
    _train_steps(batch, opt, 3, seed=9)
    _train_steps(restored, restored_opt, 3, seed=9)
    for name, t in batch.state_dict().items():
        assert torch.equal(restored.state_dict()[name], t), name


def test_save_load_into_existing_objects(tmp_path) -> None:
    batch = _cnn_pack(2)
    opt = mb.optim.SGD(batch, lr=0.1, momentum=0.9)
    _train_steps(batch, opt, 2)
    mb.save(tmp_path / "p.pt", batch, opt)
    other = _cnn_pack(2)
    other_opt = mb.optim.SGD(other, lr=0.5)
    mb.load(tmp_path / "p.pt", other, other_opt)
    assert torch.equal(other.stack.conv2.weight, batch.stack.conv2.weight)
    assert torch.equal(other_opt.hparams["lr"], opt.hparams["lr"])
    assert torch.equal(
        other_opt.state["conv1.weight"]["momentum_buffer"], opt.state["conv1.weight"]["momentum_buffer"]
    )


def test_dropout_masks_differ_between_members() -> None:
    batch = mb.ModelBatch([nn.Dropout(0.5) for _ in range(4)])
    out = batch(torch.ones(1000))
    assert out.shape == (4, 1000)
    kept = out != 0
    # Each member drops about half, independently: pairwise agreement ~50 %, not 100 %.
    agreement = (kept[0] == kept[1]).float().mean()
    assert 0.4 < float(kept.float().mean()) < 0.6 and float(agreement) < 0.6


def test_batchnorm_running_stats_are_per_member() -> None:
    models = [nn.BatchNorm1d(3).double() for _ in range(2)]
    alone = copy.deepcopy(models)
    batch = mb.ModelBatch(models)
    xs = torch.randn(2, 10, 3, dtype=torch.float64)
    batch(xs, in_dims=0)
    for i, m in enumerate(alone):
        m(xs[i])
        assert torch.equal(batch.stack.running_mean[i], m.running_mean)
        assert torch.equal(batch.stack.running_var[i], m.running_var)
    assert batch.stack.num_batches_tracked.tolist() == [1, 1]


class Other(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)


BAD_INPUTS = [
    ("empty list", lambda: mb.ModelBatch([]), ValueError, "ModelBatch: got an empty list"),
    ("not a list", lambda: mb.ModelBatch(nn.Linear(2, 2)), TypeError, "expected a list of nn.Module"),
    ("not modules", lambda: mb.ModelBatch([nn.Linear(2, 2), "x"]), TypeError, "model 1 is a str"),
    ("mixed classes", lambda: mb.ModelBatch([MLP(), Other()]), TypeError, "same class"),
    (
        "mixed shapes",
        lambda: mb.ModelBatch([MLP(hidden=16), MLP(hidden=32)]),
        ValueError,
        "identical parameter shapes",
    ),
    (
        "lr list length",
        lambda: mb.optim.Adam(mb.ModelBatch([MLP(), MLP()]), lr=[1e-3]),
        ValueError,
        "lr has 1 values",
    ),
    (
        "negative lr",
        lambda: mb.optim.SGD(mb.ModelBatch([MLP(), MLP()]), lr=[0.1, -0.1]),
        ValueError,
        "lr of member 1",
    ),
    (
        "nan wd",
        lambda: mb.optim.AdamW(mb.ModelBatch([MLP()]), weight_decay=float("nan")),
        ValueError,
        "must be finite",
    ),
    (
        "beta 1",
        lambda: mb.optim.Adam(mb.ModelBatch([MLP()]), betas=(1.0, 0.9)),
        ValueError,
        "beta1 of member 0",
    ),
    ("not a pack", lambda: mb.optim.Adam([MLP()]), TypeError, "expected a ModelBatch"),
    ("nesterov", lambda: mb.optim.SGD(mb.ModelBatch([MLP()]), nesterov=True), ValueError, "nesterov"),
    (
        "input N",
        lambda: mb.ModelBatch([MLP(), MLP()])(torch.randn(3, 4, 8), in_dims=0),
        ValueError,
        "must have the pack size N=2",
    ),
    ("member index", lambda: mb.ModelBatch([MLP()]).member(3), IndexError, "member 3 is out of range"),
]


@pytest.mark.parametrize(("case", "call", "exc", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_clear_error(case, call, exc, message) -> None:
    with pytest.raises(exc, match=message):
        call()


def test_backward_on_unsummed_losses_fails_loudly() -> None:
    batch = mb.ModelBatch([MLP(), MLP()])
    losses = batch.compute_loss(batch(torch.randn(4, 8)), torch.randint(0, 3, (4,)), F.cross_entropy)
    with pytest.raises(RuntimeError, match=r"losses.sum\(\).backward\(\)"):
        losses.backward()
    assert all(p.grad is None for p in batch.parameters())


def test_loss_must_be_one_scalar_per_member() -> None:
    batch = mb.ModelBatch([MLP(), MLP()])
    with pytest.raises(ValueError, match="one scalar per member"):
        batch.compute_loss(
            batch(torch.randn(4, 8)), torch.randint(0, 3, (4,)), nn.CrossEntropyLoss(reduction="none")
        )


def test_load_member_with_missing_keys_names_them() -> None:
    batch = mb.ModelBatch([MLP(), MLP()])
    state = MLP().state_dict()
    del state["fc2.bias"]
    with pytest.raises(KeyError, match=r"missing keys \['fc2.bias'\]"):
        batch.load_member(0, state)
    with pytest.raises(TypeError, match="expected a MLP"):
        batch.load_member(0, Other())


def test_checkpoint_of_another_architecture_is_refused(tmp_path) -> None:
    mb.save(tmp_path / "mlp.pt", mb.ModelBatch([MLP(hidden=16), MLP(hidden=16)]))
    with pytest.raises(RuntimeError, match=r"ModelBatch\.load_state_dict: the checkpoint does not fit"):
        mb.load(tmp_path / "mlp.pt", mb.ModelBatch([MLP(hidden=32), MLP(hidden=32)]))
    with pytest.raises(ValueError, match="checkpoint has 2 members but this pack has 3"):
        mb.load(tmp_path / "mlp.pt", mb.ModelBatch([MLP(), MLP(), MLP()]))
    with pytest.raises(ValueError, match="holds MLP models but the batch holds CNN"):
        mb.load(tmp_path / "mlp.pt", mb.ModelBatch([CNN(), CNN()]))
    (tmp_path / "junk.pt").write_bytes(b"")
    torch.save({"x": 1}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a ModelBatch checkpoint"):
        mb.load(tmp_path / "junk.pt")


def test_masked_loss_equals_each_member_on_its_real_samples() -> None:
    models = [seeded(MLP, i).double() for i in range(3)]
    alone = copy.deepcopy(models)
    batch = mb.ModelBatch(models)
    xs = torch.randn(3, 6, 8, dtype=torch.float64)
    ys = torch.randint(0, 3, (3, 6))
    counts = [6, 4, 0]
    mask = torch.arange(6).expand(3, 6) < torch.tensor(counts).unsqueeze(1)
    losses = batch.compute_loss(batch(xs, in_dims=0), ys, F.cross_entropy, mask=mask)
    losses.sum().backward()
    assert float(losses[2].detach()) == 0.0
    for i, (m, c) in enumerate(zip(alone, counts)):
        if c == 0:
            assert float(batch.stack.fc1.weight.grad[i].abs().max()) == 0.0
            continue
        loss = F.cross_entropy(m(xs[i, :c]), ys[i, :c])
        torch.testing.assert_close(losses[i], loss, rtol=1e-14, atol=0)
        loss.backward()
        for name, p in batch.stacked_parameters().items():
            ref = m.get_parameter(name).grad
            torch.testing.assert_close(p.grad[i], ref, rtol=0, atol=1e-13 * float(ref.abs().max()))


def test_members_not_participating_keep_their_buffers() -> None:
    batch = mb.ModelBatch([nn.BatchNorm1d(3) for _ in range(3)])
    before = batch.stack.running_mean.clone()
    batch(torch.randn(3, 10, 3), in_dims=0, participating=torch.tensor([True, False, True]))
    assert torch.equal(batch.stack.running_mean[1], before[1])
    assert not torch.equal(batch.stack.running_mean[0], before[0])
