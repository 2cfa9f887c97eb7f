"""Peers: another tool's recipe on the same model, schedule and seeds, judged like every engine so
the report shows flowpress's margin.  Opt-in plug-ins of the compare stage: `compare.peers` names
'module.path:function' entries (or 'modelopt', the built-in one; `compare.modelopt_peer: true` and
`--modelopt-peer` name it too).  A peer function takes (ctx, fp) — the run's context and its FP
reference trajectories — and returns rows made by `peer_row`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flowpress.context import RunContext
from flowpress.engines import Engine, TorchEngine
from flowpress.errors import FlowpressError
from flowpress.plugins import import_named
from flowpress.validation import FpReference, judge

Peer = Callable[[RunContext, FpReference], list[dict[str, Any]]]
BUILT_IN = {"modelopt": "flowpress.stages.peers:modelopt_int8"}
MODELOPT_SEEDS = 32  # modelopt's diffusers example calibrates on 32-64 prompts


def peer_names(ctx: RunContext) -> list[str]:
    """The peers the recipe names, 'modelopt' first when `compare.modelopt_peer` is set."""
    compare = ctx.recipe.compare
    names = list(compare.peers)
    return ["modelopt", *names] if compare.modelopt_peer and "modelopt" not in names else names


def load_peer(name: str) -> Peer:
    """The peer function `name` names ('modelopt' or 'module.path:function')."""
    if ":" not in BUILT_IN.get(name, name):
        raise FlowpressError(f"compare.peers: {name!r} must be 'modelopt' or 'module.path:function'")
    peer = import_named(BUILT_IN.get(name, name), "compare.peers", "function")
    if not callable(peer):
        raise FlowpressError(f"compare.peers: {name} is not a function")
    return peer  # type: ignore[no-any-return]


def run_peers(ctx: RunContext, fp: FpReference) -> list[dict[str, Any]]:
    """Every peer the recipe asks for, judged against `fp` (their margins are added by the compare)."""
    return [row for name in peer_names(ctx) for row in load_peer(name)(ctx, fp)]


def peer_row(ctx: RunContext, fp: FpReference, engine: Engine, described: str) -> dict[str, Any]:
    """A peer's engine sampled on the compare's seeds and judged like flowpress's engines."""
    judged = judge(fp, engine, ctx.sampler, ctx.compare_config, ctx.shape, ctx.null, ctx.evaluator, ctx.source.decode)
    return {
        "peer": described,
        "final_psnr_db": judged["final"]["psnr_db"],
        "final_ssim": judged["final"]["ssim"],
        "quality": judged["quality"],
        "gate_passed": judged["gate"]["passed"],
    }


def modelopt_int8(ctx: RunContext, fp: FpReference) -> list[dict[str, Any]]:
    """modelopt's default int8 recipe on this model, schedule and seeds: INT8_DEFAULT_CFG on every
    layer, and as modelopt's diffusers example runs it (the layers its filter skips in full
    precision: input / output layers, shortcut convs, time embedding); fake-quant in torch."""
    from flowpress.compress.modelopt import MODELOPT_DIFFUSERS_SKIP, modelopt_fake_quant

    recipe = ctx.recipe
    seeds = list(range(recipe.calibration.seed_base, recipe.calibration.seed_base + MODELOPT_SEEDS))
    cond, guidance = ctx.calibration_cond(MODELOPT_SEEDS), recipe.sampling.guidance
    calibration = f"INT8_DEFAULT_CFG, whole-sampler calibration on {MODELOPT_SEEDS} seeds, fake-quant (torch)"
    rows = []
    for engine, described, skip in (
        ("modelopt-default", f"modelopt {calibration}", None),
        (
            "modelopt-int8-example",
            f"modelopt {calibration}, its diffusers example's skipped layers in full precision",
            MODELOPT_DIFFUSERS_SKIP,
        ),
    ):
        qmodule = modelopt_fake_quant(ctx.fp, ctx.sampler, cond, ctx.null, guidance, seeds, skip=skip)
        rows.append(peer_row(ctx, fp, TorchEngine(qmodule, ctx.sampler, engine), described))
    return rows
