"""Extras: the core install runs int8 on onnxruntime; OpenVINO, W4A8 (brevitas), text pipelines
(transformers) and the digits example's data (scikit-learn) are extras, and a missing one is a
one-line error naming it.  Default recipes do not depend on the working directory."""

import json
import sys
import tomllib

import pytest

from flowpress import cli
from flowpress.cli import main
from flowpress.errors import FlowpressError

from .conftest import ROOT


def missing(monkeypatch, *modules: str) -> None:
    """Make `import module` raise ImportError, as on an install without its extra."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def one_line(err: pytest.ExceptionInfo, extra: str) -> str:
    message = str(err.value)
    assert "\n" not in message
    assert f"pip install 'flowpress[{extra}]'" in message
    return message


def test_missing_openvino_names_its_extra_where_the_engines_are_built_and_run(monkeypatch, tmp_path):
    from flowpress.engines.openvino import OpenVinoEngine
    from flowpress.export.openvino import OpenVinoConfig, export_openvino

    missing(monkeypatch, "openvino", "nncf")
    with pytest.raises(FlowpressError) as err:
        export_openvino(tmp_path / "fp32.onnx", tmp_path / "ov" / "model.xml", OpenVinoConfig(precision="bf16"))
    assert "needs openvino, which is not installed" in one_line(err, "openvino")
    with pytest.raises(FlowpressError) as err:
        OpenVinoEngine(tmp_path / "model.xml", None, "f32")  # type: ignore[arg-type]
    one_line(err, "openvino")


def test_a_recipe_that_builds_openvino_engines_fails_before_any_work(monkeypatch, tmp_path, capsys):
    missing(monkeypatch, "openvino", "nncf")
    # the default recipe: engine.candidates (on by default) builds OpenVINO int8 and bf16 candidates
    code = main(["quantize", "--recipe", str(cli.default_recipe()), "--runs", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "engine.candidates" in err and "flowpress[openvino]" in err
    assert "engine.candidates: false" in err  # and the way round it
    assert not any(tmp_path.iterdir())  # nothing was started
    # --model: before the model loads (an empty directory would fail the load)
    code = main(["quantize", "--model", str(tmp_path), "--runs", str(tmp_path / "runs"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "flowpress[openvino]" in err and "--no-openvino" in err


def test_runtime_openvino_needs_nncf_for_int8_only(monkeypatch):
    from flowpress.compress import Int8Config
    from flowpress.export.openvino import OpenVinoConfig
    from flowpress.recipe import EngineSection, need_extras

    missing(monkeypatch, "nncf")
    need_extras(
        EngineSection(runtime="openvino", openvino=OpenVinoConfig(precision="bf16"), candidates=False), Int8Config()
    )
    need_extras(EngineSection(candidates=False), Int8Config())  # onnxruntime alone: the core install
    with pytest.raises(FlowpressError) as err:
        need_extras(EngineSection(runtime="openvino", candidates=False), Int8Config())
    assert "needs nncf" in one_line(err, "openvino")


def test_missing_brevitas_names_the_lowbit_extra(monkeypatch, tmp_path, capsys):
    from flowpress.compress.w4a8 import _quantizers

    missing(monkeypatch, "brevitas")
    with pytest.raises(FlowpressError) as err:
        _quantizers(None)
    assert "W4A8" in one_line(err, "lowbit")
    code = main(
        ["quantize", "--model", str(tmp_path), "--precision", "w4a8", "--no-openvino", "--runs", str(tmp_path / "r")]
    )
    err_line = capsys.readouterr().err.strip()
    assert code == 2 and "quantize.precision: w4a8" in err_line and "flowpress[lowbit]" in err_line


def test_missing_transformers_and_sklearn_name_their_extras(monkeypatch):
    from examples.digits.data import load_digits
    from flowpress.models.conditioning import PromptConditioner

    missing(monkeypatch, "transformers", "sklearn")
    with pytest.raises(FlowpressError) as err:
        PromptConditioner(object(), "unet-cond", 8)
    one_line(err, "text")
    with pytest.raises(FlowpressError) as err:
        load_digits()
    one_line(err, "examples")


def test_a_text_pipeline_without_transformers_names_the_text_extra(monkeypatch, tmp_path):
    from flowpress.models import load_source

    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    missing(monkeypatch, "transformers")
    with pytest.raises(FlowpressError) as err:
        load_source(tmp_path, None, None, None)
    assert "text encoders" in one_line(err, "text")


def test_an_installed_extra_that_cannot_import_says_so(monkeypatch):
    from flowpress.extras import need

    def broken(name, *args, **kwargs):
        raise ImportError("libopenvino.so: cannot open shared object file", name="_pyopenvino")

    monkeypatch.setattr("importlib.import_module", broken)
    with pytest.raises(FlowpressError) as err:
        need("openvino", "openvino", "OpenVINO engines")
    assert "cannot be imported (libopenvino.so" in one_line(err, "openvino")


@pytest.mark.parametrize("command", ["quantize", "compare", "engines", "bench-gpu"])
def test_default_recipe_does_not_depend_on_the_working_directory(monkeypatch, tmp_path, command):
    monkeypatch.chdir(tmp_path)
    path = cli.default_recipe()
    assert path.is_absolute() and path.is_file()
    assert path == ROOT / cli.DEFAULT_RECIPE
    assert cli.default_recipe(cli.DEFAULT_DISTILL_RECIPE).is_file()
    # no default baked into the parser as a relative path
    assert cli._parser().parse_args([command]).recipe is None


def test_without_the_examples_the_default_recipe_asks_for_one(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "REPOSITORY", tmp_path)  # an installed package: no examples/ beside it
    for command in (["compare"], ["quantize"], ["distill"]):
        assert main([*command, "--runs", str(tmp_path / "runs")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "give --recipe" in err


def test_core_dependencies_leave_the_extras_out():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {
        dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower() for dep in project["dependencies"]
    }
    for heavy in ("openvino", "nncf", "brevitas", "onnxoptimizer", "transformers", "scikit-learn", "tensorrt"):
        assert heavy not in core
    assert {"torch", "onnx", "onnxruntime", "nvidia-modelopt", "diffusers", "numpy"} <= core
    extras = project["optional-dependencies"]
    names = {name: {dep.split(">")[0].split("<")[0].strip() for dep in deps} for name, deps in extras.items()}
    assert names["openvino"] == {"openvino", "nncf"}
    assert "brevitas" in names["lowbit"] and names["text"] == {"transformers"} and names["examples"] == {"scikit-learn"}
    assert {"dev", "openvino", "lowbit", "text", "examples", "gpu"} <= set(extras)
    # make install installs every extra but gpu
    makefile = (ROOT / "Makefile").read_text()
    assert "EXTRAS := dev,openvino,lowbit,text,examples" in makefile and '-e ".[$(EXTRAS)]"' in makefile
