"""flowpress: compress diffusion / rectified-flow image models into engines validated against the
full-precision trajectory, step by step.  `flowpress.quantize(recipe)` returns a Run."""

from typing import Any

__all__ = ["Run", "compare", "load_run", "quantize"]


def __getattr__(name: str) -> Any:  # the API loads torch & co. on first use, not on `import flowpress`
    if name in __all__:
        import importlib

        return getattr(importlib.import_module("flowpress.api"), name)
    raise AttributeError(f"module 'flowpress' has no attribute {name!r}")
