"""`python -m benchmarks ablate` on the tiny UNet: every row measured, the peers beside flowpress, the tables written."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.ablate import W8A8_PEERS, load_ablation_config, run_ablation
from flowpress.compress import PORTABLE_WEIGHT_BITS
from flowpress.engines.isa import host_isa
from flowpress.engines.portability import resolve_portable
from flowpress.errors import FlowpressError
from tests.conftest import DIGITS, EVALUATOR, ROOT

RECIPE = """
name: tiny-int8
model: {{path: {model}}}
sampling: {{steps: 4, guidance: 2.0}}
evaluator: {evaluator}
"""
ABLATION = """
name: tiny-ablation
recipes: [{recipe}]
methods: [uniform]
settings: [w8a8, hard]
calibration_seeds: [100000]
budget: 32           # of the 8 trajectories x 4 steps x 2 (guidance) = 64 captured inputs
trajectories: 8
compare_samples: 10
batch_size: 10
"""


def test_ablation_measures_every_row_beside_the_peers(tiny_model_dir, tmp_path):
    for name in ("ablation.yaml", "ablation-ndtc-hard.yaml"):  # the committed configs parse, their recipes exist
        config = load_ablation_config(DIGITS / "recipes" / name)
        assert config.recipes and all((ROOT / path).is_file() for path in config.recipes), name
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model_dir, evaluator=EVALUATOR))
    (tmp_path / "ablation.yaml").write_text(ABLATION.format(recipe=recipe))
    config = load_ablation_config(tmp_path / "ablation.yaml")
    out = run_ablation(config, tmp_path / "runs", progress=False, results_dir=tmp_path / "results")

    rows = json.loads((out / "ablation.json").read_text())
    found = {(r["setting"], r["method"], r["temporal_cache"]) for r in rows}
    flowpress_rows = {(s, "uniform", c) for s in ("w8a8", "hard") for c in (True, False)}
    assert found == flowpress_rows | {("w8a8", peer, False) for peer in W8A8_PEERS} and len(rows) == 6
    host_bits = PORTABLE_WEIGHT_BITS if resolve_portable(None, host_isa()) else 8
    for row in rows:
        what = (row["setting"], row["method"], row["temporal_cache"])
        assert row["architecture"] == "unet" and row["model"] == "tiny-int8" and row["n_seeds"] == 1, what
        # measured on this random-weight UNet: 27.1 (ort-quantize-static) .. 39.9 dB (uniform w8a8)
        assert 20.0 < row["final_psnr_db"] < 50.0, (what, row["final_psnr_db"])
        # the evaluator's metrics: the accuracy is a count over the 10 compare samples
        assert row["classifier_acc"] * 10 == pytest.approx(round(row["classifier_acc"] * 10)), what
        assert math.isfinite(row["fd"]) and row["fd"] > 0, what
        assert len(row["per_step_rel_l2"]) == 4 and all(math.isfinite(v) for v in row["per_step_rel_l2"]), what
        assert row["weight_bits"] == (8 if row["method"] in W8A8_PEERS else host_bits), what
        assert (row["engine_ms_b8"] is None) == (row["setting"] == "hard"), what  # hard: torch fake-quant
    psnr = {(r["setting"], r["method"], r["temporal_cache"]): r["final_psnr_db"] for r in rows}
    # 6-bit activations cost the most: measured 31.7 dB against 39.3 / 39.9 dB at 8 bits
    hard, w8a8 = ([psnr[(s, "uniform", c)] for c in (True, False)] for s in ("hard", "w8a8"))
    assert max(hard) < min(w8a8) - 3
    table = (out / "ablation.md").read_text()
    assert "| classifier_acc | fd | engine ms b8 |" in table
    for row in rows:
        cache = "yes" if row["temporal_cache"] else "no"
        assert f"| unet | {row['setting']} | {row['method']} | {cache} | {row['weight_bits']} |" in table
    assert "- best flowpress configuration, unet w8a8: uniform" in table
    result = (tmp_path / "results" / "tiny-ablation.md").read_text()  # results/<config name>.md
    assert result.startswith("# make ablate\n\n_Written by `python -m benchmarks ablate` on ")
    assert "| unet | w8a8 | modelopt-default | no | 8 |" in result and "![" not in result


def test_modelopt_peer_keeps_its_own_numbers_where_int8_kernels_saturate(tiny_model_dir, tmp_path, monkeypatch):
    """Where 8-bit weights saturate the int8 kernels (x86 without VNNI), modelopt-default's PSNR is
    its fake-quant model's (its onnxruntime engine there is wrong, not miscalibrated: 38.9 vs 45.5
    dB on the digits DiT on x86-avx2), and its ms still its onnxruntime engine's."""
    import torch

    from benchmarks.common import fp_reference, sample_engine
    from benchmarks.peers import modelopt_default
    from flowpress.engines import TorchEngine
    from flowpress.models import load_source
    from flowpress.recipe import load_recipe
    from flowpress.validation import psnr_db

    monkeypatch.setenv("FLOWPRESS_ISA", "x86-avx2")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model_dir, evaluator=EVALUATOR))
    text = ABLATION.format(recipe=recipe).replace("methods: [uniform]", "methods: []")
    (tmp_path / "ablation.yaml").write_text(text.replace("[w8a8, hard]", "[w8a8]") + "peers: [modelopt-default]\n")
    out = run_ablation(load_ablation_config(tmp_path / "ablation.yaml"), tmp_path / "runs", progress=False)
    (row,) = json.loads((out / "ablation.json").read_text())

    loaded = load_recipe(recipe)
    source = load_source(loaded.model.path, loaded.model.time_scale)
    model, sampler = source.denoiser, source.sampler(loaded.sampling.steps, loaded.sampling.method)
    guidance = loaded.sampling.guidance
    ref = fp_reference(model, sampler, guidance, 10, 10)
    with torch.no_grad():
        fake = TorchEngine(
            modelopt_default(
                model, sampler, guidance, 100000, 32, model.cycling_condition, model.null_condition()
            ).module,
            sampler,
            "fake-quant",
        )
        xs = sample_engine(fake, ref, guidance, model.null_condition(), 10)
    assert row["method"] == "modelopt-default" and row["engine_ms_b8"] > 0
    assert row["final_psnr_db"] == pytest.approx(psnr_db(ref.xs[-1], xs[-1]), abs=1e-6)


