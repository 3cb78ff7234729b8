"""The preparation pass: make a pack's skeleton module run exactly under vmap.

:func:`prepare_for_vmap` walks a module and, for every layer torch cannot run (or runs wrongly)
under ``torch.vmap``, swaps the layer's class for a subclass with a vmap-safe ``forward``
(:data:`FIXES`). Parameters, buffers and their names are untouched, so state_dicts still load.
Layers that cannot be supported at all (:data:`UNSUPPORTED`) raise at once, naming the layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ._attention import VmapMultiheadAttention, VmapTransformerEncoder, VmapTransformerEncoderLayer
from ._batchnorm import VmapBatchNorm
from ._embedding import VmapEmbedding
from ._rnn import VmapGRU, VmapGRUCell, VmapLSTM, VmapLSTMCell, VmapRNN, VmapRNNCell


class UnsupportedLayerError(ValueError):
    """A layer that cannot run exactly inside a pack (raised when the pack is built)."""


@dataclass(frozen=True)
class Fix:
    """Swap the class of layers of type ``applies_to`` for ``fixed`` when ``needed(layer)``."""

    applies_to: tuple[type[nn.Module], ...]
    fixed: type[nn.Module]
    needed: Callable[[nn.Module], bool] = lambda layer: True
    reason: str = ""


@dataclass(frozen=True)
class Unsupported:
    """Layers of type ``applies_to`` for which ``reason(layer)`` is not None cannot be packed."""

    applies_to: tuple[type[nn.Module], ...]
    reason: Callable[[nn.Module], str | None]
    how_to_fix: str


FIXES: list[Fix] = [
    Fix((nn.LSTM,), VmapLSTM, reason="aten::lstm.input has no batching rule"),
    Fix((nn.GRU,), VmapGRU, reason="aten::gru.input has no batching rule"),
    Fix((nn.RNN,), VmapRNN, reason="aten::rnn_tanh/relu.input have no batching rule"),
    Fix((nn.LSTMCell,), VmapLSTMCell, reason="aten::lstm_cell has no batching rule"),
    Fix((nn.GRUCell,), VmapGRUCell, reason="aten::gru_cell runs member by member (slow fallback)"),
    Fix((nn.RNNCell,), VmapRNNCell, reason="aten::rnn_*_cell run member by member (slow fallback)"),
    Fix(
        (nn.Embedding,),
        VmapEmbedding,
        lambda layer: layer.padding_idx is not None,
        "padding_idx gives members 1..N-1 wrong gradients under vmap",
    ),
    Fix(
        (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
        VmapBatchNorm,
        lambda layer: layer.momentum is None,
        "momentum=None calls .item() under vmap",
    ),
    Fix((nn.MultiheadAttention,), VmapMultiheadAttention, reason="the eval fast path has no backward"),
    Fix((nn.TransformerEncoderLayer,), VmapTransformerEncoderLayer, reason="eval fast path"),
    Fix((nn.TransformerEncoder,), VmapTransformerEncoder, reason="eval fast path"),
]


def _sparse(layer: nn.Module) -> str | None:
    return "sparse=True gives sparse gradients, which cannot be stacked per member" if layer.sparse else None


def _spectral_norm_hook(layer: nn.Module) -> str | None:
    hooks = list(layer._forward_pre_hooks.values())
    if any(type(h).__name__ == "SpectralNorm" for h in hooks):
        return "nn.utils.spectral_norm's in-place power iteration has no batching rule (aten::div.out)"
    return None


UNSUPPORTED: list[Unsupported] = [
    Unsupported((nn.Embedding, nn.EmbeddingBag), _sparse, "build the layer with sparse=False"),
    Unsupported(
        (nn.AdaptiveLogSoftmaxWithLoss,),
        lambda layer: "it selects samples by target with data-dependent shapes (aten::nonzero)",
        "use a full softmax head (nn.Linear + F.cross_entropy)",
    ),
    Unsupported(
        (nn.Module,),
        _spectral_norm_hook,
        "train these models one by one, or drop spectral_norm",
    ),
]


def check_supported(module: nn.Module, api: str = "mb.layers.check_supported") -> None:
    """Raise :class:`UnsupportedLayerError` naming the first layer of ``module`` a pack cannot run.

    Example:
        >>> import torch
        >>> from modelbatch.layers import check_supported
        >>> check_supported(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LSTM(4, 4)))
        >>> check_supported(torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True)))
        Traceback (most recent call last):
        ...
        modelbatch.layers._prepare.UnsupportedLayerError: mb.layers.check_supported: layer '0' (Embedding) ...
    """
    for name, layer in module.named_modules():
        for rule in UNSUPPORTED:
            reason = rule.reason(layer) if isinstance(layer, rule.applies_to) else None
            if reason is not None:
                raise UnsupportedLayerError(
                    f"{api}: layer {name or '<root>'!r} ({type(layer).__name__}) cannot run in a pack: "
                    f"{reason}. Fix: {rule.how_to_fix}."
                )


def prepare_for_vmap(module: nn.Module, api: str = "mb.layers.prepare_for_vmap") -> nn.Module:
    """Make ``module`` (in place) run exactly under ``torch.vmap``; returns it.

    Checks every layer against :data:`UNSUPPORTED` (raising :class:`UnsupportedLayerError`), then
    swaps the class of each layer listed in :data:`FIXES` for a subclass with a vmap-safe
    ``forward``. A subclass of a fixed layer keeps its own methods: its ``super().forward``
    reaches the fix. Parameter and buffer names do not change. :class:`~modelbatch.ModelBatch`
    applies this to its skeleton; ``batch.member(i)`` still returns the original classes.

    Example:
        >>> import torch
        >>> from modelbatch.layers import prepare_for_vmap
        >>> net = torch.nn.Sequential(torch.nn.LSTM(3, 4), torch.nn.Embedding(5, 3, padding_idx=0))
        >>> keys = list(net.state_dict())
        >>> [type(m).__name__ for m in prepare_for_vmap(net)]
        ['VmapLSTM', 'VmapEmbedding']
        >>> list(net.state_dict()) == keys
        True
    """
    check_supported(module, api)
    for layer in module.modules():
        for fix in FIXES:
            if isinstance(layer, fix.applies_to) and not isinstance(layer, fix.fixed) and fix.needed(layer):
                layer.__class__ = fixed_class(type(layer), fix.fixed)
                break
    return module


@functools.cache
def fixed_class(cls: type[nn.Module], fix: type[nn.Module]) -> type[nn.Module]:
    """``fix`` for the stock layer it subclasses, else a subclass of ``cls`` whose super() reaches ``fix``.

    For a user subclass ``MyLSTM(nn.LSTM)`` the generated class is ``VmapMyLSTM(MyLSTM, VmapLSTM)``:
    ``MyLSTM``'s own methods run first and its ``super().forward`` calls the vmap-safe forward.
    """
    if issubclass(fix, cls):
        return fix
    return type(f"Vmap{cls.__name__}", (cls, fix), {"__reduce_ex__": _reduce_fixed})


def _reduce_fixed(self: nn.Module, protocol: Any) -> tuple:
    """Pickle a layer of a generated class by its user class and fix (it has no import path)."""
    _, _, *rest = object.__reduce_ex__(self, protocol)
    user_cls, fix = type(self).__bases__
    return (_new_fixed, (user_cls, fix), *rest)


def _new_fixed(user_cls: type[nn.Module], fix: type[nn.Module]) -> nn.Module:
    cls = fixed_class(user_cls, fix)
    return cls.__new__(cls)
