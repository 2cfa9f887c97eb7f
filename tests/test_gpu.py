"""`flowpress engines` / `bench-gpu` and the TensorRT engine.

On a CPU machine: the commands lint, keep the onnxruntime CPU engine and skip TensorRT in
one line; the manifest checks that guard a plan are pure functions and run here too.
Tests that build or run a TensorRT plan carry @pytest.mark.gpu and skip, with the reason,
where the tensorrt module or a CUDA GPU is missing.
"""

from __future__ import annotations

import dataclasses
import json

import onnx
import pytest
import torch

from flowpress.cli import main
from flowpress.engines import OrtEngine
from flowpress.errors import FlowpressError
from flowpress.export import export_onnx, ort_session
from flowpress.export.lint import BatchProfile
from flowpress.export.tensorrt import GpuIdentity, TensorRTConfig, sha256_file, tensorrt_unavailable
from flowpress.models import StepModel, load_model
from flowpress.recipe import load_recipe
from flowpress.rundir import tree_hashes
from flowpress.sampling import Schedule
from flowpress.stages.gpu import _row, batch_profile

from .conftest import EVALUATOR

SCHEDULE = Schedule(4)
GPU_PROFILE = BatchProfile(1, 8, 16)
RECIPE = """
name: tiny-int8
model: {{path: {model}}}
sampling: {{steps: {steps}, guidance: 2.0}}
compare: {{n_samples: 10, batch_size: 10, latency_runs: 2}}
gate: {{min_final_psnr_db: {psnr}, metrics: {{classifier_acc: {{max_drop: 0.5}}}}}}
evaluator: {evaluator}
"""


def recipe_file(tmp_path, model, steps=4, psnr=30.0):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=model, steps=steps, psnr=psnr, evaluator=EVALUATOR))
    return path


@pytest.fixture(scope="module")
def fp32_graph(tiny_model_dir, tmp_path_factory):
    """The tiny UNet's FP graph, exported once for this module."""
    return export_onnx(StepModel(load_model(tiny_model_dir), SCHEDULE), tmp_path_factory.mktemp("fp32") / "fp32.onnx")


@pytest.fixture
def run(tiny_model_dir, fp32_graph, tmp_path):
    """runs/tiny-int8/ with what `engines` reads: manifest (schedule, hashes), model.onnx,
    model.tensorrt.onnx, fp32.onnx, the onnxruntime engine, report.json.  FP graphs stand in for
    the Q/DQ ones (lint and the onnxruntime engine treat them alike, and exporting takes a
    second); test_tensorrt_lint covers Q/DQ graphs."""
    run_dir = tmp_path / "runs" / "tiny-int8"
    (run_dir / "engine").mkdir(parents=True)
    for name in ("fp32.onnx", "model.onnx", "model.tensorrt.onnx", "engine/model.opt.onnx"):
        (run_dir / name).write_bytes(fp32_graph.read_bytes())
    (run_dir / "engine" / "engine.json").write_text(json.dumps({"runtime": "onnxruntime"}) + "\n")
    (run_dir / "report.json").write_text(json.dumps({"gate": {"passed": True}}) + "\n")
    rehash(run_dir)
    return recipe_file(tmp_path, tiny_model_dir), run_dir


def rehash(run_dir):
    """manifest.json as `make quantize` would have written it for the files now in run_dir."""
    hashes = {k: v for k, v in tree_hashes(run_dir).items() if k != "manifest.json"}
    manifest = {"schedule": SCHEDULE.as_dict(), "outputs": hashes}
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def cli(command, recipe, run_dir):
    return main([command, "--recipe", str(recipe), "--runs", str(run_dir.parent), "--quiet"])


def cpu_only_reason():
    reason = tensorrt_unavailable()
    if reason is None:
        pytest.skip("TensorRT and a CUDA GPU are present here: the gpu-marked tests cover this host")
    return reason


def test_engines_on_cpu_prints_one_skip_line_and_leaves_the_run_as_it_was(run, capsys):
    reason = cpu_only_reason()
    recipe, run_dir = run
    before = tree_hashes(run_dir)
    for _ in range(2):
        assert cli("engines", recipe, run_dir) == 0
        assert capsys.readouterr().out.splitlines() == [f"[flowpress] tensorrt: skipped: {reason}"]
    assert tree_hashes(run_dir) == before and not (run_dir / "engine" / "tensorrt").exists()
    assert not [p for p in run_dir.parent.iterdir() if p.name.startswith(".")]  # no lock or staging left


