"""Per-member data routing: MemberSampler vs DataLoader, subset builders, gathering, exact packed training."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from models import MLP, seeded
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

import modelbatch as mb
import modelbatch.data as mbd

N_SAMPLES, B = 23, 4  # 23 % 4 != 0: a partial last batch
SUBSETS = [torch.arange(23), torch.tensor([5, 3, 9, 1, 2, 7, 8, 11, 20, 21, 4]), torch.arange(7)]


def reference_batches(subset, seed, epochs, drop_last=False, batch_size=B):
    """Batches (lists of sample indices) of a shuffled DataLoader with a seeded generator, epoch by epoch."""
    data = TensorDataset(torch.arange(N_SAMPLES))
    data = data if subset is None else Subset(data, subset)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen, drop_last=drop_last)
    return [[x.tolist() for (x,) in loader] for _ in range(epochs)]


def sampler_batches(sampler, epochs, start=0):
    """Each member's real batches, per epoch: [member][epoch][step] -> list of indices."""
    out = [[[] for _ in range(start, epochs)] for _ in range(sampler.n_members)]
    for e in range(start, epochs):
        for step in sampler.epoch(e):
            mask = torch.ones_like(step.indices, dtype=torch.bool) if step.mask is None else step.mask
            assert torch.equal(step.participating, mask.any(dim=1))
            for i in range(sampler.n_members):
                if step.participating[i]:
                    out[i][e - start].append(step.indices[i][mask[i]].tolist())
    return out


# ---------------------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("subsets", [None, SUBSETS], ids=["full", "subsets"])
def test_member_order_equals_dataloader(drop_last, subsets):
    seeds = [3, 5, 9]
    sampler = mbd.MemberSampler(N_SAMPLES, 3, B, seeds=seeds, subsets=subsets, drop_last=drop_last)
    got = sampler_batches(sampler, 3)
    for i, seed in enumerate(seeds):
        subset = None if subsets is None else subsets[i]
        assert got[i] == reference_batches(subset, seed, 3, drop_last)


def test_int_seed_gives_seed_plus_member():
    got = sampler_batches(mbd.MemberSampler(N_SAMPLES, 2, B, seeds=10), 2)
    assert got[1] == reference_batches(None, 11, 2)


def test_mask_and_participating_with_subsets_of_different_sizes():
    subsets = [torch.arange(10), torch.arange(10, 15), torch.tensor([20, 21, 22])]
    sampler = mbd.MemberSampler(N_SAMPLES, 3, B, subsets=subsets)
    assert len(sampler) == 3
    steps = list(sampler.epoch(0))
    assert [s.participating.tolist() for s in steps] == [
        [True] * 3,
        [True, True, False],
        [True, False, False],
    ]
    assert [s.mask.sum(dim=1).tolist() for s in steps] == [[4, 4, 3], [4, 1, 0], [2, 0, 0]]
    for step in steps:
        assert step.indices.dtype == torch.int64 and step.indices.shape == (3, B)
        assert bool((step.indices[~step.mask] == 0).all())  # padding points at sample 0
    full = next(iter(mbd.MemberSampler(N_SAMPLES, 3, B).epoch(0)))
    assert full.mask is None and bool(full.participating.all())


def test_shared_order_is_one_permutation_for_all_members():
    sampler = mbd.MemberSampler(N_SAMPLES, 3, B, seeds=4, order="shared")
    got = sampler_batches(sampler, 2)
    assert got[0] == got[1] == got[2] == reference_batches(None, 4, 2)
    subsets = [torch.arange(23), torch.tensor([9, 2, 2, 17, 5])]  # duplicates kept
    sampler = mbd.MemberSampler(N_SAMPLES, 2, B, seeds=4, order="shared", subsets=subsets)
    got = sampler_batches(sampler, 1)
    perm = [x for batch in reference_batches(None, 4, 1)[0] for x in batch]
    order = [x for batch in got[1][0] for x in batch]
    assert order == sorted(subsets[1].tolist(), key=perm.index)


