"""nn.Embedding with ``padding_idx`` that stays exact under vmap.

Under vmap, torch's embedding backward applies ``padding_idx`` to member 0 only: members
1..N-1 get a gradient for their padding row (silently wrong training). Here the embedding runs
without ``padding_idx`` and the outputs at padding positions are detached, so the padding row
gets exactly zero gradient in every member, as it does for a model trained alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class VmapEmbedding(nn.Embedding):
    """nn.Embedding whose ``padding_idx`` row gets zero gradient in every member of a pack.

    Example:
        >>> import torch, modelbatch as mb
        >>> pack = mb.ModelBatch([torch.nn.Embedding(5, 2, padding_idx=0) for _ in range(3)])
        >>> idx = torch.tensor([[0, 1, 2], [0, 0, 3], [4, 0, 1]])
        >>> pack(idx, in_dims=0).sum().backward()
        >>> pack.stack.weight.grad[:, 0].abs().sum().item()  # the padding rows of all members
        0.0
    """

    def forward(self, input: Tensor) -> Tensor:
        if self.padding_idx is None:
            return super().forward(input)
        out = F.embedding(
            input, self.weight, None, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        padding = (input == self.padding_idx).unsqueeze(-1)
        return torch.where(padding, out.detach(), out)
