"""Recipe fingerprints: equal for the same training problem built anywhere, different otherwise."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tune_recipes import recipe

TESTS = Path(__file__).parent
# A recipe of its own, not tests/recipes.py's: each copy is a whole user's file whose model reads a
# global of that file, imported in another process.
SOURCE = """
import torch
import modelbatch as mb
WIDTH = {width}
def model(cfg):
    return torch.nn.Linear(2, WIDTH)
def recipe():
    X = torch.zeros(4, 2)
    return mb.Recipe(model=model, optimizer="sgd", loss=torch.nn.functional.mse_loss,
                     train_data=(X, torch.zeros(4, WIDTH)), batch_size=2)
"""
PRINT = """
import importlib, sys
sys.path[:0] = {paths!r}
for module in {modules!r}:
    print(module, importlib.import_module(module).recipe().fingerprint())
"""


@pytest.fixture(scope="module")
def other_process(tmp_path_factory) -> dict[str, str]:
    """Fingerprints computed in another process: the tests' recipe, a copy of its file under another
    name (another user's), and three small recipes whose model reads a global WIDTH (8, 8, 16)."""
    folder = tmp_path_factory.mktemp("users")
    shutil.copy(TESTS / "tune_recipes.py", folder / "alices_recipes.py")
    for name, width in (("eight", 8), ("also_eight", 8), ("sixteen", 16)):
        (folder / f"{name}.py").write_text(SOURCE.format(width=width))
    modules = ["tune_recipes", "alices_recipes", "eight", "also_eight", "sixteen"]
    code = PRINT.format(paths=[str(TESTS), str(folder)], modules=modules)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return dict(line.split() for line in out.stdout.splitlines() if line.split()[0] in modules)


def test_the_same_recipe_from_another_process_and_another_users_file_has_the_same_fingerprint(other_process):
    mine = recipe().fingerprint()
    assert mine is not None and len(mine) == 64
    assert other_process["tune_recipes"] == mine
    assert other_process["alices_recipes"] == mine


def test_a_different_training_problem_has_a_different_fingerprint():
    base = recipe().fingerprint()
    X, Y = recipe().train_data
    X2 = X.clone()
    X2[0, 0] += 1e-12
    changed = [
        recipe(train_data=(X2, Y)),
        recipe(batch_size=8),
        recipe(optimizer="adam"),
        recipe(loss=lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1)),
        recipe(optimizer_defaults={"weight_decay": 0.1}),
        recipe(dtype=torch.float32),
    ]
    prints = [r.fingerprint() for r in changed]
    assert None not in prints and base not in prints and len(set(prints)) == len(prints)


def test_a_global_that_the_model_reads_is_part_of_its_fingerprint(other_process):
    assert other_process["eight"] == other_process["also_eight"] != other_process["sixteen"]


def test_a_recipe_holding_something_it_cannot_capture_has_no_fingerprint():
    draws = iter(range(10))
    assert recipe(loss=lambda out, y: F.cross_entropy(out, y) * next(draws)).fingerprint() is None
