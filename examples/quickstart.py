"""Quickstart: a learning-rate sweep of MLPs on scikit-learn's digits, trained as one ModelBatch pack.

Every member is a 64-128-10 MLP with dropout, with its own initialisation (seed), its own learning
rate (log-spaced over 1e-4..3e-2), its own AdamW state and its own shuffle order of the training
set: at each step the pack gathers a ``[N, B, 64]`` batch (row ``i`` drawn from member ``i``'s
permutation) and runs ``batch(xb, in_dims=0)``. At the end the best member is taken out with
``batch.member(i)`` and checked to give the same validation accuracy on its own.

Run from the repository root after ``pip install -e .`` (about 30 CPU-seconds; 1 min on a busy 2-core CPU):
    python examples/quickstart.py
    python examples/quickstart.py --members 64 --epochs 20 --seed 1
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import modelbatch as mb

BATCH_SIZE = 64
VAL_FRACTION = 0.2
LR_RANGE = (1e-4, 3e-2)


def make_mlp(seed: int) -> nn.Module:
    """A 64-128-10 MLP with dropout, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))


def load_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1], split into train and validation sets by a seeded permutation."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(y) * VAL_FRACTION)
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def log_spaced(low: float, high: float, n: int) -> list[float]:
    """``n`` values from ``low`` to ``high``, evenly spaced in log scale."""
    return torch.logspace(math.log10(low), math.log10(high), n, dtype=torch.float64).tolist()


@torch.no_grad()
def evaluate(batch: mb.ModelBatch, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every member's validation loss and accuracy (``[N]`` each) on the shared set ``x, y``."""
    batch.eval()
    logits = batch(x)
    losses = batch.compute_loss(logits, y, F.cross_entropy, target_in_dims=None)
    accuracy = (logits.argmax(-1) == y).float().mean(1)
    batch.train()
    return losses.as_subclass(torch.Tensor), accuracy


def ranking(val_acc: torch.Tensor, val_loss: torch.Tensor) -> list[int]:
    """Member indices from best to worst: highest validation accuracy, then lowest validation loss."""
    return sorted(range(len(val_acc)), key=lambda i: (-float(val_acc[i]), float(val_loss[i])))


def train(members: int, epochs: int, seed: int) -> None:
    x_train, y_train, x_val, y_val = load_split(seed)
    lrs = log_spaced(*LR_RANGE, members)
    batch = mb.ModelBatch([make_mlp(seed * 10_000 + i) for i in range(members)])
    opt = mb.optim.AdamW(batch, lr=lrs, weight_decay=1e-2)
    shufflers = [torch.Generator().manual_seed(seed * 10_000 + i) for i in range(members)]
    n_train = len(y_train)
    print(f"{members} MLPs, {n_train} train / {len(y_val)} val digits, lr {LR_RANGE[0]:g}..{LR_RANGE[1]:g}")

    batch.train()
    for epoch in range(1, epochs + 1):
        perms = torch.stack([torch.randperm(n_train, generator=g) for g in shufflers])  # [N, n_train]
        loss_sum = torch.zeros(members)
        n_steps = 0
        for start in range(0, n_train, BATCH_SIZE):
            idx = perms[:, start : start + BATCH_SIZE]  # [N, B]: each member's own mini-batch
            losses = batch.compute_loss(
                batch(x_train[idx], in_dims=0), y_train[idx], F.cross_entropy, target_in_dims=0
            )
            opt.zero_grad()
            losses.sum().backward()
            opt.step()
            loss_sum += losses.detach()
            n_steps += 1
        train_loss = loss_sum / n_steps
        val_loss, val_acc = evaluate(batch, x_val, y_val)
        ranked = ranking(val_acc, val_loss)
        best = ranked[0]
        print(
            f"epoch {epoch:3d}/{epochs}  train loss {train_loss.min():.4f}..{train_loss.max():.4f}  "
            f"best: member {best} (lr {lrs[best]:.2e}) val acc {val_acc[best]:.4f} "
            f"val loss {val_loss[best]:.4f}"
        )

    print(f"\n{'member':>6} {'lr':>9} {'train loss':>10} {'val loss':>9} {'val acc':>8}")
    for i in ranked:
        print(f"{i:6d} {lrs[i]:9.2e} {train_loss[i]:10.4f} {val_loss[i]:9.4f} {val_acc[i]:8.4f}")
    print(f"\nbest member: {best} (lr {lrs[best]:.2e}), val acc {val_acc[best]:.4f}")

    model = batch.member(best).eval()
    with torch.no_grad():
        standalone_logits = model(x_val)
        pack_logits = batch.eval()(x_val)[best]
    standalone_acc = float((standalone_logits.argmax(-1) == y_val).float().mean())
    assert torch.allclose(standalone_logits, pack_logits, rtol=1e-5, atol=1e-5), "member(i) logits differ"
    assert standalone_acc == float(val_acc[best]), (
        f"standalone acc {standalone_acc} != {float(val_acc[best])}"
    )
    print(f"batch.member({best}) standalone: val acc {standalone_acc:.4f} (same as in the pack)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=32, help="number of MLPs in the pack (default 32)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the split, inits and shuffles (default 0)"
    )
    args = parser.parse_args()
    if args.members < 1 or args.epochs < 1:
        parser.error("--members and --epochs must be at least 1")
    train(args.members, args.epochs, args.seed)


if __name__ == "__main__":
    main()
