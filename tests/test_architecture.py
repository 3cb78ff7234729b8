"""Module settings (Dropout.p, eps, ...) decide which models may share a pack."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelbatch as mb
from modelbatch._trainer import architecture_signature

torch.manual_seed(0)
X = torch.randn(64, 5, dtype=torch.float64)
Y = torch.randint(0, 3, (64,))


def net(dropout: float = 0.0, slope: float = 0.01) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.LeakyReLU(slope), nn.Dropout(dropout), nn.Linear(16, 3))


def test_models_differing_in_a_module_setting_cannot_share_a_pack() -> None:
    with pytest.raises(ValueError, match=r"ModelBatch: model 1 has 2\.p = 0\.5 \(model 0: 0\.1\)"):
        mb.ModelBatch([net(0.1), net(0.5)])
    with pytest.raises(ValueError, match=r"1\.negative_slope = 0\.2"):
        mb.ModelBatch([net(slope=0.01), net(slope=0.2)])
    mb.ModelBatch([net(0.1), net(0.1)])  # equal settings, different weights: one pack


def test_signature_separates_settings_and_ignores_train_mode() -> None:
    assert architecture_signature(net(0.1)) != architecture_signature(net(0.2))
    assert architecture_signature(net(0.1)) == architecture_signature(net(0.1).eval())


def test_fit_packs_each_setting_apart_and_each_member_equals_its_run_alone() -> None:
    recipe = mb.Recipe(
        model=lambda cfg: net(slope=cfg["slope"]),
        optimizer="adam",
        loss=F.cross_entropy,
        train_data=(X, Y),
        val_data=(X, Y),
        batch_size=16,
        steps_per_report=4,
        dtype=torch.float64,
        device="cpu",
        backend="vmap",
    )
    configs = [{"slope": a, "lr": 1e-2, "seed": s} for s, a in enumerate([0.01, 0.3, 0.01, 0.3])]
    together = mb.fit(recipe, configs, reports=2, progress=False)
    for member, config in enumerate(configs):
        alone = mb.fit(recipe, [config], reports=2, progress=False)
        got = together[together["member"] == member]
        torch.testing.assert_close(
            torch.tensor(got["val_loss"].to_numpy()),
            torch.tensor(alone["val_loss"].to_numpy()),
            rtol=1e-12,
            atol=0,
        )
