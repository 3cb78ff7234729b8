"""mb.Recipe with a map-style Dataset: streamed through a DataLoader, exactly as with in-memory tensors."""

from __future__ import annotations

import pickle

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from recipes import small_recipe
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import modelbatch as mb
from tune_integration._packs import Packs, auto_slots, load_member_state

N_TRAIN, N_VAL, FEATURES, CLASSES = 45, 20, 6, 3  # 45 % 8 != 0: short last batches (masks)
STEPS, REPORTS = 7, 3


class Formula(Dataset):
    """Samples computed from their index (never stored); counts its fetches in this process."""

    def __init__(self, n: int, offset: int = 0) -> None:
        self.n, self.offset, self.calls = n, offset, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.calls += 1
        k = i + self.offset
        x = torch.sin(0.37 * (k + 1) * torch.arange(1, FEATURES + 1, dtype=torch.float64) + k)
        return x, (7 * k + k // 5) % CLASSES


def as_tensors(data: Formula) -> tuple[torch.Tensor, torch.Tensor]:
    items = [data[i] for i in range(len(data))]
    data.calls = 0
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_net(cfg) -> nn.Module:  # module level: the recipe pickles
    return Net()


def recipe(train, val, **kw) -> mb.Recipe:
    settings = dict(
        model=make_net,
        train_data=train,
        val_data=val,
        batch_size=8,
        steps_per_report=STEPS,
        metrics={"acc": mb.metrics.accuracy},
        backend="vmap",  # bitwise comparisons between runs need one backend
    )
    return small_recipe(**{**settings, **kw})


CONFIGS = [{"lr": 3e-3 * (i + 1), "seed": 20 + i} for i in range(4)]


def fit(r: mb.Recipe, configs=CONFIGS, **kw) -> pd.DataFrame:
    return mb.fit(r, configs, reports=REPORTS, progress=False, **kw)


def assert_same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Every row and column equal, bit for bit (float64)."""
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=True)


def expected_train_fetches(n_members: int, seeds: list[int], steps: int) -> int:
    """Sum over steps of the union of the members' indices: what the loader must fetch."""
    streams = mb.data.MemberStreams(N_TRAIN, n_members, 8)
    for slot, seed in enumerate(seeds):
        streams.reset_member(slot, seed=seed)
    return sum(torch.unique(streams.next_step().indices).numel() for _ in range(steps))


def test_fit_with_a_dataset_equals_fit_with_tensors_and_fetches_each_steps_union_once() -> None:
    train, val = Formula(N_TRAIN), Formula(N_VAL, offset=1000)
    tensors = recipe(as_tensors(train), as_tensors(val))
    streamed = recipe(train, val)
    assert (train.calls, val.calls) == (1, 1)  # the recipe checks the first item
    assert_same(fit(streamed), fit(tensors))
    union = expected_train_fetches(len(CONFIGS), [c["seed"] for c in CONFIGS], STEPS * REPORTS)
    assert union < len(CONFIGS) * 8 * STEPS * REPORTS  # members share samples: fetched once per step
    assert train.calls == 1 + union
    assert val.calls == 1 + REPORTS * N_VAL


def test_tensor_dataset_equals_tensors_and_is_cast_to_the_recipe_dtype() -> None:
    X, Y = as_tensors(Formula(N_TRAIN))
    XV, YV = as_tensors(Formula(N_VAL, offset=1000))
    X, XV = X.float(), XV.float()  # cast to float64 by the pack in both cases
    assert_same(
        fit(recipe(TensorDataset(X, Y), TensorDataset(XV, YV))),
        fit(recipe((X, Y), (XV, YV))),
    )


def test_member_from_a_dataset_equals_plain_torch_training_alone() -> None:
    """Reference: the model under its seed, a seeded shuffling DataLoader over the dataset, torch.optim."""
    train, val = Formula(N_TRAIN), Formula(N_VAL, offset=1000)
    r = recipe(train, val, optimizer="sgd", optimizer_defaults={"momentum": 0.9, "nesterov": True})
    history = fit(r)
    cfg = CONFIGS[2]
    torch.manual_seed(cfg["seed"])
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9, nesterov=True)
    loader = DataLoader(
        train, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(cfg["seed"])
    )
    batches = (b for _ in range(100) for b in loader)
    val_loader = DataLoader(val, batch_size=N_VAL)
    losses, val_losses, val_accs = [], [], []
    for _ in range(REPORTS):
        train_losses = []
        for _ in range(STEPS):
            xb, yb = next(batches)
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            train_losses.append(loss.item())
        losses.append(sum(train_losses) / STEPS)
        with torch.no_grad():
            (xv, yv) = next(iter(val_loader))
            val_losses.append(float(F.cross_entropy(model(xv), yv)))
            val_accs.append(float(mb.metrics.accuracy(model(xv), yv)))
    got = history[history["member"] == 2]
    for column, want in (("loss", losses), ("val_loss", val_losses), ("val_acc", val_accs)):
        torch.testing.assert_close(torch.tensor(got[column].tolist()), torch.tensor(want), rtol=1e-10, atol=0)


