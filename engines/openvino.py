"""OpenVINO CPU engine: IR compiled per static batch size with an explicit precision hint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowpress.engines.base import engine_args, graph_feeds
from flowpress.errors import FlowpressError
from flowpress.extras import need
from flowpress.ranks import runtime_threads
from flowpress.sampling import Cond, Sampler

LARGE_IR_BYTES = 256 << 20


class OpenVinoEngine:
    """An OpenVINO IR (x, step, *cond) -> out on the CPU plugin.

    Compiled once per batch size with static shapes (measured faster than a dynamic batch
    here) and INFERENCE_PRECISION_HINT set explicitly, never OpenVINO's silent default.
    precision_hint None compiles with the runtime's default (only to measure what a user gets
    without flowpress); `compiled_hint` says what the compiled model actually runs.
    """

    def __init__(
        self,
        xml: str | Path,
        schedule: Sampler,
        precision_hint: str | None,
        name: str = "openvino",
        threads: int = 0,
        perf_counters: bool = False,
    ):
        ov = need("openvino", "openvino", f"the OpenVINO engine {xml}")

        self.name = name
        self.schedule = schedule
        self.path = Path(xml)
        if not self.path.is_file():
            raise FlowpressError(f"{self.path}: OpenVINO IR missing; rebuild it with `make quantize`")
        self.precision_hint = precision_hint
        self.threads = threads
        self.perf_counters = perf_counters
        self.core = ov.Core()
        try:
            self.model = self.core.read_model(str(self.path))
        except Exception as err:  # OpenVINO raises RuntimeError for unreadable or inconsistent IR
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise FlowpressError(
                f"{self.path}: OpenVINO cannot read this IR ({reason}); rebuild it with `make quantize`"
            ) from None
        self.input_names = [port.get_any_name() for port in self.model.inputs]
        self.compiled: dict[int, Any] = {}
        # each compiled batch size holds its own copy of the weights in the plugin's layout: a
        # large model keeps one compiled at a time (recompiled when the batch changes)
        weights = self.path.with_suffix(".bin")
        self.max_compiled = 1 if weights.is_file() and weights.stat().st_size > LARGE_IR_BYTES else None

    def release(self) -> None:
        """Free the compiled models and the IR read into memory; the next call compiles again."""
        self.compiled.clear()
        self.model = None

    def _compiled(self, batch: int) -> Any:
        if self.model is None:
            self.model = self.core.read_model(str(self.path))
        if batch not in self.compiled:
            if self.max_compiled is not None and len(self.compiled) >= self.max_compiled:
                self.compiled.clear()
            model = self.model.clone()
            shapes = {}
            for port in model.inputs:
                dims = list(port.get_partial_shape())
                shapes[port.get_any_name()] = [batch, *[int(d.get_length()) for d in dims[1:]]]
            model.reshape(shapes)
            config = {"PERFORMANCE_HINT": "LATENCY"}
            if self.precision_hint is not None:
                config["INFERENCE_PRECISION_HINT"] = self.precision_hint
            if self.threads or runtime_threads():
                config["INFERENCE_NUM_THREADS"] = str(self.threads or runtime_threads())
            if self.perf_counters:
                config["PERF_COUNT"] = "YES"
            self.compiled[batch] = self.core.compile_model(model, "CPU", config)
        return self.compiled[batch]

    def compiled_hint(self, batch: int) -> str:
        """What the compiled model runs its float parts in: 'f32', 'bf16' or 'f16'."""
        return str(self._compiled(batch).get_property("INFERENCE_PRECISION_HINT").to_string())

    def __call__(self, x: Tensor, step: Tensor, cond: Cond) -> Tensor:
        x, step, cond = engine_args(self, x, step, cond, self.input_names[2:])
        feeds = graph_feeds(self, self.path, self.input_names, x, step, cond)
        compiled = self._compiled(int(x.shape[0]))
        return torch.from_numpy(np.array(compiled(feeds)[compiled.output(0)]))
