"""One command for the GPU benchmarks: ``python3 -m benchmarks.gpu``.

Run in the repository's root on a machine with an NVIDIA GPU. Stages, each
line stamped with the UTC time and the seconds since the start:

1. *environment*: Python, ``nvidia-smi -L`` and the versions found;
2. *install*: nothing when jax, equinox, jaxtyping, numpy, scipy and diffrax
   import and JAX sees the GPU (a prepared GPU image); otherwise pip installs
   the missing pieces (``jax[cuda12]`` matching the installed jax, this
   repository with its dependencies, diffrax, scipy, and torchdiffeq when torch
   is there; CUDA torch is too large to fetch within the budget, so without it
   torchdiffeq's rows say skipped). neuralode runs from this checkout either
   way;
3. *benchmark*: ``python -m benchmarks.run --device gpu`` on mlp-fwd, big-fwd,
   vdp-dense, mlp-grad and cnf at full size (every variant but
   backsolve-loose), short repeats, warm-cache first calls, device-to-host
   copies per step (``--syncs``), float32 matmuls at full precision (no TF32,
   as torch's default), and a deadline so that the whole script ends within
   ``--budget-s`` (units not started by then are skipped rows);
4. *collect*: ``benchmarks/RESULTS-gpu.md``, ``benchmarks/results-gpu.json``
   and this script's log, copied to ``$OUT`` when it is set.

The float64 references are computed on the CPU if ``benchmarks/_out/refs``
does not hold them (about 20 s). ``--dry-run`` prints the plan and runs
nothing; ``--device cpu --quick`` runs the whole pipeline on the CPU at tiny
sizes (into ``benchmarks/_out/``). Never writes ``benchmarks/RESULTS.md`` or
``benchmarks/results.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: The GPU subset, in run order.
PROBLEMS = ("mlp-fwd", "big-fwd", "vdp-dense", "mlp-grad", "cnf")
#: Every variant of those problems but neuralode's backsolve-loose.
VARIANTS = (
    "dopri5",
    "backsolve",
    "checkpoint",
    "recursive-checkpoint",
    "own-adjoint",
    "adjoint",
    "CNF",
)
#: Modules the benchmark cannot run without.
REQUIRED = ("jax", "jaxlib", "equinox", "jaxtyping", "numpy", "scipy", "diffrax")
#: Modules whose absence only skips rows.
OPTIONAL = ("torch", "torchdiffeq")
#: Seconds kept back from the budget: the unit running at the deadline may
#: take 30 s more (`benchmarks.run.Clock.timeout`), then writing and copying.
RESERVE_S = 35.0


class Log:
    """Prints stamped lines and keeps them for the log file."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.lines: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, text: str) -> None:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
        line = f"[{now} +{self.elapsed():6.1f} s] {text}"
        self.lines.append(line)
        print(line, flush=True)

    def stage(self, name: str) -> None:
        self(f"== {name}")


