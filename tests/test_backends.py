"""Backends: vmap, chunked, loop and auto run the same pack to the same results (float64); auto's
choice follows its documented rule and never depends on timing."""

from __future__ import annotations

import copy
import itertools
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import CNN, MLP, seeded
from torch import nn

import modelbatch as mb
from modelbatch._backends import (
    CPU_DENSE_MAX_PARAMS,
    CPU_OTHER_MAX_PARAMS,
    Profile,
    architecture_kind,
    auto_choice,
)

N = 5  # not divisible by the chunk sizes below
BACKENDS = [("chunked", 2), ("chunked", 3), ("chunked", 9), ("loop", None), ("auto", None)]
MODELS = {"mlp": (MLP, (8,)), "cnn": (CNN, (1, 8, 8))}


def _pack(model: str, backend: str, chunk_size: int | None = None, n: int = N, **kw) -> mb.ModelBatch:
    cls, _ = MODELS[model]
    models = [seeded(cls, i).double() for i in range(n)]
    return mb.ModelBatch(models, backend=backend, chunk_size=chunk_size, **kw)


def _batches(model: str, steps: int, n: int = N, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shape = MODELS[model][1]
    return [
        (
            torch.randn(n, 6, *shape, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n, 6), generator=gen),
        )
        for _ in range(steps)
    ]


def _assert_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    scale = ref.detach().abs().max().clamp_min(1e-300)
    err = float((got.detach() - ref.detach()).abs().max() / scale)
    assert err <= 1e-12, f"{what}: relative error {err:.2e}"


def _state(batch: mb.ModelBatch) -> dict[str, torch.Tensor]:
    return {**batch.stacked_parameters(), **batch.stacked_buffers()}


def _assert_same_step(
    batch: mb.ModelBatch, ref: mb.ModelBatch, out: torch.Tensor, ref_out: torch.Tensor
) -> None:
    _assert_close(out, ref_out, "output")
    for name, p in ref.stacked_parameters().items():
        _assert_close(batch.stacked_parameters()[name].grad, p.grad, f"grad of {name}")
    for name, b in ref.stacked_buffers().items():
        _assert_close(batch.stacked_buffers()[name].double(), b.double(), f"buffer {name}")


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize(("backend", "chunk_size"), BACKENDS)
def test_backend_with_a_frozen_member_matches_vmap(model: str, backend: str, chunk_size: int | None) -> None:
    """With member 1 frozen, outputs, gradients and BatchNorm statistics after every step equal those
    of vmap, and member 1 stays as it was. (Packs without a frozen member, layer by layer under each
    backend and both input layouts: tests/test_layers.py's conformance matrix.)"""
    frozen = 1
    batch, ref = _pack(model, backend, chunk_size), _pack(model, "vmap")
    opts = [mb.optim.Adam(b, lr=[1e-2 * (i + 1) for i in range(N)]) for b in (batch, ref)]
    batch.freeze(frozen)
    ref.freeze(frozen)
    frozen_before = {k: t[frozen].clone() for k, t in _state(ref).items()}
    for x, y in _batches(model, steps=3):
        outs = []
        for b, opt in zip((batch, ref), opts):
            opt.zero_grad()
            out = b(x, in_dims=0)
            b.compute_loss(out, y, F.cross_entropy).sum().backward()
            outs.append(out)
        _assert_same_step(batch, ref, *outs)
        for opt in opts:
            opt.step()
    for name, value in frozen_before.items():
        assert torch.equal(_state(batch)[name][frozen], value), f"frozen member changed {name}"


