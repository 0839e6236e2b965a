"""mlc as users install it: a wheel (not editable), used from a folder outside the repository."""

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_every_package_is_listed_for_the_wheel():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("mlc", "data_tools", "eval")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert found | {"mlc.configs"} == listed


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed (without its dependencies, which this
    environment has) into a folder of its own."""
    dist, target = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("mlc-*.whl")
    install = [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    return target


def run_installed(installed: Path, cwd: Path, *args: str, timeout: int = 600):
    env = {"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    code = "import sys, mlc, mlc.cli; assert mlc.__file__.startswith(sys.argv[1]), mlc.__file__; "
    code += "sys.exit(mlc.cli.main(sys.argv[2:]))"
    return subprocess.run(
        [sys.executable, "-c", code, str(installed), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_shipped_configs_are_found_by_name_outside_the_repository(installed, tmp_path):
    result = run_installed(installed, tmp_path, "train", "--list-configs")
    assert result.returncode == 0, result.stderr
    assert "paper_imagenet" in result.stdout and str(installed) in result.stdout
    for name in ("paper_imagenet", "configs/paper_imagenet.yaml"):
        result = run_installed(installed, tmp_path, "train", "--config", name, "--print-config")
        assert result.returncode == 0, result.stderr
        assert "lr: 0.045" in result.stdout and "decay_rate: 0.94" in result.stdout


def test_the_demo_runs_from_the_wheel_outside_the_repository(installed, tmp_path):
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST missing (apt-get install dataset-fashion-mnist)")
    args = ["demo", "--quiet", "--train-count", "320", "--test-count", "120", "--samples", "160"]
    for value in ["data.image_size=32", "model.width=0.125", "data.batch_size=16"]:
        args += ["--set", value]
    result = run_installed(installed, tmp_path, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "runs" / "demo" / "eval" / "report.md").is_file()
    assert (tmp_path / "runs" / "demo" / "train" / "config.yaml").is_file()
    assert "fwMAP@100" in result.stdout
