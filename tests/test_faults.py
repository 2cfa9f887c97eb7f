"""Faults injected into a finished tiny run: each gets exit 2 (3 for an engine not faithful on
this host) and one line naming the file or setting, and nothing corrupt is re-hashed as good."""

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from flowpress.cli import main
from flowpress.engines import check_steps
from flowpress.rundir import run_lock, staged_run, write_json
from flowpress.sampling import Schedule

from .conftest import EVALUATOR, ROOT, calibrate

RECIPE = """
name: tiny
model: {{path: {model}}}
sampling: {{steps: 4, guidance: {guidance}}}
calibration: {{n_samples: 8}}
engine: {{candidates: false}}
compare: {{n_samples: 10, batch_size: 10, latency_runs: 2}}
gate: {{min_final_psnr_db: 10.0, metrics: {{classifier_acc: {{max_drop: 0.5{gate}}}}}}}
evaluator: {evaluator}
"""


def write_recipe(folder: Path, model: Path, guidance: float = 2.0, gate: str = "") -> Path:
    path = folder / "recipe.yaml"
    path.write_text(RECIPE.format(model=model, guidance=guidance, gate=gate, evaluator=EVALUATOR))
    return path


def cli(command: str, recipe: Path, runs: Path, capsys) -> tuple[int, str]:
    code = main([command, "--recipe", str(recipe), "--runs", str(runs), "--quiet"])
    return code, capsys.readouterr().err.strip()


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """(model dir, runs dir) of a finished tiny int8 run; tests copy it before breaking it."""
    tmp = tmp_path_factory.mktemp("faults")
    model = tmp / "model"
    shutil.copytree(tiny_model_dir, model)
    code = main(["quantize", "--recipe", str(write_recipe(tmp, model)), "--runs", str(tmp / "runs"), "--quiet"])
    assert code == 0
    return model, tmp / "runs"


@pytest.fixture
def run(finished, tmp_path):
    """A private copy of the finished run (and its model): (recipe, runs dir, run dir)."""
    model, runs = finished
    shutil.copytree(model, tmp_path / "model")
    shutil.copytree(runs, tmp_path / "runs")
    return write_recipe(tmp_path, tmp_path / "model"), tmp_path / "runs", tmp_path / "runs" / "tiny"


def flip_bytes(path: Path, count: int = 256) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(255 - b for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def one_line(err: str) -> str:
    assert len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------- 1, 2: checked before trusted


@pytest.mark.slow
def test_engines_refuses_a_corrupted_engine_and_keeps_the_manifest(run, capsys):
    recipe, runs, run_dir = run
    flip_bytes(run_dir / "engine" / "model.opt.onnx")
    before = (run_dir / "manifest.json").read_bytes()
    code, err = cli("engines", recipe, runs, capsys)
    assert code == 2 and "engine/model.opt.onnx: changed since it was written" in one_line(err)
    assert (run_dir / "manifest.json").read_bytes() == before


@pytest.mark.slow
def test_compare_refuses_truncated_calibration_and_keeps_the_report(run, capsys):
    recipe, runs, run_dir = run
    calibration = run_dir / "calibration" / "inputs.safetensors"
    calibration.write_bytes(calibration.read_bytes()[:1000])
    before = snapshot(run_dir)
    code, err = cli("compare", recipe, runs, capsys)
    assert code == 2 and "inputs.safetensors: changed since it was written" in one_line(err)
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_compare_refuses_a_deleted_engine_manifest(run, capsys):
    recipe, runs, run_dir = run
    (run_dir / "engine" / "engine.json").unlink()
    code, err = cli("compare", recipe, runs, capsys)
    assert code == 2 and "engine/engine.json: missing, though manifest.json records it" in one_line(err)
    assert "engine/engine.json" in json.loads((run_dir / "manifest.json").read_text())["outputs"]


@pytest.mark.slow
def test_engines_does_not_rebuild_from_a_corrupted_source(run, capsys):
    recipe, runs, run_dir = run
    flip_bytes(run_dir / "model.onnx", 64)
    (run_dir / "engine" / "model.opt.onnx").unlink()
    before = snapshot(run_dir)
    code, err = cli("engines", recipe, runs, capsys)
    assert code == 2 and "model.onnx" in one_line(err)
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_a_changed_checkpoint_is_named_and_the_old_report_stays(run, capsys):
    recipe, runs, run_dir = run
    from safetensors.torch import load_file, save_file

    weights_file = next((recipe.parent / "model").glob("*.safetensors"))
    weights = load_file(str(weights_file))
    weights["conv_out.weight"] = weights["conv_out.weight"] * 3
    save_file(weights, str(weights_file))
    before = snapshot(run_dir)
    code, err = cli("compare", recipe, runs, capsys)
    assert code == 2 and "model checkpoint changed since this run was made" in one_line(err)
    assert weights_file.name in err and snapshot(run_dir) == before


# ---------------------------------------------------------------- 3, 8: one writer, whole swaps


@pytest.mark.slow
def test_a_second_run_of_a_recipe_is_refused_while_one_holds_it(run, capsys):
    recipe, runs, run_dir = run
    before = snapshot(run_dir)
    with run_lock(run_dir, "quantize (the first)"):
        code, err = cli("quantize", recipe, runs, capsys)
    assert code == 2 and "another flowpress command is writing this run" in one_line(err)
    assert f"pid {os.getpid()}" in err and "quantize (the first)" in err
    assert snapshot(run_dir) == before and sorted(p.name for p in runs.iterdir()) == ["tiny"]


def test_a_failed_swap_leaves_the_previous_run_whole(tmp_path, monkeypatch):
    final = tmp_path / "runs" / "r"
    final.mkdir(parents=True)
    (final / "report.json").write_text("old")
    real_rename = Path.rename

    def rename(self, target):
        if self.name == ".r.partial":
            raise OSError(5, "Input/output error")  # the second rename of the swap fails
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError), staged_run(final) as tmp:
        (tmp / "report.json").write_text("new")
    assert (final / "report.json").read_text() == "old"
    assert sorted(p.name for p in final.parent.iterdir()) == ["r"]