def test_loader_workers_give_the_same_result_as_loading_in_process() -> None:
    train, val = Formula(N_TRAIN), Formula(N_VAL, offset=1000)
    in_process = fit(recipe(train, val), n_slots=2)  # waves: members join and leave between reports
    train.calls = val.calls = 0
    workers = recipe(train, val, num_workers=2, loader_kwargs={"prefetch_factor": 3})
    assert_same(fit(workers, n_slots=2), in_process)
    assert (train.calls, val.calls) == (1, 1)  # only the recipe's check: the workers fetched the rest
    tensors = recipe(as_tensors(train), as_tensors(val))
    assert_same(fit(tensors, n_slots=2), in_process)


def kfold_subset(cfg):
    return torch.arange(N_TRAIN)[torch.arange(N_TRAIN) % 3 != cfg["fold"]]


def kfold_val_subset(cfg):
    return torch.arange(N_TRAIN)[torch.arange(N_TRAIN) % 3 == cfg["fold"]]


def bootstrap_subset(cfg):
    return mb.data.bootstrap(N_TRAIN, 1, seeds=cfg["seed"])[0]


@pytest.mark.parametrize(
    "options",
    [
        {"subset": kfold_subset, "val_subset": kfold_val_subset, "same_val": True},
        {"subset": bootstrap_subset, "order": "shared"},
        {"subset": bootstrap_subset, "val_subset": kfold_val_subset, "same_val": True, "num_workers": 1},
    ],
    ids=["kfold", "bootstrap-shared-order", "bootstrap-val-subset-workers"],
)
def test_subsets_and_order_with_a_dataset_equal_tensors(options) -> None:
    options = dict(options)
    same_val = options.pop("same_val", False)
    train = Formula(N_TRAIN)
    val = train if same_val else Formula(N_VAL, offset=1000)
    configs = [{**c, "fold": i % 3} for i, c in enumerate(CONFIGS)]
    tensors = as_tensors(train)
    val_tensors = tensors if same_val else as_tensors(val)
    tensor_options = {k: v for k, v in options.items() if k != "num_workers"}
    want = fit(recipe(tensors, val_tensors, **tensor_options), configs)
    assert_same(fit(recipe(train, val, **options), configs), want)


def test_validation_streams_in_chunks_and_equals_one_pass() -> None:
    train, val = Formula(N_TRAIN), Formula(N_VAL, offset=1000)
    trainer = mb.PackTrainer(recipe(train, val), n_slots=2, example_config=CONFIGS[0])
    trainer.add(0, CONFIGS[0])
    trainer.add(1, CONFIGS[1])
    trainer.train_report()
    val.calls = 0
    whole, chunked = trainer.evaluate(), trainer.evaluate(chunk=6)  # 20 = 6 + 6 + 6 + 2
    assert val.calls == 2 * N_VAL
    for name in whole:
        torch.testing.assert_close(torch.tensor(chunked[name]), torch.tensor(whole[name]), rtol=1e-12, atol=0)


