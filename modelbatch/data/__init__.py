"""Per-member data routing: each member of a pack gets its own batches, subsets and order.

``MemberSampler`` yields ``[N, B]`` sample indices per step (member ``i``'s batches are those of
its own shuffled DataLoader); ``gather`` / ``StreamingGather`` turn them into ``[N, B, ...]``
inputs; ``bootstrap``, ``kfold``, ``kfold_members``, ``stratified``, ``class_subset`` and
``filter_subset`` build per-member subsets.

Example:
    >>> import torch, torch.nn.functional as F, modelbatch as mb
    >>> X, y = torch.randn(30, 4), torch.randint(0, 2, (30,))
    >>> batch = mb.ModelBatch([torch.nn.Linear(4, 2) for _ in range(3)])
    >>> opt = mb.optim.SGD(batch, lr=0.1)
    >>> sampler = mb.data.MemberSampler(30, 3, batch_size=8, subsets=mb.data.bootstrap(30, 3))
    >>> for step in sampler.epoch(0):
    ...     xs, ys = mb.data.gather((X, y), step)
    ...     out = batch(xs, in_dims=0, participating=step.participating)
    ...     losses = batch.compute_loss(out, ys, F.cross_entropy, target_in_dims=0, mask=step.mask)
    ...     opt.zero_grad(); losses.sum().backward(); opt.step(mask=step.participating)
    >>> losses.shape
    torch.Size([3])
"""

from ._sampler import MemberSampler, MemberStep
from ._stream import StreamingGather, gather
from ._streams import MemberStreams
from ._subsets import KFoldMembers, bootstrap, class_subset, filter_subset, kfold, kfold_members, stratified

__all__ = [
    "KFoldMembers",
    "MemberSampler",
    "MemberStep",
    "MemberStreams",
    "StreamingGather",
    "bootstrap",
    "class_subset",
    "filter_subset",
    "gather",
    "kfold",
    "kfold_members",
    "stratified",
]
