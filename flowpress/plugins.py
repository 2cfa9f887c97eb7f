"""What a recipe names as 'module.path:Name' (an evaluator class, a peer function), imported."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from flowpress.errors import FlowpressError


def import_named(reference: str, where: str, kind: str) -> Any:
    """The object `reference` ('module.path:Name') names; a module resolves from the working
    directory too, as under `python -m`.  A wrong reference is one line naming `where`."""
    module_name, _, name = reference.partition(":")
    if not name:
        raise FlowpressError(f"{where}: {reference!r} must be 'module.path:{kind}'")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise FlowpressError(
            f"{where}: cannot import {module_name!r} ({err}); run from the repository root or install it"
        ) from None
    found = getattr(module, name, None)
    if found is None:
        raise FlowpressError(f"{where}: {module_name} has no {kind.lower()} {name!r}")
    return found
