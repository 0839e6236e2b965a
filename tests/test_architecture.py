"""The code's shape, checked where import-linter cannot: no module imports another's private
names (the layer contracts themselves are pyproject.toml's, run by `make test`)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mlc", "eval", "data_tools")


def private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
            continue
        if node.module.split(".")[0] in PACKAGES:
            found += [
                f"{path}:{node.lineno}: {node.module}.{alias.name}"
                for alias in node.names
                if alias.name.startswith("_")
            ]
    return found


def test_private_import_is_detected(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from mlc.train.loop import _hidden, visible\nfrom os import _exit\n")
    assert private_imports(sample) == [f"{sample}:1: mlc.train.loop._hidden"]


def test_no_module_imports_private_names_of_another():
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 50
    assert [line for p in files for line in private_imports(p)] == []
