"""Every common layer in a pack: forward, backward, optimizer steps, exact against training alone.

One conformance test trains every layer x mode x backend (vmap, chunked, loop) x input layout
(per member ``[N, B, ...]``: ``mb.testing.assert_pack_matches_sequential``; shared ``[B, ...]``: the
same check here) packed and alone (float64, Adam, 20 steps, rtol 1e-10); known impossibilities and
engine bugs are strict xfails. Dropout is tested by its statistics, float32 by per-step gradients,
the pre-flight check by disabling a fix.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelbatch as mb
from modelbatch.layers import FIXES, PreflightError, UnsupportedLayerError, preflight_check

CLASSES = 3
SAMPLES = 64


# ---------------------------------------------------------------- small models around each layer
class Net(nn.Module):
    """``head(post(body(pre(x))))``: a layer wrapped so that its output feeds a linear classifier."""

    def __init__(self, body: nn.Module, features: int, pre=None, post=None) -> None:
        super().__init__()
        self.body, self.head = body, nn.Linear(features, CLASSES)
        self.pre, self.post = pre, post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x) if self.pre else x
        out = self.body(x)
        out = self.post(out) if self.post else out
        return self.head(out.flatten(1))


def first(out):
    return out[0] if isinstance(out, tuple) else out


def last_step(out):  # batch-first sequence output (or (output, hidden)) -> last time step
    return first(out)[:, -1]


def time_major(x):
    return x.transpose(0, 1)


def mean_tokens(out):
    return out.mean(1)


class RecurrentWithState(nn.Module):
    """nn.LSTM/GRU/RNN (sequence-first) started from a learned initial state computed from the input."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn, self.lstm = rnn, isinstance(rnn, nn.LSTM)
        layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
        self.shape = (layers, rnn.hidden_size)
        self.init = nn.Linear(rnn.input_size, layers * rnn.hidden_size * (2 if self.lstm else 1))
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = torch.tanh(self.init(x[:, 0])).reshape(x.shape[0], -1, *self.shape).permute(1, 2, 0, 3)
        hx = (state[0].contiguous(), state[1].contiguous()) if self.lstm else state[0].contiguous()
        out, _ = self.rnn(x.transpose(0, 1), hx)
        return self.head(out[-1])


class CellLoop(nn.Module):
    """An LSTMCell/GRUCell/RNNCell unrolled over the sequence by hand."""

    def __init__(self, cell: nn.RNNCellBase) -> None:
        super().__init__()
        self.cell, self.head = cell, nn.Linear(cell.hidden_size, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(first(state))


class SelfAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha, self.head = mha, nn.Linear(mha.embed_dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mha(x, x, x)[0].mean(1))


class Decoder(nn.Module):
    def __init__(self, layer: nn.TransformerDecoderLayer) -> None:
        super().__init__()
        self.layer, self.head = layer, nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x, x.flip(1)).mean(1))


