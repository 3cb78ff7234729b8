"""What one architecture is: the one place that builds a config's model and names its architecture.

Two models are pack-compatible when they have the same class, tensors and module settings:
:func:`architecture_signature` is that key, :func:`pack_label` its short name (the results'
``pack`` column), :func:`architecture_key` a config's label from a model built on the meta
device (:func:`model_shapes`). :func:`build_model` / :func:`build_seeded` build a member's model
from its seed (:func:`member_seed`) as a plain script would.

A pack runs every member through ONE copy of the modules (the first model's), with each
member's own tensors. Plain settings stored on modules — ``LeakyReLU``'s slope,
``BatchNorm``'s ``eps``/``momentum`` — are therefore shared by the whole pack, so models that
differ in one of them must not share a pack. Dropout rates are the exception: a pack holds the
rate ``p`` of a dropout module (``nn.Dropout`` and its kin) and every float rate a module keeps
for ``F.dropout`` / attention (Hugging Face's ``attention_dropout``; the rule is
:func:`modelbatch._dropout.is_rate_attribute`) per member, so they are not settings here.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._dropout import is_rate_attribute, rate_slots

if TYPE_CHECKING:
    from ._recipe import Recipe

_PLAIN = (bool, int, float, str, type(None))


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def module_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module path: {attribute: value}}`` of every submodule's plain public settings.

    Plain means ``bool``/``int``/``float``/``str``/``None`` or tuples and lists of them;
    ``training`` is left out (``train()``/``eval()`` switch it for the whole pack), and so are
    dropout rates (per-member values in a pack: :func:`modelbatch._dropout.is_rate_attribute`).

    Example:
        >>> from torch import nn
        >>> module_settings(nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.25)))["1"]
        {'inplace': False}
        >>> attention = nn.Module()
        >>> attention.attention_dropout, attention.scaling = 0.1, 0.5
        >>> module_settings(attention)[""]
        {'scaling': 0.5}
    """
    settings = {}
    for path, module in model.named_modules():
        settings[path] = {
            key: value
            for key, value in sorted(vars(module).items())
            if not key.startswith("_")
            and key != "training"
            and _plain(value)
            and not is_rate_attribute(module, key, value)
        }
    return settings


def first_setting_difference(a: nn.Module, b: nn.Module) -> str | None:
    """A description of the first module setting where ``b`` differs from ``a`` (``None``: none)."""
    sa, sb = module_settings(a), module_settings(b)
    for path in sorted(sa.keys() | sb.keys()):
        da, db = sa.get(path, {}), sb.get(path, {})
        for key in sorted(da.keys() | db.keys()):
            if da.get(key, "<absent>") != db.get(key, "<absent>"):
                where = f"{path}.{key}" if path else key
                return f"{where} = {db.get(key, '<absent>')!r} (model 0: {da.get(key, '<absent>')!r})"
    return None


def architecture_signature(model: nn.Module) -> str:
    """A key equal for models that can share a pack: class, tensor names and shapes, module settings.

    Module settings (``eps``, a slope, ...) are part of it: a pack runs every member through one
    copy of the modules, so configs that differ in one train in separate packs. Dropout rates
    are not (a pack holds them per member), only where they are: a rate that is a float in one
    config and ``None`` in another (BERT's ``classifier_dropout``) splits the pack.
    """
    shapes = [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in model.state_dict().items()]
    settings = repr(sorted(module_settings(model).items()))
    rates = ",".join(sorted(rate_slots(model)))  # where the per-member rates are, not their values
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    return f"{name}|" + ";".join(shapes) + "|" + settings + "|" + rates


def pack_label(signature: str) -> str:
    """A short readable name of an architecture signature: the results' ``pack`` column.

    The model class, the output sizes of its weight tensors and a hash of the whole signature
    (which tells apart architectures the readable part does not).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.2), nn.Linear(64, 10))
        >>> pack_label(architecture_signature(net))[:-8]
        'Sequential 64-10'
    """
    digest = hashlib.sha1(signature.encode()).hexdigest()[:6]
    name, _, rest = signature.partition("|")
    if not rest:
        return digest
    sizes = re.findall(r"weight:\((\d+)[,)]", rest.partition("|")[0])
    return " ".join(w for w in (name.rsplit(".", 1)[-1], "-".join(sizes), f"#{digest}") if w)