@pytest.mark.parametrize(("backend", "chunk_size"), [("vmap", None), *BACKENDS])
def test_non_participating_members_keep_their_buffers(backend: str, chunk_size: int | None) -> None:
    batch = _pack("cnn", backend, chunk_size)
    before = {k: v.clone() for k, v in batch.stacked_buffers().items()}
    participating = torch.tensor([True, False, True, True, False])
    x, _ = _batches("cnn", 1)[0]
    batch(x, in_dims=0, participating=participating)
    for name, buf in batch.stacked_buffers().items():
        assert torch.equal(buf[~participating], before[name][~participating]), name
        if name.endswith("running_mean"):
            assert not torch.equal(buf[participating], before[name][participating]), name


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("computed", [[0], [1, 3], [0, 2, 3, 4]])
@pytest.mark.parametrize(("backend", "chunk_size"), [("vmap", None), *BACKENDS])
def test_only_participating_members_are_computed_and_they_match_the_full_pack(
    model: str, computed: list[int], backend: str, chunk_size: int | None
) -> None:
    """With ``participating`` the others are skipped (zero outputs, no gradient); the rest is unchanged."""
    batch, ref = _pack(model, backend, chunk_size), _pack(model, "vmap")
    participating = torch.zeros(N, dtype=torch.bool)
    participating[computed] = True
    frozen = computed[-1] if len(computed) > 1 else N - 1  # frozen and participating: skipped as well
    batch.freeze(frozen)
    ref.freeze(frozen)
    opts = [mb.optim.Adam(b, lr=[1e-2 * (i + 1) for i in range(N)]) for b in (batch, ref)]
    updating = participating.clone()
    updating[frozen] = False
    before = {k: t.clone() for k, t in _state(batch).items()}
    for x, y in _batches(model, steps=3):
        outs = []
        for b, opt, part in zip((batch, ref), opts, (participating, None)):
            opt.zero_grad()
            out = b(x, in_dims=0, participating=part)
            b.compute_loss(out, y, F.cross_entropy).sum().backward()
            outs.append(out)
        out, ref_out = outs
        assert torch.equal(out[~updating], torch.zeros_like(out[~updating]))
        _assert_close(out[updating], ref_out[updating], "output")
        for name, p in ref.stacked_parameters().items():
            grad = batch.stacked_parameters()[name].grad
            assert torch.equal(grad[~updating], torch.zeros_like(grad[~updating])), name
            _assert_close(grad[updating], p.grad[updating], f"grad of {name}")
        for name, buf in ref.stacked_buffers().items():
            _assert_close(batch.stacked_buffers()[name][updating].double(), buf[updating].double(), name)
        for opt in opts:
            opt.step(mask=updating)
    for name, value in _state(batch).items():
        assert torch.equal(value[~updating], before[name][~updating]), f"a skipped member changed {name}"


@pytest.mark.parametrize(("backend", "chunk_size"), [("vmap", None), *BACKENDS])
def test_dropout_masks_are_independent_per_member(backend: str, chunk_size: int | None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 256), nn.Dropout(0.5))
    batch = mb.ModelBatch([copy.deepcopy(model) for _ in range(N)], backend=backend, chunk_size=chunk_size)
    out = batch(torch.ones(8, 4))  # identical members and inputs: only the masks differ
    dropped = out == 0
    assert 0.4 < float(dropped.float().mean()) < 0.6
    for i in range(1, N):
        assert not torch.equal(dropped[0], dropped[i]), f"member {i} shares member 0's mask"