# ---------------------------------------------------------------- 4: the graph refuses bad steps


@pytest.mark.slow
def test_the_engine_graph_itself_refuses_steps_outside_its_schedule(run):
    _, _, run_dir = run
    session = ort.InferenceSession(str(run_dir / "engine" / "model.opt.onnx"), providers=["CPUExecutionProvider"])
    x = np.zeros((1, 1, 16, 16), np.float32)
    labels = np.array([1], np.int64)
    good = session.run(None, {"x": x, "step": np.array([3], np.int64), "class_labels": labels})[0]
    assert np.isfinite(good).all()
    for step in (-1, -5, 4):  # 4 steps: Euler evaluates 0..3
        try:
            out = session.run(None, {"x": x, "step": np.array([step], np.int64), "class_labels": labels})[0]
        except Exception:  # noqa: BLE001 - onnxruntime's own error for an index past the tables
            continue
        assert np.isnan(out).all(), step


def test_step_checks_take_tensors_that_do_not_live_in_host_memory():
    class OnGpu(torch.Tensor):
        """Stands for a CUDA tensor: reports a GPU device and refuses .numpy() as CUDA tensors do."""

        @property
        def device(self):
            return torch.device("cuda", 0)

        def numpy(self, *args, **kwargs):
            raise TypeError("can't convert cuda:0 device type tensor to numpy")

        def to(self, *args, **kwargs):
            return self.as_subclass(torch.Tensor).to(*args, **kwargs)

    engine = SimpleNamespace(name="probe", schedule=Schedule(4))
    check_steps(engine, torch.tensor([0, 3]).as_subclass(OnGpu))
    with pytest.raises(Exception, match="step 4 is outside its schedule"):
        check_steps(engine, torch.tensor([4]).as_subclass(OnGpu))


# ---------------------------------------------------------------- 5, 10: bad input in one line


@pytest.mark.slow
def test_a_corrupt_engine_file_is_one_line_even_with_a_matching_manifest(run, capsys):
    recipe, runs, run_dir = run
    engine = run_dir / "engine" / "model.opt.onnx"
    engine.write_bytes(b"\x08\x07garbage" * 100)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["outputs"]["engine/model.opt.onnx"] = hashlib.sha256(engine.read_bytes()).hexdigest()
    write_json(run_dir / "manifest.json", manifest)
    code, err = cli("compare", recipe, runs, capsys)
    assert code == 2 and "onnxruntime cannot load this engine" in one_line(err)


