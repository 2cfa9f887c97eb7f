"""`flowpress bench` on the tiny UNet, and the onnxruntime engine's I/O binding."""

import torch

from engines import OrtEngine, interleaved_step_times
from export.openvino import cpu_has_bf16
from flowpress.bench import BenchConfig, BenchModel, bars, bench_model
from sampling import Schedule

from .conftest import CLASSIFIER, TINY_SCHEDULE

RECIPE = """
name: tiny-bench
model: {{path: {model}}}
sampling: {{steps: {steps}, guidance: {guidance}}}
calibration: {{n_samples: 8}}
quantize: {{{quantize}}}
export: {{{export}}}
classifier: {{path: {classifier}}}
"""
RECIPES = {  # name: (steps, guidance, quantize, export)
    "tiny": (4, 2.0, "amax: perstep-mean", "flavour: ort-cpu"),
    "fp8": (4, 2.0, "precision: fp8, amax: max", "flavour: tensorrt"),
    "w4a8": (4, 2.0, "precision: w4a8, recon_iters: 5, recon_samples: 16", "flavour: ort-cpu, opset: 21"),
    # the tiny UNet itself stands in for a distilled student: one step, no guidance
    "student": (1, 1.0, "amax: mse", "flavour: ort-cpu"),
}


def test_io_binding_matches_run_and_never_aliases_its_buffer(tiny_tensorrt_export):
    _, fp32, feeds = tiny_tensorrt_export
    bound = OrtEngine(fp32, TINY_SCHEDULE, io_binding=True)
    plain = OrtEngine(fp32, TINY_SCHEDULE, io_binding=False)
    x, step, cond = feeds["x"][:4], feeds["step"][:4], feeds["class_labels"][:4]
    first = bound(x, step, cond)
    assert torch.equal(first, plain(x, step, cond))
    kept = first.clone()
    bound(x.flip(0), step, cond)  # same shape: the output buffer is reused
    assert torch.equal(first, kept)


def test_interleaved_timing_rotates_the_engines_and_times_runs_each():
    calls = []

    class Probe:
        def __init__(self, name):
            self.name, self.schedule = name, Schedule(3)

        def __call__(self, x, step, cond):
            calls.append((self.name, int(step[0])))
            return x

    engines = {name: Probe(name) for name in "abc"}
    times = interleaved_step_times(engines, 2, (1, 4, 4), runs=7, warmup=2, block=3, settle=2)
    assert {name: len(t) for name, t in times.items()} == {"a": 7, "b": 7, "c": 7}
    assert all((t > 0).all() for t in times.values())
    timed = calls[6:]  # after 2 warm-up forwards each
    # rounds of 2 untimed + 3 timed forwards (the last round: 2 + 1), starting engine rotating
    firsts = [timed[0][0], timed[15][0], timed[30][0]]
    assert firsts == ["a", "b", "c"] and len(timed) == 3 * (5 + 5 + 3)
    assert [s for n, s in calls if n == "a"][:5] == [0, 1, 2, 0, 1]  # steps cycle through the schedule