class _TwoInputs(nn.Module):
    """Two positional inputs, a keyword argument and a tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

    def forward(
        self, x: torch.Tensor, z: torch.Tensor, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x) + self.b(z)
        return h * scale, h.sum()


@pytest.mark.parametrize(("backend", "chunk_size"), BACKENDS)
def test_mixed_inputs_kwargs_and_tuple_outputs(backend: str, chunk_size: int | None) -> None:
    models = [seeded(_TwoInputs, i).double() for i in range(N)]
    batch, ref = (
        mb.ModelBatch(models, backend=b, chunk_size=c) for b, c in ((backend, chunk_size), ("vmap", None))
    )
    x = torch.randn(N, 7, 3, dtype=torch.float64, requires_grad=True)  # per member
    z = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)  # shared
    results = []
    for b in (batch, ref):
        out, total = b(x, z, in_dims=(0, None), scale=2.0)
        assert out.shape == (N, 7, 4) and total.shape == (N,)
        grads = torch.autograd.grad((out.sum() + total.sum()), [x, z, *b.parameters()])
        results.append((out, total, *grads))
    for got, ref_value in zip(*results):
        _assert_close(got, ref_value, "output or gradient")


def test_chunk_size_edge_cases_and_errors() -> None:
    assert _pack("mlp", "chunked", 9).chunk_size == N  # larger than the pack: one chunk
    assert _pack("mlp", "chunked").chunk_size == N  # default 16, capped at N
    with pytest.raises(
        ValueError, match=r"^mb\.ModelBatch: unknown backend 'jit'; valid options are 'auto', 'vmap'"
    ):
        _pack("mlp", "jit")
    batch = _pack("mlp", "vmap")
    with pytest.raises(
        ValueError, match=r"^mb\.ModelBatch.set_backend: unknown backend 'Loop'.*'chunked', 'loop'"
    ):
        batch.set_backend("Loop")
    with pytest.raises(
        ValueError, match=r"^mb\.ModelBatch.set_backend: chunk_size applies only to backend='chunked'"
    ):
        batch.set_backend("loop", chunk_size=4)
    with pytest.raises(ValueError, match=r"^mb\.ModelBatch: chunk_size must be a positive int, got 0"):
        _pack("mlp", "chunked", 0)


def test_packs_with_backends_deepcopy() -> None:
    batch = _pack("mlp", "auto")
    x, y = _batches("mlp", 1)[0]
    batch.compute_loss(batch(x, in_dims=0), y, F.cross_entropy).sum().backward()
    clone = copy.deepcopy(batch)
    _assert_close(clone(x, in_dims=0), batch(x, in_dims=0), "output of the copy")


@pytest.mark.parametrize(
    ("backend", "compiled"), [("vmap", True), ("loop", True), ("vmap", "reduce-overhead")]
)
def test_compile_matches_eager(backend: str, compiled: bool | str) -> None:
    """compile=True or a torch.compile mode (dynamic=False) trains a tiny MLP to the same float64 weights as
    eager ("reduce-overhead" puts the compiled step in CUDA graphs on a GPU; on CPU the same kernels)."""
    results = []
    for compile_ in (False, compiled):
        batch = _pack("mlp", backend, compile=compile_, n=3)
        opt = mb.optim.Adam(batch, lr=1e-2)
        for x, y in _batches("mlp", 3, n=3):
            opt.zero_grad()
            batch.compute_loss(batch(x, in_dims=0), y, F.cross_entropy).sum().backward()
            opt.step()
        results.append(batch.stacked_parameters())
    for name, p in results[0].items():
        _assert_close(results[1][name], p, name)


def test_an_unknown_compile_mode_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"mb\.ModelBatch: compile must be True, False or a torch\.compile mode"
    ):
        mb.ModelBatch([nn.Linear(2, 2) for _ in range(2)], compile="fast")


class _Recurrent(nn.Module):
    """Layers the preparation pass replaces for vmap: the loop runs them as their own class."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4, padding_idx=0)
        self.lstm = nn.LSTM(4, 5, num_layers=2, batch_first=True)
        self.bn = nn.BatchNorm1d(5, momentum=None)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(self.bn(out[:, -1]))


@pytest.mark.parametrize(("backend", "chunk_size"), BACKENDS)
def test_prepared_layers_match_vmap(backend: str, chunk_size: int | None) -> None:
    models = [seeded(_Recurrent, i).double() for i in range(N)]
    batch, ref = (
        mb.ModelBatch(copy.deepcopy(models), backend=b, chunk_size=c)
        for b, c in ((backend, chunk_size), ("vmap", None))
    )
    prepared = {name: type(m) for name, m in batch.stack.named_modules()}
    tokens = torch.randint(0, 10, (N, 6, 7))
    tokens[:, :, 0] = 0  # padding
    results = []
    for b in (batch, ref):
        out = b(tokens, in_dims=0)
        results.append((out, *torch.autograd.grad(out.square().sum(), list(b.parameters()))))
    for got, want in zip(*results):
        _assert_close(got, want, "output or gradient")
    for name, buf in ref.stacked_buffers().items():
        _assert_close(batch.stacked_buffers()[name].double(), buf.double(), name)
    assert {name: type(m) for name, m in batch.stack.named_modules()} == prepared


