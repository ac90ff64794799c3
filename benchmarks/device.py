"""The device the benchmarks run on: described by JAX, checked before any unit.

``python -m benchmarks.device [--torch]`` prints, as JSON, what JAX (and
torch) see in the environment it is started with; the parent runs it with a
worker's environment (`probe`), so that a request for a GPU that JAX cannot
see fails at once with `DeviceError` rather than as a table of failed rows.
The parent never initialises a GPU itself: JAX would reserve most of the
GPU's memory for the parent's whole run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: ``--device`` choices.
DEVICES: tuple[str, ...] = ("cpu", "gpu")


class DeviceError(RuntimeError):
    """The requested device is not available to JAX."""


def describe(with_torch: bool = False) -> dict[str, Any]:
    """What this process's JAX (and, optionally, torch) run on."""
    info: dict[str, Any] = {}
    try:
        import jax

        info["jax"] = jax.__version__
        devices = jax.devices()
        info["platform"] = devices[0].platform
        info["device_kind"] = devices[0].device_kind
        info["device_count"] = len(devices)
    except Exception as exc:  # no backend at all: reported, judged by `require`
        info["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    if with_torch:
        info["torch_cuda"] = _torch_cuda()
    return info


def _torch_cuda() -> str | None:
    """The name of torch's first CUDA device, or None (no torch or no CUDA)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def require(info: Mapping[str, Any], device: str) -> None:
    """Raise `DeviceError` unless `info` (from `describe`) shows `device`."""
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; choose one of {DEVICES}")
    if device == "cpu" or info.get("platform") == "gpu":
        return
    seen = info.get("error") or (
        f"only {info.get('platform')} ({info.get('device_kind')}) devices"
    )
    version = info.get("jax", "<your jax version>")
    raise DeviceError(
        f"--device gpu: JAX sees no GPU ({seen}). Install the CUDA build of "
        f'the same JAX, e.g. pip install "jax[cuda12]=={version}", or run with '
        "--device cpu."
    )


def probe(
    device: str, env: Mapping[str, str], with_torch: bool, timeout_s: float = 120.0
) -> dict[str, Any]:
    """`describe` in a subprocess with `env`; raises `DeviceError` if `device`
    is not there."""
    cmd = [sys.executable, "-m", "benchmarks.device"]
    if with_torch:
        cmd.append("--torch")
    # A probe must not hold most of the GPU's memory while it starts up.
    env = {**env, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    proc = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=Path(__file__).resolve().parent.parent,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        info: dict[str, Any] = {"error": f"probe failed: {tail[:300]}"}
    else:
        info = json.loads(lines[-1])
    require(info, device)
    return info


def main(argv: list[str] | None = None) -> int:
    """Print `describe` as one line of JSON."""
    args = sys.argv[1:] if argv is None else argv
    print(json.dumps(describe(with_torch="--torch" in args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
