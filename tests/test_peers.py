"""Peers are opt-in plug-ins of the compare stage: 'modelopt' or 'module.path:function'; evaluators are named the same way."""

from types import SimpleNamespace

import pytest

from flowpress.errors import FlowpressError
from flowpress.recipe import CompareSection
from flowpress.stages.peers import load_peer, modelopt_int8, peer_names, run_peers


def fixed_peer(ctx, fp):
    """A plug-in: one row per call, naming what it was handed."""
    return [{"peer": f"fixed on {ctx.recipe.name} vs {fp}", "final_psnr_db": 30.0}]


def _ctx(**compare):
    return SimpleNamespace(recipe=SimpleNamespace(name="r", compare=CompareSection(**compare)))


def test_the_recipe_names_its_peers_and_modelopt_peer_is_modelopt():
    assert peer_names(_ctx()) == []
    assert peer_names(_ctx(modelopt_peer=True, peers=("tests.test_peers:fixed_peer",))) == [
        "modelopt",
        "tests.test_peers:fixed_peer",
    ]
    assert peer_names(_ctx(modelopt_peer=True, peers=("modelopt",))) == ["modelopt"]
    assert load_peer("modelopt") is modelopt_int8


def test_a_plug_in_peer_is_run_on_the_fp_reference():
    rows = run_peers(_ctx(peers=("tests.test_peers:fixed_peer", "tests.test_peers:fixed_peer")), "fp")  # type: ignore[arg-type]
    assert rows == [{"peer": "fixed on r vs fp", "final_psnr_db": 30.0}] * 2


@pytest.mark.parametrize(
    "name, said",
    [
        ("fixed_peer", "must be 'modelopt' or 'module.path:function'"),
        ("tests.no_such_module:f", "cannot import 'tests.no_such_module'"),
        ("tests.test_peers:no_such_peer", "tests.test_peers has no function 'no_such_peer'"),
    ],
)
def test_a_wrong_peer_name_is_one_line(name, said):
    with pytest.raises(FlowpressError, match=said) as err:
        load_peer(name)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name, said",
    [
        ("examples.digits.evaluator", "must be 'module.path:Class'"),
        ("examples.digits.evaluator:Nope", "examples.digits.evaluator has no class 'Nope'"),
        ("examples.digits.evaluator:CLASSIFIER", "is not a class"),
    ],
)
def test_a_wrong_evaluator_name_is_one_line_like_a_peers(name, said):
    from flowpress.evaluator import load_evaluator
    from flowpress.recipe import EvaluatorSection

    with pytest.raises(FlowpressError, match=said) as err:
        load_evaluator(EvaluatorSection(name))
    assert "\n" not in str(err.value) and str(err.value).startswith("evaluator.name: ")
