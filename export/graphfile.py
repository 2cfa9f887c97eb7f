"""ONNX graphs on disk at any size: protobuf cannot hold a message over 2 GB, and every real
model of the field is over it in fp32.

- `read_graph(path)`: the graph's structure; initializers stored outside it stay on disk (their
  bytes are read one at a time, by `Graph.array`, when a pass needs them).
- `write_graph(graph, path)`: graph and weights written aside and renamed into place.  Above
  `large_bytes()` bytes of tensors, every tensor over SMALL_TENSOR_BYTES goes to one data
  file beside the graph, `<graph name>.data`, at a relative location (a run directory can be
  moved); the bytes are streamed tensor by tensor, never all in memory.
- `graph_files(path)`: the graph and the data files it references, for hashing and shipping.
- `check_graph(path)`: onnx's checker by path (a loaded proto over 2 GB cannot be checked).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flowpress.errors import FlowpressError

if TYPE_CHECKING:
    from onnx import ModelProto, TensorProto

LARGE_BYTES_ENV = "FLOWPRESS_LARGE_BYTES"
# a model (or graph) past this many bytes is large: its graphs keep their weights in a data file
# (under protobuf's 2 GB with room for the graph itself), and the run releases the torch model
# before the engines are built (flowpress/stages/chain.py); tests lower it (LARGE_BYTES_ENV) to force
# tiny models through both paths
DEFAULT_LARGE_BYTES = 1 << 30
# scales and zero points (per channel too), shapes, biases: kept in the graph, where passes read them
SMALL_TENSOR_BYTES = 1 << 16
MIN_INLINE_BYTES = 1024
ALIGN = 4096  # each tensor starts on a page in the data file (memory-mapped by the runtimes)


def large_bytes() -> int:
    """The size past which a model or graph is handled as large (LARGE_BYTES_ENV, else 1 GiB)."""
    raw = os.environ.get(LARGE_BYTES_ENV)
    if raw is None:
        return DEFAULT_LARGE_BYTES
    try:
        return int(raw)
    except ValueError:
        raise FlowpressError(f"{LARGE_BYTES_ENV}={raw!r}: not a byte count; unset it or give an integer") from None


def _inline_bytes(threshold: int) -> int:
    """Tensors up to this size stay in the graph: SMALL_TENSOR_BYTES, less when tests lower the
    threshold, never under the 1 KiB that onnxruntime needs inline (shape inputs of Reshape)."""
    return max(min(SMALL_TENSOR_BYTES, threshold), MIN_INLINE_BYTES)


def data_name(path: str | Path) -> str:
    """The data file of graph `path`: model.onnx -> model.onnx.data (beside it)."""
    return f"{Path(path).name}.data"


@dataclass
class Graph:
    """proto: an ONNX model whose tensors may live outside it; base: the directory their
    locations are relative to."""

    proto: ModelProto
    base: Path

    def tensors(self) -> Iterator[TensorProto]:
        """Every tensor of the graph: initializers and Constant / attribute tensors, subgraphs included."""
        from onnx.external_data_helper import _get_all_tensors

        return iter(_get_all_tensors(self.proto))

    def array(self, tensor: TensorProto) -> np.ndarray:
        """A tensor's values, read from its data file when it is stored there."""
        from onnx import numpy_helper

        return numpy_helper.to_array(tensor, str(self.base))

    def constants(self) -> dict[str, np.ndarray]:
        """The initializers in memory (scales, zero points, shapes: read_graph leaves only the
        weights on disk), by name: what graph passes read."""
        from onnx import TensorProto, numpy_helper

        return {
            t.name: numpy_helper.to_array(t)
            for t in self.proto.graph.initializer
            if t.data_location != TensorProto.EXTERNAL
        }


def read_graph(path: str | Path) -> Graph:
    """The graph at `path`, its externally stored tensors left on disk."""
    import onnx
    from onnx import TensorProto
    from onnx.external_data_helper import load_external_data_for_tensor

    path = Path(path)
    graph = Graph(onnx.load(str(path), load_external_data=False), path.parent)
    for tensor in graph.tensors():  # scales, zero points, shapes: in memory, where passes read them
        if tensor.data_location == TensorProto.EXTERNAL and _nbytes(tensor) <= SMALL_TENSOR_BYTES:
            load_external_data_for_tensor(tensor, str(graph.base))
    return graph


def _nbytes(tensor: TensorProto) -> int:
    from onnx import TensorProto, helper

    if tensor.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        if "length" in info:
            return int(info["length"])
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def tensor_bytes(graph: Graph) -> int:
    """Bytes of all tensors of the graph, wherever they are stored."""
    return sum(_nbytes(t) for t in graph.tensors())