def _run(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> int:
    """Run `cmd`, relaying its output line by line through the log."""
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    except OSError as exc:
        LOG(f"cannot start {cmd[0]}: {exc}")
        return 127
    watchdog = threading.Timer(timeout_s, proc.kill)  # also if it prints nothing
    watchdog.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        LOG("  " + line.rstrip())
    rc = proc.wait()
    if not watchdog.is_alive():
        LOG(f"killed after {timeout_s:.0f} s")
    watchdog.cancel()
    return rc


def installed_modules() -> dict[str, str | None]:
    """Version (or None) of each required and optional module, in a subprocess."""
    names = REQUIRED + OPTIONAL
    code = (
        "import importlib, json\n"
        "found = {}\n"
        f"for name in {names!r}:\n"
        "    try:\n"
        "        found[name] = str(getattr(importlib.import_module(name),"
        " '__version__', 'present'))\n"
        "    except Exception:\n"
        "        found[name] = None\n"
        "print(json.dumps(found))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if proc.returncode != 0:
        return dict.fromkeys(names)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def install_commands(
    found: dict[str, str | None], sees_gpu: bool, device: str
) -> list[list[str]]:
    """The pip commands that supply what `found` lacks."""
    pip = [sys.executable, "-m", "pip", "install", "--retries", "1", "--timeout", "30"]
    cmds: list[list[str]] = []
    missing = [name for name in REQUIRED if not found.get(name)]
    if device == "gpu" and not sees_gpu:
        jax = found.get("jax")
        spec = f"jax[cuda12]=={jax}" if jax else "jax[cuda12]>=0.4.35,<0.11"
        cmds.append(pip + [spec])
    if missing:
        cmds.append(pip + ["-e", ".", "diffrax", "scipy"])
    if found.get("torch") and not found.get("torchdiffeq"):
        cmds.append(pip + ["--no-deps", "torchdiffeq"])
    return cmds


def output_paths(device: str, quick: bool) -> tuple[Path, Path]:
    """Where the report and its JSON go (never RESULTS.md / results.json)."""
    if device == "gpu" and not quick:
        return HERE / "RESULTS-gpu.md", HERE / "results-gpu.json"
    tag = device + ("-quick" if quick else "")
    out = HERE / "_out"
    return out / f"RESULTS-gpu-{tag}.md", out / f"results-gpu-{tag}.json"


def benchmark_command(
    args: argparse.Namespace, md: Path, js: Path, deadline_s: float
) -> list[str]:
    """The ``benchmarks.run`` call of the benchmark stage."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--device", args.device]
    cmd += ["--problems", ",".join(PROBLEMS), "--variants", ",".join(VARIANTS)]
    cmd += ["--warm-cache", "--syncs", "--matmul-precision", "highest"]
    cmd += ["--target-s", str(args.target_s), "--max-total-s", str(args.max_total_s)]
    cmd += ["--no-grad-evals", "--timeout", str(args.unit_timeout_s)]
    cmd += ["--deadline-s", f"{deadline_s:.0f}"]
    cmd += ["--json-out", str(js), "--md-out", str(md)]
    if args.libs:
        cmd += ["--libs", args.libs]
    if args.quick:
        cmd.append("--quick")
    return cmd


def collect(files: list[Path]) -> None:
    """Copy `files` (those that exist) to ``$OUT`` when it is set."""
    out = os.environ.get("OUT")
    if not out:
        LOG("$OUT not set: results stay in the repository")
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    for path in files:
        if path.exists():
            shutil.copy(path, Path(out) / path.name)
            LOG(f"copied {path.relative_to(ROOT)} to $OUT/{path.name}")
        else:
            LOG(f"missing: {path.relative_to(ROOT)}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument(
        "--budget-s", type=float, default=290.0, help="whole script, s (290)"
    )
    parser.add_argument("--target-s", type=float, default=0.3, help="repeat time, s")
    parser.add_argument("--max-total-s", type=float, default=1.5)
    parser.add_argument("--unit-timeout-s", type=float, default=150.0)
    parser.add_argument("--libs", default=None, help="default: all four")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the stages; returns the benchmark's exit status."""
    args = _parse(argv)
    md, js = output_paths(args.device, args.quick)
    log_path = HERE / "_out" / "gpu-run.log"
    LOG.stage("environment")
    LOG(f"python {sys.version.split()[0]} at {sys.executable}; repository {ROOT}")
    if shutil.which("nvidia-smi"):
        _run(["nvidia-smi", "-L"], 20)
    else:
        LOG("no nvidia-smi on PATH")
    LOG.stage("install")
    if args.dry_run:
        LOG("would check imports of " + ", ".join(REQUIRED + OPTIONAL))
        LOG("would pip install only what is missing, e.g.:")
        fake: dict[str, str | None] = dict.fromkeys(REQUIRED + OPTIONAL)
        for cmd in install_commands(fake, False, args.device):
            LOG("  " + " ".join(cmd))
    else:
        status = _install(args)
        if status:
            _finish([], log_path)
            return status
    LOG.stage("benchmark")
    deadline_s = max(args.budget_s - LOG.elapsed() - RESERVE_S, 0.0)
    cmd = benchmark_command(args, md, js, deadline_s)
    LOG(" ".join(cmd))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
    )
    rc = 0
    if args.dry_run:
        LOG(f"would write {md.relative_to(ROOT)} and {js.relative_to(ROOT)}")
    else:
        hard_stop = max(args.budget_s - LOG.elapsed(), 0.0) + 240.0
        rc = _run(cmd, hard_stop, env)
        LOG(f"benchmark finished with exit status {rc}")
    LOG.stage("collect")
    if args.dry_run:
        LOG(f"would copy {md.name}, {js.name} and {log_path.name} to $OUT if set")
    else:
        _finish([md, js], log_path)
    LOG(f"done in {LOG.elapsed():.0f} s")
    return rc


def _install(args: argparse.Namespace) -> int:
    """Check the environment, pip install what is missing; 0 when ready."""
    from .device import DeviceError, probe
    from .run import single_thread_env

    def check() -> tuple[dict[str, Any], bool, str]:
        try:
            found = installed_modules()
        except subprocess.TimeoutExpired:
            found = dict.fromkeys(REQUIRED + OPTIONAL)
        LOG("found: " + ", ".join(f"{k} {v or '—'}" for k, v in found.items()))
        LOG(f"neuralode asks for {_jax_requirement()}; running with jax {found['jax']}")
        if not found.get("jax"):
            return found, False, "jax is not installed"
        try:
            info = probe(args.device, single_thread_env(args.device), False)
        except (DeviceError, subprocess.TimeoutExpired) as exc:
            return found, False, str(exc)
        LOG(f"JAX device: {info.get('device_kind')} ({info.get('platform')})")
        return found, True, ""

    found, sees_device, problem = check()
    missing = [name for name in REQUIRED if not found.get(name)]
    if sees_device and not missing:
        LOG("nothing to install")
        return 0
    LOG(f"to supply: {', '.join(missing) or 'the GPU build of JAX'} ({problem})")
    for cmd in install_commands(found, sees_device, args.device):
        LOG(" ".join(cmd))
        rc = _run(cmd, max(args.budget_s / 2 - LOG.elapsed(), 30.0))
        LOG(f"pip exit status {rc}")
    found, sees_device, problem = check()
    missing = [name for name in REQUIRED if not found.get(name)]
    if sees_device and not missing:
        return 0
    LOG(f"cannot run: {', '.join(missing) or problem} (no package registry?)")
    return 2


def _jax_requirement() -> str:
    """neuralode's requirement on jax, from pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'"(jax[<>=!~][^"]*)"', text)
    return found.group(1) if found else "jax"


def _finish(files: list[Path], log_path: Path) -> None:
    """Copy `files` to ``$OUT``, then write the log there and beside them."""
    collect(files)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("\n".join(LOG.lines) + "\n")
    if os.environ.get("OUT"):
        shutil.copy(log_path, Path(os.environ["OUT"]) / log_path.name)


LOG = Log()

if __name__ == "__main__":
    raise SystemExit(main())
