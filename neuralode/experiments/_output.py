"""Run directories and the files written into them, always atomically."""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

METRICS = "metrics.json"
CONFIG = "config.json"
CHECKPOINT = "checkpoint.eqx"
HISTORY = "history.json"
# The files that make a directory a run's; --out refuses such a directory
# unless --overwrite is given.
RUN_FILES = (METRICS, CONFIG, CHECKPOINT)


class UsageError(Exception):
    """A bad command line, reported as an argparse usage error (exit code 2)."""


def is_run_directory(path: Path) -> bool:
    """Whether `path` is a directory holding a run's metrics, config or checkpoint."""
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def default_directory(experiment: str) -> Path:
    """`runs/<experiment>-<timestamp>`, suffixed `-2`, `-3`... if that exists."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{experiment}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to `path` that replaces `path` on success.

    An exception (or an interruption) while writing leaves `path` as it was
    and removes the temporary file, so no reader ever sees a truncated file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _jsonable(value: Any) -> Any:
    """Turn NumPy/JAX scalars and arrays into plain JSON values (NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented JSON (atomically), array scalars as numbers."""
    text = json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n"
    with atomic_open(path) as f:
        f.write(text)


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object written by `write_json`."""
    return json.loads(path.read_text())


def read_run_json(path: Path) -> dict[str, Any]:
    """`read_json`, with an unreadable or non-object file as a `UsageError`."""
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"cannot read {path}: expected a JSON object")
    return data