class _LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize("n", [1, 3])
def test_loop_runs_stock_lstm_kernel_and_matches_sequential(n: int) -> None:
    """The loop backend runs nn.LSTM's own fused kernel (aten::lstm, not the plain-ops VmapLSTM
    that vmap needs) on each member's slice, and trains exactly like the models alone (float64)."""
    models = [seeded(_LSTMClassifier, i).double() for i in range(n)]
    alone = copy.deepcopy(models)
    batch = mb.ModelBatch(models, backend="loop")
    lrs = [1e-2 * (i + 1) for i in range(n)]
    opt = mb.optim.AdamW(batch, lr=lrs)
    torch_opts = [torch.optim.AdamW(m.parameters(), lr=lr) for m, lr in zip(alone, lrs)]
    gen = torch.Generator().manual_seed(0)
    for step in range(30):
        x = torch.randn(n, 5, 7, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (n, 5), generator=gen)
        opt.zero_grad()
        with torch.profiler.profile() as prof:
            out = batch(x, in_dims=0)
        if step == 0:
            ops = {e.key for e in prof.key_averages()}
            assert "aten::lstm" in ops, sorted(ops)
        batch.compute_loss(out, y, F.cross_entropy).sum().backward()
        opt.step()
        for m, o, xi, yi in zip(alone, torch_opts, x, y):
            o.zero_grad()
            F.cross_entropy(m(xi), yi).backward()
            o.step()
    assert type(batch.stack.lstm).__name__ == "VmapLSTM"  # the skeleton stays vmap-ready
    for i, m in enumerate(alone):
        for name, p in m.named_parameters():
            _assert_close(batch.stacked_parameters()[name][i], p, f"member {i} {name}")


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def _tutorial_mlp() -> nn.Module:
    """The model of PyTorch's "model ensembling" tutorial (the issue's slow inference case)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


class _OwnWeight(nn.Module):
    """A layer running code of its own on a parameter of its own: not known to be dense."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


# architecture, members, device type -> (training, inference) choice of "auto" (module docstring rules)
AUTO_RULES = [
    (MLP, 1, "cpu", ("loop", "loop")),
    (CNN, 1, "cpu", ("loop", "loop")),
    (MLP, 5, "cpu", ("vmap", "vmap")),
    (MLP, 64, "cpu", ("vmap", "vmap")),
    (_tutorial_mlp, 10, "cpu", ("vmap", "vmap")),
    (CNN, 5, "cpu", ("vmap", "loop")),
    (CNN, 64, "cpu", ("chunked:16", "loop")),
    (_Attention, 17, "cpu", ("chunked:16", "loop")),
    (_LSTMClassifier, 8, "cpu", ("loop", "loop")),
    (lambda: _Recurrent(), 8, "cpu", ("loop", "loop")),
    (MLP, 1, "cuda", ("loop", "loop")),
    (MLP, 64, "cuda", ("vmap", "vmap")),
    (CNN, 64, "cuda", ("vmap", "vmap")),
    (_LSTMClassifier, 8, "cuda", ("vmap", "vmap")),
]


@pytest.mark.parametrize(("make", "n", "device", "expected"), AUTO_RULES)
def test_auto_choice_follows_the_documented_rule(make, n: int, device: str, expected: tuple) -> None:
    got = tuple(auto_choice(Profile.of(make(), n), device, training).label for training in (True, False))
    assert got == expected
    if device == "cpu":
        batch = mb.ModelBatch([make() for _ in range(n)])
        assert batch.backend_choice == dict(zip(("training", "inference"), expected))
        assert (batch.backend, batch.chunk_size) == ("auto", None)


def test_auto_sizes_and_layer_kinds() -> None:
    with torch.device("meta"):
        wide = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10))
        convs = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3))
    assert Profile.of(wide, 16) == Profile(16, "dense", 1_011_010)
    assert Profile.of(convs, 32) == Profile(32, "other", 38_720)
    for profile in (Profile.of(wide, 16), Profile.of(convs, 32)):  # big members: the loop on CPU
        assert auto_choice(profile, "cpu", training=True).label == "loop"
        assert auto_choice(profile, "cuda", training=True).label == "vmap"
    limits = [("dense", CPU_DENSE_MAX_PARAMS, "vmap"), ("other", CPU_OTHER_MAX_PARAMS, "chunked:16")]
    for kind, limit, vectorized in limits:
        assert auto_choice(Profile(32, kind, limit), "cpu", training=True).label == vectorized
        assert auto_choice(Profile(32, kind, limit + 1), "cpu", training=True).label == "loop"
    assert (
        architecture_kind(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Dropout(), nn.LayerNorm(8))) == "dense"
    )
    assert architecture_kind(nn.Sequential(nn.Linear(8, 8), _OwnWeight())) == "other"
    assert architecture_kind(nn.Sequential(nn.Linear(8, 8), _ItemLayer())) == "other"  # a leaf of its own
    assert architecture_kind(nn.Sequential(nn.GRUCell(8, 8), nn.Conv1d(1, 1, 1))) == "recurrent"


