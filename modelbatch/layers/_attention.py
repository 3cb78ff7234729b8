"""MultiheadAttention and Transformer layers without torch's inference fast path.

In ``eval()`` mode torch routes MHA/TransformerEncoderLayer to fused kernels
(``aten::_native_multi_head_attention``, ``aten::_transformer_encoder_layer_fwd``) when it sees
no input that requires grad. Inside vmap the stacked parameters do not *look* like they require
grad, so the fast path is taken and backward fails ("derivative ... is not implemented"); under
``no_grad`` with a padding mask, TransformerEncoder's nested tensors fail under vmap
("Could not run 'aten::stack' ... 'NestedTensorCPU'"). These classes switch the fast path off for
the duration of their own forward and restore the global setting afterwards (it is a process-wide
flag: another thread running attention meanwhile takes the slow path too, with the same results).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    """Disable ``torch.backends.mha``'s fast path inside the block, then restore the previous value.

    Example:
        >>> import torch
        >>> from modelbatch.layers import mha_fastpath_disabled
        >>> with mha_fastpath_disabled():
        ...     torch.backends.mha.get_fastpath_enabled()
        False
        >>> torch.backends.mha.get_fastpath_enabled()
        True
    """
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


class _NoFastPath(nn.Module):
    """Runs the parent class's forward with the MHA fast path off."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with mha_fastpath_disabled():
            return super().forward(*args, **kwargs)


class VmapMultiheadAttention(_NoFastPath, nn.MultiheadAttention):
    """nn.MultiheadAttention that never takes the inference fast path."""


class VmapTransformerEncoderLayer(_NoFastPath, nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer that never takes the inference fast path."""


class VmapTransformerEncoder(_NoFastPath, nn.TransformerEncoder):
    """nn.TransformerEncoder that never takes the inference fast path (nor nested tensors)."""
