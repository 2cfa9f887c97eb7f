"""One backend per precision, found by config type; nothing outside the registry branches on a precision's name."""

import ast

import pytest

from flowpress.compress import (
    BACKENDS,
    PRECISIONS,
    Fp8Config,
    Int8Config,
    W4A4Config,
    W4A8Config,
    backend_named,
    backend_of,
)
from flowpress.errors import FlowpressError
from flowpress.recipe import ModelSection, Recipe

from .conftest import ROOT
from .test_layers import modules


@pytest.mark.parametrize("config", [Int8Config(), Fp8Config(), W4A8Config(), W4A4Config()])
def test_each_config_finds_its_backend_and_its_name(config):
    backend = backend_of(config)
    assert backend.config is type(config) and backend.name == config.precision
    assert backend_named(config.precision) is backend and PRECISIONS[backend.name] is type(config)
    assert backend.flavour in backend.flavours


def test_an_unknown_precision_is_one_line_naming_the_known():
    with pytest.raises(FlowpressError, match="'int4': choose one of int8, fp8, w4a8, w4a4"):
        backend_named("int4")


def test_the_recipe_asks_the_backend_for_its_flavours_and_runtimes():
    from flowpress.export import ExportConfig
    from flowpress.recipe import EngineSection

    with pytest.raises(
        FlowpressError, match="fp8 Q/DQ is written in the tensorrt flavour: set export.flavour: tensorrt"
    ):
        Recipe("r", ModelSection("m"), quantize=Fp8Config(), export=ExportConfig(flavour="ort-cpu"))
    with pytest.raises(FlowpressError, match="fp8 engines run in onnxruntime"):
        Recipe("r", ModelSection("m"), quantize=Fp8Config(), export=ExportConfig(flavour="tensorrt"),
               engine=EngineSection(runtime="openvino"))  # fmt: skip
    assert len(BACKENDS) == len(PRECISIONS)


def _branches(path):
    """Comparisons in `path` against a quantization precision's name."""
    names = {b.name for b in BACKENDS} - {"int8"}  # 'int8' is also an OpenVINO engine precision
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        for side in (node.left, *node.comparators):
            text = ast.unparse(side)
            literal = isinstance(side, ast.Constant) and side.value in names
            attribute = text.endswith(".precision") and any(w in text for w in ("quantize", "qmodel", "layer"))
            if literal or attribute:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_precision_name_is_branched_on_outside_the_backends():
    registry = ROOT / "compress" / "backends"
    found = [
        line
        for name, path in modules().items()
        if not path.resolve().is_relative_to(registry)
        for line in _branches(path)
    ]
    assert found == []
