"""The host's integer-kernel class: what an int8 engine computes exactly on this CPU.

x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake) multiply uint8 x int8 with
VPMADDUBSW, which adds each pair of products into an int16 and saturates it: 2 * 255 * 127 =
64770 does not fit, 2 * 255 * 63 = 32130 does.  onnxruntime's U8S8 kernels and OpenVINO's
int8 kernels run that instruction there, so 8-bit weights are silently wrong on such hosts and
7-bit weights (|w| <= 63) are exact on every x86 host.  VNNI (VPDPBUSD) and AMX accumulate in
int32, as do ARM's dot-product instructions.

FLOWPRESS_ISA=<class> makes flowpress treat this host as that class (tests stand for the
classes they do not run on); the record says so.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from flowpress.errors import FlowpressError

# class -> whether u8 x s8 pair sums saturate there with 8-bit weights
ISA_CLASSES = {
    "x86-amx": False,
    "x86-avx512-vnni": False,
    "x86-avx-vnni": False,
    "x86-avx512": True,
    "x86-avx2": True,
    "x86-sse": True,
    "arm64-dotprod": False,
    "arm64": True,
    "unknown": True,
}
ISA_ENV = "FLOWPRESS_ISA"
_FLAGS_OF_INTEREST = (
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
    "amx_bf16",
    "asimddp",
    "bf16",
)


@dataclass(frozen=True)
class HostIsa:
    """isa_class: one of ISA_CLASSES; int8_saturates: 8-bit weights are not exact in the int8
    kernels here (measured by a probe of onnxruntime on a real host, the class's value when
    emulated); flags: the CPU flags the class was read from; emulated: set by FLOWPRESS_ISA."""

    isa_class: str
    int8_saturates: bool
    machine: str
    flags: tuple[str, ...]
    emulated: bool = False

    def as_dict(self) -> dict[str, object]:
        record = asdict(self)
        record["flags"] = list(self.flags)
        return record


def classify(flags: set[str], machine: str) -> str:
    """The ISA class of a CPU from its /proc/cpuinfo flags and platform.machine()."""
    machine = machine.lower()
    if machine in ("x86_64", "amd64", "i686", "i386"):
        if "amx_int8" in flags:
            return "x86-amx"
        if "avx512_vnni" in flags:
            return "x86-avx512-vnni"
        if "avx_vnni" in flags:
            return "x86-avx-vnni"
        if "avx512bw" in flags:
            return "x86-avx512"
        return "x86-avx2" if "avx2" in flags else "x86-sse"
    if machine in ("aarch64", "arm64"):
        return "arm64-dotprod" if "asimddp" in flags else "arm64"
    return "unknown"


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


@functools.cache
def ort_int8_saturates() -> bool:
    """Probe onnxruntime's U8S8 integer GEMM on this host: 64 products of 255 x 127 summed.

    Exact kernels give 64 * 255 * 127; VPMADDUBSW clamps each pair sum at 32767."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 64
    weights = numpy_helper.from_array(np.full((k, 4), 127, np.int8), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
        "flowpress-int8-probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 4])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"a": np.full((1, k), 255, np.uint8)})[0]
    return bool((got != k * 255 * 127).any())


def host_isa() -> HostIsa:
    """This host's class (or the one FLOWPRESS_ISA names; read on every call, the probe is cached)."""
    machine = platform.machine()
    flags = _cpu_flags()
    emulated = os.environ.get(ISA_ENV)
    if emulated:
        if emulated not in ISA_CLASSES:
            raise FlowpressError(
                f"{ISA_ENV}={emulated!r} is not an ISA class; use one of {', '.join(ISA_CLASSES)} or unset it"
            )
        return HostIsa(emulated, ISA_CLASSES[emulated], machine, (), emulated=True)
    isa_class = classify(flags, machine)
    return HostIsa(isa_class, ort_int8_saturates(), machine, tuple(f for f in _FLAGS_OF_INTEREST if f in flags))
