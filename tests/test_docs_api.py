"""The documentation's invariants that need no site build: every public name
has a docstring and an API page (what docs/hooks.py enforces in `mkdocs
build`), the notebooks install the package from where the README says it
lives, and `neuralode.__version__` works from a checkout that is not
installed."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _hooks():
    spec = importlib.util.spec_from_file_location(
        "docs_hooks", ROOT / "docs" / "hooks.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_has_a_docstring_and_an_api_page():
    pytest.importorskip("griffe")
    hooks = _hooks()
    names = hooks.public_names()
    assert "neuralode.odeint" in names and "neuralode.nn.MLPField" in names
    assert hooks.api_problems() == []


def test_the_check_catches_a_missing_docstring_and_page(tmp_path):
    pytest.importorskip("griffe")
    hooks = _hooks()
    # A method without a docstring (private, so not part of the API).
    undocumented = "neuralode._solution._Results.message"
    assert hooks.missing_docstrings(["neuralode.odeint", undocumented]) == [
        undocumented
    ]
    (tmp_path / "page.md").write_text("# Solving\n\n::: neuralode.odeint\n")
    assert hooks.documented_names(tmp_path) == {"neuralode.odeint"}


#: Where the package lives, as the README and every notebook's first cell say.
INSTALL = "neuralode[experiments] @ git+https://github.com/neuralode/neuralode.git"


def test_notebooks_install_from_where_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    assert f'pip install "{INSTALL}"' in readme
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert len(notebooks) == 6
    for path in notebooks:
        cells = json.loads(path.read_text())["cells"]
        first = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
        specs = re.findall(r'%pip install[^"\n]*"([^"]+)"', first)
        assert specs == [INSTALL], (path.name, first)


def test_version_from_a_checkout_that_is_not_installed(tmp_path):
    """`import neuralode` with the repository on sys.path and no installed
    distribution of neuralode in sight: site-packages is offered through a
    folder of links to everything in it but neuralode's own entries."""
    site = Path(sysconfig.get_paths()["purelib"])
    farm = tmp_path / "site"
    farm.mkdir()
    for entry in site.iterdir():
        if "neuralode" not in entry.name.lower():
            (farm / entry.name).symlink_to(entry)
    code = (
        "import importlib.metadata as m, sys;"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(farm)!r}];"
        "import neuralode;"
        "missing = False\n"
        "try: m.version('neuralode')\n"
        "except m.PackageNotFoundError: missing = True\n"
        "print(neuralode.__version__, missing, neuralode.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    version, missing, file = out.stdout.split()
    expected = re.search(
        r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M
    )
    assert expected is not None
    assert (version, missing) == (expected[1], "True")
    assert Path(file).is_relative_to(ROOT)