class SDPA(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.qkv, self.heads, self.head = nn.Linear(dim, 3 * dim), heads, nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(out.transpose(1, 2).reshape(b, t, d).mean(1))


class PackedLSTM(nn.Module):
    """Packs its padded batch inside forward: a PackedSequence cannot be vmapped."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(4, 5, batch_first=True), nn.Linear(5, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = torch.full((x.shape[0],), x.shape[1])
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
        return self.head(self.lstm(packed)[1][0][-1])


class MyLSTM(nn.LSTM):
    """A user subclass: its own forward runs in a pack and reaches the fix through super()."""

    def forward(self, x, hx=None):
        out, hidden = super().forward(x, hx)
        return out * 2, hidden


# ---------------------------------------------------------------- data: one generator per input kind
def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def features(*shape: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    def make() -> tuple[torch.Tensor, torch.Tensor]:
        gen = _gen()
        return torch.randn(SAMPLES, *shape, generator=gen), torch.randint(
            0, CLASSES, (SAMPLES,), generator=gen
        )

    return make


def tokens(vocab: int = 10, length: int = 6, pad_fraction: float = 0.3):
    def make() -> tuple[torch.Tensor, torch.Tensor]:
        gen = _gen()
        x = torch.randint(1, vocab, (SAMPLES, length), generator=gen)
        x[torch.rand(SAMPLES, length, generator=gen) < pad_fraction] = 0  # padding token
        return x, torch.randint(0, CLASSES, (SAMPLES,), generator=gen)

    return make


SEQ = features(6, 4)  # [B, T=6, F=4]
TOKENS_8 = features(5, 8)  # [B, T=5, d=8] for attention
IMAGES = features(1, 6, 6)


def conv_bn(**bn_kwargs) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),  # no bias feeding BatchNorm: its true gradient is 0
        nn.BatchNorm2d(4, **bn_kwargs),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, CLASSES),
    )


def lstm_net() -> nn.Module:
    lstm = nn.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True)
    return Net(lstm, 10, post=last_step)


# name -> (builder, data, modes); "eval" where eval differs (running stats, attention fast path)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable, tuple[str, ...]]] = {
    "linear": (
        lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, CLASSES)),
        features(4),
        ("train",),
    ),
    "conv1d+maxpool1d": (
        lambda: Net(nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.MaxPool1d(2)), 12),
        features(2, 8),
        ("train",),
    ),
    "conv2d+avgpool2d": (
        lambda: Net(nn.Sequential(nn.Conv2d(1, 3, 3), nn.AvgPool2d(2)), 12),
        IMAGES,
        ("train",),
    ),
    "conv3d+maxpool3d": (
        lambda: Net(nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.Tanh(), nn.MaxPool3d(2)), 16),
        features(1, 4, 4, 4),
        ("train",),
    ),
    "convtranspose1d": (lambda: Net(nn.ConvTranspose1d(2, 3, 3, stride=2), 51), features(2, 8), ("train",)),
    "convtranspose2d": (
        lambda: Net(nn.ConvTranspose2d(1, 2, 3, stride=2), 98),
        features(1, 3, 3),
        ("train",),
    ),
    "pools2d": (
        lambda: Net(
            nn.Sequential(
                nn.Conv2d(1, 3, 3, padding=1),
                nn.MaxPool2d(2),
                nn.AvgPool2d(3, stride=1, padding=1),
                nn.LPPool2d(2, 2),
                nn.AdaptiveMaxPool2d(1),
            ),
            3,
        ),
        features(1, 8, 8),
        ("train",),
    ),
    "adaptiveavgpool1d": (
        lambda: Net(nn.Sequential(nn.Conv1d(2, 3, 3), nn.AdaptiveAvgPool1d(2)), 6),
        features(2, 8),
        ("train",),
    ),
    "layernorm": (
        lambda: Net(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh()), 8),
        features(4),
        ("train",),
    ),
    "groupnorm": (lambda: Net(nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4)), 64), IMAGES, ("train",)),
    "instancenorm2d": (
        lambda: Net(
            nn.Sequential(
                nn.Conv2d(1, 4, 3, bias=False), nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
            ),
            64,
        ),
        IMAGES,
        ("train", "eval"),
    ),
    "instancenorm1d": (
        lambda: Net(nn.Sequential(nn.Conv1d(2, 3, 3, bias=False), nn.InstanceNorm1d(3)), 18),
        features(2, 8),
        ("train",),
    ),
    "batchnorm1d": (
        lambda: Net(nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.Tanh()), 8),
        features(4),
        ("train", "eval"),
    ),
    "batchnorm1d-sequence": (
        lambda: Net(nn.Sequential(nn.Conv1d(2, 3, 3, bias=False), nn.BatchNorm1d(3)), 18),
        features(2, 8),
        ("train",),
    ),
    "batchnorm2d": (conv_bn, IMAGES, ("train", "eval")),
    "batchnorm2d-momentum-None": (lambda: conv_bn(momentum=None), IMAGES, ("train", "eval")),
    "batchnorm2d-no-running-stats": (lambda: conv_bn(track_running_stats=False), IMAGES, ("train", "eval")),
    "embedding": (lambda: Net(nn.Embedding(10, 4), 4, post=mean_tokens), tokens(), ("train",)),
    "embedding-padding_idx": (
        lambda: Net(nn.Embedding(10, 4, padding_idx=0), 4, post=mean_tokens),
        tokens(),
        ("train",),
    ),
    "embedding-padding_idx-max_norm-freq": (
        lambda: Net(
            nn.Embedding(10, 4, padding_idx=0, max_norm=1.0, scale_grad_by_freq=True), 4, post=mean_tokens
        ),
        tokens(),
        ("train",),
    ),
    "embeddingbag-padding_idx": (lambda: Net(nn.EmbeddingBag(10, 4, padding_idx=0), 4), tokens(), ("train",)),
    "lstm-2layer-bidirectional-batch_first": (lstm_net, SEQ, ("train",)),
    "lstm-h0c0-seq_first": (lambda: RecurrentWithState(nn.LSTM(4, 5, num_layers=2)), SEQ, ("train",)),
    "lstm-proj_size-no-bias": (
        lambda: Net(nn.LSTM(4, 5, proj_size=3, bias=False, batch_first=True), 3, post=last_step),
        SEQ,
        ("train",),
    ),
    "gru-2layer-bidirectional-batch_first": (
        lambda: Net(nn.GRU(4, 5, num_layers=2, bidirectional=True, batch_first=True), 10, post=last_step),
        SEQ,
        ("train",),
    ),
    "gru-h0-bidirectional": (lambda: RecurrentWithState(nn.GRU(4, 5, bidirectional=True)), SEQ, ("train",)),
    "rnn-tanh-2layer": (
        lambda: Net(nn.RNN(4, 5, num_layers=2), 5, pre=time_major, post=lambda o: o[0][-1]),
        SEQ,
        ("train",),
    ),
    "rnn-relu-h0": (lambda: RecurrentWithState(nn.RNN(4, 5, nonlinearity="relu")), SEQ, ("train",)),
    "lstmcell": (lambda: CellLoop(nn.LSTMCell(4, 5)), SEQ, ("train",)),
    "grucell": (lambda: CellLoop(nn.GRUCell(4, 5)), SEQ, ("train",)),
    "rnncell": (lambda: CellLoop(nn.RNNCell(4, 5)), SEQ, ("train",)),
    "multiheadattention": (
        lambda: SelfAttention(nn.MultiheadAttention(8, 2, batch_first=True)),
        TOKENS_8,
        ("train", "eval"),
    ),
    "multiheadattention-seq_first": (lambda: SelfAttention(nn.MultiheadAttention(8, 2)), TOKENS_8, ("eval",)),
    "transformerencoderlayer": (
        lambda: Net(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 8, post=mean_tokens),
        TOKENS_8,
        ("train", "eval"),
    ),
    "transformerencoder": (
        lambda: Net(
            nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2),
            8,
            post=mean_tokens,
        ),
        TOKENS_8,
        ("eval",),
    ),
    "transformerdecoderlayer": (
        lambda: Decoder(nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)),
        TOKENS_8,
        ("train", "eval"),
    ),
    "scaled_dot_product_attention": (SDPA, TOKENS_8, ("train",)),
    "weight_norm-parametrization": (
        lambda: nn.Sequential(
            nn.utils.parametrizations.weight_norm(nn.Linear(4, 8)), nn.Tanh(), nn.Linear(8, CLASSES)
        ),
        features(4),
        ("train",),
    ),
    # Through the loop only: a PackedSequence cannot be vmapped (its batch_sizes drive Python
    # control flow); vmap and chunked are strict xfails (CANNOT below).
    "lstm-PackedSequence": (PackedLSTM, SEQ, ("train",)),
}

XFAILS = {
    "embedding-sparse": (
        lambda: Net(nn.Embedding(10, 4, sparse=True), 4, post=mean_tokens),
        tokens(),
        UnsupportedLayerError,
        "sparse gradients cannot be stacked per member",
    ),
    "adaptivelogsoftmax": (
        lambda: nn.Sequential(nn.Linear(4, 6), nn.AdaptiveLogSoftmaxWithLoss(6, CLASSES, [2])),
        features(4),
        UnsupportedLayerError,
        "selects samples by target (aten::nonzero): data-dependent shapes cannot be vmapped",
    ),
    "spectral_norm-hook": (
        lambda: nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 8)), nn.Tanh(), nn.Linear(8, CLASSES)),
        features(4),
        UnsupportedLayerError,
        "legacy spectral_norm's in-place power iteration has no batching rule (aten::div.out)",
    ),
}


def _factory(build: Callable[[], nn.Module], mode: str) -> Callable[[int], nn.Module]:
    def make(i: int) -> nn.Module:
        torch.manual_seed(100 + i)
        return build().train(mode == "train")

    return make


BACKENDS = ("vmap", "chunked", "loop")  # named, not "auto": each cell runs one known backend
CHUNK = 2  # "chunked" with N=3 members: chunks [0, 1] and [2], one of them short
LAYOUTS = ("stacked", "shared")  # ModelBatch.forward's in_dims=0 ([N, B, ...]) and in_dims=None ([B, ...])
# (layer, backend) cells a backend cannot run, with the documented error each raises.
CANNOT = {
    ("lstm-PackedSequence", backend): (
        TypeError,
        "a PackedSequence cannot be vmapped (its batch_sizes drive Python control flow): "
        "ModelBatch raises its documented TypeError pointing to backend='loop'",
    )
    for backend in ("vmap", "chunked")
}
# Engine bugs (strict: a fix shows up as an XPASS, and this entry goes).
CANNOT |= {
    ("embedding-padding_idx-max_norm-freq", backend): (
        RuntimeError,
        "engine bug: with max_norm, nn.Embedding renormalizes its weight in place; the loop (unbind) "
        "and chunked with more than one chunk (split) hand it a view of the stacked weight, which "
        "autograd refuses ('Output 0 of Unbind/Split is a view ... modified inplace'); vmap works",
    )
    for backend in ("chunked", "loop")
}


def _conformance_params() -> list:
    params = []
    for backend in BACKENDS:
        for layout in LAYOUTS:
            for name, (_, _, modes) in CASES.items():
                marks = ()
                if (name, backend) in CANNOT:
                    error, reason = CANNOT[name, backend]
                    marks = pytest.mark.xfail(raises=error, reason=reason, strict=True)
                for mode in modes:
                    params.append(
                        pytest.param(
                            name, mode, backend, layout, id=f"{name}-{mode}-{backend}-{layout}", marks=marks
                        )
                    )
            for name, (_, _, error, reason) in XFAILS.items():  # refused at build, whatever the backend
                mark = pytest.mark.xfail(raises=error, reason=reason, strict=True)
                params.append(
                    pytest.param(
                        name, "train", backend, layout, id=f"{name}-train-{backend}-{layout}", marks=mark
                    )
                )
    return params


ADAM = {"lr": [1e-3, 3e-3, 1e-2], "betas": ([0.9, 0.8, 0.95], 0.999)}
STEPS, BATCH, MEMBERS, RTOL = 20, 8, 3, 1e-10


def _assert_shared_input_matches_sequential(
    make: Callable[[int], nn.Module], data: tuple, backend: str, ignore: list[str]
) -> None:
    """``mb.testing.assert_pack_matches_sequential`` for a shared input (``in_dims=None``): the pack
    runs one batch ``[B, ...]`` for all members, each model alone trains on the same batches. The
    same bound: every tensor within ``RTOL`` of the largest value of its kind, per member."""
    X, y = data
    X = X.double() if X.is_floating_point() else X
    models = [make(i).double() for i in range(MEMBERS)]
    alone = copy.deepcopy(models)
    batches = mb.testing.member_batches(SAMPLES, 1, STEPS, BATCH)[:, 0]  # [steps, B]: one stream for all
    batch = mb.ModelBatch(models, backend=backend, chunk_size=CHUNK if backend == "chunked" else None)
    opt = mb.optim.Adam(batch, **ADAM)
    for idx in batches:
        opt.zero_grad()
        out = batch(X[idx])
        batch.compute_loss(out, y[idx], F.cross_entropy, target_in_dims=None).sum().backward()
        opt.step()
    for i, model in enumerate(alone):
        torch_opt = torch.optim.Adam(model.parameters(), **mb.testing.member_hparams(ADAM, i, MEMBERS))
        for idx in batches:
            torch_opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            torch_opt.step()
    params = batch.stacked_parameters()
    packed = {**params, **batch.stacked_buffers()}
    refs = {
        name: torch.stack([{**dict(m.named_parameters()), **dict(m.named_buffers())}[name] for m in alone])
        for name in packed
        if name not in ignore
    }
    scales: dict[str, torch.Tensor] = {}
    for name, ref in refs.items():
        if ref.is_floating_point():
            kind = mb.testing.tensor_kind(name, name in params)
            largest = ref.detach().abs().reshape(MEMBERS, -1).amax(1)
            scales[kind] = torch.maximum(scales.get(kind, largest), largest)
    for name, ref in refs.items():
        got = packed[name].detach()
        if not ref.is_floating_point():  # num_batches_tracked
            assert torch.equal(got, ref), f"{name}: {got.tolist()} != {ref.tolist()}"
            continue
        scale = scales[mb.testing.tensor_kind(name, name in params)].clamp_min(1e-300)
        diff = (got - ref.detach()).abs().reshape(MEMBERS, -1).amax(1) / scale
        assert bool((diff <= RTOL).all()), f"{name}: relative difference per member {diff.tolist()}"


@pytest.mark.parametrize(("name", "mode", "backend", "layout"), _conformance_params())
def test_layer_pack_matches_sequential(
    name: str, mode: str, backend: str, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    build, data = (CASES[name][:2]) if name in CASES else XFAILS[name][:2]
    # The key third of an attention's in_proj_bias has an identically zero true gradient (softmax
    # ignores a shift shared by all keys): Adam turns its round-off into steps. Its effect on the
    # other parameters (all compared) is nil, so it is left out as a whole.
    ignore = [n for n, _ in build().named_parameters() if n.endswith("in_proj_bias")]
    if layout == "shared":
        _assert_shared_input_matches_sequential(_factory(build, mode), data(), backend, ignore)
        return
    if backend == "chunked":  # assert_pack_matches_sequential takes no chunk_size: its default, made short
        monkeypatch.setattr("modelbatch._backends.DEFAULT_CHUNK_SIZE", CHUNK)
        assert mb.ModelBatch([nn.Linear(2, 2) for _ in range(MEMBERS)], backend=backend).chunk_size == CHUNK
    report = mb.testing.assert_pack_matches_sequential(
        _factory(build, mode),
        data(),
        optimizer="adam",
        hparams=ADAM,
        n_members=MEMBERS,
        steps=STEPS,
        batch_size=BATCH,
        ignore=ignore,
        backend=backend,
    )
    assert report.max_rel_diff <= RTOL


OPTIMIZER_HPARAMS = {
    "sgd": {"lr": [0.02, 0.05, 0.1], "momentum": [0.0, 0.9, 0.5], "weight_decay": [0.0, 1e-3, 1e-2]},
    "adam": {"lr": [1e-3, 3e-3, 1e-2], "weight_decay": [0.0, 1e-3, 1e-2]},
    "adamw": {"lr": [1e-3, 3e-3, 1e-2], "weight_decay": [1e-2, 0.1, 0.0]},
    "rmsprop": {"lr": [1e-3, 3e-3, 5e-3], "alpha": [0.9, 0.99, 0.95], "momentum": [0.0, 0.5, 0.9]},
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZER_HPARAMS))
@pytest.mark.parametrize("name", ["lstm-2layer-bidirectional-batch_first", "batchnorm2d-momentum-None"])
def test_layer_pack_matches_sequential_per_optimizer(name: str, optimizer: str) -> None:
    build, data, _ = CASES[name]
    mb.testing.assert_pack_matches_sequential(
        _factory(build, "train"),
        data(),
        optimizer=optimizer,
        hparams=OPTIMIZER_HPARAMS[optimizer],
        n_members=3,
        steps=20,
        batch_size=8,
    )


# ---------------------------------------------------------------- float32: per-step gradients
@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("lstm-2layer-bidirectional-batch_first", "train"),
        ("batchnorm2d-momentum-None", "train"),
        ("embedding-padding_idx", "train"),
        ("transformerencoderlayer", "eval"),
    ],
)
def test_float32_gradients_match_per_step(name: str, mode: str) -> None:
    """Every step, each member's float32 gradient equals its alone-computed one up to its scale."""
    build, data, _ = CASES[name]
    make, (X, y), n = _factory(build, mode), data(), 3
    batch = mb.ModelBatch([make(i) for i in range(n)])
    opt = mb.optim.Adam(batch, lr=[1e-3, 3e-3, 1e-2])
    batches = mb.testing.member_batches(SAMPLES, n, steps=5, batch_size=8)
    for idx in batches:
        members = [batch.member(i) for i in range(n)]  # the pack's current weights, trained alone
        opt.zero_grad()
        batch.compute_loss(
            batch(X[idx], in_dims=0), y[idx], F.cross_entropy, target_in_dims=0
        ).sum().backward()
        for i, model in enumerate(members):
            F.cross_entropy(model(X[idx[i]]), y[idx[i]]).backward()
            for pname, p in model.named_parameters():
                got, ref = batch.stack.get_parameter(pname).grad[i], p.grad
                scale = float(ref.abs().max()) + 1e-6
                assert float((got - ref).abs().max()) <= 1e-4 * scale, f"{name}: {pname} member {i}"
        opt.step()


# ---------------------------------------------------------------- dropout: statistics, not masks
@pytest.mark.parametrize(
    ("layer", "shape"), [(nn.Dropout(0.3), (4000,)), (nn.Dropout2d(0.3), (50, 40, 2, 2))]
)
def test_dropout_masks_differ_per_member_with_the_right_keep_rate(layer: nn.Module, shape: tuple) -> None:
    batch = mb.ModelBatch([copy.deepcopy(layer) for _ in range(4)])
    out = batch(torch.ones(shape))
    kept = out != 0
    if isinstance(layer, nn.Dropout2d):  # whole channels are kept or dropped
        assert torch.equal(kept.all(dim=(3, 4)), kept.any(dim=(3, 4)))
    assert torch.allclose(out[kept], torch.tensor(1 / 0.7))
    rates = kept.flatten(1).double().mean(1)
    assert torch.allclose(rates, torch.full_like(rates, 0.7), atol=0.04), rates
    assert all(not torch.equal(kept[0], kept[i]) for i in range(1, 4))
    batch.eval()
    assert torch.equal(batch(torch.ones(shape)), torch.ones(4, *shape))


def test_rnn_interlayer_dropout_differs_per_member() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 5, num_layers=2, dropout=0.5)
    batch = mb.ModelBatch([copy.deepcopy(lstm) for _ in range(3)])
    out, _ = batch(torch.randn(6, 8, 4))
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    batch.eval()
    out, _ = batch(torch.randn(6, 8, 4))
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[1], out[2])