def member_seed(config: Mapping[str, Any], default: int, api: str) -> int:
    """The member's seed: ``config["seed"]`` when given, else ``default``.

    A seed that is no int raises, its message starting with ``api``: the public name the user
    called (``"mb.fit"``, ``"mb.PackTrainer.add"``, ``"ModelBatchSearcher"``, ...).
    """
    seed = config.get("seed", default)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"{api}: config seed must be an int, got {seed!r}.")
    return seed


def build_model(recipe: Recipe, config: Mapping[str, Any], seed: int, api: str = "mb.Recipe") -> nn.Module:
    """``recipe.model(config)`` under ``torch.manual_seed(seed)``, in the recipe's dtype.

    A factory that reads a key the config lacks, or returns no module, raises with ``api`` first.
    """
    return build_seeded(recipe, config, seed, api)[0]


def build_seeded(
    recipe: Recipe, config: Mapping[str, Any], seed: int, api: str = "mb.Recipe"
) -> tuple[nn.Module, torch.Tensor]:
    """:func:`build_model`, and the CPU generator's state after the factory ran.

    That state is where a plain script's ``torch.manual_seed(seed); model = factory(config)``
    leaves the global generator for its training loop: the member's dropout stream starts there.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = recipe.model(config)
        except KeyError as exc:
            key = exc.args[0] if len(exc.args) == 1 else None
            if not isinstance(key, (str, int)) or key in config:
                raise
            raise KeyError(
                f"{api}: the model factory reads cfg[{key!r}], which the config lacks (it has "
                f"{sorted(map(str, config))}). Add {key!r} to every config (or to the search space), "
                f"or read it with cfg.get({key!r}, default)."
            ) from exc
        state = torch.get_rng_state()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{api}: model(config) must return an nn.Module, got {type(model).__name__} "
            f"(config {dict(config)!r}). Return an instance, e.g. MyNet(cfg['hidden'])."
        )
    return model.to(recipe.dtype), state


def model_shapes(recipe: Recipe, config: Mapping[str, Any], seed: int) -> nn.Module:
    """The config's model on the meta device: its architecture without initializing weights.

    A factory that needs real tensors (an init that reads values) builds it as usual.
    """
    try:
        with torch.device("meta"):
            return build_model(recipe, config, seed)
    except Exception:
        return build_model(recipe, config, seed)


def config_signature(recipe: Recipe, config: Mapping[str, Any], seed: int | None = None, *, api: str) -> str:
    """The :func:`architecture_signature` of the config's model, built on the meta device where it can be.

    ``api``: the public name the user called, first in the message of a bad seed.
    """
    seed = member_seed(config, 0, api) if seed is None else seed
    return architecture_signature(model_shapes(recipe, config, seed))


def architecture_key(recipe: Recipe, config: Mapping[str, Any], *, api: str) -> str:
    """The :func:`pack_label` of the config's model: configs of one key train in one pack.

    Built once, on the meta device where it can be; a factory that rejects the config raises
    (a bad seed with ``api`` first: the public name the user called).

    Example:
        >>> import torch, modelbatch as mb
        >>> recipe = mb.Recipe(model=lambda cfg: torch.nn.Linear(4, cfg["out"]), optimizer="sgd",
        ...     loss=torch.nn.functional.mse_loss, train_data=(torch.randn(8, 4), torch.randn(8, 2)))
        >>> architecture_key(recipe, {"out": 2, "lr": 0.1}, api="mb.fit")[:-8]
        'Linear 2'
        >>> key = architecture_key(recipe, {"out": 2, "lr": 0.1}, api="mb.fit")
        >>> key == architecture_key(recipe, {"out": 2, "lr": 1.0}, api="mb.fit")
        True
    """
    return pack_label(config_signature(recipe, config, api=api))
