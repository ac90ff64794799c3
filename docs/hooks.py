"""MkDocs hooks for the documentation site (see `mkdocs.yml`).

- The API reference must cover every public name with a docstring: the build
  fails (`PluginError`) on a public name that has none, as mkdocstrings reads
  it, or that no page under `docs/api/` renders with a `::: name` block.
  `tests/test_docs_api.py` runs the same check without building the site.
- The benchmark reports (`benchmarks/*.md` and their plots) and the notebooks
  (`notebooks/*.ipynb`, rendered from their saved outputs by mkdocs-jupyter)
  are published from where they live, under `benchmarks/` and `notebooks/`,
  so the site never holds a stale copy.
"""

from __future__ import annotations

import importlib
import re
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
API_DIR = ROOT / "docs" / "api"

#: The modules whose public names form the API (`neuralode.experiments` is
#: the command line's, documented on the experiments page).
PUBLIC_MODULES = (
    "neuralode",
    "neuralode.nn",
    "neuralode.cnf",
    "neuralode.datasets",
    "neuralode.parallel",
)

#: Files published from outside `docs/`: (folder in the repository, glob).
EXTERNAL = (("benchmarks", "*.md"), ("benchmarks", "*.png"), ("notebooks", "*.ipynb"))


def public_names() -> list[str]:
    """Every public name, dotted (`neuralode.odeint`, `neuralode.nn.MLPField`):
    each public module's attributes not starting with `_`, less submodules."""
    names = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(vars(module)):
            value = getattr(module, name)
            if name.startswith("_") or isinstance(value, types.ModuleType):
                continue
            names.append(f"{module_name}.{name}")
    return names


def documented_names(api_dir: Path = API_DIR) -> set[str]:
    """The identifiers of the `::: name` blocks on the API pages."""
    found = set()
    for page in api_dir.glob("*.md"):
        found.update(re.findall(r"^:::\s*([\w.]+)", page.read_text(), re.MULTILINE))
    return found


def missing_docstrings(names: list[str]) -> list[str]:
    """The names whose docstring, as mkdocstrings' loader (griffe) reads the
    source, is missing or blank; aliases are followed to their definitions."""
    import griffe

    package = griffe.load("neuralode", search_paths=[str(ROOT)], resolve_aliases=True)
    missing = []
    for dotted in names:
        obj = package[dotted.removeprefix("neuralode.")]
        docstring = obj.docstring
        if docstring is None or not docstring.value.strip():
            missing.append(dotted)
    return missing


def api_problems() -> list[str]:
    """What keeps the API reference from being complete, one line each."""
    names = public_names()
    problems = [f"{n}: no docstring" for n in missing_docstrings(names)]
    documented = documented_names()
    # A name bound to the same object as a rendered one (`neuralode.CNF` and
    # `neuralode.cnf.CNF`) is rendered once, under the first.
    objects = {id(_resolve(n)) for n in documented if n in names}
    problems += [
        f"{n}: on no page under docs/api/"
        for n in names
        if n not in documented and id(_resolve(n)) not in objects
    ]
    return problems


def _resolve(dotted: str):
    module_name, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def on_config(config, **kwargs):
    from mkdocs.exceptions import PluginError

    problems = api_problems()
    if problems:
        raise PluginError(
            "The API reference must render every public name with a docstring:\n  "
            + "\n  ".join(problems)
        )
    return config


def _publish_external(files, config):
    from mkdocs.structure.files import File

    for folder, pattern in EXTERNAL:
        for path in sorted((ROOT / folder).glob(pattern)):
            uri = f"{folder}/{path.name}"
            if files.get_file_from_path(uri) is None:
                files.append(
                    File(
                        uri,
                        src_dir=str(ROOT),
                        dest_dir=config["site_dir"],
                        use_directory_urls=config["use_directory_urls"],
                    )
                )
    return files


try:  # Run before mkdocs-jupyter's own on_files, which converts the notebooks.
    from mkdocs.plugins import event_priority

    on_files = event_priority(100)(_publish_external)
except ImportError:  # pragma: no cover - mkdocs is only in the docs extra
    on_files = _publish_external