# ---------------------------------------------------------------- the preparation pass
def test_members_keep_their_classes_and_state_dicts() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(MyLSTM(4, 5, batch_first=True), nn.Identity())
    ref = copy.deepcopy(model)
    batch = mb.ModelBatch([model, copy.deepcopy(model)])
    assert type(batch.stack[0]).__name__ == "VmapMyLSTM"
    assert batch.stack.state_dict().keys() == ref.state_dict().keys()
    member = batch.member(1)
    assert type(member[0]) is MyLSTM and type(batch.template[0]) is MyLSTM
    nn.Sequential(MyLSTM(4, 5, batch_first=True), nn.Identity()).load_state_dict(member.state_dict())
    x = torch.randn(2, 3, 4)
    assert torch.allclose(batch(x)[0][1], ref(x)[0], atol=1e-6)
    clone = pickle.loads(pickle.dumps(batch))  # generated classes pickle by their user class
    assert type(clone.stack[0]).__name__ == "VmapMyLSTM"
    assert torch.allclose(clone(x)[0], batch(x)[0])


def test_unsupported_layer_fails_at_build_naming_it() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.AdaptiveLogSoftmaxWithLoss(6, 10, [4]))
    with pytest.raises(UnsupportedLayerError, match=r"ModelBatch: layer '1' \(AdaptiveLogSoftmaxWithLoss\)"):
        mb.ModelBatch([model, copy.deepcopy(model)])
    with pytest.raises(UnsupportedLayerError, match="sparse=False"):
        mb.ModelBatch([nn.Embedding(5, 2, sparse=True)])


