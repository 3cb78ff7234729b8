"""Per-member data routing: each member of a pack gets its own batches, subsets and order.

``MemberSampler`` yields ``[N, B]`` sample indices per step (member ``i``'s batches are those of
its own shuffled DataLoader); ``MemberStreams`` does the same for slots whose members join and
leave at any step; ``gather`` (in-memory tensors) and ``StreamingGather`` (a map-style
``Dataset`` that does not fit on the device: the union of the step's indices is loaded once
through a ``DataLoader`` with workers and pinned memory, then routed on the device) turn them
into ``[N, B, ...]`` inputs; ``bootstrap``, ``kfold``, ``kfold_members``, ``stratified``,
``class_subset`` and ``filter_subset`` build per-member subsets.

:class:`mb.Recipe <modelbatch.Recipe>` (hence ``mb.fit`` and the Tune slot servers) takes either
``(X, y)`` tensors or such a ``Dataset`` as ``train_data`` / ``val_data``, with the same
per-member batches; a ``Dataset`` is streamed with ``StreamingGather`` and ``MemberStreams``.

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

from ._sampler import MemberSampler
from ._stream import StreamingGather, gather
from ._streams import MemberStep, MemberStreams
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
