"""Packaging promises: the runtime stays light, the wheel holds every subpackage and the models."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

import uncnn_rt
from uncnn_rt.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "torch", "keras", "tf2onnx", "tf_keras", "jax")


def test_runtime_imports_no_heavy_framework() -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        "import uncnn_rt.runtime as rt\n"
        "for m in pkgutil.walk_packages(rt.__path__, 'uncnn_rt.runtime.'):\n"
        "    importlib.import_module(m.name)\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"uncnn_rt.runtime pulled in: {out.stdout.strip()}"


def test_every_source_package_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    mapping = config["tool"]["setuptools"]["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]) if rel.parts else package)
    assert found <= listed, (
        f"packages missing from pyproject [tool.setuptools].packages: {sorted(found - listed)}"
    )


def test_version_and_help_list_commands() -> None:
    runner = CliRunner()
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0
    assert version.output.strip() == f"uncnn-rt {uncnn_rt.__version__}"
    help_text = runner.invoke(app, ["--help"]).output
    for command in ("convert", "models"):
        assert command in help_text


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "uncnn_rt", "--version"], capture_output=True, text=True, cwd="/", check=True
    )
    assert out.stdout.startswith("uncnn-rt ")


@pytest.mark.slow
def test_wheel_ships_subpackages_models_and_typing_marker(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("uncnn_rt-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "uncnn_rt/__init__.py",
        "uncnn_rt/py.typed",
        "uncnn_rt/runtime/contract.py",
        "uncnn_rt/converters/grad/driver.py",
        "uncnn_rt/cli/app.py",
        "uncnn_rt/models/__init__.py",
    ):
        assert required in names
    shipped = {p.name for p in (ROOT / "models").glob("*.onnx")} | {
        p.name for p in (ROOT / "models").glob("*.json")
    }
    assert {f"uncnn_rt/models/{n}" for n in shipped} <= names
    assert not any(n.startswith("tests/") or n.startswith("bench/") for n in names)
