"""Content fingerprints of recipes: two recipes with the same fingerprint train every config the same.

Used to let members of different sweeps (of different users) share one pack when their recipes are
the same training problem. A fingerprint is a SHA-256 over what a value *does*, not where it was
defined: tensors by dtype, shape and bytes; a function by its bytecode, constants, defaults, closure
and the globals it names (recursively), not its file or line numbers, so that the same code run
from two users' scripts matches; library code (the standard library, installed packages) by its
qualified name and the package's version. A value that cannot be fingerprinted with confidence (an
unknown extension object, a generator) makes the whole fingerprint ``None``: no sharing, never a
false match.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import sys
import sysconfig
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


class Unfingerprintable(TypeError):
    """A value whose behaviour a fingerprint cannot capture."""


def fingerprint(value: Any) -> str | None:
    """The hex SHA-256 fingerprint of ``value`` (``None``: it holds something that cannot be captured).

    Example:
        >>> import torch
        >>> a = {"data": torch.arange(3.0), "loss": torch.nn.functional.mse_loss, "lr": 0.1}
        >>> b = {"data": torch.arange(3.0), "loss": torch.nn.functional.mse_loss, "lr": 0.1}
        >>> fingerprint(a) == fingerprint(b), fingerprint(a) == fingerprint({**a, "lr": 0.2})
        (True, False)
        >>> fingerprint((x for x in range(3))) is None
        True
    """
    digest = hashlib.sha256()
    try:
        _Hasher(digest).feed(value)
    except (Unfingerprintable, RecursionError):
        return None
    return digest.hexdigest()


@functools.cache
def _library_roots() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(Path(p).resolve() for p in roots)


def _library_module(name: str | None) -> str | None:
    """``package==version`` when module ``name`` is installed library code (not a user's file)."""
    module = sys.modules.get(name or "")
    if module is None:
        return None
    file = getattr(module, "__file__", None)
    if file is None:  # built in
        return name
    path = Path(file).resolve()
    if not any(root in path.parents for root in _library_roots()):
        return None
    top = sys.modules.get(name.split(".", 1)[0])
    return f"{name}=={getattr(top, '__version__', '')}"


class _Hasher:
    def __init__(self, digest: Any) -> None:
        self.digest = digest
        self.active: set[int] = set()  # functions and classes being fed (cycles: a name only)

    def put(self, *parts: Any) -> None:
        for part in parts:
            data = part if isinstance(part, bytes) else str(part).encode()
            self.digest.update(len(data).to_bytes(8, "little") + data)

    def feed(self, value: Any) -> None:
        if value is None or isinstance(value, (bool, int, str, bytes)):
            self.put(type(value).__name__, value)
        elif isinstance(value, float):
            self.put("float", value.hex() if math.isfinite(value) else repr(value))
        elif isinstance(value, (torch.dtype, torch.device, torch.Size, range, slice, complex)):
            self.put(type(value).__name__, value)
        elif isinstance(value, torch.Tensor):
            self.tensor(value)
        elif hasattr(value, "__array_interface__") and hasattr(value, "tobytes"):  # numpy
            self.put("array", value.dtype, value.shape, value.tobytes())
        elif isinstance(value, (tuple, list)):
            self.put(type(value).__name__, len(value))
            for item in value:
                self.feed(item)
        elif isinstance(value, (set, frozenset)):
            self.put("set", *sorted(fingerprint(v) or "?" for v in value))
        elif isinstance(value, Mapping):
            self.put("map", len(value))
            for key in sorted(value, key=repr):
                self.feed(key)
                self.feed(value[key])
        elif isinstance(value, types.ModuleType):
            self.put("module", value.__name__)
        elif isinstance(value, functools.partial):
            self.put("partial")
            self.feed((value.func, value.args, value.keywords))
        elif isinstance(value, types.MethodType):
            self.put("method")
            self.feed((value.__func__, value.__self__))
        elif isinstance(value, types.FunctionType):
            self.function(value)
        elif isinstance(value, type):
            self.cls(value)
        elif isinstance(
            value, (types.BuiltinFunctionType, types.MethodWrapperType, types.WrapperDescriptorType)
        ):
            self.put(
                "builtin", getattr(value, "__module__", None), getattr(value, "__qualname__", repr(value))
            )
        elif dataclasses.is_dataclass(value) or hasattr(value, "__dict__"):
            self.instance(value)
        else:
            raise Unfingerprintable(type(value).__qualname__)

    def tensor(self, t: torch.Tensor) -> None:
        t = t.detach()
        if t.is_sparse or t.device.type == "meta":
            raise Unfingerprintable("sparse or meta tensor")
        flat = t.cpu().contiguous().reshape(-1)
        self.put("tensor", t.dtype, tuple(t.shape))
        self.put(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")

    def enter(self, kind: str, obj: Any) -> bool:
        """Feed library code and a cycle by name (``False``); else mark ``obj`` active (``True``: feed
        its content, then ``self.active.discard(id(obj))``)."""
        library = _library_module(obj.__module__)
        if library is not None:
            self.put(f"lib{kind}", library, obj.__qualname__)
            return False
        if id(obj) in self.active:
            self.put("cycle", obj.__qualname__)
            return False
        self.active.add(id(obj))
        self.put(kind, obj.__qualname__)
        return True

    def function(self, fn: types.FunctionType) -> None:
        if not self.enter("fn", fn):
            return
        try:
            self.code(fn.__code__)
            self.feed((fn.__defaults__, fn.__kwdefaults__))
            self.feed([cell.cell_contents for cell in fn.__closure__ or ()])
            for name in sorted(_global_names(fn.__code__)):
                if name in fn.__globals__:
                    self.put("global", name)
                    self.feed(fn.__globals__[name])
        finally:
            self.active.discard(id(fn))

    def code(self, code: types.CodeType) -> None:
        self.put(
            "code", code.co_code, code.co_argcount, code.co_kwonlyargcount, code.co_flags, *code.co_names
        )
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                self.code(const)
            else:
                self.feed(const)

    def cls(self, cls: type) -> None:
        if not self.enter("cls", cls):
            return
        try:
            self.feed(list(cls.__bases__))
            own = {
                k: v
                for k, v in vars(cls).items()
                if k not in _CLASS_BOOKKEEPING and not k.startswith("_abc_")
            }
            for name in sorted(own):
                self.put("attr", name)
                value = own[name]
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                elif isinstance(value, property):
                    value = (value.fget, value.fset, value.fdel)
                elif isinstance(value, (types.GetSetDescriptorType, types.MemberDescriptorType)):
                    value = value.__name__
                self.feed(value)
        finally:
            self.active.discard(id(cls))

    def instance(self, obj: Any) -> None:
        if id(obj) in self.active:
            self.put("cycle", type(obj).__qualname__)
            return
        self.active.add(id(obj))
        try:
            self.put("obj")
            self.cls(type(obj))
            if dataclasses.is_dataclass(obj):
                self.feed({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
            else:
                self.feed(dict(vars(obj)))
        finally:
            self.active.discard(id(obj))


_CLASS_BOOKKEEPING = frozenset(
    ("__dict__", "__weakref__", "__module__", "__qualname__", "__annotations__", "__parameters__",
     "__orig_bases__", "__firstlineno__", "__static_attributes__")
)  # fmt: skip
"""Class attributes that do not change what its instances do."""


def _global_names(code: types.CodeType) -> set[str]:
    """Names a code object (and the code nested in it) may look up as globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names
