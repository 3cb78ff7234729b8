"""Conformance matrix on models nobody here wrote: Hugging Face transformers built from tiny configs
(BERT, GPT-2 with its tied lm_head, Llama tied and untied, ViT) and a ResNet-style CNN with
BatchNorm, with and without gradient checkpointing, on the vmap and loop backends (pinned: the
automatic choice is not under test here).

For each: packed training equals each model trained alone (float64, 20 Adam steps, tensors whose
true gradient is zero listed and left out), ``member(i)`` returns the class with its ties, and
``mb.save``/``mb.load`` give back a pack computing bitwise the same (non-persistent buffers too).
Attention runs Hugging Face's default ``attn_implementation="sdpa"`` (under the pack's vmap on the
CPU, torch's math kernel: the fused CPU kernel has no batching rule) with no vmap fallback warning
allowed, and "eager" in the exactness matrix too.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint

import modelbatch as mb
from modelbatch import _architecture as mb_architecture

transformers.logging.set_verbosity_error()
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # gradient_checkpointing_enable's rename
    pytest.mark.filterwarnings("error:.*batching rule.*:UserWarning"),  # a vmap fallback: slow
]

VOCAB, SEQ, CLASSES = 50, 8, 3


class ResNetLike(nn.Module):
    """Two BatchNorm residual blocks (no conv bias before BatchNorm), optionally checkpointed."""

    def __init__(self, checkpointing: str | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)) for _ in range(2)
        )
        self.head = nn.Linear(4, CLASSES)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            if self.checkpointing is None:
                h = torch.relu(h + block(h))
            else:
                reentrant = self.checkpointing == "reentrant"
                h = torch.relu(h + checkpoint(block, h, use_reentrant=reentrant))
        return self.head(h.mean(dim=(2, 3)))


def _bert(dropout: float = 0.0, attn: str = "sdpa") -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=CLASSES,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, attn_implementation=attn,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _gpt2(dropout: float = 0.0, attn: str = "sdpa") -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=dropout,
        embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0, attn_implementation=attn,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _llama(tied: bool, dropout: float = 0.0, attn: str = "sdpa") -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        attn_implementation=attn, attention_dropout=dropout,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _vit(dropout: float = 0.0, attention_dropout: float = 0.0, attn: str = "sdpa") -> nn.Module:
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=CLASSES, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=attention_dropout, attn_implementation=attn,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


def _lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _tokens(n: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))


def _images(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _labels(n: int = 32) -> torch.Tensor:
    return torch.randint(0, CLASSES, (n,), generator=torch.Generator().manual_seed(1))


# name: (build, (X, y), loss_fn, tied (alias, original) or None)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple], Callable, tuple | None]] = {
    "bert": (_bert, lambda: (_tokens(), _labels()), F.cross_entropy, None),
    "gpt2": (_gpt2, lambda: (_tokens(), _tokens()), _lm_loss, ("lm_head.weight", "transformer.wte.weight")),
    "llama-tied": (
        lambda **kw: _llama(True, **kw),
        lambda: (_tokens(), _tokens()),
        _lm_loss,
        ("lm_head.weight", "model.embed_tokens.weight"),
    ),
    "llama-untied": (lambda **kw: _llama(False, **kw), lambda: (_tokens(), _tokens()), _lm_loss, None),
    "vit": (_vit, lambda: (_images(), _labels()), F.cross_entropy, None),
    "resnet": (ResNetLike, lambda: (_images(), _labels()), F.cross_entropy, None),
}


def _factory(name: str, checkpointing: str | None = None, attn: str = "sdpa") -> Callable[[int], nn.Module]:
    build = MODELS[name][0]

    def make(i: int) -> nn.Module:
        torch.manual_seed(100 + i)
        model = ResNetLike(checkpointing) if name == "resnet" else build(attn=attn)
        if checkpointing is not None and name != "resnet":
            kwargs = {"use_reentrant": checkpointing == "reentrant"}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return model.train().double()

    return make


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_parameter(name)


def _trained_pack(name: str, backend: str, steps: int = 2, n: int = 3) -> mb.ModelBatch:
    make = _factory(name)
    _, data, loss_fn, _ = MODELS[name]
    X, y = data()
    batch = mb.ModelBatch([make(i) for i in range(n)], backend=backend)
    opt = mb.optim.Adam(batch, lr=[1e-2 * (i + 1) for i in range(n)])
    for step in range(steps):
        idx = torch.arange(4) + 4 * step
        opt.zero_grad()
        batch.compute_loss(batch(X[idx]), y[idx], loss_fn, target_in_dims=None).sum().backward()
        opt.step()
    return batch


CASES = [
    (name, backend, ckpt, "sdpa")
    for name in MODELS
    for backend in ("vmap", "loop")
    for ckpt in (None, "non-reentrant", "reentrant")
    if ckpt != "reentrant" or backend == "vmap"
] + [(name, "vmap", None, "eager") for name in MODELS if name != "resnet"]


@pytest.mark.parametrize(("name", "backend", "checkpointing", "attn"), CASES)
def test_pack_matches_models_trained_alone(
    name: str, backend: str, checkpointing: str | None, attn: str
) -> None:
    _, data, loss_fn, _ = MODELS[name]
    report = mb.testing.assert_pack_matches_sequential(
        _factory(name, checkpointing, attn),
        data(),
        optimizer="adam",
        hparams={"lr": [1e-2, 3e-2]},
        loss_fn=loss_fn,
        n_members=2,
        steps=20,
        batch_size=4,
        rtol=1e-9,
        backend=backend,
    )
    assert report.rel_diff and report.max_rel_diff <= 1e-9, report.verdict
    assert report.verdict.startswith("packed == alone: max relative difference")
    if name == "bert":  # softmax attention: a key bias's true gradient is zero
        assert any(n.endswith("attention.self.key.bias") for n in report.zero_gradient), report.verdict
    tied = MODELS[name][3]
    if tied is not None:  # the tie is one stacked leaf, updated once per step
        assert tied[0] not in report.rel_diff and tied[1] in report.rel_diff


# name: models with dropout on (train mode), member i at rate DROPOUT[i]: in dropout modules (BERT,
# GPT-2) or as a float rate passed to F.dropout / SDPA (Llama's attention_dropout, ViT's); a pack
# holds both per member.
DROPOUT = [0.1, 0.3]
DROPOUT_MODELS: dict[str, Callable[[float], nn.Module]] = {
    "bert": _bert,
    "gpt2": _gpt2,
    "llama-untied": lambda p: _llama(False, dropout=p),
    "llama-eager": lambda p: _llama(False, dropout=p, attn="eager"),
    "vit": lambda p: _vit(p, attention_dropout=p),
    "vit-eager": lambda p: _vit(p, attention_dropout=p, attn="eager"),
}
DATA = {"llama-eager": "llama-untied", "vit-eager": "vit"}  # their data and loss


@pytest.mark.parametrize("backend", ["vmap", "loop"])
@pytest.mark.parametrize("name", list(DROPOUT_MODELS))
def test_dropout_on_pack_matches_models_trained_alone(name: str, backend: str) -> None:
    """Each member draws the masks its model draws alone after torch.manual_seed(seed + i)."""

    def make(i: int) -> nn.Module:
        torch.manual_seed(100 + i)
        return DROPOUT_MODELS[name](DROPOUT[i]).train().double()

    _, data, loss_fn, _ = MODELS[DATA.get(name, name)]
    report = mb.testing.assert_pack_matches_sequential(
        make, data(), optimizer="adam", hparams={"lr": [1e-2, 3e-2]}, loss_fn=loss_fn, n_members=2,
        steps=4, batch_size=4, rtol=1e-9, backend=backend,
    )  # fmt: skip
    assert report.rel_diff and report.max_rel_diff <= 1e-9, report.verdict
    with torch.random.fork_rng(devices=[]):  # dropout is on: the same model twice differs
        X = data()[0][:4]
        model = make(0)
        assert not torch.equal(model(X).logits, model(X).logits)


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpointed_layers_are_recomputed_in_the_backward(name: str) -> None:
    """Checkpointing is not switched off in a pack: the region runs again during the backward."""
    _, data, loss_fn, _ = MODELS[name]
    X, y = data()
    batch = mb.ModelBatch([_factory(name, "non-reentrant")(i) for i in range(2)], backend="vmap")
    kinds = ("Layer", "Block", "Sequential")  # the first checkpointed layer of each model
    layer = next(m for m in batch.stack.modules() if type(m).__name__.endswith(kinds))
    inner = next(m for m in layer.modules() if m is not layer and "weight" in m._parameters)
    calls = []  # counted inside the region (HF checkpoints forward, not the layer's hooks)
    inner.register_forward_pre_hook(lambda *_: calls.append(1))
    losses = batch.compute_loss(batch(X[:4]), y[:4], loss_fn, target_in_dims=None)
    forwards = len(calls)
    losses.sum().backward()
    assert forwards == 1 and len(calls) == 2


@pytest.mark.parametrize("backend", ["vmap", "loop"])
@pytest.mark.parametrize("name", list(MODELS))
def test_member_round_trip_keeps_ties(name: str, backend: str) -> None:
    batch = _trained_pack(name, backend)
    batch.eval()
    X = MODELS[name][1]()[0][:4]
    for i in range(batch.n):
        member = batch.member(i)
        assert type(member) is type(_factory(name)(0)) and not member.training
        tied = MODELS[name][3]
        if tied is not None:
            assert _tensor(member, tied[0]) is _tensor(member, tied[1])
        expected = batch(X)
        got = member(X)
        got, expected = (got.logits, expected.logits[i]) if name != "resnet" else (got, expected[i])
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        for key, value in batch.stacked_buffers().items():
            assert torch.equal(member.get_buffer(key), value[i]), key
        fresh = _factory(name)(0)
        fresh.load_state_dict(member.state_dict())
        if tied is not None:
            assert _tensor(fresh, tied[0]) is _tensor(fresh, tied[1])


@pytest.mark.parametrize("backend", ["vmap", "loop"])
@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_computes_bitwise_the_same(name: str, backend: str, tmp_path) -> None:
    batch = _trained_pack(name, backend)
    opt = mb.optim.Adam(batch, lr=1e-2)
    path = tmp_path / "pack.pt"
    mb.save(path, batch, opt)
    loaded, loaded_opt, _ = mb.load(path)
    into = mb.ModelBatch([_factory(name)(9)] * batch.n, backend=backend)
    mb.load(path, batch=into)
    X = MODELS[name][1]()[0][:4]
    batch.eval()
    for other in (loaded, into):
        other.eval()
        assert other.backend == backend
        for key, value in batch.stacked_buffers().items():  # non-persistent ones included
            assert torch.equal(other.stacked_buffers()[key], value), key
        out, ref = other(X), batch(X)
        assert torch.equal(out if name == "resnet" else out.logits, ref if name == "resnet" else ref.logits)
        tied = MODELS[name][3]
        if tied is not None:
            assert _tensor(other.stack, tied[0]) is _tensor(other.stack, tied[1])
    assert set(loaded_opt.state) == set(opt.state)


@pytest.mark.parametrize("name", list(MODELS))
def test_preflight_passes_on_correct_models(name: str) -> None:
    """Integer buffers (position_ids, num_batches_tracked) compare exactly; ties need no copy out of meta."""
    X = MODELS[name][1]()[0][:4]
    batch = mb.ModelBatch([_factory(name)(i) for i in range(2)], preflight=True, backend="vmap")
    batch(X)


def test_preflight_passes_with_dropout_rates_kept_as_floats() -> None:
    """Llama's attention dropout is a float rate passed to SDPA, per member: switched off for the check."""
    config = _llama(False).config
    torch.manual_seed(0)
    models = []
    for rate in (0.1, 0.3):
        config.attention_dropout = rate
        models.append(transformers.LlamaForCausalLM(config).train())
    batch = mb.ModelBatch(models, preflight=True, backend="vmap")
    batch(_tokens(4))
    attention = "model.layers.0.self_attn.attention_dropout"
    assert batch.dropout_rates[attention] == [0.1, 0.3]  # only the check's copies were switched off
    assert [batch.member(i).model.layers[0].self_attn.attention_dropout for i in range(2)] == [0.1, 0.3]


