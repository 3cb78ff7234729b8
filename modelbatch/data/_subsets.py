"""Per-member subsets of a dataset: bootstrap, k-fold, stratified, class and filter subsets.

Each builder returns one index tensor per member, ready for ``MemberSampler(..., subsets=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from .._hparams import check_positive_int

Seeds = int | Sequence[int]
"""One int (member ``i`` gets ``seed + i``) or one seed per member."""

IndexLike = torch.Tensor | Sequence[int]
"""Sample indices (a LongTensor, a list of ints, a numpy array) or a bool mask over the samples."""


def member_seeds(api: str, seeds: Seeds, n_members: int) -> list[int]:
    """Return one int seed per member: ``seeds + i`` for an int, the list itself otherwise."""
    check_positive_int(api, "n_members", n_members)
    if isinstance(seeds, bool):
        raise TypeError(f"{api}: seeds must be an int or one int per member, got a bool.")
    if isinstance(seeds, int):
        return [seeds + i for i in range(n_members)]
    values = [int(s) for s in seeds]
    if len(values) != n_members:
        raise ValueError(
            f"{api}: seeds has {len(values)} values but there are {n_members} members; "
            "pass one seed per member, or a single int (member i then gets seed + i)."
        )
    return values


def as_index(api: str, what: str, index: IndexLike, n_samples: int) -> torch.Tensor:
    """``index`` as a 1-d int64 CPU tensor of indices in ``[0, n_samples)``; a bool mask is converted."""
    tensor = torch.as_tensor(index).detach().to("cpu")
    if tensor.dtype == torch.bool:
        if tensor.shape != (n_samples,):
            raise ValueError(
                f"{api}: {what} is a bool mask of shape {list(tensor.shape)}; a mask needs one entry "
                f"per sample, [{n_samples}]."
            )
        return tensor.nonzero().reshape(-1)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dim() != 1:
        raise TypeError(
            f"{api}: {what} must be a 1-d tensor or list of int indices (or a bool mask), got "
            f"dtype {tensor.dtype} and shape {list(tensor.shape)}."
        )
    tensor = tensor.to(torch.int64)
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= n_samples):
        raise IndexError(
            f"{api}: {what} holds indices in [{int(tensor.min())}, {int(tensor.max())}] but the data "
            f"has {n_samples} samples; indices must lie in [0, {n_samples})."
        )
    return tensor


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bootstrap(
    n_samples: int, n_members: int, seeds: Seeds = 0, *, size: int | None = None
) -> list[torch.Tensor]:
    """Bootstrap resamples: member ``i`` draws ``size`` (default ``n_samples``) indices with replacement.

    The draw is ``torch.randint(n_samples, (size,), generator=torch.Generator().manual_seed(seed_i))``.

    Example:
        >>> import modelbatch as mb
        >>> subsets = mb.data.bootstrap(100, n_members=4, seeds=0)
        >>> len(subsets), subsets[0].shape
        (4, torch.Size([100]))
        >>> bool((subsets[0] < 100).all())
        True
    """
    api = "mb.data.bootstrap"
    check_positive_int(api, "n_samples", n_samples)
    size = n_samples if size is None else size
    check_positive_int(api, "size", size)
    return [
        torch.randint(n_samples, (size,), generator=_generator(seed), dtype=torch.int64)
        for seed in member_seeds(api, seeds, n_members)
    ]


def kfold(
    n_samples: int, k: int, *, seed: int = 0, shuffle: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """K-fold splits ``[(train_idx, val_idx)] * k`` with ``sklearn.model_selection.KFold`` semantics.

    The first ``n_samples % k`` folds hold ``n_samples // k + 1`` validation samples, the others
    ``n_samples // k``; validation folds are disjoint and cover every sample; ``train_idx`` is the
    sorted complement. With ``shuffle`` the samples are first permuted by
    ``torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))`` (sklearn shuffles
    with numpy instead, so the folds are sklearn's applied to that permutation).

    Example:
        >>> import modelbatch as mb
        >>> folds = mb.data.kfold(10, 3, shuffle=False)
        >>> [val.tolist() for _, val in folds]
        [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
        >>> folds[1][0].tolist()
        [0, 1, 2, 3, 7, 8, 9]
    """
    api = "mb.data.kfold"
    check_positive_int(api, "n_samples", n_samples)
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= n_samples:
        raise ValueError(
            f"{api}: k must be an int with 2 <= k <= n_samples={n_samples}, got {k!r}; "
            "use fewer folds or more samples."
        )
    order = torch.randperm(n_samples, generator=_generator(seed)) if shuffle else torch.arange(n_samples)
    sizes = [n_samples // k + (1 if f < n_samples % k else 0) for f in range(k)]
    folds = []
    for val in torch.split(order, sizes):
        in_val = torch.zeros(n_samples, dtype=torch.bool)
        in_val[val] = True
        folds.append(((~in_val).nonzero().reshape(-1), val.clone()))
    return folds


class KFoldMembers(NamedTuple):
    """The members of a k-fold cross-validation sweep (see :func:`kfold_members`)."""

    configs: list[dict[str, Any]]
    """One config per member: the original config plus a ``"fold"`` key."""
    train: list[torch.Tensor]
    """Member ``m``'s training indices (pass as ``MemberSampler(subsets=...)``)."""
    val: list[torch.Tensor]
    """Member ``m``'s validation indices."""


def kfold_members(
    configs: Sequence[Mapping[str, Any]],
    k: int,
    *,
    n_samples: int,
    seed: int = 0,
    shuffle: bool = True,
) -> KFoldMembers:
    """Expand ``C`` configs into ``C * k`` members, one per (config, fold); member ``c * k + f``.

    Every config sees the same folds (:func:`kfold` with ``seed``), so configs are compared on
    identical splits.

    Example:
        >>> import modelbatch as mb
        >>> members = mb.data.kfold_members([{"lr": 0.1}, {"lr": 0.01}], k=3, n_samples=30)
        >>> [(c["lr"], c["fold"]) for c in members.configs]
        [(0.1, 0), (0.1, 1), (0.1, 2), (0.01, 0), (0.01, 1), (0.01, 2)]
        >>> len(members.train[0]), len(members.val[0])
        (20, 10)
    """
    api = "mb.data.kfold_members"
    if isinstance(configs, Mapping) or not all(isinstance(c, Mapping) for c in configs):
        raise TypeError(f"{api}: configs must be a list of dicts (one per config), e.g. [{{'lr': 0.1}}].")
    for c, config in enumerate(configs):
        if "fold" in config:
            raise ValueError(f"{api}: config {c} already has a 'fold' key; remove it, folds are added here.")
    folds = kfold(n_samples, k, seed=seed, shuffle=shuffle)
    expanded = [{**config, "fold": f} for config in configs for f in range(k)]
    train = [folds[f][0] for _ in configs for f in range(k)]
    val = [folds[f][1] for _ in configs for f in range(k)]
    return KFoldMembers(expanded, train, val)


def stratified(
    labels: torch.Tensor | Sequence[int], fraction: float, seeds: Seeds = 0, *, n_members: int | None = None
) -> list[torch.Tensor]:
    """Per-member stratified random subsets: ``round(fraction * n_c)`` samples of every class ``c``.

    Member ``i`` draws, class by class in ascending label order, ``torch.randperm(n_c)[:count]``
    from ``torch.Generator().manual_seed(seed_i)``; its indices are returned sorted. ``seeds`` is a
    list (one per member) or an int with ``n_members``.

    Example:
        >>> import torch, modelbatch as mb
        >>> labels = torch.tensor([0] * 80 + [1] * 20)
        >>> subsets = mb.data.stratified(labels, 0.5, seeds=[1, 2, 3])
        >>> [int((labels[s] == 1).sum()) for s in subsets]
        [10, 10, 10]
    """
    api = "mb.data.stratified"
    labels = _labels(api, labels)
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"{api}: fraction must be in (0, 1], got {fraction!r}.")
    seeds = _seeds_with_count(api, seeds, n_members)
    classes = [(labels == c).nonzero().reshape(-1) for c in torch.unique(labels)]
    counts = [int(float(fraction) * len(members) + 0.5) for members in classes]
    subsets = []
    for seed in seeds:
        gen = _generator(seed)
        picks = [idx[torch.randperm(len(idx), generator=gen)[:count]] for idx, count in zip(classes, counts)]
        subsets.append(torch.cat(picks).sort().values)
    return subsets


def _labels(api: str, labels: torch.Tensor | Sequence[int]) -> torch.Tensor:
    tensor = torch.as_tensor(labels).detach().to("cpu")
    if tensor.dim() != 1 or tensor.is_floating_point():
        raise ValueError(
            f"{api}: labels must be a 1-d tensor of int class labels (one per sample), got dtype "
            f"{tensor.dtype} and shape {list(tensor.shape)}."
        )
    return tensor


def _seeds_with_count(api: str, seeds: Seeds, n_members: int | None) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if n_members is None:
            raise ValueError(f"{api}: with an int seed, pass n_members= (or pass one seed per member).")
        return member_seeds(api, seeds, n_members)
    return member_seeds(api, seeds, len(seeds) if n_members is None else n_members)


def class_subset(
    labels: torch.Tensor | Sequence[int], classes: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Member ``i`` keeps the samples whose label is in ``classes[i]`` (one list of classes per member).

    Example:
        >>> import torch, modelbatch as mb
        >>> labels = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> [s.tolist() for s in mb.data.class_subset(labels, [[0], [1, 2]])]
        [[0, 3], [1, 2, 4, 5]]
    """
    api = "mb.data.class_subset"
    labels = _labels(api, labels)
    if isinstance(classes, torch.Tensor) or any(isinstance(c, int) for c in classes):
        raise TypeError(
            f"{api}: classes must hold one list of classes per member, e.g. [[0, 1], [2]]; "
            "for one member pass [[0, 1]]."
        )
    subsets = []
    for i, member_classes in enumerate(classes):
        keep = torch.isin(labels, torch.as_tensor(list(member_classes), dtype=labels.dtype))
        if not bool(keep.any()):
            raise ValueError(
                f"{api}: member {i} keeps no sample (classes {list(member_classes)} are absent)."
            )
        subsets.append(keep.nonzero().reshape(-1))
    return subsets


def filter_subset(
    keep: torch.Tensor | Sequence[torch.Tensor] | Callable[[int], torch.Tensor],
    n_members: int | None = None,
) -> list[torch.Tensor]:
    """Per-member subsets from bool masks over the samples: ``[N, n]``, a list of ``[n]``, or a function.

    ``keep`` may be one ``[n]`` mask shared by ``n_members`` members, an ``[N, n]`` tensor or a list
    of ``N`` masks, or a function ``keep(i) -> [n] bool mask`` called for ``i < n_members``.

    Example:
        >>> import torch, modelbatch as mb
        >>> x = torch.arange(6.0)
        >>> [s.tolist() for s in mb.data.filter_subset(lambda i: x % (i + 2) == 0, n_members=2)]
        [[0, 2, 4], [0, 3]]
    """
    api = "mb.data.filter_subset"
    masks = _member_masks(api, keep, n_members)
    subsets = []
    for i, mask in enumerate(masks):
        mask = torch.as_tensor(mask).detach().to("cpu")
        if mask.dtype != torch.bool or mask.dim() != 1:
            raise TypeError(
                f"{api}: the mask of member {i} must be a 1-d bool tensor over the samples, got dtype "
                f"{mask.dtype} and shape {list(mask.shape)}."
            )
        subsets.append(mask.nonzero().reshape(-1))
    return subsets


def _member_masks(api: str, keep: Any, n_members: int | None) -> Sequence[Any]:
    if callable(keep):
        if n_members is None:
            raise ValueError(
                f"{api}: with a function, pass n_members= (it is called as keep(i), i < n_members)."
            )
        return [keep(i) for i in range(n_members)]
    if isinstance(keep, torch.Tensor) and keep.dim() == 1:
        if n_members is None:
            raise ValueError(f"{api}: one mask for all members needs n_members=; or pass an [N, n] mask.")
        return [keep] * n_members
    if n_members is not None and len(keep) != n_members:
        raise ValueError(f"{api}: got {len(keep)} masks for n_members={n_members}; pass one mask per member.")
    return list(keep)
