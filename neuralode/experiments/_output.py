"""Run directories and the JSON files written into them."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any


def run_directory(experiment: str, out: str | None) -> Path:
    """Create (if needed) and return the output directory of a run.

    **Arguments:**

    - `experiment`: the experiment's name, used in the default directory name.
    - `out`: the directory asked for on the command line, or None for
      `runs/<experiment>-<timestamp>/`.

    **Returns:**

    The directory, which exists on return.
    """
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = str(Path("runs") / f"{experiment}-{stamp}")
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    """Write `data` as indented JSON, converting array scalars to numbers."""
    path.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object written by `write_json`."""
    return json.loads(path.read_text())
