"""pyproject.toml declares exactly what mlc's own code imports: the required dependencies are the
packages imported by mlc/, eval/ and data_tools/ (nothing unused, nothing missing), optional
packages are imported only where they are used, through mlc.extras.require or behind a check,
and every extra named in a message holds the package it names."""

import ast
import re
import sys
from pathlib import Path

import pytest

from mlc.extras import PROTOCOL_EXTRAS

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mlc", "eval", "data_tools")
# Import name -> distribution, where they differ.
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn"}


def name_of(requirement: str) -> str:
    """The normalised distribution name of a requirement such as "scikit-learn>=1.3"."""
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def project() -> tuple[set[str], dict[str, set[str]]]:
    """(required distributions, extra -> its distributions); the extra "all" maps to the extras
    it names ("mlc[a,b]" -> {"a", "b"})."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {name_of(r) for r in data["dependencies"]}
    extras = {k: {name_of(r) for r in v} for k, v in data["optional-dependencies"].items()}
    (everything,) = data["optional-dependencies"]["all"]
    extras["all"] = set(re.fullmatch(r"mlc\[(.*)\]", everything).group(1).split(","))
    return required, extras


def scan(path: Path) -> tuple[list, list]:
    """(imports, require calls) of a module: imports as (distribution, at_top_level, line) for
    third-party packages; require calls as (module, package, extra, line)."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    imports, requires = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            names = []
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require":
                args = [a.value for a in node.args if isinstance(a, ast.Constant)]
                if len(args) == 4:
                    requires.append((args[0], args[2], args[3], node.lineno))
        for name in names:
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in PACKAGES:
                continue
            dist = DISTRIBUTIONS.get(top, top).lower().replace("_", "-")
            imports.append((dist, id(node) in top_level, f"{path}:{node.lineno}"))
    return imports, requires


def product_files() -> list[Path]:
    return [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]


def test_scan_sees_top_level_nested_and_required_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nimport numpy as np\nfrom PIL import Image\nfrom mlc.io import x\n"
        "try:\n    import s3fs\nexcept ImportError:\n    pass\n"
        "def f():\n    import fsspec\n    h5py = require('h5py', 'reading', 'h5py', 'w')\n"
    )
    imports, requires = scan(sample)
    assert [(d, top) for d, top, _ in imports] == [
        ("numpy", True),
        ("pillow", True),
        ("s3fs", False),
        ("fsspec", False),
    ]
    assert [r[:3] for r in requires] == [("h5py", "h5py", "w")]


def test_dependencies_are_exactly_what_the_code_imports():
    required, extras = project()
    optional = set().union(*(v for k, v in extras.items() if k not in ("test", "all", "async")))
    imports = [i for p in product_files() for i in scan(p)[0]]
    assert len(imports) > 50
    undeclared = sorted(f"{where}: {d}" for d, _, where in imports if d not in required | optional)
    assert undeclared == [], "imported but not in pyproject's dependencies or extras"
    optional_at_top = sorted(f"{where}: {d}" for d, top, where in imports if top and d in optional)
    assert optional_at_top == [], "an extra's package imported on import of the module"
    unused = sorted(required - {d for d, _, _ in imports})
    assert unused == [], "required but never imported by mlc's own code: move it to an extra"
    assert {"webdataset", "scikit-learn"} <= extras["test"]  # the tests' references only
    assert not {"webdataset", "scikit-learn"} & required


def test_every_missing_optional_package_names_an_extra_that_has_it():
    _, extras = project()
    requires = [r for p in product_files() for r in scan(p)[1]]
    assert {package for _, package, _, _ in requires} >= {"tensorboard", "h5py"}
    for module, package, extra, line in requires:
        assert package in extras.get(extra, ()), f"require({module!r}) at {line}: {extra}"
    for package, extra in PROTOCOL_EXTRAS.values():
        assert package in extras[extra]
    assert {"tensorboard", "s3", "gcs", "onnx", "ray", "weights"} <= set(extras)
    assert extras["onnx"] == {"safetensors", "onnx", "onnxruntime", "onnxscript"}
    assert extras["export"] == {"safetensors"}
    # every extra but the tests' and async (a torch version range, not a feature)
    assert extras["all"] == set(extras) - {"all", "test", "async"}
