"""Dropout in a pack: each member draws from its own stream, at its own rate.

References: plain torch (the same module after ``torch.manual_seed(seed)``, on the CPU) for the
masks, a member trained alone (``mb.fit(recipe, [config])``, float64) for training, and a rerun
for reproducibility.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from recipes import small_recipe
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

import modelbatch as mb

BACKENDS = [("vmap", None), ("chunked", 2), ("loop", None)]
RATES = [0.2, 0.5, 0.0]

# layer, input shape: one of each dropout kind torch has (feature dropout zeroes whole channels)
LAYERS = [
    (nn.Dropout, (6, 40)),
    (nn.Dropout1d, (6, 4, 10)),
    (nn.Dropout2d, (6, 4, 3, 3)),
    (nn.Dropout3d, (4, 3, 2, 2)),  # unbatched: F.dropout3d adds a batch dim
    (nn.AlphaDropout, (6, 40)),
    (nn.FeatureAlphaDropout, (6, 4, 10)),
]


def _pack(models: list[nn.Module], backend: tuple[str, int | None], seeds: list[int]) -> mb.ModelBatch:
    batch = mb.ModelBatch([copy.deepcopy(m) for m in models], backend=backend[0], chunk_size=backend[1])
    batch.manual_seed(seeds)
    return batch


def _plain(model: nn.Module, seed: int, *inputs: torch.Tensor, calls: int = 2) -> list[torch.Tensor]:
    """What the model alone computes in ``calls`` calls after ``torch.manual_seed(seed)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [model(*inputs) for _ in range(calls)]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b[0])
@pytest.mark.parametrize(("layer", "shape"), LAYERS, ids=lambda v: getattr(v, "__name__", ""))
def test_each_member_draws_the_masks_plain_torch_draws_at_its_own_rate(layer, shape, backend) -> None:
    models = [layer(p) for p in RATES]
    batch = _pack(models, backend, seeds=[10, 11, 12])
    x = torch.randn(shape, dtype=torch.float64)
    packed = [batch(x) for _ in range(2)]  # the streams go on between calls
    for i, model in enumerate(models):
        for got, expected in zip(packed, _plain(model, 10 + i, x)):
            assert torch.equal(got[i], expected), (i, layer.__name__)
    assert batch.dropout_rates == {"": RATES}
    assert not torch.equal(packed[0][0], packed[1][0])


