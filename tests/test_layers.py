"""The package's shape, as design.md draws it: one namespace, arrows one way, no circle, no
digits in the core, no product file over 400 lines nor function over 80, heavy backends imported lazily."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

# the stages, lowest first; a module may import its own stage and the stages below it.  The root
# package (flowpress.* outside these) may import everything; flowpress.errors, flowpress.files,
# flowpress.extras (optional dependencies, imported where used) and flowpress.ranks (data parallelism)
# are leaves every stage may use.
STAGES = ["sampling", "models", "calibration", "compress", "export", "engines", "validation"]
LEAVES = {"flowpress", "flowpress.errors", "flowpress.files", "flowpress.extras", "flowpress.ranks"}
CORE = [ROOT / "flowpress" / s for s in STAGES]


def modules() -> dict[str, Path]:
    """Every module of the flowpress package by dotted name (through the stage symlinks)."""
    found = {}
    # rglob does not descend into the linked stage folders (flowpress/compress -> ../compress): walk them too
    for path in sorted(p for root in (ROOT / "flowpress", *CORE) for p in root.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path) -> set[str]:
    """Every flowpress / examples / benchmarks module `path` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.split(".")[0] in ("flowpress", "examples", "benchmarks")}


def stage_of(module: str) -> int:
    """Index in STAGES, or len(STAGES) for the root package."""
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES else len(STAGES)


def test_the_stages_import_only_their_own_and_lower_stages():
    known = modules()
    upward = []
    for name, path in known.items():
        for target in imports(path):
            target = target if target in known else target.rpartition(".")[0]
            if target in LEAVES or target.split(".")[0] == "examples":
                continue
            if target in known and stage_of(target) > stage_of(name):
                upward.append(f"{name} -> {target}")
    assert upward == []


def test_no_import_circle():
    known = modules()
    graph = {
        name: {t if t in known else t.rpartition(".")[0] for t in imports(path)} & set(known)
        for name, path in known.items()
    }
    # a package's __init__ re-exports its modules: count an edge into a package as into the module it names
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt == node or nxt in LEAVES or node.startswith(nxt + "."):
                continue  # a package's own __init__ and the leaves are not edges of a circle
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_the_product_imports_nothing_from_the_harness():
    harness = {f"{name}: {t}" for name, path in modules().items() for t in imports(path) if t.startswith("benchmarks")}
    assert harness == set()


def test_the_core_knows_nothing_of_the_digits_demo():
    found = []
    for folder in CORE:
        for path in folder.rglob("*.py"):
            text = path.read_text()
            for needle in ("examples", "DigitClassifier", "load_digits", "% 10", "NUM_CLASSES"):
                if needle in text and not (
                    needle == "examples" and "examples" not in imports(path) and "import examples" not in text
                ):
                    found.append(f"{path.relative_to(ROOT)}: {needle}")
    assert found == []


def test_no_product_file_over_400_lines_and_no_function_over_80():
    files = [*modules().values(), *(ROOT / "examples").rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 400}
    functions = {
        f"{p.relative_to(ROOT)}:{node.lineno} {node.name}": length
        for p in files
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (length := node.end_lineno - node.lineno + 1) > 80  # type: ignore[operator]
    }
    assert long == {} and functions == {}


@pytest.mark.parametrize(
    ("code", "works"),
    [
        ("import flowpress.compress, flowpress.export, flowpress.calibration, flowpress.engines", True),
        ("import sampling", False),
        ("import compress", False),
        ("import export", False),
    ],
)
def test_one_namespace_from_outside_the_repository(tmp_path, code, works):
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert (done.returncode == 0) is works, done.stderr[-500:]


def test_heavy_backends_are_not_imported_at_package_import():
    code = (
        "import sys, flowpress, flowpress.cli, flowpress.engines, flowpress.export, flowpress.compress; "
        "print(sorted(m for m in ('modelopt', 'onnxruntime', 'diffusers', 'tensorrt', 'openvino', 'brevitas') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