def test_slot_server_packs_train_a_dataset_recipe_exactly_and_resume_from_checkpoints() -> None:
    train, val = Formula(N_TRAIN), Formula(N_VAL, offset=1000)
    r = recipe(train, val, num_workers=1)
    r = pickle.loads(pickle.dumps(r))  # Ray ships the recipe to the servers
    assert isinstance(r.train_data, Formula)
    want = fit(recipe(as_tensors(train), as_tensors(val)), CONFIGS[:2])
    packs = Packs(r, slots=2, reports=REPORTS)
    pid = packs.join("a", dict(CONFIGS[0]), None)
    assert packs.join("b", dict(CONFIGS[1]), None) == pid
    got = {"a": [], "b": []}
    for report in range(REPORTS):
        for member, reply in packs.train(pid, {}).items():
            got[member].append(reply["result"])
            if member == "b" and report == 0:  # b restarts from its checkpoint elsewhere in the pack
                blob = reply["checkpoint"]
        if report == 0:
            packs.leave("b")
            assert load_member_state(blob)["slot_state"].iteration == 1
            packs.join("b", dict(CONFIGS[1]), blob)
    for i, member in enumerate("ab"):
        rows = want[want["member"] == i]
        for column in ("loss", "val_loss", "val_acc"):
            assert [res[column] for res in got[member]] == rows[column].tolist()
    assert auto_slots(r, CONFIGS[:1], torch.device("cpu")) >= 1


class Triples(Formula):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x, y, i


class Stream(IterableDataset):
    def __iter__(self):
        return iter([(torch.zeros(FEATURES), 0)])


class NoGetItem:
    def __len__(self) -> int:
        return 3


X_OK = as_tensors(Formula(N_TRAIN))
BAD = [
    ("item not a pair", {"train_data": Triples(N_TRAIN)}, TypeError,
     r"^mb\.Recipe: train_data\[0\] is a tuple of length 3; train_data must be a pair \(X, y\) of tensors.*"
     r"or a map-style torch\.utils\.data\.Dataset"),
    ("item a tensor", {"val_data": TensorDataset(torch.zeros(5, FEATURES))}, TypeError,
     r"^mb\.Recipe: val_data\[0\] is a tuple of length 1; val_data must be"),
    ("iterable dataset", {"train_data": Stream()}, TypeError,
     r"^mb\.Recipe: train_data is an IterableDataset \(Stream\); .* must be a pair \(X, y\) .*map-style"),
    ("no __getitem__", {"train_data": NoGetItem()}, TypeError,
     r"^mb\.Recipe: train_data must be a pair \(X, y\) of tensors .*map-style torch\.utils\.data\.Dataset"),
    ("empty dataset", {"train_data": Formula(0)}, ValueError, r"^mb\.Recipe: train_data is empty"),
    ("loader decides batches", {"loader_kwargs": {"batch_size": 4}}, ValueError,
     r"^mb\.Recipe: loader_kwargs sets \['batch_size'\]; batches and order come from each member's seed"),
    ("loader kwargs not a dict", {"loader_kwargs": [("prefetch_factor", 2)]}, TypeError,
     r"^mb\.Recipe: loader_kwargs must be a dict of DataLoader arguments"),
    ("negative workers", {"num_workers": -1}, ValueError,
     r"^mb\.Recipe: num_workers must be an int >= 0, got -1"),
    ("pin_memory a string", {"pin_memory": "yes"}, TypeError,
     r"^mb\.Recipe: pin_memory must be True, False or None"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "change", "exc", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_dataset_raises_a_clear_error(case, change, exc, message) -> None:
    with pytest.raises(exc, match=message):
        recipe(Formula(N_TRAIN), None, **change)


def test_pickled_dataset_recipe_trains_like_the_original() -> None:
    r = recipe(Formula(N_TRAIN), Formula(N_VAL, offset=1000), num_workers=1)
    copy = pickle.loads(pickle.dumps(r))
    assert copy.num_workers == 1 and copy.train_data is not r.train_data
    assert_same(fit(copy, CONFIGS[:2]), fit(r, CONFIGS[:2]))