@pytest.mark.parametrize("backend", ["vmap", "chunked"])
def test_packed_sequence_error_says_how_to_fix(backend: str) -> None:
    batch = mb.ModelBatch([PackedLSTM(), PackedLSTM()], backend=backend)
    with pytest.raises(
        TypeError, match=r"^mb\.ModelBatch: VmapLSTM received a PackedSequence.*backend='loop'"
    ):
        batch(torch.randn(3, 6, 4))


def test_attention_fast_path_setting_is_restored() -> None:
    batch = mb.ModelBatch(
        [SelfAttention(nn.MultiheadAttention(8, 2, batch_first=True)).eval() for _ in range(2)]
    )
    batch(torch.randn(3, 5, 8)).sum().backward()
    assert torch.backends.mha.get_fastpath_enabled()
    assert batch.stack.mha.in_proj_weight.grad is not None


class MaskedEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(x.shape[:2], dtype=torch.bool)
        mask[:, -2:] = True
        return self.enc(x, src_key_padding_mask=mask)


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_encoder_inference_with_padding_mask(backend: str) -> None:
    """In eval under no_grad torch would build nested tensors, which vmap cannot stack."""
    torch.manual_seed(0)
    models = [MaskedEncoder().eval() for _ in range(2)]
    batch = mb.ModelBatch(copy.deepcopy(models), backend=backend)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        out = batch(x)
        for i, model in enumerate(models):  # torch's fast path zeroes the padded steps: compare the others
            assert torch.allclose(out[i, :, :-2], model(x)[:, :-2], atol=1e-5)