class UserForward(nn.Module):
    """Dropout a user's forward applies itself: F.dropout, torch.dropout and attention dropout."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, self.p, self.training)
        h = torch.dropout(h, 0.1, self.training)
        q, k, v = (lin(h).unflatten(-1, (2, 4)).transpose(-3, -2) for lin in (self.q, self.k, self.v))
        drop = self.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b[0])
def test_functional_dropout_and_attention_dropout_in_a_forward_follow_the_member(backend) -> None:
    torch.manual_seed(0)
    models = [UserForward().double() for _ in range(3)]
    x = torch.randn(5, 6, 8, dtype=torch.float64)
    batch = _pack(models, backend, seeds=[3, 4, 5])
    packed = [batch(x) for _ in range(2)]
    for i, model in enumerate(models):
        for got, expected in zip(packed, _plain(model, 3 + i, x)):
            # the masks are plain torch's (a mask difference is O(1)); SDPA's arithmetic to round-off
            torch.testing.assert_close(got[i], expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b[0])
def test_a_members_masks_depend_neither_on_its_pack_mates_nor_on_its_slot(backend) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.5), nn.Linear(32, 2)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    first = _pack([net] * 3, backend, seeds=[5, 6, 7])(x)[0]
    last = _pack([net] * 3, backend, seeds=[8, 9, 5])(x)[2]
    alone = _pack([net], backend, seeds=[5])(x)[0]
    torch.testing.assert_close(first, last, rtol=1e-14, atol=0)
    torch.testing.assert_close(first, alone, rtol=1e-14, atol=0)
    # a step in which only some members participate computes those members alone
    batch = _pack([net] * 3, backend, seeds=[8, 9, 5])
    some = batch(x, participating=torch.tensor([False, True, True]))
    torch.testing.assert_close(some[2], first, rtol=1e-14, atol=0)


class Checkpointed(nn.Module):
    def __init__(self, checkpointing: bool, p: float) -> None:
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(4, 16), nn.Dropout(p), nn.Linear(16, 3)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def region(h: torch.Tensor) -> torch.Tensor:
            return F.dropout(torch.tanh(self.drop(self.a(h))), 0.2)

        return self.b(checkpoint(region, x, use_reentrant=False) if self.checkpointing else region(x))


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_a_checkpointed_region_is_recomputed_with_the_masks_of_its_forward(backend: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64)
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        models = [Checkpointed(checkpointing, p).double() for p in (0.2, 0.5)]
        batch = _pack(models, (backend, None), seeds=[1, 2])
        batch(x).pow(2).sum().backward()
        grads[checkpointing] = batch.stack.a.weight.grad
    assert torch.equal(grads[True], grads[False])
    for i, model in enumerate(models):
        _plain(model, 1 + i, x, calls=1)[0].pow(2).sum().backward()
        torch.testing.assert_close(grads[True][i], model.a.weight.grad, rtol=1e-13, atol=0)


def test_save_and_load_keep_each_members_rates_and_stream(tmp_path) -> None:
    batch = _pack([nn.Dropout(p) for p in RATES], ("vmap", None), seeds=[1, 2, 3])
    x = torch.randn(50)
    batch(x)
    mb.save(tmp_path / "pack.pt", batch)
    loaded, _, _ = mb.load(tmp_path / "pack.pt")
    into = mb.ModelBatch([nn.Dropout(0.9) for _ in range(3)])
    mb.load(tmp_path / "pack.pt", batch=into)
    expected = batch(x)
    for other in (loaded, into):
        assert other.dropout_rates == batch.dropout_rates
        assert torch.equal(other(x), expected)


def test_member_and_load_member_carry_the_rate() -> None:
    batch = mb.ModelBatch([nn.Sequential(nn.Linear(2, 2), nn.Dropout(p)) for p in (0.1, 0.4)])
    assert batch.member(1)[1].p == 0.4 and type(batch.member(1)[1].p) is float
    batch.load_member(0, nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.7)))
    assert batch.dropout_rates == {"1": [0.7, 0.4]}


def test_manual_seed_refuses_a_wrong_number_of_seeds() -> None:
    batch = mb.ModelBatch([nn.Dropout(0.5) for _ in range(3)])
    with pytest.raises(TypeError, match=r"ModelBatch.manual_seed: pass one seed per member \(a list of 3"):
        batch.manual_seed([1, 2])
    with pytest.raises(TypeError, match=r"ModelBatch.manual_seed: with member=, seed must be one int"):
        batch.manual_seed([1], member=0)


# ---------------------------------------------------------------------------- mb.fit
N_SAMPLES, FEATURES, CLASSES = 64, 5, 3
X = torch.randn(N_SAMPLES, FEATURES, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.randint(0, CLASSES, (N_SAMPLES,), generator=torch.Generator().manual_seed(1))


def _net(cfg) -> nn.Module:
    return nn.Sequential(
        nn.Linear(FEATURES, 32), nn.ReLU(), nn.Dropout(cfg["dropout"]), nn.Linear(32, CLASSES)
    )


def _recipe(backend: str = "vmap") -> mb.Recipe:
    return small_recipe(_net, (X, Y), val_data=(X, Y), backend=backend)


CONFIGS = [{"dropout": p, "lr": 1e-2, "seed": s} for s, p in enumerate([0.1, 0.5, 0.3, 0.0])]


def test_configs_differing_only_in_dropout_share_one_pack_and_equal_their_runs_alone() -> None:
    together = mb.fit(_recipe(), CONFIGS, reports=3, progress=False)
    assert together["pack"].nunique() == 1 and together["pack"].iloc[0].startswith("Sequential 32-3 #")
    assert_each_as_alone(_recipe(), CONFIGS, together, reports=3)


def assert_each_as_alone(recipe: mb.Recipe, configs: list[dict], together, reports: int) -> None:
    """Each member's history in ``together`` (one mb.fit of all configs) equals its config fitted alone."""
    for member, config in enumerate(configs):
        alone = mb.fit(recipe, [config], reports=reports, progress=False)
        got = together[together["member"] == member]
        for column in ("loss", "val_loss"):
            torch.testing.assert_close(
                torch.tensor(got[column].to_numpy()),
                torch.tensor(alone[column].to_numpy()),
                rtol=1e-9,
                atol=0,
            )


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_fit_reruns_bitwise_identically(backend: str) -> None:
    first = mb.fit(_recipe(backend), CONFIGS[:3], reports=2, progress=False)
    torch.manual_seed(123)  # the global generator plays no part
    second = mb.fit(_recipe(backend), CONFIGS[:3], reports=2, progress=False)
    pd.testing.assert_frame_equal(first, second, check_exact=True)


