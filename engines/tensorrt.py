"""GPU engines behind the Engine protocol: a TensorRT plan, and onnxruntime-gpu (CUDA / TensorRT EPs).

Both take and return torch tensors.  CPU tensors are copied to the GPU and the result
back (what the sampler on the CPU needs); CUDA tensors stay on the device (what a GPU
sampler and the benchmark need).  `import tensorrt` / `onnxruntime` happen in __init__.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowpress.engines.base import check_steps
from flowpress.errors import FlowpressError
from flowpress.export.lint import BatchProfile
from flowpress.export.tensorrt import GpuIdentity, current_gpu, manifest_path
from flowpress.sampling import Cond, Sampler


def read_manifest(plan: str | Path) -> dict[str, Any]:
    """The engine manifest written beside `plan` by export.tensorrt.build_engine."""
    path = manifest_path(plan)
    if not Path(plan).is_file() or not path.is_file():
        raise FlowpressError(f"{plan}: TensorRT plan or its manifest {path.name} missing; build it with `make engines`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise FlowpressError(f"{path}: engine manifest is not valid JSON; rebuild it with `make engines`") from None


def check_manifest(manifest: dict[str, Any], schedule: Sampler, gpu: GpuIdentity, where: str | Path) -> None:
    """Refuse a plan built for another GPU, compute capability, TensorRT version or schedule."""
    built_gpu = manifest.get("gpu", {})
    built_schedule = manifest.get("schedule", {})
    here = gpu.as_dict()
    problems = []
    if manifest.get("tensorrt") != gpu.tensorrt:
        problems.append(f"built by TensorRT {manifest.get('tensorrt')}, TensorRT {gpu.tensorrt} is installed")
    if built_gpu.get("name") != gpu.name:
        problems.append(f"built on {built_gpu.get('name')}, this GPU is {gpu.name}")
    if built_gpu.get("compute_capability") != here["compute_capability"]:
        problems.append(
            f"built for compute capability {built_gpu.get('compute_capability')}, this GPU has {here['compute_capability']}"
        )
    wanted = schedule.as_dict()
    if (built_schedule.get("n_steps"), built_schedule.get("method")) != (wanted["n_steps"], wanted["method"]):
        problems.append(
            f"built for the {built_schedule.get('n_steps')}-step {built_schedule.get('method')} schedule, "
            f"{wanted['n_steps']}-step {wanted['method']} requested"
        )
    if problems:
        raise FlowpressError(f"{where}: {'; '.join(problems)}; `make engines` rebuilds it")


def _torch_dtypes(trt: Any) -> dict[Any, torch.dtype]:
    return {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
    }


def _feeds(name: str, x: Tensor, step: Tensor, cond: Cond, inputs: list[str]) -> dict[str, Tensor]:
    feeds = {"x": x, "step": step}
    for input_name in inputs[2:]:
        if input_name not in cond:
            raise FlowpressError(f"engine {name}: this engine needs the conditioning input {input_name!r}")
        feeds[input_name] = cond[input_name]
    unknown = sorted(set(inputs) - set(feeds))
    if unknown:
        raise FlowpressError(f"engine {name}: unexpected engine inputs {unknown}; engines take x, step, *conditioning")
    return feeds


class TensorRTEngine:
    """A TensorRT plan (x, step, *cond) -> out on the current CUDA device.

    Before deserializing, the manifest beside the plan is checked against this GPU, its
    compute capability, the installed TensorRT and `schedule`: plans are not portable.
    """

    def __init__(self, plan: str | Path, schedule: Sampler, name: str = "tensorrt"):
        import tensorrt as trt

        self.name = name
        self.schedule = schedule
        self.plan = Path(plan)
        self.manifest = read_manifest(self.plan)
        check_manifest(self.manifest, schedule, current_gpu(), self.plan)
        self.profile = BatchProfile(**self.manifest["profile"])
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if self.engine is None:
            raise FlowpressError(
                f"{self.plan}: TensorRT could not deserialize the plan; rebuild it with `make engines`"
            )
        self.context = self.engine.create_execution_context()
        dtypes = _torch_dtypes(trt)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(outputs) != 1:
            raise FlowpressError(f"{self.plan}: expected one output 'v', the plan has {outputs}")
        self.output = outputs[0]
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}

    def __call__(self, x: Tensor, step: Tensor, cond: Cond) -> Tensor:
        """x: (B, C, H, W) on CPU or CUDA; v comes back float32 on x's device."""
        check_steps(self, step)
        return self.execute(x, step, cond)

    def execute(self, x: Tensor, step: Tensor, cond: Cond) -> Tensor:
        """__call__ without the step check (which syncs the GPU to read `step`): the benchmark's path."""
        batch = int(x.shape[0])
        if not self.profile.min <= batch <= self.profile.max:
            raise FlowpressError(
                f"engine {self.name}: batch {batch} is outside its profile {self.profile.min}..{self.profile.max}; "
                "rebuild with a larger max batch (`make engines`)"
            )
        device = torch.device("cuda", torch.cuda.current_device())
        stream = torch.cuda.current_stream(device)
        bound = {}
        for name, tensor in _feeds(self.name, x, step, cond, self.inputs).items():
            bound[name] = tensor.to(device=device, dtype=self.dtypes[name]).contiguous()
            self.context.set_input_shape(name, tuple(bound[name].shape))
            self.context.set_tensor_address(name, bound[name].data_ptr())
        v = torch.empty(
            tuple(self.context.get_tensor_shape(self.output)), dtype=self.dtypes[self.output], device=device
        )
        self.context.set_tensor_address(self.output, v.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise FlowpressError(f"engine {self.name}: TensorRT execution failed (see the log above)")
        # `bound` lives until here; the caching allocator orders any reuse after this stream's work
        return v.float().to(x.device)


class OrtGpuEngine:
    """An ONNX graph run by onnxruntime-gpu on the TensorRT and/or CUDA execution provider."""

    PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

    def __init__(
        self, path: str | Path, schedule: Sampler, name: str = "onnxruntime-gpu", cache_dir: str | Path | None = None
    ):
        import onnxruntime as ort

        self.name = name
        self.schedule = schedule
        self.path = Path(path)
        if not self.path.is_file():
            raise FlowpressError(f"{self.path}: ONNX file missing; run `make quantize` first")
        available = ort.get_available_providers()
        chosen = [p for p in self.PROVIDERS if p in available]
        if not chosen:
            raise FlowpressError(
                f"onnxruntime {ort.__version__} has no GPU provider here (available: {', '.join(available)}); "
                "install onnxruntime-gpu in place of onnxruntime (pip install -e '.[gpu]') on a GPU host"
            )
        providers: list[Any] = []
        for provider in chosen:
            if provider == "TensorrtExecutionProvider" and cache_dir is not None:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
                options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir)}
                providers.append((provider, options))
            else:
                providers.append(provider)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), opts, providers=[*providers, "CPUExecutionProvider"])
        self.providers = self.session.get_providers()
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.output = self.session.get_outputs()[0].name

    def __call__(self, x: Tensor, step: Tensor, cond: Cond) -> Tensor:
        """x: (B, C, H, W) on CPU (copied through numpy) or CUDA (bound in place with io_binding)."""
        check_steps(self, step)
        return self.execute(x, step, cond)

    def execute(self, x: Tensor, step: Tensor, cond: Cond) -> Tensor:
        """__call__ without the step check (which syncs the GPU to read `step`): the benchmark's path."""
        feeds = _feeds(self.name, x, step, cond, self.inputs)
        if x.device.type != "cuda":
            numpy_feeds = {k: v.numpy() for k, v in feeds.items()}
            return torch.from_numpy(self.session.run(None, numpy_feeds)[0])
        device_id = x.device.index or 0
        binding = self.session.io_binding()
        bound = {k: v.to(x.device).contiguous() for k, v in feeds.items()}
        for name, tensor in bound.items():
            element_type = np.float32 if tensor.dtype == torch.float32 else np.int64
            binding.bind_input(name, "cuda", device_id, element_type, tuple(tensor.shape), tensor.data_ptr())
        v = torch.empty_like(bound["x"], dtype=torch.float32)
        binding.bind_output(self.output, "cuda", device_id, np.float32, tuple(v.shape), v.data_ptr())
        torch.cuda.current_stream(x.device).synchronize()  # onnxruntime runs on its own stream
        self.session.run_with_iobinding(binding)
        return v
