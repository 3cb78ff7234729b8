"""BatchNorm with ``momentum=None`` (cumulative average) in tensor ops, so that it runs under vmap.

torch's BatchNorm computes the cumulative-average factor as ``1.0 / float(num_batches_tracked)``:
``float()`` of a tensor is ``.item()``, which vmap cannot run. Here the factor stays a tensor
(one per member) and the running statistics are updated with torch's formula
``running = factor * batch_stat + (1 - factor) * running`` (unbiased variance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm


class VmapBatchNorm(_BatchNorm):
    """BatchNorm1d/2d/3d whose ``momentum=None`` update is tensor ops (no ``.item()``).

    Applied to ``nn.BatchNorm1d/2d/3d`` (and their subclasses) by :func:`prepare_for_vmap`;
    every other configuration runs torch's own forward.

    Example:
        >>> import torch, modelbatch as mb
        >>> pack = mb.ModelBatch([torch.nn.BatchNorm1d(3, momentum=None) for _ in range(2)])
        >>> pack(torch.randn(2, 8, 3), in_dims=0).shape
        torch.Size([2, 8, 3])
        >>> pack.stack.num_batches_tracked.tolist()
        [1, 1]
    """

    def forward(self, input: Tensor) -> Tensor:
        cumulative = self.training and self.track_running_stats and self.momentum is None
        if not cumulative or self.running_mean is None or self.num_batches_tracked is None:
            return super().forward(input)
        self._check_input_dim(input)
        self.num_batches_tracked.add_(1)
        output = F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        with torch.no_grad():
            dims = [0, *range(2, input.dim())]
            factor = 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)
            mean = input.mean(dims)
            var = input.var(dims, correction=1)
            self.running_mean.copy_(factor * mean + (1 - factor) * self.running_mean)
            self.running_var.copy_(factor * var + (1 - factor) * self.running_var)
        return output