def test_fit_alone_equals_plain_torch_training_with_its_seed() -> None:
    """The plain script: seed, build, train on DataLoader(shuffle, generator seeded alike)."""
    config, reports, steps = CONFIGS[1], 3, 4
    history = mb.fit(_recipe(), [config], reports=reports, progress=False)
    torch.manual_seed(config["seed"])
    model = _net(config).double()
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    loader = DataLoader(
        TensorDataset(X, Y), batch_size=16, shuffle=True,
        generator=torch.Generator().manual_seed(config["seed"]),
    )  # fmt: skip
    losses, val_losses = [], []
    batches = (b for _ in range(reports) for b in loader)
    for _ in range(reports):
        total = 0.0
        for _ in range(steps):
            xb, yb = next(batches)
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        losses.append(total / steps)
        with torch.no_grad():
            val_losses.append(float(F.cross_entropy(model.eval()(X), Y)))
        model.train()
    torch.testing.assert_close(
        torch.tensor(history["loss"].tolist()), torch.tensor(losses), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        torch.tensor(history["val_loss"].tolist()), torch.tensor(val_losses), rtol=1e-12, atol=0
    )


COMPILED = """
import sys, torch, modelbatch as mb
from torch import nn
backend = sys.argv[1]
models = [nn.Sequential(nn.Linear(4, 8), nn.Dropout(p)) for p in (0.2, 0.5)]
x = torch.randn(3, 4)
compiled = mb.ModelBatch(models, backend=backend, compile=True)
compiled.manual_seed([1, 2])
eager = mb.ModelBatch(models, backend=backend)
eager.manual_seed([1, 2])
for _ in range(2):
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-6, atol=1e-6)
"""


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_compiled_pack_draws_the_same_masks(backend: str) -> None:
    """In a fresh interpreter, so that the result does not depend on what ran before in the worker."""
    done = subprocess.run([sys.executable, "-c", COMPILED, backend], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


# ---------------------------------------------------------------------------- float rates
FLOAT_RATES = [0.0, 0.1, 0.3]


class FloatRate(nn.Module):
    """A rate kept as a plain float, as Hugging Face's attention keeps ``attention_dropout``."""

    def __init__(self, attention_dropout: float = 0.1, sdpa: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, CLASSES)
        self.attention_dropout, self.sdpa = attention_dropout, sdpa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, p=self.attention_dropout, training=self.training)  # x: [..., S, 8]
        q, k, v = (lin(h).unflatten(-1, (2, 4)).transpose(-3, -2) for lin in (self.q, self.k, self.v))
        if self.sdpa:
            drop = 0.0 if not self.training else self.attention_dropout
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:
            weights = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
            out = F.dropout(weights, p=self.attention_dropout, training=self.training) @ v
        return self.head(out.transpose(-3, -2).flatten(-2).mean(-2))


