"""Engines know where they were validated: the host record, its figures, re-validation elsewhere.

Each engine's error against the FP graph is measured on stored calibration inputs where it is
built and written into engine.json.  On a host of another ISA class the same error is measured
again before the engine is used; an engine whose error grew past HOST_DRIFT_LIMIT times the
recorded one (8-bit weights on a host whose int8 kernels saturate grow well past it) is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch
from torch import Tensor

from flowpress.compress.model import PORTABLE_WEIGHT_BITS
from flowpress.engines.base import Engine
from flowpress.engines.isa import HostIsa, host_isa
from flowpress.errors import EngineParityError

HOST_DRIFT_LIMIT = 1.5  # error here / error where validated; same host: 1.0 exactly
FLOAT_ENGINE_ERROR = 1e-4  # below this recorded error an engine runs float kernels: nothing to re-check


def resolve_portable(setting: bool | None, host: HostIsa) -> bool:
    """engine.portable: True / False as set, None = portable exactly where 8-bit weights saturate."""
    return host.int8_saturates if setting is None else bool(setting)


def int8_weight_form(portable: bool | None, portable_weights: str, host: HostIsa) -> tuple[int, bool]:
    """(bits, unsigned) of the onnxruntime engine's int8 weights on `host` (engine.portable and
    engine.portable_weights of the recipe): 8-bit where not portable; where portable 7-bit, or
    8-bit stored unsigned for onnxruntime's U8U8 kernels ('u8u8')."""
    if not resolve_portable(portable, host):
        return 8, False
    return (8, True) if portable_weights == "u8u8" else (PORTABLE_WEIGHT_BITS, False)


def host_record(host: HostIsa | None = None) -> dict[str, Any]:
    """The ISA class and runtime versions an engine is validated with."""
    host = host or host_isa()
    record: dict[str, Any] = host.as_dict()
    for package in ("onnxruntime", "openvino"):
        try:
            record[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            record[package] = "missing"
    return record


@torch.no_grad()
def _outputs(engine: Engine, feeds: dict[str, Tensor]) -> Tensor:
    """One forward of each feed at its step; the engine's runtime is released after (a large
    model's engines are then held one at a time)."""
    cond = {name: value for name, value in feeds.items() if name not in ("x", "step")}
    out = engine(feeds["x"], feeds["step"], cond)
    release = getattr(engine, "release", None)
    if release is not None:
        release()
    return out


def _error(got: Tensor, want: Tensor) -> float:
    """Mean over the rows of ||got - want|| / ||want|| (inf where the engine is not finite)."""
    if not torch.isfinite(got).all():
        return float("inf")
    return float(((got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())


def host_figures(engines: dict[str, Engine], fp: Engine, feeds: dict[str, Tensor]) -> dict[str, float]:
    """Each engine's mean relative error vs FP on `feeds`, the figures engine.json records where they
    are validated (FP's outputs computed once; one runtime in memory at a time)."""
    want = _outputs(fp, feeds)
    return {name: _error(_outputs(engine, feeds), want) for name, engine in engines.items()}


def check_engine_host(
    engine_manifest: dict[str, Any],
    engines: dict[str, Engine],
    fp: Engine,
    load_feeds: Callable[[], dict[str, Tensor]],
    where: str,
) -> dict[str, Any] | None:
    """None when this host is of the class the engines were validated on (engine.json's
    validated_on); else re-measure each engine's figure here and raise EngineParityError naming
    both classes for one that drifted.  Returns {isa_class, emulated, figures} of the re-validation."""
    host = host_isa()
    validated_on = engine_manifest.get("validated_on", {})
    recorded = engine_manifest.get("host_check", {}).get("figures", {})
    if validated_on.get("isa_class") == host.isa_class:
        return None
    feeds = load_feeds()
    want = _outputs(fp, feeds)
    figures: dict[str, float] = {}
    for name, engine in engines.items():
        before = recorded.get(name)
        if before is None or before < FLOAT_ENGINE_ERROR:
            continue
        figures[name] = _error(_outputs(engine, feeds), want)
        if not figures[name] <= HOST_DRIFT_LIMIT * before + FLOAT_ENGINE_ERROR:
            raise EngineParityError(
                f"{where}: engine {name} was validated on {validated_on.get('isa_class')} "
                f"({engine_manifest.get('int8_weights', 'float')} weights); on this {host.isa_class} host its error vs FP is "
                f"{figures[name]:.4g}, {figures[name] / before:.1f}x the {before:.4g} recorded there"
                + (" (int8 pair sums saturate here)" if host.int8_saturates else "")
                + "; rebuild the run here or with engine.portable: true (exact on every x86 host)"
            )
    return {"isa_class": host.isa_class, "emulated": host.emulated, "figures": figures}
