"""Optional dependencies (pyproject's extras), imported where they are used: a missing one is a
one-line FlowpressError naming the extra that installs it.  `make install` installs every extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from flowpress.errors import FlowpressError


def need(module: str, extra: str, what: str, instead: str | None = None) -> ModuleType:
    """`import module` for `what`, or one line naming flowpress[extra] (and `instead`, another way
    round it) when it is not installed or cannot be imported."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        parts = module.split(".")
        absent = err.name in {".".join(parts[: i + 1]) for i in range(len(parts))}
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        problem = "which is not installed" if absent else f"which cannot be imported ({reason})"
        raise FlowpressError(
            f"{what} needs {parts[0]}, {problem}: pip install 'flowpress[{extra}]' (make install installs every extra)"
            + (f"; or {instead}" if instead else "")
        ) from None
