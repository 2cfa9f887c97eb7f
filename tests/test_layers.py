"""The package arrows of design.md point one way: each package imports only the layers below it."""

import ast

import pytest

from .conftest import ROOT

ORDER = ["sampling", "models", "calibration", "compress", "export", "engines", "flowpress"]


def first_party_imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in ORDER and top != package:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", ORDER)
def test_package_imports_only_lower_layers(package):
    allowed = set(ORDER[: ORDER.index(package)])
    upward = {k: v for k, v in first_party_imports(package).items() if k not in allowed}
    assert not upward, f"{package} imports upward: {upward}"


def test_heavy_backends_are_not_imported_at_package_import():
    import subprocess
    import sys

    code = "import sys, flowpress.cli, engines, export, compress; print(sorted(m for m in ('modelopt', 'onnxruntime', 'diffusers', 'tensorrt') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