@pytest.mark.parametrize("sdpa", [False, True], ids=["eager", "sdpa"])
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b[0])
def test_float_rates_share_a_pack_and_each_member_draws_at_its_own_rate(backend, sdpa) -> None:
    torch.manual_seed(0)
    models = [FloatRate(p, sdpa).double() for p in FLOAT_RATES]
    batch = _pack(models, backend, seeds=[3, 4, 5])
    assert batch.dropout_rates == {"attention_dropout": FLOAT_RATES}
    x = torch.randn(5, 6, 8, dtype=torch.float64)
    packed = [batch(x) for _ in range(2)]
    for i, model in enumerate(models):
        for got, expected in zip(packed, _plain(model, 3 + i, x)):
            torch.testing.assert_close(got[i], expected, rtol=1e-13, atol=1e-13)


def _float_rate_net(cfg) -> nn.Module:
    attention = FloatRate(cfg["attention_dropout"], cfg["sdpa"])
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Unflatten(-1, (2, 8)), attention)


FLOAT_CONFIGS = [{"attention_dropout": p, "lr": 1e-2, "seed": s} for s, p in enumerate(FLOAT_RATES)]


@pytest.mark.parametrize("sdpa", [False, True], ids=["eager", "sdpa"])
def test_fit_packs_configs_differing_only_in_a_float_rate_together_each_as_alone(sdpa: bool) -> None:
    recipe = small_recipe(_float_rate_net, (X, Y), val_data=(X, Y), backend="vmap")
    configs = [{**c, "sdpa": sdpa} for c in FLOAT_CONFIGS]
    together = mb.fit(recipe, configs, reports=2, progress=False)
    assert together["pack"].nunique() == 1
    assert_each_as_alone(recipe, configs, together, reports=2)


def test_member_save_and_load_keep_each_members_float_rate(tmp_path) -> None:
    torch.manual_seed(0)
    models = [FloatRate(p).double() for p in FLOAT_RATES]
    batch = _pack(models, ("vmap", None), seeds=[1, 2, 3])
    batch.load_member(0, FloatRate(0.2).double())
    batch.load_member_rates(1, FloatRate(0.4).double())
    batch.load_member(2, FloatRate(0.8).double().state_dict())  # a state: weights alone
    assert batch.dropout_rates == {"attention_dropout": [0.2, 0.4, 0.3]}
    for i, rate in enumerate([0.2, 0.4, 0.3]):
        member = batch.member(i)
        assert member.attention_dropout == rate and type(member.attention_dropout) is float
    x = torch.randn(5, 6, 8, dtype=torch.float64)
    batch(x)
    mb.save(tmp_path / "pack.pt", batch)
    loaded, _, _ = mb.load(tmp_path / "pack.pt")
    into = _pack([FloatRate(0.9).double() for _ in range(3)], ("vmap", None), seeds=[7, 8, 9])
    mb.load(tmp_path / "pack.pt", batch=into)
    expected = batch(x)
    for other in (loaded, into):
        assert other.dropout_rates == batch.dropout_rates
        assert torch.equal(other(x), expected)


def test_a_version_3_checkpoint_still_loads(tmp_path) -> None:
    """Version 3 saved the dropout modules' rates alone; its float rates were equal, in the template."""
    batch = _pack([nn.Sequential(FloatRate(0.3), nn.Dropout(p)) for p in (0.1, 0.5)], ("vmap", None), [1, 2])
    mb.save(tmp_path / "pack.pt", batch)
    payload = torch.load(tmp_path / "pack.pt", weights_only=False)
    payload["version"], payload["dropout"]["rates"] = 3, {"1": [0.1, 0.5]}
    torch.save(payload, tmp_path / "v3.pt")
    loaded, _, _ = mb.load(tmp_path / "v3.pt")
    into = _pack([nn.Sequential(FloatRate(0.9), nn.Dropout(0.9)) for _ in range(2)], ("vmap", None), [5, 6])
    mb.load(tmp_path / "v3.pt", batch=into)
    x = torch.randn(5, 6, 8)
    expected = batch(x)
    for other in (loaded, into):
        assert other.dropout_rates == {"0.attention_dropout": [0.3, 0.3], "1": [0.1, 0.5]}
        assert torch.equal(other(x), expected)


