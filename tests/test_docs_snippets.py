"""Every Python code block of README.md and docs/**/*.md runs.

The blocks of one file run in order in one namespace, as a reader would run
them. The blocks run under tests/conftest.py's float64 and strict dtype
promotion, with HOME and XDG_CACHE_HOME in a temporary directory, and the JAX
options a block may change are restored after each block. An HTML comment on
the line before a block changes that, with the reason after it:

- `<!-- snippet: skip ... -->`: not run (for what cannot run here: several
  processes or hosts);
- `<!-- snippet: standard-promotion ... -->`: run under JAX's default
  (standard) dtype promotion, for blocks that train with optax, whose bias
  correction mixes integer and float arrays.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(
    r"(?:<!--\s*snippet:\s*(?P<marker>skip|standard-promotion)\b[^>]*-->\s*\n)?"
    r"^```(?P<lang>[^\n`]*)\n(?P<code>.*?)^```\s*$",
    re.MULTILINE | re.DOTALL,
)

#: JAX options a snippet may set (the compilation cache example does).
JAX_OPTIONS = (
    "jax_enable_x64",
    "jax_numpy_dtype_promotion",
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
)


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, code, marker) for each ```python block of the file."""
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match["lang"].strip() not in ("python", "py"):
            continue
        line = text.count("\n", 0, match.start("code")) + 1
        blocks.append((line, match["code"], match["marker"]))
    return blocks


def _cases():
    for path in FILES:
        for index, (line, _, marker) in enumerate(python_blocks(path)):
            rel = path.relative_to(ROOT).as_posix()
            skip = marker == "skip"
            marks = [pytest.mark.skip(reason="marked snippet: skip")] if skip else []
            yield pytest.param(path, index, id=f"{rel}:{line}", marks=marks)


#: Per file: the namespace its blocks share and how many blocks have run in it.
_STATE: dict[Path, dict] = {}


@pytest.fixture
def isolated(monkeypatch, tmp_path_factory):
    home = tmp_path_factory.mktemp("snippet-home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    before = {name: getattr(jax.config, name) for name in JAX_OPTIONS}
    yield
    changed = {n: v for n, v in before.items() if getattr(jax.config, n) != v}
    for name, value in changed.items():
        jax.config.update(name, value)
    if "jax_compilation_cache_dir" in changed:
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()


@pytest.mark.parametrize("path, index", list(_cases()))
def test_snippet_runs(path, index, isolated):
    blocks = python_blocks(path)
    state = _STATE.setdefault(
        path, {"namespace": {"__name__": "__snippet__"}, "done": 0, "failed": None}
    )
    if state["failed"] is not None:
        pytest.fail(f"an earlier block of this file failed: {state['failed']}")
    # Run the blocks before this one first if this process has not (another
    # xdist worker may have run them), then this one.
    for i in range(state["done"], index + 1):
        line, code, marker = blocks[i]
        if marker != "skip":
            source = "\n" * (line - 1) + code  # tracebacks show the file's lines
            promotion = "standard" if marker == "standard-promotion" else "strict"
            try:
                with jax.numpy_dtype_promotion(promotion):
                    exec(compile(source, str(path), "exec"), state["namespace"])
            except BaseException:
                state["failed"] = f"{path.name}:{line}"
                raise
        state["done"] = i + 1


def test_snippets_found():
    counts = {p.relative_to(ROOT).as_posix(): len(python_blocks(p)) for p in FILES}
    assert counts["README.md"] >= 1
    assert sum(counts.values()) >= 10, counts
