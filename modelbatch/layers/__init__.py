"""Layers under vmap: the fixes a pack applies to its skeleton, and the pre-flight check.

:class:`~modelbatch.ModelBatch` runs :func:`prepare_for_vmap` on its skeleton module, so stock
``torch.nn`` layers that torch cannot vmap (LSTM/GRU/RNN, LSTMCell, BatchNorm with
``momentum=None``, MHA/Transformer layers in eval with grad) or vmaps wrongly (Embedding with
``padding_idx``) run exactly in a pack; layers that cannot be supported raise when the pack is
built. :func:`preflight_check` (or ``ModelBatch(models, preflight=True)``) compares a pack with
the models run one by one on one float64 batch, for layers no registry can know about.

Example:
    >>> import torch, modelbatch as mb
    >>> models = [torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True) for _ in range(4)]
    >>> batch = mb.ModelBatch(models)
    >>> out, (h, c) = batch(torch.randn(5, 2, 3))
    >>> out.shape, h.shape
    (torch.Size([4, 5, 2, 8]), torch.Size([4, 4, 2, 4]))
    >>> type(batch.stack).__name__, type(batch.member(0)).__name__
    ('VmapLSTM', 'LSTM')
"""

from ._attention import (
    VmapMultiheadAttention,
    VmapTransformerEncoder,
    VmapTransformerEncoderLayer,
    mha_fastpath_disabled,
)
from ._batchnorm import VmapBatchNorm
from ._embedding import VmapEmbedding
from ._preflight import PreflightError, install_preflight, preflight_check
from ._prepare import (
    FIXES,
    UNSUPPORTED,
    Fix,
    Unsupported,
    UnsupportedLayerError,
    check_supported,
    fixed_class,
    prepare_for_vmap,
)
from ._rnn import VmapGRU, VmapGRUCell, VmapLSTM, VmapLSTMCell, VmapRNN, VmapRNNCell

__all__ = [
    "FIXES",
    "UNSUPPORTED",
    "Fix",
    "PreflightError",
    "Unsupported",
    "UnsupportedLayerError",
    "VmapBatchNorm",
    "VmapEmbedding",
    "VmapGRU",
    "VmapGRUCell",
    "VmapLSTM",
    "VmapLSTMCell",
    "VmapMultiheadAttention",
    "VmapRNN",
    "VmapRNNCell",
    "VmapTransformerEncoder",
    "VmapTransformerEncoderLayer",
    "check_supported",
    "fixed_class",
    "install_preflight",
    "mha_fastpath_disabled",
    "preflight_check",
    "prepare_for_vmap",
]