class ComputesWithItsRate(nn.Module):
    """A forward that does arithmetic / comparisons with its float rate: one value for the pack."""

    def __init__(self, dropout: float, use: str) -> None:
        super().__init__()
        self.lin, self.dropout, self.use = nn.Linear(4, 4), dropout, use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use == "arithmetic":
            return self.lin(x) * (1 - self.dropout)
        if self.use == "comparison":
            return F.dropout(self.lin(x), self.dropout) if self.dropout > 0 else self.lin(x)
        return self.lin(x) if not self.dropout else F.dropout(self.lin(x), self.dropout)  # bool


@pytest.mark.parametrize("use", ["arithmetic", "comparison", "bool"])
@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_computing_with_a_rate_that_differs_between_members_raises(use: str, backend: str) -> None:
    x = torch.randn(3, 4)
    batch = mb.ModelBatch([ComputesWithItsRate(p, use) for p in (0.1, 0.3)], backend=backend)
    with pytest.raises(
        RuntimeError,
        match=r"ModelBatch: the dropout rate dropout differs between members \(\[0\.1, 0\.3\]\), and the mod",
    ):
        batch(x)
    torch.manual_seed(0)
    models = [ComputesWithItsRate(0.2, use) for _ in range(2)]
    equal = _pack(models, (backend, None), seeds=[1, 2])
    out = equal(x)  # equal rates: the ordinary float
    for i, model in enumerate(models):
        torch.testing.assert_close(out[i], _plain(model, 1 + i, x, calls=1)[0], rtol=1e-6, atol=1e-6)


def test_member_rate_is_the_plain_float_only_when_the_rates_agree() -> None:
    from modelbatch._dropout import MemberRate

    same = MemberRate([0.25, 0.25], "drop")
    assert (1 - same, same * 2, same > 0.2, bool(same), float(same)) == (0.75, 0.5, True, True, 0.25)
    differ = MemberRate([0.25, 0.5], "drop")
    for compute in (lambda r: r + 1, lambda r: r < 1, lambda r: r == 0.25, bool, float, round):
        with pytest.raises(RuntimeError, match="ModelBatch: the dropout rate drop differs"):
            compute(differ)
    assert math.isnan(torch.tensor(1.0).mul(differ).item())  # a torch op reads NaN, never member 0's
    assert copy.deepcopy(differ).rates == [0.25, 0.5] and repr(differ) == "MemberRate([0.25, 0.5])"


def test_rnn_and_multihead_attention_rates_stay_module_settings() -> None:
    """torch's kernels compute with these rates (not through F.dropout): equal in a pack."""
    with pytest.raises(ValueError, match=r"ModelBatch: model 1 has dropout = 0\.3"):
        mb.ModelBatch([nn.GRU(4, 4, num_layers=2, dropout=p) for p in (0.1, 0.3)])
    with pytest.raises(ValueError, match=r"ModelBatch: model 1 has dropout = 0\.3"):
        mb.ModelBatch([nn.MultiheadAttention(4, 2, dropout=p) for p in (0.1, 0.3)])


@pytest.mark.parametrize("sdpa", [False, True], ids=["eager", "sdpa"])
def test_compiled_pack_applies_float_rates_per_member(sdpa: bool) -> None:
    torch.manual_seed(0)
    models = [FloatRate(p, sdpa) for p in FLOAT_RATES]
    x = torch.randn(5, 6, 8)
    compiled = mb.ModelBatch(models, backend="vmap", compile=True)
    compiled.manual_seed([1, 2, 3])
    eager = _pack(models, ("vmap", None), seeds=[1, 2, 3])
    for _ in range(2):
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-6, atol=1e-6)
