"""The Engine protocol: anything that maps (x, step, cond) -> out on a fixed schedule."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from flowpress.errors import FlowpressError
from flowpress.export import ort_session
from flowpress.models import StepModel, run_by_step
from flowpress.sampling import Cond, Sampler


@runtime_checkable
class Engine(Protocol):
    """out = engine(x, step, cond).  x: (B, C, H, W); step: (B,) int64 index of the sampler's
    evaluation; cond: the conditioning inputs by name (e.g. {"class_labels": (B,) int64})."""

    name: str

    @property
    def schedule(self) -> Sampler: ...

    def __call__(self, x: Tensor, step: Tensor, cond: Cond) -> Tensor: ...


def host_array(tensor: Tensor) -> np.ndarray:
    """A tensor's values as a numpy array in host memory (a copy when it lives on a GPU)."""
    if tensor.device.type != "cpu":
        tensor = tensor.detach().to("cpu")
    return tensor.numpy()


def engine_args(engine: Engine, x: Any, step: Any, cond: Any, names: list[str] | None) -> tuple[Tensor, Tensor, Cond]:
    """What a user passes, as the engine takes it, or a one-line refusal naming what it takes.

    x: a (B, C, H, W) tensor; step: the sampler's evaluation index, an int or a (B,) integer tensor
    (not a timestep); cond: the conditioning inputs by name (`names`), None when there are none, or
    the one input's tensor alone when the engine takes exactly one."""
    listed = "{" + ", ".join(repr(n) for n in names) + "}" if names is not None else "{input name: tensor}"
    takes = f"x (B, C, H, W), step (int or (B,) int64), cond {listed}"
    names = names if names is not None else []
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise FlowpressError(f"engine {engine.name}: x must be a (B, C, H, W) tensor; it takes {takes}")
    batch = int(x.shape[0])
    if isinstance(step, int) and not isinstance(step, bool):
        step = torch.full((batch,), step, dtype=torch.int64)
    elif isinstance(step, Tensor) and not step.is_floating_point() and step.dim() <= 1:
        step = step.reshape(-1).expand(batch) if step.numel() == 1 else step
    if not isinstance(step, Tensor) or step.is_floating_point() or tuple(step.shape) != (batch,):
        raise FlowpressError(
            f"engine {engine.name}: step is the sampler's evaluation index (0..{engine.schedule.n_evaluations - 1}), "
            f"an int or a ({batch},) integer tensor, not a timestep; it takes {takes}"
        )
    if cond is None:
        cond = {}
    elif isinstance(cond, Tensor) and len(names) == 1:
        cond = {names[0]: cond}
    if not isinstance(cond, Mapping) or any(n not in cond for n in names):
        given = f"keys {sorted(cond)}" if isinstance(cond, Mapping) else f"a {type(cond).__name__}"
        raise FlowpressError(
            f"engine {engine.name}: cond must be a dict of the conditioning inputs by name, got {given}; it takes {takes}"
        )
    return x, step.long(), dict(cond)


def check_steps(engine: Engine, step: Tensor) -> None:
    last = engine.schedule.n_evaluations - 1
    # numpy, not torch: a torch reduction on a (B,) tensor was slow here (its thread pool waking
    # up after the runtime's), enough to dominate a batch-1 sampler step
    steps = host_array(step)
    bad = int(steps.min()) if int(steps.min()) < 0 else int(steps.max())
    if bad < 0 or bad > last:
        raise FlowpressError(
            f"engine {engine.name}: step {bad} is outside its schedule (0..{last}, {engine.schedule.n_steps} steps); "
            "rebuild the engine for this step count (`make quantize`)"
        )


def graph_feeds(
    engine: Engine, path: Path, input_names: list[str], x: Tensor, step: Tensor, cond: Cond
) -> dict[str, np.ndarray]:
    """Checked numpy inputs of an exported engine graph (x, step, *cond)."""
    check_steps(engine, step)
    feeds: dict[str, np.ndarray] = {"x": host_array(x), "step": host_array(step)}
    for name in input_names[2:]:
        if name not in cond:
            raise FlowpressError(f"engine {path}: this engine needs the conditioning input {name!r}")
        feeds[name] = host_array(cond[name])
    return feeds


class TorchEngine:
    """A step model (FP or fake-quant) as an engine: the reference for every comparison."""

    def __init__(self, step_model: StepModel, schedule: Sampler, name: str = "torch"):
        self.name = name
        self.schedule = schedule
        self.step_model = step_model.eval()

    @torch.no_grad()
    def __call__(self, x: Tensor, step: Tensor, cond: Cond) -> Tensor:
        x, step, cond = engine_args(self, x, step, cond, None)  # the model checks its own inputs
        check_steps(self, step)
        return self.step_model.run(x, step, cond)


class OrtEngine:
    """An ONNX graph (x, step, *cond) -> out run by onnxruntime on the CPU provider.

    io_binding: inputs are bound in place and v is written into a buffer kept per batch shape
    (the sampler loop calls the engine with the same shapes every step), then copied out once.
    """

    def __init__(
        self,
        path: str | Path,
        schedule: Sampler,
        name: str = "onnxruntime",
        threads: int = 0,
        io_binding: bool = True,
        optimization: str = "all",
    ):
        self.name = name
        self.schedule = schedule
        self.path = Path(path)
        if not self.path.is_file():
            raise FlowpressError(f"{self.path}: engine file missing; build it with `make engines`")
        self.optimization, self.threads, self.io_binding = optimization, threads, io_binding
        self._open()

    def _open(self) -> None:
        try:
            self.session = ort_session(self.path, self.optimization, self.threads)
        except Exception as err:  # onnxruntime raises its own types for unreadable or invalid graphs
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise FlowpressError(
                f"{self.path}: onnxruntime cannot load this engine ({reason}); rebuild it with `make quantize`"
            ) from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        self._binding = self.session.io_binding()
        self._outputs: dict[tuple[int, ...], np.ndarray] = {}

    def release(self) -> None:
        """Free the session (the weights onnxruntime holds); the next call loads it again."""
        self.session = self._binding = None  # type: ignore[assignment]
        self._outputs = {}

    def __call__(self, x: Tensor, step: Tensor, cond: Cond) -> Tensor:
        if self.session is None:
            self._open()
        x, step, cond = engine_args(self, x, step, cond, self.input_names[2:])
        feeds = graph_feeds(self, self.path, self.input_names, x, step, cond)
        if feeds["step"].size > 1 and feeds["step"].min() != feeds["step"].max():
            # a graph with per-step activation scales takes one step per batch (others: the same result)
            return run_by_step(self, x, step, cond)
        if not self.io_binding:
            return torch.from_numpy(self.session.run(None, feeds)[0])
        for name, value in feeds.items():
            self._binding.bind_cpu_input(name, np.ascontiguousarray(value))
        shape = tuple(x.shape)  # a velocity model's output has the shape of x
        if shape not in self._outputs:
            self._outputs[shape] = np.empty(shape, np.float32)
        out = self._outputs[shape]
        self._binding.bind_output(self.output_name, "cpu", 0, np.float32, list(shape), out.ctypes.data)
        self.session.run_with_iobinding(self._binding)
        return torch.from_numpy(out.copy())  # the buffer is reused by the next call