@pytest.mark.slow
def test_an_invalid_manifest_is_refused_before_any_work(run, capsys):
    recipe, runs, run_dir = run
    (run_dir / "manifest.json").write_text('{"outputs": ')
    code, err = cli("compare", recipe, runs, capsys)
    assert code == 2 and "manifest.json: not valid JSON" in one_line(err)


@pytest.mark.parametrize("value", [float("nan"), 1e30])
def test_a_nan_or_overflowing_weight_is_named_before_quantization(tiny_model_dir, tmp_path, capsys, value):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights_file = next(model.glob("*.safetensors"))
    weights = load_file(str(weights_file))
    weights["conv_in.weight"][0, 0, 0, 0] = value
    save_file(weights, str(weights_file))
    code, err = cli("quantize", write_recipe(tmp_path, model), tmp_path / "runs", capsys)
    assert code == 2 and "weight conv_in.weight" in one_line(err)
    assert not (tmp_path / "runs" / "tiny").exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [("steps: 0", "steps must be an integer >= 1, got 0"), ("guidance: -1.0", "guidance must be >= 0")],
)
def test_nonsense_sampling_settings_are_refused(tiny_model_dir, tmp_path, capsys, setting, message):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    recipe.write_text(recipe.read_text().replace("steps: 4, guidance: 2.0", setting))
    code, err = cli("quantize", recipe, tmp_path / "runs", capsys)
    assert code == 2 and message in one_line(err)


