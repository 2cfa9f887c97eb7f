import pytest

from flowpress.recipe import load_recipe, load_teacher_recipe
from sampling import FlowpressError

from .conftest import ROOT


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_shipped_recipes_load():
    recipe = load_recipe(ROOT / "recipes" / "digits-unet-int8.yaml")
    assert recipe.name == "digits-unet-int8" and recipe.sampling.schedule().n_steps == 20
    assert recipe.export.flavour == "ort-cpu" and recipe.quantize.temporal == "cache"
    teacher = load_teacher_recipe(ROOT / "recipes" / "digits-teacher.yaml")
    assert teacher.teacher.out == recipe.model.path


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
