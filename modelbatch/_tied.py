"""Tied (shared) parameters and buffers: one tensor reachable under several names.

GPT-2's ``lm_head.weight`` *is* ``transformer.wte.weight``. ``named_parameters()`` lists such a
tensor once (under its first name), ``state_dict()`` under every name. A pack keeps the tie per
member: one stacked leaf, every name's slot holding that same leaf. ``.to("meta")``,
``to_empty()`` and ``load_state_dict(assign=True)`` replace slots one by one and break ties, so
each of them is followed by :func:`retie`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

Aliases = dict[str, list[str]]


def tied_names(module: nn.Module) -> tuple[Aliases, Aliases]:
    """``(parameters, buffers)``: each shared tensor's first name -> its other names.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
        >>> net[1].weight = net[0].weight
        >>> tied_names(net)
        ({'0.weight': ['1.weight']}, {})
    """
    return (
        _group(module.named_parameters(remove_duplicate=False)),
        _group(module.named_buffers(remove_duplicate=False)),
    )


def _group(named: Iterator[tuple[str, torch.Tensor]]) -> Aliases:
    first: dict[int, str] = {}
    aliases: Aliases = {}
    for name, tensor in named:
        canonical = first.setdefault(id(tensor), name)
        if canonical != name:
            aliases.setdefault(canonical, []).append(name)
    return aliases


def _slot(module: nn.Module, name: str, is_param: bool) -> tuple[dict, str]:
    owner, _, leaf = name.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    return (sub._parameters if is_param else sub._buffers), leaf


def set_tensor(module: nn.Module, name: str, value: torch.Tensor | None, is_param: bool) -> None:
    """Put ``value`` into the parameter or buffer slot ``name`` (dotted path) of ``module``."""
    table, leaf = _slot(module, name, is_param)
    table[leaf] = value


def get_tensor(module: nn.Module, name: str, is_param: bool) -> torch.Tensor | None:
    """The tensor in the parameter or buffer slot ``name`` (dotted path) of ``module``."""
    table, leaf = _slot(module, name, is_param)
    return table[leaf]


def retie(module: nn.Module, aliases: tuple[Aliases, Aliases]) -> nn.Module:
    """Make every alias slot hold its first name's tensor again (in place); returns ``module``."""
    for is_param, table in ((True, aliases[0]), (False, aliases[1])):
        for canonical, others in table.items():
            value = get_tensor(module, canonical, is_param)
            for other in others:
                set_tensor(module, other, value, is_param)
    return module