def test_reset_member_starts_fresh_at_next_epoch():
    sampler = mbd.MemberSampler(N_SAMPLES, 2, B, seeds=[1, 2])
    steps = sampler.epoch(0)
    next(steps)
    sampler.reset_member(1, seed=42, subset=SUBSETS[1])
    rest = list(steps)
    assert all(s.participating.tolist() == [True, False] for s in rest)
    got = sampler_batches(sampler, 3, start=1)
    assert got[1] == reference_batches(SUBSETS[1], 42, 2)
    assert got[0] == reference_batches(None, 1, 3)[1:]


def test_state_dict_resume_mid_epoch():
    def make():
        return mbd.MemberSampler(N_SAMPLES, 3, B, seeds=[3, 5, 9], subsets=SUBSETS)

    full = make()
    expected = [s.indices for e in range(3) for s in full.epoch(e)]
    first = make()
    seen = [s.indices for s in first.epoch(0)]
    steps = first.epoch(1)
    seen += [next(steps).indices, next(steps).indices]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer))
    seen += [s.indices for e in (1, 2) for s in resumed.epoch(e)]
    assert len(seen) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))


def test_state_dict_resume_after_reset_member():
    def run(resume_at):
        sampler = mbd.MemberSampler(N_SAMPLES, 2, B, seeds=[1, 2], subsets=SUBSETS[:2])
        out = []
        for e in range(3):
            for step in sampler.epoch(e):
                out.append(step.indices.clone())
                if (e, step.step) == (1, 0):
                    sampler.reset_member(0, seed=7, subset=SUBSETS[2])
                if (e, step.step) == resume_at:
                    state = sampler.state_dict()
                    sampler = mbd.MemberSampler(N_SAMPLES, 2, B, seeds=[1, 2], subsets=SUBSETS[:2])
                    sampler.load_state_dict(state)
                    break
            else:
                continue
            out += [s.indices for s in sampler.epoch(e)]
        return out

    expected = run(resume_at=None)
    got = run(resume_at=(1, 1))
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