def test_member_config_holds_its_own_dropout_rates_through_save_pretrained_and_checkpoints(tmp_path) -> None:
    """A member's Hugging Face config says its own rates (not model 0's): after member(i),
    save_pretrained/from_pretrained, mb.save/mb.load and load_member of a model with other rates."""
    rates = [0.1, 0.3, 0.2]
    torch.manual_seed(0)
    batch = mb.ModelBatch([_bert(rate) for rate in rates], backend="loop")
    assert batch.dropout_rates["config.hidden_dropout_prob"] == rates
    for i, rate in enumerate(rates):
        member = batch.member(i)
        assert member.config.hidden_dropout_prob == member.bert.embeddings.dropout.p == rate
        member.save_pretrained(tmp_path / f"member-{i}")
        again = transformers.BertForSequenceClassification.from_pretrained(tmp_path / f"member-{i}")
        assert again.config.attention_probs_dropout_prob == rate
        assert again.bert.encoder.layer[0].attention.self.dropout.p == rate
    mb.save(tmp_path / "pack.pt", batch)
    loaded, _, _ = mb.load(tmp_path / "pack.pt")
    assert [loaded.member(i).config.hidden_dropout_prob for i in range(3)] == rates
    batch.load_member(1, _bert(0.45))
    assert batch.member(1).config.hidden_dropout_prob == 0.45
    assert batch.dropout_rates["config.hidden_dropout_prob"] == [0.1, 0.45, 0.2]


