"""What ``tune_integration`` may use of the engine beyond the public ``modelbatch`` API.

``tune_integration`` imports from ``modelbatch``, ``modelbatch.mlflow`` and this module only
(``tests/test_internal_api.py`` checks it); everything else in ``modelbatch._*`` may change
without it noticing. Not for users: the names here may change between releases.
"""

from ._architecture import (
    architecture_key,
    architecture_signature,
    build_model,
    config_signature,
    member_seed,
    pack_label,
)
from ._deprecated import warn_renamed
from ._hparams import check_positive_int
from ._recipe import OPTIMIZER_KEYS
from ._wandb import WandBWriter
from .data._source import example_batch

__all__ = [
    "OPTIMIZER_KEYS",
    "WandBWriter",
    "architecture_key",
    "architecture_signature",
    "build_model",
    "check_positive_int",
    "config_signature",
    "example_batch",
    "member_seed",
    "pack_label",
    "warn_renamed",
]