def _same(a, b) -> bool:
    """Equal nested states (dicts, lists, tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _steps_equal(a, b) -> bool:
    return _same([a.indices, a.mask, a.participating], [b.indices, b.mask, b.participating])


def _other_state(order):
    """A valid state of another sampler with the same settings (seeds and a subset differ)."""
    seeds = 8 if order == "shared" else [8, 9, 10]
    other = mbd.MemberSampler(N_SAMPLES, 3, B, seeds=seeds, order=order, subsets=[*SUBSETS[:2], [1, 2]])
    next(iter(other.epoch(2)))
    return other.state_dict()


def _without(state, key):
    return {k: v for k, v in state.items() if k != key}


REFUSED_SAMPLER_CALLS = {  # id: (order, call, error)
    "shared: reset_member with seed=": (
        "shared",
        lambda s: s.reset_member(1, seed=5, subset=[0, 1, 2]),
        ValueError,
    ),
    "member: reset_member with a seed torch cannot take": (
        "member",
        lambda s: s.reset_member(1, seed=2**70, subset=[0, 1, 2]),
        ValueError,
    ),
    "load_state_dict: a generator state that is not one": (
        "member",
        lambda s: s.load_state_dict({**_other_state("member"), "generator_states": [torch.zeros(3)] * 3}),
        ValueError,
    ),
    "load_state_dict: a key missing": (
        "shared",
        lambda s: s.load_state_dict(_without(_other_state("shared"), "generator_states")),
        ValueError,
    ),
    "load_state_dict: subsets of another pack": (
        "member",
        lambda s: s.load_state_dict({**_other_state("member"), "subsets": [None, None]}),
        ValueError,
    ),
    "load_state_dict: epoch_steps too few for its subsets": (
        "member",
        lambda s: s.load_state_dict({**_other_state("member"), "epoch_steps": 1}),
        RuntimeError,
    ),
}


@pytest.mark.parametrize(
    "order, call, error", REFUSED_SAMPLER_CALLS.values(), ids=REFUSED_SAMPLER_CALLS.keys()
)
def test_a_refused_call_leaves_the_sampler_as_it_was(order, call, error):
    seeds = 3 if order == "shared" else [3, 5, 9]
    sampler = mbd.MemberSampler(N_SAMPLES, 3, B, seeds=seeds, order=order, subsets=SUBSETS)
    next(iter(sampler.epoch(0)))
    untouched, before = copy.deepcopy(sampler), sampler.state_dict()
    with pytest.raises(error):
        call(sampler)
    assert _same(sampler.state_dict(), before)
    got = [s for e in range(3) for s in sampler.epoch(e)]
    expected = [s for e in range(3) for s in untouched.epoch(e)]
    assert len(got) == len(expected) and all(map(_steps_equal, got, expected))


def test_errors_name_the_api_and_the_fix():
    with pytest.raises(
        ValueError, match=r"^mb.data.MemberSampler: seeds has 3 values but there are 4 members"
    ):
        mbd.MemberSampler(10, 4, 2, seeds=[1, 2, 3])
    with pytest.raises(IndexError, match=r"^mb.data.MemberSampler: subset 1 holds indices"):
        mbd.MemberSampler(10, 2, 2, subsets=[[0, 1], [5, 10]])
    with pytest.raises(ValueError, match="never train"):
        mbd.MemberSampler(10, 2, 4, subsets=[[0, 1, 2, 3], [5, 6]], drop_last=True)
    with pytest.raises(ValueError, match="one int seed"):
        mbd.MemberSampler(10, 2, 2, seeds=[1, 2], order="shared")
    sampler = mbd.MemberSampler(10, 2, 2)
    list(sampler.epoch(1))
    with pytest.raises(ValueError, match="before the current epoch"):
        sampler.epoch(0)


# ---------------------------------------------------------------------------------------------- subsets
def test_kfold_equals_sklearn():
    model_selection = pytest.importorskip("sklearn.model_selection")
    n, k = 23, 5
    folds = mbd.kfold(n, k, shuffle=False)
    for (train, val), (ref_train, ref_val) in zip(folds, model_selection.KFold(k).split(range(n))):
        assert train.tolist() == ref_train.tolist() and val.tolist() == ref_val.tolist()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    shuffled = mbd.kfold(n, k, seed=3)
    for (train, val), (ref_train, ref_val) in zip(shuffled, model_selection.KFold(k).split(range(n))):
        assert val.tolist() == perm[ref_val].tolist() and train.tolist() == sorted(perm[ref_train].tolist())


def test_kfold_folds_are_disjoint_and_cover_every_sample():
    n, k = 23, 4
    folds = mbd.kfold(n, k, seed=1)
    val_count = torch.zeros(n, dtype=torch.int64)
    train_count = torch.zeros(n, dtype=torch.int64)
    for train, val in folds:
        val_count[val] += 1
        train_count[train] += 1
        assert not set(train.tolist()) & set(val.tolist())
    assert bool((val_count == 1).all()) and bool((train_count == k - 1).all())


def test_kfold_members_expands_configs_by_fold():
    members = mbd.kfold_members([{"lr": 0.1}, {"lr": 0.2}], 3, n_samples=10, seed=2)
    assert [(c["lr"], c["fold"]) for c in members.configs] == [(lr, f) for lr in (0.1, 0.2) for f in range(3)]
    folds = mbd.kfold(10, 3, seed=2)
    for m, config in enumerate(members.configs):
        assert torch.equal(members.train[m], folds[config["fold"]][0])
        assert torch.equal(members.val[m], folds[config["fold"]][1])


def test_bootstrap_draws_with_replacement_from_each_members_generator():
    subsets = mbd.bootstrap(50, 3, seeds=7)
    for i, subset in enumerate(subsets):
        expected = torch.randint(50, (50,), generator=torch.Generator().manual_seed(7 + i))
        assert torch.equal(subset, expected)
        assert subset.unique().numel() < 50  # with replacement
    assert mbd.bootstrap(50, 2, seeds=[1, 2], size=20)[1].shape == (20,)


def test_stratified_keeps_class_proportions():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)[
        torch.randperm(100, generator=torch.Generator().manual_seed(0))
    ]
    subsets = mbd.stratified(labels, 0.3, seeds=5, n_members=4)
    for subset in subsets:
        assert torch.bincount(labels[subset]).tolist() == [18, 9, 3]
        assert subset.unique().numel() == subset.numel()
    assert not torch.equal(subsets[0], subsets[1])


def test_class_and_filter_subsets():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    assert [s.tolist() for s in mbd.class_subset(labels, [[2], [0, 1]])] == [[2, 5, 6], [0, 1, 3, 4]]
    with pytest.raises(TypeError, match="one list of classes per member"):
        mbd.class_subset(labels, [0, 1])
    masks = torch.tensor([[True, False, True], [False, True, True]])
    assert [s.tolist() for s in mbd.filter_subset(masks)] == [[0, 2], [1, 2]]
    assert [s.tolist() for s in mbd.filter_subset(masks[0], n_members=2)] == [[0, 2], [0, 2]]


# ---------------------------------------------------------------------------------------------- gathering
class DictDataset(Dataset):
    """A map-style dataset that is not a TensorDataset (goes through the DataLoader path)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "name": f"s{i}"}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_gather_equals_in_memory_gather(num_workers):
    x, y = torch.randn(N_SAMPLES, 3), torch.arange(N_SAMPLES)
    sampler = mbd.MemberSampler(N_SAMPLES, 3, B, subsets=SUBSETS)
    stream = mbd.StreamingGather(DictDataset(x, y), num_workers=num_workers)
    count = 0
    for step, batch in stream.epoch(sampler, 0):
        xs, ys = mbd.gather((x, y), step)
        assert torch.equal(batch["x"], xs) and torch.equal(batch["y"], ys)
        assert batch["name"][1] == [f"s{j}" for j in step.indices[1].tolist()]
        count += 1
        assert sampler.state_dict()["position"] == count  # prefetching does not move the position
    assert count == len(sampler)
    step = next(iter(sampler.epoch(1)))
    assert torch.equal(stream(step)["x"], x[step.indices])
    fast = mbd.StreamingGather(TensorDataset(x, y))
    assert all(torch.equal(a, b) for a, b in zip(fast(step), mbd.gather((x, y), step)))
    assert torch.equal(mbd.StreamingGather(x)(step), x[step.indices])


