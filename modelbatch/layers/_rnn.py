"""nn.LSTM / GRU / RNN and their cells in plain tensor ops, so that they run under ``torch.vmap``.

torch's fused kernels (``aten::lstm.input``, ``aten::gru.input``, ``aten::rnn_tanh.input``,
``aten::lstm_cell``) have no batching rule; ``aten::gru_cell`` and ``aten::rnn_*_cell`` run
member by member in vmap's slow fallback. The classes below keep the modules' parameters,
attribute names and state_dicts and only replace ``forward`` with the same recurrence written
with ``F.linear`` and elementwise ops (the order of operations of torch's CPU kernels), so a
pack of them is exact to round-off against the fused kernels.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence


def lstm_cell(
    gates_x: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Tensor | None, w_hr: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One LSTM step from the precomputed input gates ``x @ W_ih^T + b_ih``."""
    i, f, g, o = (F.linear(h, w_hh, b_hh) + gates_x).chunk(4, -1)
    c = f.sigmoid() * c + i.sigmoid() * g.tanh()
    h = o.sigmoid() * c.tanh()
    return (h if w_hr is None else F.linear(h, w_hr)), c


def gru_cell(gates_x: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> Tensor:
    """One GRU step from the precomputed input gates ``x @ W_ih^T + b_ih``."""
    xr, xz, xn = gates_x.chunk(3, -1)
    hr, hz, hn = F.linear(h, w_hh, b_hh).chunk(3, -1)
    reset = (hr + xr).sigmoid()
    update = (hz + xz).sigmoid()
    new = (xn + hn * reset).tanh()
    return (h - new) * update + new


def rnn_cell(gates_x: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None, relu: bool) -> Tensor:
    """One Elman RNN step (tanh or relu) from the precomputed ``x @ W_ih^T + b_ih``."""
    pre = F.linear(h, w_hh, b_hh) + gates_x
    return pre.relu() if relu else pre.tanh()


def _direction(
    module: nn.RNNBase, x: Tensor, h: Tensor, c: Tensor | None, layer: int, reverse: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run one layer in one direction over time-major ``x`` ``[T, B, F]``."""
    sfx = f"_l{layer}{'_reverse' if reverse else ''}"
    w_ih, w_hh = getattr(module, f"weight_ih{sfx}"), getattr(module, f"weight_hh{sfx}")
    b_ih = getattr(module, f"bias_ih{sfx}") if module.bias else None
    b_hh = getattr(module, f"bias_hh{sfx}") if module.bias else None
    w_hr = getattr(module, f"weight_hr{sfx}") if getattr(module, "proj_size", 0) > 0 else None
    gates_x = F.linear(x, w_ih, b_ih)
    outputs: list[Tensor] = [h] * x.shape[0]
    for t in reversed(range(x.shape[0])) if reverse else range(x.shape[0]):
        if module.mode == "LSTM":
            h, c = lstm_cell(gates_x[t], h, c, w_hh, b_hh, w_hr)
        elif module.mode == "GRU":
            h = gru_cell(gates_x[t], h, w_hh, b_hh)
        else:
            h = rnn_cell(gates_x[t], h, w_hh, b_hh, relu=module.mode == "RNN_RELU")
        outputs[t] = h
    return torch.stack(outputs), h, c


def _layers(
    module: nn.RNNBase, x: Tensor, h0: Tensor, c0: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """All layers and directions over time-major ``x``; returns ``(output, h_n, c_n)``."""
    directions = 2 if module.bidirectional else 1
    h_n, c_n = [], []
    for layer in range(module.num_layers):
        outs = []
        for d in range(directions):
            k = layer * directions + d
            out, h, c = _direction(module, x, h0[k], None if c0 is None else c0[k], layer, d == 1)
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(outs, -1) if directions == 2 else outs[0]
        if module.dropout and module.training and layer < module.num_layers - 1:
            x = F.dropout(x, module.dropout, training=True)
    return x, torch.stack(h_n), (None if c0 is None else torch.stack(c_n))


def _zeros_hidden(module: nn.RNNBase, x: Tensor, size: int) -> Tensor:
    directions = 2 if module.bidirectional else 1
    batch = x.shape[0] if module.batch_first else x.shape[1]
    return torch.zeros(module.num_layers * directions, batch, size, dtype=x.dtype, device=x.device)


class _PlainRNNBase(nn.RNNBase):
    """``forward`` of nn.LSTM/GRU/RNN in plain tensor ops (no fused kernel, vmap-safe)."""

    def forward(self, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None) -> tuple:
        name = type(self).__name__
        if isinstance(input, PackedSequence):
            raise TypeError(
                f"mb.ModelBatch: {name} received a PackedSequence, which a pack cannot run (vmap needs one "
                "tensor per input). Pad the sequences instead (nn.utils.rnn.pad_packed_sequence) and "
                "mask the padded steps in the loss, or pass backend='loop' (it runs nn.LSTM's own kernel)."
            )
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        lstm = self.mode == "LSTM"
        batched = input.dim() == 3
        if not batched:
            input = input.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                hx = tuple(h.unsqueeze(1) for h in hx) if lstm else hx.unsqueeze(1)
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if hx is None:
            h0 = _zeros_hidden(self, input, out_size)
            hx = (h0, _zeros_hidden(self, input, self.hidden_size)) if lstm else h0
        self.check_forward_args(input, hx, None)
        h0, c0 = hx if lstm else (hx, None)
        x = input.transpose(0, 1) if self.batch_first else input
        out, h_n, c_n = _layers(self, x, h0, c0)
        out = out.transpose(0, 1) if self.batch_first else out
        hidden = (h_n, c_n) if lstm else h_n
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
            hidden = tuple(h.squeeze(1) for h in hidden) if lstm else hidden.squeeze(1)
        return out, hidden


class VmapLSTM(_PlainRNNBase, nn.LSTM):
    """nn.LSTM whose forward is plain tensor ops: same parameters and state_dict, runs under vmap.

    Example:
        >>> import torch
        >>> from modelbatch.layers import VmapLSTM
        >>> lstm = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
        >>> x = torch.randn(5, 2, 3)
        >>> expected = lstm(x)[0]
        >>> lstm.__class__ = VmapLSTM
        >>> torch.allclose(lstm(x)[0], expected, atol=1e-6)
        True
    """


class VmapGRU(_PlainRNNBase, nn.GRU):
    """nn.GRU whose forward is plain tensor ops (see :class:`VmapLSTM`)."""


class VmapRNN(_PlainRNNBase, nn.RNN):
    """nn.RNN (tanh or relu) whose forward is plain tensor ops (see :class:`VmapLSTM`)."""


class VmapLSTMCell(nn.LSTMCell):
    """nn.LSTMCell whose forward is plain tensor ops (``aten::lstm_cell`` has no batching rule).

    Example:
        >>> import torch
        >>> from modelbatch.layers import VmapLSTMCell
        >>> cell = torch.nn.LSTMCell(3, 4)
        >>> x = torch.randn(2, 3)
        >>> expected = cell(x)[0]
        >>> cell.__class__ = VmapLSTMCell
        >>> torch.allclose(cell(x)[0], expected, atol=1e-6)
        True
    """

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.shape[0], self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        elif not batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        gates_x = F.linear(input, self.weight_ih, self.bias_ih)
        h, c = lstm_cell(gates_x, hx[0], hx[1], self.weight_hh, self.bias_hh)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class _PlainCell(nn.RNNCellBase, abc.ABC):
    """Shared input handling of GRUCell/RNNCell: 1-D or 2-D input, optional ``hx``."""

    @abc.abstractmethod
    def _step(self, gates_x: Tensor, h: Tensor) -> Tensor:
        """The next hidden state from the input's gate pre-activations and the current one."""

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        if input.dim() not in (1, 2):
            raise ValueError(
                f"{type(self).__name__}: Expected input to be 1D or 2D, got {input.dim()}D instead"
            )
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(input.shape[0], self.hidden_size, dtype=input.dtype, device=input.device)
        elif not batched:
            hx = hx.unsqueeze(0)
        h = self._step(F.linear(input, self.weight_ih, self.bias_ih), hx)
        return h if batched else h.squeeze(0)


class VmapGRUCell(_PlainCell, nn.GRUCell):
    """nn.GRUCell in plain tensor ops (vmap runs ``aten::gru_cell`` member by member)."""

    def _step(self, gates_x: Tensor, h: Tensor) -> Tensor:
        return gru_cell(gates_x, h, self.weight_hh, self.bias_hh)


class VmapRNNCell(_PlainCell, nn.RNNCell):
    """nn.RNNCell in plain tensor ops (vmap runs ``aten::rnn_*_cell`` member by member)."""

    def _step(self, gates_x: Tensor, h: Tensor) -> Tensor:
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return rnn_cell(gates_x, h, self.weight_hh, self.bias_hh, relu=self.nonlinearity == "relu")
