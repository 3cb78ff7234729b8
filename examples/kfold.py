"""K-fold cross-validation of many configs as ONE pack: member = config x fold.

Six MLP configs (learning rate x weight decay) x 5 folds of scikit-learn's shipped digits data
train together as 30 members of one ModelBatch. Each member trains on its fold's training part
with its own shuffle order and is validated on its held-out fold; at the end every config's
validation accuracy is reported as mean ± std over its folds.

Run from the repository root after ``pip install -e ".[dev]"`` (about 20 s on 2 CPU cores):
    python examples/kfold.py
    python examples/kfold.py --folds 10 --reports 10
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import modelbatch as mb


def mlp(config: dict) -> nn.Module:
    return nn.Sequential(nn.Linear(64, config["hidden"]), nn.ReLU(), nn.Linear(config["hidden"], 10))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--reports", type=int, default=6)
    parser.add_argument("--steps-per-report", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    grid = [
        {"lr": lr, "weight_decay": wd, "hidden": 64}
        for lr, wd in itertools.product([3e-4, 1e-3, 3e-3], [0.0, 0.05])
    ]
    members = mb.data.kfold_members(grid, args.folds, n_samples=len(X), seed=args.seed)
    configs = [{**c, "seed": args.seed * 1000 + i} for i, c in enumerate(members.configs)]
    folds = {c["fold"]: (train, val) for c, train, val in zip(members.configs, members.train, members.val)}

    recipe = mb.Recipe(
        model=mlp,
        optimizer="adamw",
        loss=F.cross_entropy,
        train_data=(X, y),
        val_data=(X, y),  # each member is validated on its own held-out fold of the same data
        subset=lambda cfg: folds[cfg["fold"]][0],
        val_subset=lambda cfg: folds[cfg["fold"]][1],
        batch_size=32,
        steps_per_report=args.steps_per_report,
        metrics={"acc": mb.metrics.accuracy},
    )
    print(f"{len(grid)} configs x {args.folds} folds = {len(configs)} members in one pack")
    history = mb.fit(recipe, configs, reports=args.reports)

    final = history.sort_values("training_iteration").groupby("member").tail(1)
    summary = (
        final.groupby(["config/lr", "config/weight_decay"])["val_acc"]
        .agg(["mean", "std", "count"])
        .sort_values("mean", ascending=False)
    )
    print(f"\nvalidation accuracy over {args.folds} folds (mean ± std):")
    for (lr, wd), row in summary.iterrows():
        score = f"{row['mean']:.4f} ± {row['std']:.4f}"
        print(f"  lr={lr:<7g} weight_decay={wd:<5g} {score}  ({int(row['count'])} folds)")
    (lr, wd), best = summary.index[0], summary.iloc[0]
    print(f"\nbest config: lr={lr:g}, weight_decay={wd:g}: {best['mean']:.4f} ± {best['std']:.4f}")


if __name__ == "__main__":
    main()