@pytest.mark.slow
def test_the_gate_judges_the_fp_reference_too(tiny_model_dir, tmp_path, capsys):
    # the random tiny UNet's FP samples are recognised as their class 5-10% of the time: a floor of
    # 0.5 must fail the gate whatever the engine's agreement with FP
    recipe = write_recipe(tmp_path, tiny_model_dir, gate=", min_reference: 0.5")
    code = main(["quantize", "--recipe", str(recipe), "--runs", str(tmp_path / "runs"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1 and "gate reference_classifier_acc" in out and ">= 0.5: FAILED" in out


def _run_cli_limited(args: list[str], limit_bytes: int | None = None):
    """The CLI in a child process, its writes capped at `limit_bytes` (RLIMIT_FSIZE: a write past
    it fails with EFBIG, as a full disk fails one with ENOSPC)."""

    def setup() -> None:
        if limit_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "MPLCONFIGDIR": "/tmp", "HOME": "/tmp", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "flowpress", *args, "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=setup,
        timeout=600,
    )


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    runs = tmp_path / "runs"
    done = _run_cli_limited(["quantize", "--recipe", str(recipe), "--runs", str(runs)], limit_bytes=60_000)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "File too large" in one_line(done.stderr.strip()) and "free space" in done.stderr
    assert not runs.exists() or list(runs.iterdir()) == []


@contextmanager
def read_only(folder: Path):
    """`folder` unwritable even for root (immutable: chattr +i), or by its mode for other users."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield
        folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: no way to make a directory read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.slow
def test_a_read_only_runs_directory_is_one_line(tiny_model_dir, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    with read_only(runs):
        done = _run_cli_limited(
            ["quantize", "--recipe", str(write_recipe(tmp_path, tiny_model_dir)), "--runs", str(runs)]
        )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot write (" in one_line(done.stderr.strip()) and str(runs) in done.stderr
    assert list(runs.iterdir()) == []


# ---------------------------------------------------------------- the engine's host


@pytest.mark.slow
def test_an_engine_is_revalidated_on_a_host_of_another_class(run, capsys, monkeypatch):
    recipe, runs, run_dir = run
    engine_json = json.loads((run_dir / "engine" / "engine.json").read_text())
    assert engine_json["validated_on"]["isa_class"] and engine_json["host_check"]["figures"]["ort-int8"] > 0
    recorded = engine_json["validated_on"]["isa_class"]
    other = "x86-amx" if recorded != "x86-amx" else "x86-avx2"
    monkeypatch.setenv("FLOWPRESS_ISA", other)
    code, _ = cli("compare", recipe, runs, capsys)
    report = json.loads((run_dir / "report.json").read_text())
    revalidated = report["host"]["revalidated"]
    assert code == 0 and revalidated["isa_class"] == other and revalidated["emulated"]
    # the same kernels ran both times here: the figure is the recorded one
    assert revalidated["figures"]["ort-int8"] == pytest.approx(engine_json["host_check"]["figures"]["ort-int8"])


@pytest.mark.slow
def test_an_engine_that_drifted_on_another_class_is_refused_naming_both(run, capsys, monkeypatch):
    recipe, runs, run_dir = run
    path = run_dir / "engine" / "engine.json"
    engine_json = json.loads(path.read_text())
    engine_json["validated_on"]["isa_class"] = "x86-avx512-vnni"
    engine_json["host_check"]["figures"]["ort-int8"] /= 10  # as exact as a VNNI host measured it
    write_json(path, engine_json)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["outputs"]["engine/engine.json"] = hashlib.sha256(path.read_bytes()).hexdigest()
    write_json(run_dir / "manifest.json", manifest)
    monkeypatch.setenv("FLOWPRESS_ISA", "x86-avx2")
    before = snapshot(run_dir)
    code, err = cli("compare", recipe, runs, capsys)
    assert code == 3 and "validated on x86-avx512-vnni" in one_line(err) and "x86-avx2 host" in err
    assert "engine.portable: true" in err and snapshot(run_dir) == before


def test_a_parity_failure_names_the_saturation_and_the_form_that_passes(tiny_model_dir, monkeypatch):
    from flowpress.compress import Int8Config, quantize, set_weight_bits
    from flowpress.engines.build import parity_failure
    from flowpress.engines.isa import host_isa
    from flowpress.errors import EngineParityError
    from flowpress.export.validate import Parity
    from flowpress.models import load_model

    model = load_model(tiny_model_dir)
    calib = calibrate(model)
    qmodel = quantize(model, Int8Config(), calib, Schedule(4))
    set_weight_bits(qmodel, 8)
    monkeypatch.setenv("FLOWPRESS_ISA", "x86-avx2")
    failed = EngineParityError(
        "x", (Parity("disabled", 0.999, 0.11), Parity("all", 0.93, 5.73))
    )  # as this tiny model measured on an AVX2 host
    err = parity_failure(failed, qmodel, calib, host_isa(), "tiny: model.onnx")
    message = str(err)
    assert err.exit_code == 3 and message.startswith("tiny: model.onnx: onnxruntime's int8 kernels")
    assert "x86-avx2 host (no VNNI) saturate 8-bit weights" in message and "all: 5.730" in message
    assert "7-bit weights measured noise ratio" in message and "engine.portable: true" in message
    assert ".partial" not in message and "\n" not in message


def test_an_unexpected_exception_is_exit_2_naming_its_stage_with_the_traceback_kept(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    def broken(*args, **kwargs):
        raise RuntimeError("injected fault\nin a library")

    monkeypatch.setattr("flowpress.stages.chain.quantize", broken)
    runs = tmp_path / "runs"
    code = main(["quantize", "--recipe", str(write_recipe(tmp_path, tiny_model_dir)), "--runs", str(runs), "--quiet"])
    err = one_line(capsys.readouterr().err.strip())
    assert code == 2 and "tiny: stage 'quantize' failed with RuntimeError (injected fault)" in err
    log = runs / ".tiny.failed" / "error.log"
    assert str(log) in err and "Traceback" in log.read_text() and "in a library" in log.read_text()
    assert [p.name for p in runs.iterdir()] == [".tiny.failed"]  # no run, no partial, no lock


def test_a_run_the_machine_cannot_hold_is_refused_before_any_work(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from flowpress.models import load_model
    from flowpress.plan import plan_memory

    plan = plan_memory(tiny_model_dir, openvino=False)  # from the safetensors header, before anything loads
    assert plan.denoiser_parameters == sum(p.numel() for p in load_model(tiny_model_dir).parameters())
    assert plan.denoiser_fp32_bytes == 4 * plan.denoiser_parameters and plan.peak_bytes > plan.denoiser_fp32_bytes
    assert plan_memory(tiny_model_dir, openvino=True).peak_bytes > plan.peak_bytes  # NNCF holds more
    monkeypatch.setattr("flowpress.plan.available_bytes", lambda: plan.peak_bytes - 1)
    runs = tmp_path / "runs"
    code = main(["quantize", "--recipe", str(write_recipe(tmp_path, tiny_model_dir)), "--runs", str(runs), "--quiet"])
    err = one_line(capsys.readouterr().err.strip())
    assert code == 2 and f"needs about {plan.peak_bytes / 1e9:.1f} GB of memory" in err and "available" in err
    assert not runs.exists()
