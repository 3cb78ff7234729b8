"""A learning-rate sweep trained as one pack by a PyTorch Lightning Trainer.

Five small MLPs (one per learning rate) learn a synthetic 3-class problem together: one
``lightning.Trainer`` runs the pack (its loops, checkpoints and CSV logs), each member has its own
AdamW state and lr, logs ``val_loss/m<i>`` and ``val_acc/m<i>``, and leaves the pack when its
validation loss stops improving (``MemberEarlyStopping``). At the end each member's final
validation loss is printed and the best member is taken out as a plain ``nn.Module``.

Run from the repository root (a few CPU-seconds):
    python examples/lightning_pack.py --output-dir /tmp/lightning_pack
    python examples/lightning_pack.py --output-dir /tmp/lightning_pack --epochs 20 --members 8
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import modelbatch as mb
from modelbatch.lightning import MemberEarlyStopping, PackModule, RecipeDataModule


def make_data(seed: int, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Points in 8 dimensions labelled by which of 3 random centres is nearest."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 8, generator=g)
    x = torch.randn(n, 8, generator=g)
    return x, torch.cdist(x, centres).argmin(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="checkpoints, CSV logs, members")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    x, y = make_data(args.seed)
    split = len(y) * 3 // 4
    recipe = mb.Recipe(
        model=lambda cfg: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
        optimizer="adamw",
        loss=F.cross_entropy,
        train_data=(x[:split], y[:split]),
        val_data=(x[split:], y[split:]),
        batch_size=32,
        metrics={"acc": mb.metrics.accuracy},
        order="shared",
    )
    lrs = torch.logspace(math.log10(1e-3), math.log10(3e-1), args.members).tolist()
    configs = [{"lr": lr, "seed": args.seed + i} for i, lr in enumerate(lrs)]
    module = PackModule.from_recipe(recipe, configs)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        default_root_dir=args.output_dir,
        logger=CSVLogger(args.output_dir, name="logs"),
        callbacks=[MemberEarlyStopping("val_loss", patience=2)],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=RecipeDataModule(recipe))

    final = {i: float(trainer.callback_metrics.get(f"val_loss/m{i}", float("nan"))) for i in range(module.n)}
    for i, config in enumerate(configs):
        status = module.stopped.get(i, "trained to the end")
        print(f"member {i}: lr={config['lr']:.2e} val_loss={final[i]:.4f} ({status})")
    best = min(final, key=lambda i: final[i] if math.isfinite(final[i]) else math.inf)
    model = module.member(best).eval()
    with torch.no_grad():
        acc = float(mb.metrics.accuracy(model(x[split:]), y[split:]))
    module.save_members(args.output_dir / "members")
    print(f"best member {best}: lr={configs[best]['lr']:.2e} val_loss={final[best]:.4f} val_acc={acc:.3f}")


if __name__ == "__main__":
    main()
