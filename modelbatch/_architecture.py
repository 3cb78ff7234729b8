"""What makes two models pack-compatible: the same class, tensors and module settings.

A pack runs every member through ONE copy of the modules (the first model's), with each
member's own tensors. Plain settings stored on modules — ``LeakyReLU``'s slope,
``BatchNorm``'s ``eps``/``momentum``, a float dropout rate a module passes to ``F.dropout``
— are therefore shared by the whole pack, so models that differ in one of them must not share
a pack. The rate ``p`` of a dropout module (``nn.Dropout`` and its kin) is the exception: a
pack holds it per member (:mod:`modelbatch._dropout`), so it is not a setting here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_PLAIN = (bool, int, float, str, type(None))


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def module_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module path: {attribute: value}}`` of every submodule's plain public settings.

    Plain means ``bool``/``int``/``float``/``str``/``None`` or tuples and lists of them;
    ``training`` is left out (``train()``/``eval()`` switch it for the whole pack), and so is a
    dropout module's ``p`` (a per-member value in a pack).

    Example:
        >>> from torch import nn
        >>> module_settings(nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.25)))["1"]
        {'inplace': False}
    """
    settings = {}
    for path, module in model.named_modules():
        per_member = ("p",) if isinstance(module, nn.modules.dropout._DropoutNd) else ()
        settings[path] = {
            key: value
            for key, value in sorted(vars(module).items())
            if not key.startswith("_") and key not in ("training", *per_member) and _plain(value)
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