# ---------------------------------------------------------------------------------------------- exactness
def test_packed_training_with_member_sampler_equals_each_model_trained_alone():
    torch.manual_seed(0)
    n, batch_size, epochs = 40, 8, 2
    X, y = torch.randn(n, 8, dtype=torch.float64), torch.randint(0, 3, (n,))
    subsets = [torch.arange(n), torch.randperm(n)[:27], torch.randperm(n)[:13]]  # 5, 4, 2 steps; partial last
    seeds, lrs = [11, 12, 13], [0.1, 0.05, 0.2]
    models = [seeded(MLP, i).double() for i in range(3)]
    references = [copy.deepcopy(m) for m in models]

    batch = mb.ModelBatch(models)
    opt = mb.optim.SGD(batch, lr=lrs, momentum=0.9)
    sampler = mbd.MemberSampler(n, 3, batch_size, seeds=seeds, subsets=subsets)
    for e in range(epochs):
        for step in sampler.epoch(e):
            opt.zero_grad()
            out = batch(X[step.indices], in_dims=0, participating=step.participating)
            losses = batch.compute_loss(
                out, y[step.indices], F.cross_entropy, target_in_dims=0, mask=step.mask
            )
            losses.sum().backward()
            opt.step(mask=step.participating)

    for i, model in enumerate(references):
        ref_opt = torch.optim.SGD(model.parameters(), lr=lrs[i], momentum=0.9)
        gen = torch.Generator().manual_seed(seeds[i])
        loader = DataLoader(Subset(TensorDataset(X, y), subsets[i]), batch_size, shuffle=True, generator=gen)
        for _ in range(epochs):
            for xb, yb in loader:
                ref_opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                ref_opt.step()
        packed = batch.member(i)
        for (name, p), q in zip(model.named_parameters(), packed.parameters()):
            scale = p.detach().abs().max()
            assert torch.allclose(q, p, rtol=0, atol=1e-10 * float(scale)), (i, name)
            assert not torch.equal(p, seeded(MLP, i).double().get_parameter(name))  # it trained