def test_bench_rows_on_the_tiny_unet(tiny_model_dir, tmp_path):
    paths = {}
    for name, (steps, guidance, quantize, export) in RECIPES.items():
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(
            RECIPE.format(
                model=tiny_model_dir,
                classifier=CLASSIFIER,
                steps=steps,
                guidance=guidance,
                quantize=quantize,
                export=export,
            )
        )
    variants = (
        "torch-fp32",
        "ort-fp32",
        "ov-nncf-default",
        "flowpress-ort-int8",
        "flowpress-ov-int8",
        "flowpress-fp8",
        "flowpress-w4a8",
        "student",
    )
    spec = BenchModel(
        name="tiny",
        recipe=str(paths["tiny"]),
        n_samples=10,
        fp8_recipe=str(paths["fp8"]),
        w4a8_recipe=str(paths["w4a8"]),
        student_recipe=str(paths["student"]),
    )
    config = BenchConfig(
        models=(spec,),
        variants=variants,
        runs=30,
        loops=1,
        sample_batch=10,
        profile_runs=2,
    )
    (tmp_path / "work").mkdir()
    result = bench_model(config.models[0], config, tmp_path / "work", progress=False)
    rows = {(r["variant"], r["batch"]): r for r in result["rows"]}
    assert sorted(rows) == sorted((v, b) for v in variants for b in (1, 8))
    for row in rows.values():
        assert row["runs"] == 30 and 0 < row["ms_per_step_median"] <= row["ms_per_step_p90"]
        assert row["images_per_s"] > 0 and row["size_bytes"] > 0 and row["peak_rss_mb"] > 0
    assert rows[("torch-fp32", 8)]["final_psnr_db"] is None  # the reference itself
    assert rows[("ort-fp32", 8)]["final_psnr_db"] > 80  # fp32 vs fp32: rounding only (measured 138.6 dB)
    # int8 on this random-weight tiny UNet: measured 38.6 (flowpress-ort-int8), 42.8 (flowpress-ov-int8)
    # and 37.6 dB (NNCF default); a broken engine lands near 0-10 dB
    for variant in ("ov-nncf-default", "flowpress-ort-int8", "flowpress-ov-int8"):
        assert 20 < rows[(variant, 8)]["final_psnr_db"] < 80, variant
    # E4M3 and int4 weights cost fidelity (measured 33.8 and 27.9 dB here); broken: near 0-10 dB
    assert 20 < rows[("flowpress-fp8", 8)]["final_psnr_db"] < rows[("flowpress-ort-int8", 8)]["final_psnr_db"]
    assert 15 < rows[("flowpress-w4a8", 8)]["final_psnr_db"] < rows[("flowpress-ort-int8", 8)]["final_psnr_db"]
    # the stand-in student: one step without guidance against the 4-step guided trajectory
    student = rows[("student", 8)]
    assert student["steps"] == 1 and student["model_batch_in_loop"] == 8
    assert rows[("flowpress-ov-int8", 8)]["steps"] == 4 and rows[("flowpress-ov-int8", 8)]["model_batch_in_loop"] == 16
    assert 15 < student["final_psnr_db"] < rows[("flowpress-ov-int8", 8)]["final_psnr_db"]  # measured 23.6
    # the explicit hint (float parts in bf16 where the CPU has it), recorded as compiled
    assert rows[("flowpress-ov-int8", 8)]["inference_precision"] == ("bf16" if cpu_has_bf16() else "f32")
    graph = result["graph_ops"]["flowpress-ort-int8"]
    assert graph.get("QLinearConv", 0) > 0  # integer convs after onnxruntime's fusion
    for variant, ops in result["profiles"].items():
        assert ops and all(o["ms"] > 0 for o in ops), variant
        assert sum(o["share"] for o in ops) <= 1.0 + 1e-6, variant
    checks = {b["bar"].split(":")[0]: b for b in bars(result["rows"])}
    assert "flowpress-ov-int8 vs ov-nncf-default" in checks
    assert not any("(student)" in bar for bar in checks)  # another network: never the "fastest engine"


def test_int8_against_bf16_bar_is_speed_dits_only():
    def rows(model, bf16_ms):
        return [
            {
                "model": model,
                "variant": "flowpress-ov-int8",
                "batch": 8,
                "ms_per_step_median": 100.0,
                "final_psnr_db": 50.0,
                "peer": False,
            },
            {
                "model": model,
                "variant": "ov-bf16",
                "batch": 8,
                "ms_per_step_median": bf16_ms,
                "final_psnr_db": 55.0,
                "peer": True,
            },
        ]

    def bar(model, bf16_ms):
        (only,) = [b for b in bars(rows(model, bf16_ms)) if "ov-bf16" in b["bar"]]
        return only

    assert bar("speed-dit", 112.0)["passed"] is True and bar("speed-dit", 108.0)["passed"] is False
    assert bar("speed-dit", 112.0)["psnr_gain_db"] == -5.0
    assert bar("digits-unet", 200.0)["passed"] is None  # reported, no bar