def test_a_rate_float_in_one_config_and_none_in_another_is_refused_and_splits_packs() -> None:
    """BERT's classifier_dropout=None (use hidden_dropout_prob) against 0.3: no per-member value to
    hold, so ModelBatch names the rate and the fix, and the architecture signatures differ."""
    models = []
    for rate in (None, 0.3):
        config = copy.deepcopy(_bert().config)
        config.classifier_dropout = rate
        models.append(transformers.BertForSequenceClassification(config))
    with pytest.raises(ValueError, match=r"model 1 has the dropout rate config.classifier_dropout = 0.3"):
        mb.ModelBatch(models)
    signature = mb_architecture.architecture_signature
    assert signature(models[0]) != signature(models[1])


class Constants(nn.Module):
    """A user's non-persistent float and integer buffers, set after construction."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("scale", torch.ones(4), persistent=False)
        self.register_buffer("order", torch.arange(4), persistent=False)
        if extra:
            self.register_buffer("extra", torch.zeros(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)[..., self.order] * self.scale


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_save_load_keeps_non_persistent_buffers_of_a_plain_module(backend: str, tmp_path) -> None:
    models = []
    for i in range(3):
        torch.manual_seed(i)
        m = Constants()
        m.scale.copy_(torch.randn(4))
        m.order.copy_(torch.randperm(4))
        models.append(m)
    batch = mb.ModelBatch(models, backend=backend)
    mb.save(tmp_path / "pack.pt", batch)
    loaded, _, _ = mb.load(tmp_path / "pack.pt")
    into = mb.ModelBatch([Constants() for _ in range(3)], backend=backend)
    mb.load(tmp_path / "pack.pt", batch=into)
    x = torch.randn(5, 4)
    for other in (loaded, into):
        assert torch.equal(other.stack.scale, batch.stack.scale)
        assert torch.equal(other.stack.order, batch.stack.order)
        assert torch.equal(other(x), batch(x))


def test_checkpoint_of_other_non_persistent_buffers_is_refused(tmp_path) -> None:
    mb.save(tmp_path / "pack.pt", mb.ModelBatch([Constants() for _ in range(2)]))
    with pytest.raises(ValueError, match=r"mb.load: .*non-persistent buffers"):
        mb.load(tmp_path / "pack.pt", batch=mb.ModelBatch([Constants(extra=True) for _ in range(2)]))


def test_checkpoint_without_non_persistent_buffers_needs_a_batch(tmp_path) -> None:
    """A file of the older format (no non-persistent buffers) is refused without a pack to load into."""
    models = [Constants() for _ in range(2)]
    mb.save(tmp_path / "pack.pt", mb.ModelBatch(models))
    payload = torch.load(tmp_path / "pack.pt", weights_only=False)
    del payload["buffers"]
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"mb.load: .*older mb.save.*\['order', 'scale'\].*pass batch="):
        mb.load(tmp_path / "old.pt")
    into, _, _ = mb.load(tmp_path / "old.pt", batch=mb.ModelBatch([Constants() for _ in range(2)]))
    assert torch.equal(into.stack.order, torch.arange(4).expand(2, 4))


def test_member_frozen_differently_names_parameter_member_and_fix() -> None:
    models = [_factory("bert")(i) for i in range(3)]
    models[2].bert.embeddings.word_embeddings.weight.requires_grad_(False)
    with pytest.raises(ValueError) as info:
        mb.ModelBatch(models)
    message = str(info.value)
    assert message.startswith("mb.ModelBatch: parameter 'bert.embeddings.word_embeddings.weight'")
    assert "model 2" in message and "batch.freeze(i)" in message


def test_models_tied_differently_are_refused() -> None:
    with pytest.raises(ValueError, match="ModelBatch: model 1 shares"):
        mb.ModelBatch([_llama(True), _llama(False)])


def test_tied_plain_module_trains_exactly_on_every_backend() -> None:
    def make(i: int) -> nn.Module:
        torch.manual_seed(i)
        net = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Tanh(), nn.Linear(8, VOCAB, bias=False))
        net[2].weight = net[0].weight
        return net

    data = (_tokens(), _tokens())
    for backend in ("vmap", "chunked", "loop"):
        report = mb.testing.assert_pack_matches_sequential(
            make, data, loss_fn=_lm_loss, n_members=3, steps=10, batch_size=4, backend=backend,
            hparams={"lr": [1e-2, 2e-2, 3e-2]},
        )  # fmt: skip
        assert list(report.rel_diff) == ["0.weight"]
    batch = mb.ModelBatch([make(i) for i in range(2)]).to(torch.float64)
    assert batch.stack[0].weight is batch.stack[2].weight
    batch.load_state_dict(copy.deepcopy(batch.state_dict()), assign=True)
    assert batch.stack[0].weight is batch.stack[2].weight


def test_reentrant_region_without_grad_inputs_gives_no_gradient_like_alone() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.outer = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.outer(checkpoint(self.inner, x, use_reentrant=True))

    x = torch.randn(3, 4)
    alone = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "None of the inputs have requires_grad=True"
        alone(x).sum().backward()
    batch = mb.ModelBatch([copy.deepcopy(alone) for _ in range(2)], backend="vmap")
    batch(x).sum().backward()
    assert alone.inner.weight.grad is None and batch.stack.inner.weight.grad is None
    assert batch.stack.outer.weight.grad is not None


def test_hugging_face_outputs_and_caches() -> None:
    batch = mb.ModelBatch([_factory("llama-untied")(i) for i in range(2)], backend="vmap")
    X = _tokens(4)
    out = batch(X)  # use_cache is off in the pack's skeleton
    assert isinstance(out, transformers.modeling_outputs.CausalLMOutputWithPast)
    assert batch.member(0).config.use_cache  # members are the user's models
    losses = batch.compute_loss(out, X, _lm_loss)
    torch.testing.assert_close(losses, batch.compute_loss(out.logits, X, _lm_loss), rtol=0, atol=0)
    torch.testing.assert_close(losses, batch.compute_loss(out.to_tuple(), X, _lm_loss), rtol=0, atol=0)
    with pytest.raises(KeyError, match=r"ModelBatch.compute_loss: .*no field 'scores'.*output="):
        batch.compute_loss(out, X, _lm_loss, output="scores")
    for backend in ("vmap", "loop"):
        batch.set_backend(backend)
        with pytest.raises(TypeError, match=r"ModelBatch.forward: the model returned .*use_cache=False"):
            batch(X, use_cache=True)


def _additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """A ``[..., B, S]`` padding mask as the 4-D additive mask Hugging Face builds (``[..., B, 1, S, S]``)."""
    low = torch.tensor(torch.finfo(torch.float64).min, dtype=torch.float64)
    keep = mask.bool()[..., None, None, :]
    return torch.where(keep, torch.zeros((), dtype=torch.float64), low).expand(*mask.shape[:-1], 1, SEQ, SEQ)


@pytest.mark.parametrize("backend", ["vmap", "chunked", "loop"])
def test_per_member_keyword_inputs_reach_each_member(backend: str) -> None:
    """BERT with dropout on and each member's own padded batch and attention mask, vs each alone.

    The loop backend takes the 2-D padding masks; under vmap, Hugging Face's mask builder branches
    on a 2-D mask's values (``padding_mask.all()``), so those backends get the 4-D mask it builds.
    """
    models = [_factory("bert")(i) for i in range(3)]
    for i, model in enumerate(models):
        for layer in model.modules():
            if isinstance(layer, nn.Dropout):
                layer.p = 0.1 * (i + 1)
    ids = torch.randint(0, VOCAB, (3, 4, SEQ), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 4, SEQ, dtype=torch.long)
    mask[0, :, 5:] = 0
    mask[2, 1, 2:] = 0
    given = mask if backend == "loop" else _additive_mask(mask)
    batch = mb.ModelBatch(models, backend=backend, chunk_size=2 if backend == "chunked" else None)
    batch.manual_seed([4, 5, 6])
    out = batch(ids, attention_mask=given, in_dims=0, kwarg_in_dims={"attention_mask": 0}).logits
    shared = batch(ids, attention_mask=given[0], in_dims=0).logits  # kwargs are shared by default
    for i, model in enumerate(models):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4 + i)
            torch.testing.assert_close(
                out[i], model(ids[i], attention_mask=mask[i]).logits, rtol=1e-12, atol=1e-12
            )
    assert not torch.allclose(out[2], shared[2])
    with pytest.raises(
        ValueError, match=r"ModelBatch.forward: per-member keyword input 'attention_mask'.*N=3"
    ):
        batch(ids, attention_mask=given[0], in_dims=0, kwarg_in_dims={"attention_mask": 0})
    with pytest.raises(ValueError, match=r"ModelBatch.forward: kwarg_in_dims names 'token_type_ids'"):
        batch(ids, attention_mask=given, in_dims=0, kwarg_in_dims={"token_type_ids": 0})


def test_a_2d_attention_mask_under_vmap_says_what_to_do() -> None:
    batch = mb.ModelBatch([_factory("bert")(i) for i in range(2)], backend="vmap")
    ids, mask = _tokens(4).expand(2, 4, SEQ), torch.ones(2, 4, SEQ, dtype=torch.long)
    with pytest.raises(
        RuntimeError, match=r"ModelBatch.forward: the model branches on .*4-D .*backend='loop'"
    ):
        batch(ids, attention_mask=mask, in_dims=0, kwarg_in_dims={"attention_mask": 0})
    batch.set_backend("auto")  # falls back to the loop, with a warning
    with pytest.warns(RuntimeWarning, match="runs 'loop' instead"):
        batch(ids, attention_mask=mask, in_dims=0, kwarg_in_dims={"attention_mask": 0})
