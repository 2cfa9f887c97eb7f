"""`flowpress bench` on the tiny UNet, and the onnxruntime engine's I/O binding."""

import torch

from engines import OrtEngine
from export.openvino import cpu_has_bf16
from flowpress.bench import BenchConfig, BenchModel, bars, bench_model

from .conftest import CLASSIFIER, TINY_SCHEDULE

RECIPE = """
name: tiny-bench
model: {{path: {model}}}
sampling: {{steps: 4, guidance: 2.0}}
calibration: {{n_samples: 8}}
quantize: {{amax: perstep-mean}}
classifier: {{path: {classifier}}}
"""


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


def test_bench_rows_on_the_tiny_unet(tiny_model_dir, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model_dir, classifier=CLASSIFIER))
    variants = ("torch-fp32", "ort-fp32", "ov-nncf-default", "flowpress-ort-int8", "flowpress-ov-int8")
    config = BenchConfig(
        models=(BenchModel(name="tiny", recipe=str(recipe), n_samples=10),),
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
    # int8 on this random-weight tiny UNet: measured 38.6 (flowpress-ort-int8), 43.1 (flowpress-ov-int8)
    # and 37.6 dB (NNCF default); a broken engine lands near 0-10 dB
    for variant in ("ov-nncf-default", "flowpress-ort-int8", "flowpress-ov-int8"):
        assert 20 < rows[(variant, 8)]["final_psnr_db"] < 80, variant
    # the explicit hint (float parts in bf16 where the CPU has it), recorded as compiled
    assert rows[("flowpress-ov-int8", 8)]["inference_precision"] == ("bf16" if cpu_has_bf16() else "f32")
    graph = result["graph_ops"]["flowpress-ort-int8"]
    assert graph.get("QLinearConv", 0) > 0  # integer convs after onnxruntime's fusion
    for variant, ops in result["profiles"].items():
        assert ops and all(o["ms"] > 0 for o in ops), variant
        assert sum(o["share"] for o in ops) <= 1.0 + 1e-6, variant
    checks = {b["bar"].split(":")[0]: b for b in bars(result["rows"])}
    assert "flowpress-ov-int8 vs ov-nncf-default" in checks