@pytest.mark.parametrize(("model", "expected"), [("mlp", ("vmap", "vmap")), ("cnn", ("chunked:16", "loop"))])
def test_auto_ignores_the_clock_and_repeats_its_choice_and_results(
    model: str, expected: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clock returning garbage (a busy machine) changes neither auto's choice nor its numbers: a rerun
    is bitwise identical, and equal to the choices pinned by hand."""
    n = 20  # > 16: auto chunks the CNN for training

    def run(backends: tuple[str, str]) -> tuple[dict[str, str], list[torch.Tensor]]:
        (train_backend, train_chunk), (eval_backend, eval_chunk) = (
            (b.split(":")[0], int(b.split(":")[1]) if ":" in b else None) for b in backends
        )
        batch = _pack(model, train_backend, train_chunk, n=n)
        choice = batch.backend_choice
        opt = mb.optim.Adam(batch, lr=1e-2)
        for x, y in _batches(model, 3, n=n):
            opt.zero_grad()
            batch.compute_loss(batch(x, in_dims=0), y, F.cross_entropy).sum().backward()
            opt.step()
        if eval_backend != train_backend:
            batch.set_backend(eval_backend, eval_chunk)
        batch.eval()
        with torch.no_grad():
            out = batch(x, in_dims=0)
        return choice, [*_state(batch).values(), out]

    auto = ("auto", "auto")
    choice, normal = run(auto)
    assert choice == dict(zip(("training", "inference"), expected))
    garbage = itertools.cycle([3.0e6, 1.0, 7.5e3, 0.0, 42.0])
    for name in ("perf_counter", "monotonic", "process_time", "time"):
        monkeypatch.setattr(time, name, lambda: next(garbage))
    busy_choice, busy = run(auto)
    monkeypatch.undo()
    _, pinned = run(expected)
    assert busy_choice == choice
    for a, b, c in zip(normal, busy, pinned, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_auto_training_and_eval_calls_and_gradient_accumulation_match_vmap() -> None:
    """Eval calls (auto: the loop for a CNN) and two forwards per backward give vmap's results."""
    batch, ref = _pack("cnn", "auto"), _pack("cnn", "vmap")
    assert batch.backend_choice == {"training": "vmap", "inference": "loop"}
    data = _batches("cnn", 6)
    for k, (x, y) in enumerate(data):
        if k % 3 == 0:
            for b in (batch, ref):
                b.eval()
            with torch.no_grad():
                _assert_close(batch(x, in_dims=0), ref(x, in_dims=0), "eval output")
            assert batch._backends.last.label == "loop"
            for b in (batch, ref):
                b.train()
        outs = []
        for b in (batch, ref):
            for p in b.parameters():
                p.grad = None
            out = torch.cat([b(x[:, :3], in_dims=0), b(x[:, 3:], in_dims=0)], dim=1)  # two forwards
            b.compute_loss(out, y, F.cross_entropy).sum().backward()
            outs.append(out)
        assert batch._backends.last.label == "vmap"
        _assert_same_step(batch, ref, *outs)


class _ItemLayer(nn.Module):
    """Calls .item(), which vmap cannot batch: auto must fall back to the loop, and restore BN stats."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 + 0.0 * x.sum().item())


def test_auto_replaces_a_backend_that_fails_by_the_loop_and_restores_buffers() -> None:
    def make(i: int) -> nn.Module:
        torch.manual_seed(i)
        return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), _ItemLayer(), nn.Linear(6, 2)).double()

    batch = mb.ModelBatch([make(i) for i in range(N)])
    ref = mb.ModelBatch([make(i) for i in range(N)], backend="loop")
    assert batch.backend_choice == {"training": "vmap", "inference": "loop"}
    x = torch.randn(N, 8, 4, dtype=torch.float64)
    with pytest.warns(
        RuntimeWarning, match=r"^mb\.ModelBatch: backend 'vmap' failed on this model \(.*'loop'"
    ):
        out = batch(x, in_dims=0)
    _assert_close(out, ref(x, in_dims=0), "output")
    for name, buf in ref.stacked_buffers().items():
        assert torch.equal(batch.stacked_buffers()[name], buf), f"{name} updated more than once"
    assert batch.backend_choice == {"training": "loop", "inference": "loop"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second attempt, no second warning
        _assert_close(batch(x, in_dims=0), ref(x, in_dims=0), "second output")
