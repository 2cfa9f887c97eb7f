"""One backend per precision, found by the type of its config (torchao's `quantize_(model, Config)`
style): each owns its quantization, what its Q/DQ graphs look like, its export defaults, the
runtimes it runs on and its report wording.  Callers ask the backend; nothing outside this package
branches on a precision's name.  Adding a precision is one module here and its config class."""

from __future__ import annotations

from flowpress.compress.backends.base import Backend, Flavour
from flowpress.compress.backends.fp8 import FP8
from flowpress.compress.backends.int8 import INT8
from flowpress.compress.backends.w4a4 import W4A4
from flowpress.compress.backends.w4a8 import W4A8
from flowpress.compress.config import QuantConfig
from flowpress.errors import FlowpressError

BACKENDS: tuple[Backend, ...] = (INT8, FP8, W4A8, W4A4)


def backend_of(config: QuantConfig) -> Backend:
    """The backend of a quantization config (Int8Config -> int8, ...)."""
    for backend in BACKENDS:
        if type(config) is backend.config:
            return backend
    raise FlowpressError(f"quantize: no backend for {type(config).__name__}")


def backend_named(name: str) -> Backend:
    """The backend a recipe's `quantize.precision` or a layer's precision names."""
    for backend in BACKENDS:
        if backend.name == name:
            return backend
    raise FlowpressError(f"quantize.precision {name!r}: choose one of {', '.join(b.name for b in BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "Flavour", "backend_named", "backend_of"]