def test_engines_stops_on_a_lint_issue_before_anything_else(run, capsys):
    recipe, run_dir = run
    graph = onnx.load(str(run_dir / "model.tensorrt.onnx"))
    graph.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    onnx.save(graph, str(run_dir / "model.tensorrt.onnx"))
    rehash(run_dir)  # a run made with that graph
    before = tree_hashes(run_dir)
    assert cli("engines", recipe, run_dir) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "[dynamic-dim] x: input dim 2 is dynamic" in err
    assert "model.tensorrt.onnx" in err and tree_hashes(run_dir) == before


def test_engines_without_a_run_says_make_quantize(tiny_model_dir, tmp_path, capsys):
    code = main(["engines", "--recipe", str(recipe_file(tmp_path, tiny_model_dir)), "--runs", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "run `make quantize" in err and "tiny-int8" in err


def test_engines_refuses_a_run_quantized_for_another_schedule(run, tiny_model_dir, capsys):
    _, run_dir = run
    recipe = recipe_file(run_dir.parent.parent, tiny_model_dir, steps=6)
    assert cli("engines", recipe, run_dir) == 2
    err = capsys.readouterr().err
    assert "quantized for the 4-step euler schedule" in err and "6-step" in err


def test_bench_gpu_on_cpu_skips_in_one_line_and_leaves_the_report(run, capsys):
    reason = cpu_only_reason()
    recipe, run_dir = run
    report = (run_dir / "report.json").read_bytes()
    assert cli("bench-gpu", recipe, run_dir) == 0
    assert capsys.readouterr().out.splitlines() == [f"[flowpress] bench-gpu: skipped: {reason}"]
    assert (run_dir / "report.json").read_bytes() == report


def test_profile_covers_the_samplers_guided_batch(tmp_path, tiny_model_dir):
    recipe = load_recipe(recipe_file(tmp_path, tiny_model_dir))
    assert batch_profile(recipe) == BatchProfile(1, 20, 20)  # compare batch 10, doubled by guidance 2
    small = dataclasses.replace(recipe, compare=dataclasses.replace(recipe.compare, batch_size=2))
    assert batch_profile(small) == BatchProfile(1, 4, 8)  # max stays >= 8 for the b8 latency row


def test_images_per_second_from_step_latency():
    # 4 Euler evaluations per image, 20-row forwards = 10 images under guidance, 10 ms each:
    # 40 ms per 10 images -> 250 images/s
    assert _row(10.0, 20, Schedule(4), 2.0) == {"ms_per_step": 10.0, "images_per_s": 250.0}
    assert _row(10.0, 20, Schedule(4, "heun"), 1.0)["images_per_s"] == 400.0  # 5 evaluations, 20 images


def test_tensorrt_config_rejects_bad_values():
    with pytest.raises(FlowpressError, match="optimization_level must be 0..5"):
        TensorRTConfig(optimization_level=7)
    with pytest.raises(FlowpressError, match="precision must be"):
        TensorRTConfig(precision="int4")  # type: ignore[arg-type]


class OrtStandIn(OrtEngine):
    """Stands in for TensorRTEngine where no GPU is: the stage's own logic (staging, compare, gate,
    report, hashes) is what the next test checks, not TensorRT."""

    def __init__(self, plan, schedule, name="tensorrt"):
        manifest = json.loads(plan.with_suffix(".json").read_text())
        super().__init__(plan.parent.parent.parent / manifest["source"], schedule, name)


def fake_build(onnx_path, plan_path, schedule, config, calibration_sha256=None):
    from flowpress.export.tensorrt import EngineBuild, manifest_path

    plan_path.write_bytes(b"plan")
    manifest = {"precision": "int8", "source": onnx_path.name, "profile": config.profile.as_dict()}
    manifest_path(plan_path).write_text(json.dumps(manifest))
    return EngineBuild(plan_path, manifest_path(plan_path), manifest, 0.0)


@pytest.mark.parametrize(("psnr", "code"), [(30.0, 0), (1000.0, 1)])
def test_engines_with_tensorrt_validates_the_plan_and_exits_by_the_gate(run, monkeypatch, capsys, psnr, code):
    import flowpress.engines.tensorrt
    import flowpress.export.tensorrt
    import flowpress.stages.gpu

    recipe, run_dir = run
    recipe = recipe_file(recipe.parent, load_recipe(recipe).model.path, psnr=psnr)
    monkeypatch.setattr(flowpress.stages.gpu, "tensorrt_unavailable", lambda: None)
    monkeypatch.setattr(flowpress.export.tensorrt, "build_engine", fake_build)
    monkeypatch.setattr(flowpress.engines.tensorrt, "TensorRTEngine", OrtStandIn)
    assert cli("engines", recipe, run_dir) == code
    out = capsys.readouterr().out
    assert "TensorRT lint clean" in out and ("gate: PASSED" if code == 0 else "gate: FAILED") in out
    folder = run_dir / "engine" / "tensorrt"
    for name in ("model.plan", "model.json", "report.json", "report.md", "samples.npz", "trajectory_error.png"):
        assert (folder / name).is_file(), name
    report = json.loads((folder / "report.json").read_text())
    assert report["gate"]["passed"] is (code == 0) and report["n_samples"] == 10
    assert report["engine_manifest"]["profile"] == {"min": 1, "opt": 20, "max": 20}
    assert report["final"]["psnr_db"] > 60  # the stand-in runs the FP graph: it matches FP
    assert set(report["latency_ms"]) == {"engine"} and report["latency_ms"]["engine"]["b8"] > 0
    outputs = json.loads((run_dir / "manifest.json").read_text())["outputs"]
    assert outputs["engine/tensorrt/model.plan"] == sha256_file(folder / "model.plan")
    assert [p.name for p in (run_dir / "engine").iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- the manifest check every plan load runs

H100 = GpuIdentity("NVIDIA H100 80GB HBM3", (9, 0), "10.8.0.43")


def built_manifest(**changes):
    manifest = {
        "tensorrt": "10.8.0.43",
        "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
        "schedule": SCHEDULE.as_dict(),
    }
    manifest.update(changes)
    return manifest


def test_manifest_of_this_gpu_and_schedule_is_accepted():
    from flowpress.engines.tensorrt import check_manifest

    check_manifest(built_manifest(), SCHEDULE, H100, "model.plan")


@pytest.mark.parametrize(
    ("changes", "schedule", "says"),
    [
        ({"tensorrt": "10.3.0"}, SCHEDULE, "built by TensorRT 10.3.0, TensorRT 10.8.0.43 is installed"),
        ({"gpu": {"name": "NVIDIA L4", "compute_capability": "9.0"}}, SCHEDULE, "built on NVIDIA L4"),
        (
            {"gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "8.9"}},
            SCHEDULE,
            "compute capability 8.9, this GPU has 9.0",
        ),
        ({}, Schedule(20), "built for the 4-step euler schedule, 20-step euler requested"),
        ({}, Schedule(4, "heun"), "4-step heun requested"),
    ],
)
def test_manifest_mismatch_is_refused_in_one_line(changes, schedule, says):
    from flowpress.engines.tensorrt import check_manifest

    with pytest.raises(FlowpressError) as err:
        check_manifest(built_manifest(**changes), schedule, H100, "runs/x/engine/tensorrt/model.plan")
    message = str(err.value)
    assert says in message and "`make engines` rebuilds it" in message and "\n" not in message
    assert message.startswith("runs/x/engine/tensorrt/model.plan: ")


def test_missing_plan_or_manifest_says_make_engines(tmp_path):
    from flowpress.engines.tensorrt import read_manifest

    (tmp_path / "model.plan").write_bytes(b"plan")
    with pytest.raises(FlowpressError, match=r"model.json missing; build it with `make engines`"):
        read_manifest(tmp_path / "model.plan")


def test_ort_gpu_engine_names_the_missing_provider(fp32_graph):
    import onnxruntime as ort

    from flowpress.engines.tensorrt import OrtGpuEngine

    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()):
        pytest.skip("onnxruntime-gpu is installed: the gpu-marked tests cover it")
    with pytest.raises(FlowpressError, match=r"no GPU provider here \(available: .*CPUExecutionProvider"):
        OrtGpuEngine(fp32_graph, SCHEDULE)


# ---------------------------------------------------------------- on a GPU host with TensorRT


@pytest.fixture(scope="module")
def gpu():
    """The identity of this GPU; skips (with the reason) where tensorrt or a CUDA GPU is missing."""
    pytest.importorskip("tensorrt", reason="the tensorrt module is not installed (pip install -e '.[gpu]')")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    from flowpress.export.tensorrt import current_gpu

    return current_gpu()


@pytest.fixture(scope="module")
def qdq(gpu, tiny_tensorrt_export):
    """(tensorrt-flavour int8 graph path, fp32 graph path, feeds) of the tiny UNet."""
    return tiny_tensorrt_export


def ort_cpu(path, feeds):
    return torch.from_numpy(ort_session(path).run(None, {k: v.numpy() for k, v in feeds.items()})[0])


def cond(feeds):
    """The conditioning inputs of engine feeds (everything but x and step), as engines take them."""
    return {k: v for k, v in feeds.items() if k not in ("x", "step")}


def rel_l2(reference, test):
    return float((test - reference).norm() / reference.norm())


def build(onnx_path, tmp_path, profile=GPU_PROFILE):
    from flowpress.export.tensorrt import build_engine

    config = TensorRTConfig(profile=profile, timing_cache=str(tmp_path / "timing.cache"))
    return build_engine(onnx_path, tmp_path / "model.plan", SCHEDULE, config, calibration_sha256="0" * 64)


@pytest.mark.gpu
def test_int8_plan_runs_like_onnxruntime_and_records_its_build(gpu, qdq, tmp_path):
    from flowpress.engines.tensorrt import TensorRTEngine

    onnx_path, fp32, feeds = qdq
    built = build(onnx_path, tmp_path)
    manifest = json.loads((tmp_path / "model.json").read_text())
    assert manifest == built.manifest and manifest["precision"] == "int8" and manifest["strongly_typed"]
    assert manifest["gpu"]["name"] == gpu.name and manifest["tensorrt"] == gpu.tensorrt
    assert manifest["profile"] == {"min": 1, "opt": 8, "max": 16} and manifest["schedule"]["n_steps"] == 4
    assert manifest["onnx_sha256"] == sha256_file(onnx_path) and manifest["calibration_sha256"] == "0" * 64
    assert (tmp_path / "timing.cache").stat().st_size > 0
    engine = TensorRTEngine(built.plan, SCHEDULE)
    v = engine(feeds["x"], feeds["step"], cond(feeds))  # CPU in, CPU out, batch 16 = profile max
    assert v.device.type == "cpu" and v.dtype == torch.float32
    # TensorRT's int8 kernels differ from onnxruntime's by rounding flips, never by more than
    # the quantization noise itself (int8 vs FP)
    reference, fp = ort_cpu(onnx_path, feeds), ort_cpu(fp32, feeds)
    assert rel_l2(reference, v) < 2 * rel_l2(fp, reference)
    on_gpu = engine(feeds["x"].cuda(), feeds["step"].cuda(), {k: v.cuda() for k, v in cond(feeds).items()})
    assert on_gpu.is_cuda and torch.allclose(on_gpu.cpu(), v, atol=1e-5)


@pytest.mark.gpu
def test_plan_refuses_another_schedule_and_a_batch_outside_its_profile(gpu, qdq, tmp_path):
    from flowpress.engines.tensorrt import TensorRTEngine

    built = build(qdq[0], tmp_path, BatchProfile(1, 2, 4))
    with pytest.raises(FlowpressError, match="4-step euler schedule, 5-step euler requested"):
        TensorRTEngine(built.plan, Schedule(5))
    engine = TensorRTEngine(built.plan, SCHEDULE)
    feeds = qdq[2]
    with pytest.raises(FlowpressError, match=r"batch 16 is outside its profile 1..4"):
        engine(feeds["x"], feeds["step"], cond(feeds))


@pytest.mark.gpu
def test_fp8_plan_on_ada_or_newer(gpu, qdq, tmp_path):
    from flowpress.engines.tensorrt import TensorRTEngine
    from flowpress.export.fp8 import to_fp8

    if gpu.compute_capability < (8, 9):
        pytest.skip(f"fp8 needs compute capability >= 8.9; {gpu.name} has {gpu.as_dict()['compute_capability']}")
    onnx_path, fp32, feeds = qdq
    fp8_path = tmp_path / "model.fp8.onnx"
    onnx.save(to_fp8(onnx.load(str(onnx_path))), str(fp8_path))
    built = build(fp8_path, tmp_path)
    assert built.manifest["precision"] == "fp8"
    v = TensorRTEngine(built.plan, SCHEDULE)(feeds["x"], feeds["step"], cond(feeds))
    reference, fp = ort_cpu(fp8_path, feeds), ort_cpu(fp32, feeds)
    assert rel_l2(reference, v) < 2 * rel_l2(fp, reference)