W4A8_RECIPE = """
name: tiny-w4a8
model: {{path: {model}}}
sampling: {{steps: 4, guidance: 2.0}}
quantize: {{precision: w4a8, weight_group_size: 8, recon_iters: 30, recon_samples: 32, recon_lr: 0.01, edge_weight_bits: 8}}
evaluator: {evaluator}
"""
W4A8_ABLATION = """
name: tiny-ablation-w4a8
recipes: [{recipe}]
methods: []
settings: []
peers: []
variants:
  nearest: {{recon_iters: 0, edge_weight_bits: null}}
  learned+edge8: {{}}
calibration_seeds: [100000]
budget: 32
trajectories: 8
compare_samples: 10
batch_size: 10
"""


def _ablate(tmp_path, recipe_text: str, edits: dict[str, str]) -> dict[str, dict]:
    """Write the tiny recipe, W4A8_ABLATION on it with each `edits` key replaced by its value, run it
    into tmp_path/runs and tmp_path/results; the rows by method."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(recipe_text)
    text = W4A8_ABLATION.format(recipe=recipe)
    for old, new in edits.items():
        text = text.replace(old, new)
    (tmp_path / "ablation.yaml").write_text(text)
    out = run_ablation(
        load_ablation_config(tmp_path / "ablation.yaml"), tmp_path / "runs", False, results_dir=tmp_path / "results"
    )
    return {r["method"]: r for r in json.loads((out / "ablation.json").read_text())}


def test_w4a8_variants_are_rows_of_their_own_results_file(tiny_model_dir, tmp_path):
    config = load_ablation_config(DIGITS / "recipes" / "ablation-w4a8.yaml")  # the committed config parses
    assert {"nearest", "learned+edge8"} <= set(config.variants) and len(config.calibration_seeds) >= 3
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(W4A8_RECIPE.format(model=tiny_model_dir, evaluator=EVALUATOR))
    (tmp_path / "ablation.yaml").write_text(W4A8_ABLATION.format(recipe=recipe))
    out = run_ablation(
        load_ablation_config(tmp_path / "ablation.yaml"), tmp_path / "runs", False, results_dir=tmp_path / "results"
    )
    rows = {r["method"]: r for r in json.loads((out / "ablation.json").read_text())}
    assert set(rows) == {"nearest", "learned+edge8"}
    for row in rows.values():
        assert row["setting"] == "w4a8" and row["weight_bits"] == 4 and row["n_seeds"] == 1
        assert row["engine_ms_b8"] is None  # measured on the torch fake-quant model
    # measured on this random-weight UNet: nearest 28.13, learned + 8-bit edges 29.99 dB (+1.86)
    assert rows["learned+edge8"]["final_psnr_db"] > rows["nearest"]["final_psnr_db"] + 1.0
    result = (tmp_path / "results" / "tiny-ablation-w4a8.md").read_text()
    assert '`nearest`: {"recon_iters": 0, "edge_weight_bits": null}' in result
    assert "| unet | w4a8 | learned+edge8 | yes | 4 |" in result
    bad = tmp_path / "bad.yaml"
    bad.write_text(W4A8_ABLATION.format(recipe=recipe).replace("{}", "{recon_iters: -1}"))
    with pytest.raises(FlowpressError, match="ablation.variants.learned\\+edge8"):
        run_ablation(load_ablation_config(bad), tmp_path / "runs2", False)


def test_w4a4_variants_record_their_engine_size_and_only_their_own_paragraphs(tiny_model_dir, tmp_path):
    config = load_ablation_config(DIGITS / "recipes" / "ablation-w4a4.yaml")  # the committed config parses
    assert {"rank0", "rank2"} <= set(config.variants) and len(config.calibration_seeds) >= 3
    recipe = tmp_path / "tiny.yaml"
    text = W4A8_RECIPE.format(model=tiny_model_dir, evaluator=EVALUATOR)
    recipe.write_text(text.replace("{precision: w4a8, weight_group_size: 8, recon_iters: 30, recon_samples: 32, recon_lr: 0.01, edge_weight_bits: 8}", "{precision: w4a4, activation_group_size: 8}"))  # fmt: skip
    ablation = W4A8_ABLATION.format(recipe=recipe).replace("tiny-ablation-w4a8", "tiny-ablation-w4a4")
    ablation = ablation.replace("nearest: {recon_iters: 0, edge_weight_bits: null}", "rank0: {rank: 0}")
    (tmp_path / "ablation.yaml").write_text(ablation.replace("learned+edge8: {}", "rank8: {rank: 8}"))
    out = run_ablation(
        load_ablation_config(tmp_path / "ablation.yaml"), tmp_path / "runs", False, results_dir=tmp_path / "results"
    )
    rows = {r["method"]: r for r in json.loads((out / "ablation.json").read_text())}
    assert {r["setting"] for r in rows.values()} == {"w4a4"}
    # measured on this random-weight UNet (8-32 channels): 25.48 / 31.85 dB, engine 182,006 / 269,973
    # bytes (rank 0 / 8): the float16 branch, 8 x (C_in k + C_out) per layer, is +48% on layers this thin
    assert rows["rank8"]["final_psnr_db"] > rows["rank0"]["final_psnr_db"] + 4.0
    assert 1.3 * rows["rank0"]["engine_bytes"] < rows["rank8"]["engine_bytes"] < 1.7 * rows["rank0"]["engine_bytes"]
    result = (tmp_path / "results" / "tiny-ablation-w4a4.md").read_text()
    assert "| unet | w4a4 | rank8 | yes | 4 |" in result
    assert "Settings: `w8a8`" not in result and "Peers (w8a8 only)" not in result  # no such rows here


def test_modelopt_lowbit_peers_are_fake_quant_rows_in_their_own_setting(tiny_model_dir, tmp_path):
    config = load_ablation_config(DIGITS / "recipes" / "ablation-lowbit-peers.yaml")  # the committed config parses
    assert set(config.peers) == {"modelopt-int4-awq", "modelopt-w4a8-awq"} and len(config.calibration_seeds) >= 3

    peers = {
        "tiny-ablation-w4a8": "tiny-peers",
        "peers: []": "peers: [modelopt-int4-awq, modelopt-w4a8-awq]",
        "variants:\n  nearest: {recon_iters: 0, edge_weight_bits: null}\n  learned+edge8: {}\n": "",
    }
    rows = _ablate(tmp_path, W4A8_RECIPE.format(model=tiny_model_dir, evaluator=EVALUATOR), peers)
    assert {m: r["setting"] for m, r in rows.items()} == {"modelopt-int4-awq": "w4a16", "modelopt-w4a8-awq": "w4a8"}
    # measured on this random-weight UNet, its embeddings and edge layers skipped: int4-awq (W4A16) 33.36,
    # w4a8-awq 31.74 dB
    assert rows["modelopt-int4-awq"]["final_psnr_db"] > rows["modelopt-w4a8-awq"]["final_psnr_db"] > 15.0
    assert all(r["engine_ms_b8"] is None for r in rows.values())  # fake-quant
    result = (tmp_path / "results" / "tiny-peers.md").read_text()
    assert "`modelopt-w4a8-awq` = W4A8_AWQ_BETA_CFG (setting w4a8)" in result and "Settings: `w8a8`" not in result
    (tmp_path / "bad.yaml").write_text(
        (tmp_path / "ablation.yaml").read_text().replace("modelopt-int4-awq", "modelopt-nvfp4")
    )
    with pytest.raises(FlowpressError, match="unknown method 'modelopt-nvfp4'"):
        load_ablation_config(tmp_path / "bad.yaml")


def test_int8_variants_are_engine_rows_with_their_speed(tiny_model_dir, tmp_path):
    config = load_ablation_config(DIGITS / "recipes" / "ablation-step-scales.yaml")  # the committed config parses
    assert set(config.variants) == {"static", "per-step"} and len(config.calibration_seeds) >= 3

    variants = {
        "tiny-ablation-w4a8": "tiny-step-scales",
        "nearest: {recon_iters: 0, edge_weight_bits: null}": "static: {step_scales: false}",
        "learned+edge8: {}": "per-step: {step_scales: true}",
    }
    rows = _ablate(tmp_path, RECIPE.format(model=tiny_model_dir, evaluator=EVALUATOR), variants)
    bits = PORTABLE_WEIGHT_BITS if resolve_portable(None, host_isa()) else 8
    for row in rows.values():  # measured on the parity-checked onnxruntime engine, in this host's weight form
        assert row["setting"] == "int8" and row["weight_bits"] == bits and row["engine_ms_b8"] > 0
    # the per-step tables and one Gather per step-scaled layer (measured: +8,652 bytes on this tiny UNet)
    assert 1_000 < rows["per-step"]["engine_bytes"] - rows["static"]["engine_bytes"] < 20_000
    assert rows["per-step"]["final_psnr_db"] != rows["static"]["final_psnr_db"]
    assert "| unet | int8 | per-step | yes |" in (tmp_path / "results" / "tiny-step-scales.md").read_text()


def test_a_pipeline_directory_is_ablated_as_make_quantize_loads_it(tmp_path, monkeypatch):
    """A text-conditioned latent pipeline: the rows sample with its own scheduler, its calibration
    and compare prompts, and score images its VAE decoded (the peer's row equals that measurement
    made by hand; before, `make ablate` refused any pipeline directory: "no config.json")."""
    import torch

    from benchmarks.common import fp_reference, sample_engine
    from benchmarks.peers import modelopt_default
    from flowpress.context import RunContext
    from flowpress.engines import TorchEngine
    from flowpress.recipe import load_recipe
    from flowpress.validation import psnr_db
    from tests.pipelines import sd_pipeline

    config = load_ablation_config(DIGITS / "recipes" / "ablation-pipelines.yaml")  # the committed config parses
    assert set(config.peers) == {"modelopt-default", "modelopt-int8-example"} and len(config.calibration_seeds) >= 3
    assert all((ROOT / path).is_file() for path in config.recipes)
    monkeypatch.setenv("FLOWPRESS_ISA", "x86-avx2")  # the peer's row: its fake-quant model on every host
    recipe = tmp_path / "sd.yaml"
    recipe.write_text(
        f"name: tiny-sd\nmodel: {{path: {sd_pipeline(tmp_path / 'sd')}}}\nsampling: {{steps: 4, guidance: 2.0}}\n"
    )
    text = ABLATION.format(recipe=recipe).replace("methods: [uniform]", "methods: []").replace("[w8a8, hard]", "[w8a8]")
    peers = "peers: [modelopt-default, modelopt-int8-example]\nvariants: {shipped: {}}\n"
    (tmp_path / "ablation.yaml").write_text(text + peers)
    out = run_ablation(load_ablation_config(tmp_path / "ablation.yaml"), tmp_path / "runs", progress=False)
    rows = {row["method"]: row for row in json.loads((out / "ablation.json").read_text())}

    ctx = RunContext.load(load_recipe(recipe))
    guidance, decode = ctx.recipe.sampling.guidance, ctx.source.decode
    ref = fp_reference(ctx.model, ctx.sampler, guidance, 10, 10, ctx.conditions(10), ctx.null)
    peer = modelopt_default(ctx.model, ctx.sampler, guidance, 100000, 32, ctx.calibration_cond, ctx.null)
    with torch.no_grad():
        xs = sample_engine(TorchEngine(peer.module, ctx.sampler, "fake-quant"), ref, guidance, ctx.null, 10)
        by_hand = psnr_db(decode(ref.xs[-1]), decode(xs[-1]))
    assert set(rows) == {"modelopt-default", "modelopt-int8-example", "shipped"} and ref.prompts is not None
    assert rows["modelopt-default"]["final_psnr_db"] == pytest.approx(by_hand, abs=1e-6)
    # its own int8 engine, on decoded images: measured 41.4 dB on this random pipeline (peer 44.3)
    assert rows["shipped"]["setting"] == "int8" and 30.0 < rows["shipped"]["final_psnr_db"] < 60.0
    example = rows["modelopt-int8-example"]  # INT8_DEFAULT_CFG with the example's skips, fake-quant
    assert example["setting"] == "w8a8" and example["weight_bits"] == 8 and example["engine_ms_b8"] is None
    # its skipped layers (conv_in / conv_out, time embedding, shortcuts ...) stay FP: measured 49.0 dB vs 44.3
    assert example["final_psnr_db"] > rows["modelopt-default"]["final_psnr_db"] + 2.0


def test_one_table_holds_recipes_whose_evaluators_measure_different_things():
    """The DDPM demo's evaluator scores classifier_confidence, the SD demo's classifier_acc: one
    ablation of both (ablation-pipelines.yaml) lost 22 minutes of rows to a KeyError here."""
    from benchmarks.ablate import AblationConfig, ablation_markdown

    def row(architecture: str, **scores: float) -> dict:
        return {
            "method": "shipped", "architecture": architecture, "setting": "int8", "temporal_cache": True,
            "model": architecture, "weight_bits": 8, "final_psnr_db": 40.0, "final_psnr_db_std": 0.5,
            "final_psnr_db_per_seed": [40.0], "per_step_rel_l2": [0.01], "engine_ms_b8": 10.0,
            "engine_bytes": None, "n_seeds": 1, **scores,
        }  # fmt: skip

    rows = [row("unet", classifier_confidence=0.97), row("unet-cond", classifier_acc=1.0)]
    table = ablation_markdown(rows, AblationConfig(recipes=("a.yaml",), peers=(), methods=(), settings=()))
    assert "| classifier_confidence | classifier_acc | engine ms b8 |" in table
    assert "| 40.00 ± 0.50 | 0.970 | — | 10.00 |" in table and "| 40.00 ± 0.50 | — | 1.000 | 10.00 |" in table