# ---------------------------------------------------------------- the pre-flight check
def _padding_models() -> list[nn.Module]:
    build, _, _ = CASES["embedding-padding_idx"]
    return [_factory(build, "train")(i) for i in range(2)]


@pytest.fixture
def padding_fix_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "modelbatch.layers._prepare.FIXES", [f for f in FIXES if f.applies_to != (nn.Embedding,)]
    )


def test_preflight_passes_for_fixed_layers() -> None:
    x, _ = tokens()()
    report = preflight_check(_padding_models(), x[:8])
    assert report.max_rel_diff < 1e-12
    lstm = [_factory(lstm_net, "train")(i) for i in range(2)]
    assert preflight_check(lstm, SEQ()[0][:8], lambda out: out.square().mean()).max_rel_diff < 1e-12


def test_preflight_catches_the_padding_idx_bug(padding_fix_disabled: None) -> None:
    x, _ = tokens()()
    with pytest.raises(PreflightError, match=r"gradient of 'body.weight': members \[1\] differ"):
        preflight_check(_padding_models(), x[:8])


def test_modelbatch_preflight_raises_before_the_first_step(padding_fix_disabled: None) -> None:
    x, _ = tokens()()
    batch = mb.ModelBatch(_padding_models(), preflight=True)
    with pytest.raises(PreflightError, match=r"(?s)ModelBatch\(preflight=True\).*body.weight"):
        batch(x[:8])
    assert batch.stack.body.weight.grad is None  # nothing trained


def test_modelbatch_preflight_passes_once_then_gets_out_of_the_way() -> None:
    x, _ = tokens()()
    batch = mb.ModelBatch(_padding_models(), preflight=True)
    batch = pickle.loads(pickle.dumps(batch))  # a pack still waiting for its check pickles
    xs = torch.stack([x[:8], x[8:16]])
    assert batch(xs, in_dims=0).shape == (2, 8, CLASSES)
    assert not batch._forward_pre_hooks
