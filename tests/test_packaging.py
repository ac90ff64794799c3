"""The built wheel works outside the source tree.

Builds the wheel (hatchling, without build isolation: no network), installs it
with `--no-deps` into a fresh virtual environment that sees this environment's
packages (jax, equinox, ...) through a .pth line but not its editable
neuralode, and from a temporary directory runs `python -m neuralode demo` and
the README's example. Offline and about 15 s on 2 cores."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from .test_docs_snippets import python_blocks

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("hatchling")


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert out.returncode == 0, f"{args}\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of the fresh environment, a working directory outside the tree,
    the wheel)."""
    tmp = tmp_path_factory.mktemp("packaging")
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
        + ["--quiet", "--wheel-dir", str(tmp / "dist"), str(ROOT)]
    )
    (wheel,) = (tmp / "dist").glob("neuralode-*.whl")
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    # This environment's packages, as a plain path: its .pth files (the
    # editable install of neuralode among them) are not processed.
    (purelib / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install"]
        + ["--quiet", "--no-deps", "--no-index", str(wheel)]
    )
    work = tmp / "work"
    work.mkdir()
    return python, work, wheel


def _clean_env(work: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": str(work), "JAX_PLATFORMS": "cpu"}


def test_wheel_holds_the_package_and_py_typed(installed):
    _, _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "neuralode/py.typed" in names
    assert "neuralode/cnf/__init__.py" in names
    assert not any(n.startswith(("tests/", "docs/", "benchmarks/")) for n in names)


def test_installed_package_is_not_the_source_tree(installed):
    python, work, _ = installed
    out = _run(
        [
            python,
            "-c",
            "import neuralode; print(neuralode.__file__, neuralode.__version__)",
        ],
        cwd=work,
        env=_clean_env(work),
    )
    file, version = out.stdout.split()
    assert not Path(file).resolve().is_relative_to(ROOT)
    assert Path(file).resolve().is_relative_to(python.parent.parent.resolve())
    assert version != "0+unknown"


def test_demo_and_readme_example_run_from_the_wheel(installed):
    python, work, _ = installed
    env = _clean_env(work) | {"NEURALODE_CACHE_DIR": str(work / "cache")}
    demo = _run([python, "-m", "neuralode", "demo"], cwd=work, env=env)
    assert "Van der Pol" in demo.stdout and "num_steps" in demo.stdout
    readme = [
        code
        for _, code, marker in python_blocks(ROOT / "README.md")
        if marker != "skip"
    ]
    assert readme, "the README has an example"
    script = work / "readme_example.py"
    script.write_text("\n".join(readme))
    out = _run([python, str(script)], cwd=work, env=env)
    assert "(100, 3)" in out.stdout