def _raw_bytes(graph: Graph, tensor: TensorProto) -> bytes:
    """The tensor's little-endian raw bytes (as raw_data holds them), wherever they are stored."""
    from onnx import TensorProto
    from onnx.external_data_helper import _read_external_data_bytes

    if tensor.data_location == TensorProto.EXTERNAL:
        return _read_external_data_bytes(tensor, str(graph.base))
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    from onnx import numpy_helper

    return numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name).raw_data


def _clear_data(tensor: TensorProto) -> None:
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(name)
    del tensor.external_data[:]


def write_graph(graph: Graph, path: str | Path, threshold: int | None = None) -> list[Path]:
    """Write `graph` to `path` (and its tensors to `<name>.data` beside it when they are over
    `threshold` bytes in all, default large_bytes()); both are written aside and renamed
    into place, the graph last.  The proto's tensors are rewritten to their new locations.
    Returns the files written (graph first)."""
    import onnx
    from onnx import TensorProto
    from onnx.external_data_helper import _get_initializer_tensors

    from flowpress.files import staged_file

    path = Path(path)
    limit = large_bytes() if threshold is None else threshold
    data = path.with_name(data_name(path))
    data_tmp = data.with_name(f".{data.name}.tmp")
    external = tensor_bytes(graph) > limit
    small = _inline_bytes(limit)
    initializers = [t for t in _get_initializer_tensors(graph.proto) if t.data_type != TensorProto.STRING]
    try:
        if external:
            with open(data_tmp, "wb") as out:
                for tensor in initializers:
                    if _nbytes(tensor) <= small and tensor.data_location != TensorProto.EXTERNAL:
                        continue
                    raw = _raw_bytes(graph, tensor)
                    _clear_data(tensor)
                    if len(raw) <= small:
                        tensor.data_location = TensorProto.DEFAULT
                        tensor.raw_data = raw
                        continue
                    offset = out.seek(0, os.SEEK_END)
                    out.seek(offset + -offset % ALIGN)
                    for key, value in (("location", data.name), ("offset", out.tell()), ("length", len(raw))):
                        entry = tensor.external_data.add()
                        entry.key, entry.value = key, str(value)
                    tensor.data_location = TensorProto.EXTERNAL
                    out.write(raw)
        else:
            for tensor in initializers:
                if tensor.data_location == TensorProto.EXTERNAL:
                    raw = _raw_bytes(graph, tensor)
                    _clear_data(tensor)
                    tensor.data_location = TensorProto.DEFAULT
                    tensor.raw_data = raw
        with staged_file(path) as graph_tmp:
            onnx.save(graph.proto, str(graph_tmp))
            if external:
                os.replace(data_tmp, data)
            else:  # no data file: a stale one of an earlier write must not stay beside the graph
                data.unlink(missing_ok=True)
    finally:
        data_tmp.unlink(missing_ok=True)
    graph.base = path.parent
    return [path, data] if external else [path]


def graph_files(path: str | Path) -> list[Path]:
    """The graph at `path` and the data files its tensors reference (relative to it)."""
    import onnx
    from onnx import TensorProto

    graph = Graph(onnx.load(str(path), load_external_data=False), Path(path).parent)
    found = {
        (graph.base / e.value)
        for t in graph.tensors()
        if t.data_location == TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    return [Path(path), *sorted(found)]


@contextmanager
def beside(graph: Graph, name: str = "graph") -> Iterator[Path]:
    """The graph's structure saved as a hidden file in the folder its data file is in (so the
    data's relative locations resolve, nothing copied), for a runtime that loads from a path;
    removed when the block ends."""
    import onnx

    path = graph.base / f".{name}.{os.getpid()}.onnx"
    try:
        onnx.save(graph.proto, str(path))
        yield path
    finally:
        path.unlink(missing_ok=True)


def graph_bytes(path: str | Path) -> int:
    """Bytes on disk of the graph at `path` and its data files."""
    return sum(f.stat().st_size for f in graph_files(path))


def remove_graph(path: str | Path) -> None:
    """Delete the graph at `path` and its data files."""
    for file in graph_files(path):
        file.unlink(missing_ok=True)


def check_graph(path: str | Path) -> None:
    """onnx's checker on the file (so graphs over 2 GB and their data files are checked)."""
    import onnx

    onnx.checker.check_model(str(path))


def engine_data_options(source: Graph, options, engine_path: str | Path) -> None:  # noqa: ANN001
    """Tell onnxruntime to write an optimized engine's weights to `<engine name>.data` beside it
    when the source graph's are over the threshold (it cannot serialize a graph over 2 GB)."""
    if tensor_bytes(source) > large_bytes():
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", data_name(engine_path)
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes",
            str(_inline_bytes(large_bytes())),
        )
