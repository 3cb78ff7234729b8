"""Deprecated names: an old keyword, attribute or method works one more release, with a FutureWarning."""

from __future__ import annotations

import warnings
from typing import Any


def warn_renamed(api: str, old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` (as the user writes it: ``"capacity="``, ``"member_state()"``) is now ``new``."""
    warnings.warn(
        f"{api}: {old} is deprecated, use {new} (same meaning); it will be removed in the next release.",
        FutureWarning,
        stacklevel=stacklevel,
    )


def renamed_kwarg(api: str, old: str, new: str, old_value: Any, new_value: Any) -> Any:
    """The value of keyword ``new``, or of its deprecated name ``old`` with a FutureWarning.

    ``None`` means not passed; passing both raises a ``ValueError``.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     renamed_kwarg("mb.fit", "capacity", "n_slots", 4, None)
        4
        >>> print(caught[0].message)
        mb.fit: capacity= is deprecated, use n_slots= (same meaning); it will be removed in the next release.
    """
    if old_value is None:
        return new_value
    if new_value is not None:
        raise ValueError(
            f"{api}: got both {new}={new_value!r} and {old}={old_value!r}; pass only {new}= "
            f"({old}= is its deprecated name)."
        )
    warn_renamed(api, f"{old}=", f"{new}=", stacklevel=4)
    return old_value
