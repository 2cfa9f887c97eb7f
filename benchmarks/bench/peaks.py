"""This host's figures: its matrix-multiply peak per arithmetic, and its CPU / ISA record."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from flowpress.engines.isa import HostIsa
from flowpress.engines.portability import host_record
from flowpress.extras import need


def matmul_peaks(threads: int, sizes: tuple[int, ...] = (1024, 2048), chain: int = 4, runs: int = 5) -> dict[str, Any]:
    """This machine's matrix-multiply peak per arithmetic, in GOP/s: the best of square GEMMs of
    `sizes`, `chain` of them in one graph (so per-call input conversion and dispatch are shared),
    on every runtime that runs that arithmetic: fp32 (onnxruntime MatMul, OpenVINO f32), int8
    (onnxruntime MatMulInteger u8 x s8, OpenVINO int8 from Q/DQ), bf16 (OpenVINO bf16 hint).
    Returns {arithmetic: best} plus "measured": every (arithmetic, runtime, size) figure."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    ov = need("openvino", "openvino", "the arithmetic peaks (OpenVINO)")
    rng = np.random.default_rng(0)
    measured: list[dict[str, Any]] = []

    def float_graph(size: int, qdq: bool) -> Any:
        """x -> (MatMul W)^chain; with qdq every MatMul reads Q/DQ u8 activations and a DQ s8
        weight.  Without, W is float: OpenVINO runs a MatMul on DQ int8 weights in int8 even
        under the f32 hint (it quantizes the activations on the fly; measured)."""
        if qdq:
            w = rng.integers(-127, 128, (size, size)).astype(np.int8)
            inits = [
                numpy_helper.from_array(w, "w8"),
                numpy_helper.from_array(np.array(1.0 / size, np.float32), "w_scale"),
                numpy_helper.from_array(np.array(0.05, np.float32), "a_scale"),
                numpy_helper.from_array(np.array(128, np.uint8), "a_zp"),
            ]
            nodes = [helper.make_node("DequantizeLinear", ["w8", "w_scale"], ["w"])]
        else:
            inits = [numpy_helper.from_array(rng.standard_normal((size, size), dtype=np.float32) / size, "w")]
            nodes = []
        x = "x"
        for i in range(chain):
            if qdq:
                nodes += [
                    helper.make_node("QuantizeLinear", [x, "a_scale", "a_zp"], [f"q{i}"]),
                    helper.make_node("DequantizeLinear", [f"q{i}", "a_scale", "a_zp"], [f"dq{i}"]),
                ]
                x = f"dq{i}"
            nodes.append(helper.make_node("MatMul", [x, "w"], [f"y{i}"]))
            x = f"y{i}"
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in ("x", x)]
        g = helper.make_graph(nodes, "gemm", [io[0]], [io[1]], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])

    def int_graph(size: int) -> Any:
        w = rng.integers(-127, 128, (size, size)).astype(np.int8)
        inits = [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array(128, np.uint8), "a_zp"),
            numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
        ]
        nodes = [helper.make_node("MatMulInteger", ["x", "w", "a_zp", "w_zp"], [f"y{i}"]) for i in range(chain)]
        g = helper.make_graph(
            nodes,
            "gemm",
            [helper.make_tensor_value_info("x", TensorProto.UINT8, [size, size])],
            [helper.make_tensor_value_info(f"y{i}", TensorProto.INT32, [size, size]) for i in range(chain)],
            inits,
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])

    def record(arithmetic: str, runtime: str, size: int, run: Any) -> None:
        run()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        gops = chain * 2.0 * size**3 / float(np.median(times)) / 1e9
        measured.append({"arithmetic": arithmetic, "runtime": runtime, "size": size, "gop_per_s": gops})

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    core = ov.Core()
    for size in sizes:
        x = rng.standard_normal((size, size), dtype=np.float32)
        x8 = rng.integers(0, 256, (size, size), dtype=np.uint8)
        plain, quantized = float_graph(size, qdq=False), float_graph(size, qdq=True)
        session = ort.InferenceSession(plain.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        record("fp32", "onnxruntime MatMul", size, lambda s=session, x=x: s.run(None, {"x": x}))
        session = ort.InferenceSession(int_graph(size).SerializeToString(), opts, providers=["CPUExecutionProvider"])
        record("int8", "onnxruntime MatMulInteger u8 x s8", size, lambda s=session, x8=x8: s.run(None, {"x": x8}))
        with tempfile.TemporaryDirectory() as tmp:
            for name, graph in (("plain", plain), ("qdq", quantized)):
                onnx.save(graph, f"{tmp}/{name}.onnx")
            for arithmetic, name, hint in (("fp32", "plain", "f32"), ("bf16", "plain", "bf16"), ("int8", "qdq", "f32")):
                compiled = core.compile_model(
                    core.read_model(f"{tmp}/{name}.onnx"),
                    "CPU",
                    {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": str(threads)},
                )
                record(arithmetic, f"OpenVINO {arithmetic}", size, lambda c=compiled, x=x: c({"x": x}))
    peaks: dict[str, Any] = {
        a: max(m["gop_per_s"] for m in measured if m["arithmetic"] == a) for a in ("fp32", "int8", "bf16")
    }
    peaks["measured"] = measured
    return peaks


def machine_record(host: HostIsa | None = None) -> dict[str, Any]:
    """The CPU's model name and cores, and `host` (default: this one) as engines record it:
    ISA class, whether int8 saturates, flags, emulated, runtime versions."""
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "host": host_record(host)}
