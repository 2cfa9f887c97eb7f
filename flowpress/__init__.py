"""flowpress: compress diffusion / rectified-flow image models into engines validated against the
full-precision trajectory, step by step.  `flowpress.quantize(recipe)` returns a Run."""

from typing import Any

_API = {"Run": "api", "compare": "api", "load_run": "api", "quantize": "api", "load_pipeline": "dropin"}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:  # the API loads torch & co. on first use, not on `import flowpress`
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"flowpress.{_API[name]}"), name)
    raise AttributeError(f"module 'flowpress' has no attribute {name!r}")
