"""Module settings (a slope, eps, ...) decide which models may share a pack; dropout rates do not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from recipes import small_recipe
from torch import nn

import modelbatch as mb
from modelbatch._architecture import architecture_signature, pack_label

torch.manual_seed(0)
X = torch.randn(64, 5, dtype=torch.float64)
Y = torch.randint(0, 3, (64,))


def net(dropout: float = 0.0, slope: float = 0.01) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.LeakyReLU(slope), nn.Dropout(dropout), nn.Linear(16, 3))


def test_models_differing_in_a_module_setting_cannot_share_a_pack() -> None:
    with pytest.raises(
        ValueError, match=r"ModelBatch: model 1 has 1\.negative_slope = 0\.2 \(model 0: 0\.01\)"
    ):
        mb.ModelBatch([net(slope=0.01), net(slope=0.2)])
    mb.ModelBatch([net(0.1), net(0.5)])  # a dropout module's rate is per member: one pack


def test_float_dropout_rates_a_module_keeps_for_f_dropout_share_a_pack() -> None:
    """A rate kept as a plain float (Hugging Face's attention_dropout) is per member; other floats are not."""

    class Net(nn.Module):
        def __init__(self, rate: float, scale: float = 1.0) -> None:
            super().__init__()
            self.lin, self.attention_dropout, self.scale = nn.Linear(5, 3), rate, scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(self.lin(x), self.attention_dropout, self.training) * self.scale

    assert mb.ModelBatch([Net(0.1), Net(0.3)]).dropout_rates == {"attention_dropout": [0.1, 0.3]}
    assert architecture_signature(Net(0.1)) == architecture_signature(Net(0.3))
    with pytest.raises(ValueError, match=r"ModelBatch: model 1 has scale = 2\.0 \(model 0: 1\.0\)"):
        mb.ModelBatch([Net(0.1), Net(0.1, scale=2.0)])
    with pytest.raises(ValueError, match=r"ModelBatch: model 1 has attention_dropout = 1\.5"):
        mb.ModelBatch([Net(0.1), Net(1.5)])  # not a rate in [0, 1]: a setting


def test_signature_and_pack_label_ignore_dropout_rates_and_train_mode() -> None:
    assert architecture_signature(net(0.1)) == architecture_signature(net(0.2))
    assert pack_label(architecture_signature(net(0.1))) == pack_label(architecture_signature(net(0.5)))
    assert architecture_signature(net(slope=0.1)) != architecture_signature(net(slope=0.2))
    assert architecture_signature(net(0.1)) == architecture_signature(net(0.1).eval())


def test_fit_packs_each_setting_apart_and_each_member_equals_its_run_alone() -> None:
    recipe = small_recipe(lambda cfg: net(slope=cfg["slope"]), (X, Y), val_data=(X, Y), backend="vmap")
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
