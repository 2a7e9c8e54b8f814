"""Packaging promises: the runtime stays light, the wheel holds every subpackage and the models."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip install .`` builds, once for the module."""
    folder = tmp_path_factory.mktemp("wheel")
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
            str(folder),
        ],
        check=True,
        capture_output=True,
    )
    return next(folder.glob("uncnn_rt-*.whl"))


@pytest.mark.slow
def test_wheel_ships_subpackages_models_and_typing_marker(wheel: Path) -> None:
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


def readme_python_snippet() -> str:
    """The code block of the README's "Python API" section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Python API", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_snippet_runs_from_the_repository_root_after_a_plain_install(
    wheel: Path, tmp_path: Path
) -> None:
    """After ``pip install '.[cpu,demo]'`` (not editable), a user at the repository's root runs the
    README's snippet. Python puts the current folder first on its path, so a package folder named
    ``uncnn_rt`` there would hide the installed package ("No module named 'uncnn_rt.runtime'").

    The wheel is installed into a folder of its own; ``python -S`` keeps this test environment's
    editable install (a path hook set up by a ``.pth`` file) out, and the dependencies come from its
    site-packages through ``PYTHONPATH``, behind the current folder as for the user.
    """
    pytest.importorskip("skimage")
    target = tmp_path / "installed"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    paths = [str(target), *(p for p in sys.path if p.endswith("site-packages"))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    out = subprocess.run(
        [sys.executable, "-S", "-c", readme_python_snippet()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    similarity = float(out.stdout.strip().strip("[]").split()[0])
    assert similarity < 0.9  # the attack moved the face away from its clean embedding
    where = subprocess.run(
        [sys.executable, "-S", "-c", "import uncnn_rt.runtime as r; print(r.__file__)"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(target))  # the installed package, not the source tree
