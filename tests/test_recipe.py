import pytest

from examples.digits.__main__ import TeacherRecipe
from flowpress.compress import Fp8Config, Int8Config, W4A8Config
from flowpress.errors import FlowpressError
from flowpress.recipe import load_recipe
from flowpress.schema import load

from .conftest import DIGITS, EVALUATOR, ROOT


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


QUANTIZE_RECIPES = sorted(
    p for p in (DIGITS / "recipes").glob("digits-*.yaml") if not p.stem.endswith(("teacher", "slimflow"))
)


@pytest.mark.parametrize("path", QUANTIZE_RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_names_a_committed_model(path):
    recipe = load_recipe(path)
    model = ROOT / recipe.model.path
    assert recipe.name == path.stem
    assert (model / "config.json").is_file() or (model / "model_index.json").is_file(), model


def test_the_teachers_recipe_writes_where_the_default_recipe_reads():
    teacher: TeacherRecipe = load(TeacherRecipe, DIGITS / "recipes" / "digits-teacher.yaml")
    assert teacher.teacher.out == load_recipe(DIGITS / "recipes" / "digits-unet-int8.yaml").model.path


def test_quantize_section_picks_the_config_of_its_precision(tmp_path):
    for precision, config in (("int8", Int8Config), ("fp8", Fp8Config), ("w4a8", W4A8Config)):
        flavour = "tensorrt" if precision == "fp8" else "ort-cpu"
        path = write(
            tmp_path,
            f"name: a\nmodel: {{path: m}}\nquantize: {{precision: {precision}}}\nexport: {{flavour: {flavour}}}\n",
        )
        assert type(load_recipe(path).quantize) is config
    path = write(tmp_path, "name: a\nmodel: {path: m}\nquantize: {amax: mse}\n")
    assert load_recipe(path).quantize == Int8Config(amax="mse")  # no precision: int8


def test_evaluator_section_names_the_evaluator_and_its_options(tmp_path):
    text = f"name: a\nmodel: {{path: m}}\nevaluator: {EVALUATOR}\ngate: {{metrics: {{classifier_acc: {{max_drop: 0.05}}}}}}\n"
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.evaluator.name == "examples.digits.evaluator:DigitsEvaluator"
    assert recipe.evaluator.options == {"classifier": str(DIGITS / "checkpoints" / "digits-classifier")}
    assert recipe.gate.metrics["classifier_acc"].max_drop == 0.05
    assert load_recipe(write(tmp_path, "name: a\nmodel: {path: m}\n")).evaluator.name is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: a\nmodel: {path: m}\nsampling: {stepz: 3}\n", r"sampling: unknown key 'stepz'"),
        ("name: a\nmodel: {path: m}\nsampling: {steps: twenty}\n", r"sampling.steps: must be int, got str"),
        ("name: a\nmodel: {path: m}\nsampling: {method: rk4}\n", r"sampling.method: must be one of 'euler', 'heun'"),
        ("name: a\nmodel: {path: m}\nexport: {flavour: cuda}\n", r"export.flavour: must be one of"),
        ("name: a\nmodel: {path: m}\ngate: {min_final_psnr_db: high}\n", r"gate.min_final_psnr_db: must be float"),
        ("name: a\n", r"model: required key is missing"),
        ("name: a\nmodel: [1, 2]\n", r"model: must be a mapping"),
        ("name: a\nmodel: {path: m}\n  bad indent: [\n", r"not valid YAML"),
        (
            "name: a\nmodel: {path: m}\nquantize: {precision: fp16}\n",
            r"quantize.precision: must be one of 'int8', 'fp8', 'w4a8', 'w4a4', got 'fp16'",
        ),
        (
            "name: a\nmodel: {path: m}\nquantize: {precision: int8, recon_iters: 5}\n",
            r"quantize: unknown key 'recon_iters'",
        ),
        ("name: a\nmodel: {path: m}\nclassifier: {path: c}\n", r"unknown key 'classifier'"),
    ],
)
def test_bad_recipe_is_a_one_line_error_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(FlowpressError, match=message) as err:
        load_recipe(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(FlowpressError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