def _loader_batches(n, batch_size, seed, epochs, subset=None, drop_last=False):
    data = torch.arange(n)
    dataset = data if subset is None else torch.utils.data.Subset(data, subset)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
    )
    return [b.tolist() for _ in range(epochs) for b in loader]


@pytest.mark.parametrize("drop_last", [False, True])
def test_member_streams_follow_each_members_dataloader_from_when_it_joins(drop_last) -> None:
    n, b = 23, 5
    streams = mb.data.MemberStreams(n, n_slots=3, batch_size=b, drop_last=drop_last)
    subset = torch.tensor([1, 4, 6, 7, 9, 11, 12, 15, 20])
    streams.reset_member(0, seed=3)
    got = {0: [], 1: [], 2: []}
    for t in range(20):
        if t == 4:
            streams.reset_member(2, seed=8, subset=subset)  # joins mid-way, its own epoch 0
        if t == 9:
            streams.reset_member(1, seed=5)
        step = streams.next_step()
        for slot in range(3):
            if step.participating[slot]:
                row = step.indices[slot]
                got[slot].append(row[step.mask[slot]].tolist() if step.mask is not None else row.tolist())
    assert got[0] == _loader_batches(n, b, 3, 5, drop_last=drop_last)[:20]
    assert got[2] == _loader_batches(n, b, 8, 20, subset.tolist(), drop_last)[:16]
    assert got[1] == _loader_batches(n, b, 5, 5, drop_last=drop_last)[:11]


def test_member_streams_state_moves_a_member_to_another_slot() -> None:
    a = mb.data.MemberStreams(17, n_slots=2, batch_size=4)
    a.reset_member(1, seed=11)
    for _ in range(6):
        a.next_step()
    saved = a.member_state_dict(1)
    b = mb.data.MemberStreams(17, n_slots=3, batch_size=4)
    b.load_member_state_dict(2, saved)
    for _ in range(8):
        sa, sb = a.next_step(), b.next_step()
        assert torch.equal(sa.indices[1], sb.indices[2])
    assert b.next_step().participating.tolist() == [False, False, True]


REFUSED_STREAMS_CALLS = {  # id: (call, error)
    "reset_member with a seed torch cannot take": (
        lambda s, saved: s.reset_member(0, seed=2**70),
        ValueError,
    ),
    "remove a slot out of range": (lambda s, saved: s.remove(3), IndexError),
    "load_member_state_dict: a generator state that is not one": (
        lambda s, saved: s.load_member_state_dict(
            0, {**saved, "epoch_start": torch.zeros(3, dtype=torch.uint8)}
        ),
        ValueError,
    ),
    "load_member_state_dict: a key missing": (
        lambda s, saved: s.load_member_state_dict(0, _without(saved, "epoch")),
        ValueError,
    ),
    "load_member_state_dict: a position past the epoch": (
        lambda s, saved: s.load_member_state_dict(0, {**saved, "position": 99}),
        ValueError,
    ),
}


@pytest.mark.parametrize("call, error", REFUSED_STREAMS_CALLS.values(), ids=REFUSED_STREAMS_CALLS.keys())
def test_a_refused_call_leaves_the_member_streams_as_they_were(call, error) -> None:
    streams = mb.data.MemberStreams(17, n_slots=2, batch_size=4)
    streams.reset_member(0, seed=3, subset=torch.arange(2, 15))
    streams.reset_member(1, seed=11)
    for _ in range(3):
        streams.next_step()
    saved = streams.member_state_dict(1)
    untouched = copy.deepcopy(streams)
    before = [streams.member_state_dict(slot) for slot in range(2)]
    with pytest.raises(error):
        call(streams, saved)
    assert _same([streams.member_state_dict(slot) for slot in range(2)], before)
    assert all(_steps_equal(streams.next_step(), untouched.next_step()) for _ in range(10))
