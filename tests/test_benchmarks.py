"""Smoke test of the benchmark suite: ``python -m benchmarks.run --quick``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]

TOP_KEYS = {
    "command",
    "date",
    "machine",
    "versions",
    "settings",
    "problems",
    "wall_s",
    "rows",
}


@pytest.mark.slow
def test_quick_run_writes_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    json_out, md_out = tmp_path / "results.json", tmp_path / "RESULTS.md"
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick"]
    cmd += ["--json-out", str(json_out), "--md-out", str(md_out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    from benchmarks.problems import QUICK_PROBLEM_NAMES
    from benchmarks.runners import LIBRARIES
    from benchmarks.runners.common import ROW_KEYS

    results = json.loads(json_out.read_text())
    assert TOP_KEYS <= set(results)
    assert results["settings"]["quick"] is True
    rows = results["rows"]
    assert rows
    for row in rows:
        assert set(row) == set(ROW_KEYS)
        assert row["status"] in {"ok", "skipped", "failed"}
        assert row["library"] in LIBRARIES
        if row["status"] != "ok":
            assert row["message"], row  # skipped / failed rows say why

    # Every library appears for every quick problem: a missing rival is a
    # skipped row, never an absent one.
    for library in LIBRARIES:
        for problem in QUICK_PROBLEM_NAMES:
            assert any(
                r["library"] == library and r["problem"] == problem for r in rows
            )

    # neuralode itself must run and be accurate.
    mine = {r["problem"]: r for r in rows if r["library"] == "neuralode"}
    assert set(mine) == set(QUICK_PROBLEM_NAMES)
    for row in mine.values():
        assert row["status"] == "ok", row
        assert row["time_median_s"] > 0 and row["first_call_s"] > 0
        assert row["error"] is not None and row["error"] < 1e-3, row
    fwd = mine["mlp-fwd"]
    assert fwd["nfe_fwd"] > 0 and fwd["limit_s"] > 0 and fwd["time_over_limit"] > 0
    assert mine["mlp-grad"]["temp_bytes"] is not None

    report = md_out.read_text()
    assert "python -m benchmarks.run" in report and "neuralode" in report


def _grad_row(library: str, variant: str, time_s: float, error: float) -> dict:
    return {
        "problem": "mlp-grad",
        "library": library,
        "variant": variant,
        "task": "grad",
        "time_median_s": time_s,
        "error": error,
    }


def test_backsolve_target_only_counts_variants_at_most_diffraxs_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.report import _backsolve_at_equal_error

    theirs = _grad_row("diffrax", "backsolve", 1.0, 1e-3)
    default = _grad_row("neuralode", "backsolve", 0.9, 1e-6)
    loose = _grad_row("neuralode", "backsolve-loose", 0.5, 1e-4)
    check = _backsolve_at_equal_error([theirs, default, loose])
    assert check["met"] is True
    assert (
        check["value"].startswith("0.5×")
        and "default tolerances 0.9×" in check["value"]
    )

    # A faster variant that is less accurate than diffrax does not count.
    loose["error"] = 1e-2
    check = _backsolve_at_equal_error([theirs, default, loose])
    assert check["met"] is False and check["value"].startswith("0.9×")
    # Without diffrax there is nothing to compare with.
    assert _backsolve_at_equal_error([default, loose])["met"] is None


# --------------------------------------------------------------------------
# Warm-cache first calls, --device, the GPU script
# --------------------------------------------------------------------------


def _row(**values: object) -> dict:
    from benchmarks.problems import get_problem
    from benchmarks.runners.common import new_row

    problem = get_problem(str(values.pop("problem", "mlp-fwd")), quick=True)
    library = str(values.pop("library", "neuralode"))
    variant = str(values.pop("variant", "dopri5"))
    task = str(values.pop("task", "fwd"))
    return new_row(problem, library, variant, task, **values)


def _results(rows: list[dict], **settings: object) -> dict:
    return {
        "command": "python -m benchmarks.run",
        "date": "2026-01-01T00:00:00+00:00",
        "wall_s": 1.0,
        "machine": {"cpu": "CPU", "cores": 2, "platform": "linux", "python": "3"},
        "versions": {"neuralode": "0.1.0"},
        "settings": {"single_thread": "--flags", **settings},
        "problems": {},
        "rows": rows,
    }


def test_report_shows_warm_cache_first_call_and_its_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.report import render_markdown

    timing = dict(time_median_s=1e-3, time_min_s=1e-3, time_max_s=1e-3)
    rows = [
        _row(first_call_s=1.2, first_call_warm_s=0.25, **timing),
        _row(problem="big-fwd", first_call_s=1.5, first_call_warm_s=0.5, **timing),
    ]
    report = render_markdown(_results(rows))
    assert "| first call | first call (warm cache) |" in report
    assert "| 1.2 s | 250 ms |" in report
    target = "first call (warm cache) ≤ 0.3 s"
    assert f"| mlp-fwd fwd (dopri5): {target} | 0.25 s | met |" in report
    assert f"| big-fwd fwd (dopri5): {target} | 0.5 s | **missed** |" in report
    assert f"| cnf grad (CNF): {target} | n/a | n/a |" in report  # not measured


def test_report_names_the_gpu_and_the_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.report import render_markdown

    syncs = {"loops": 1, "max_depth": 1, "conditionals_in_loops": 0}
    syncs.update(loops_in_loops=0, d2h_copies=87, d2h_per_step=1.0)
    results = _results(
        [_row(time_median_s=1e-3, time_min_s=1e-3, time_max_s=1e-3, syncs=syncs)],
        device="gpu",
        jax_platforms="cuda,cpu",
        single_thread=None,
    )
    results["device"] = {
        "platform": "gpu",
        "device_kind": "NVIDIA H200",
        "device_count": 1,
        "jax": "0.10.2",
        "torch_cuda": None,
    }
    report = render_markdown(results)
    assert "- JAX device: NVIDIA H200 (platform gpu, 1 device, jax 0.10.2)." in report
    assert "torchdiffeq skipped (no CUDA torch)" in report
    assert "Single thread" not in report
    assert (
        "| mlp-fwd | neuralode | dopri5 | fwd | 1 | 1 | 0 | 0 | 87 | 1.00 |" in report
    )


def test_no_compilation_cache_reaches_a_measuring_worker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A user's cache settings are stripped; only the warm worker gets a cache,
    the one directory its measuring worker fills after measuring."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import run

    user_settings = {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "user-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_ENABLE_COMPILATION_CACHE": "true",
        "NEURALODE_CACHE_DIR": str(tmp_path / "neuralode-cache"),
    }
    for name, value in user_settings.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(
        "XLA_FLAGS", "--xla_gpu_per_fusion_autotune_cache_dir=/x --xla_dump_to=/d"
    )
    for device in ("cpu", "gpu"):
        env = run.single_thread_env(device)
        assert not set(user_settings) & set(env)
        assert (
            "cache" not in env["XLA_FLAGS"] and "--xla_dump_to=/d" in env["XLA_FLAGS"]
        )
    # What JAX itself reads in a worker's environment: no cache directory.
    probe = "import jax; print(jax.config.jax_compilation_cache_dir)"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env=run.single_thread_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "None", out.stderr[-500:]

    args = run._parse(["--problems", "mlp-fwd", "--libs", "neuralode,torchdiffeq"])
    problems = [run.get_problem("mlp-fwd")]
    units = run.plan_units(args, problems, tmp_path, 0)
    mine = next(u for u in units if u.library == "neuralode")
    assert mine.cache_dir is not None and not any(mine.cache_dir.iterdir())
    cold, warm = mine.cold_cmd(args), mine.warm_cmd(args)
    assert "--cache-dir" not in cold and "--first-call-only" not in cold
    assert cold[cold.index("--populate-cache") + 1] == str(mine.cache_dir)
    assert warm[warm.index("--cache-dir") + 1] == str(mine.cache_dir)
    assert "--first-call-only" in warm and "--populate-cache" not in warm
    torch_unit = next(u for u in units if u.library == "torchdiffeq")
    assert torch_unit.cache_dir is None  # only JAX programs are cached
    no_warm = run._parse(["--problems", "mlp-fwd", "--no-warm-cache"])
    assert all(
        u.cache_dir is None for u in run.plan_units(no_warm, problems, tmp_path, 1)
    )


def test_warm_first_calls_merge_into_the_measured_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.cache import warm_note
    from benchmarks.run import merge_warm

    measured = [_row(time_median_s=1e-3, first_call_s=1.0, nfe_fwd=36, message="cap")]
    note = warm_note(3, 2, {"xla_ffi_python_cpu_callback"})
    assert note is not None and "2 of 3" in note and "host callback" in note
    assert warm_note(2, 2, set()) is None
    warm = [_row(first_call_s=0.2, message=note, syncs={"d2h_copies": 12})]
    (row,) = merge_warm(measured, warm, "warm-cache run failed")
    assert row["first_call_warm_s"] == 0.2 and row["first_call_s"] == 1.0
    assert row["syncs"]["d2h_per_step"] == 2.0  # 12 copies over 36 / 6 steps
    assert row["message"] == f"cap; {note}"
    crashed = [_row(status="failed", message="worker crashed (rc 1): boom")]
    (row,) = merge_warm(measured, crashed, "warm-cache run failed")
    assert row["first_call_warm_s"] is None
    assert row["message"] == "cap; warm-cache run failed; worker crashed (rc 1): boom"


def test_device_gpu_without_a_gpu_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.device import DeviceError, require
    from benchmarks.run import main

    cpu_only = {"platform": "cpu", "device_kind": "cpu", "jax": "0.10.2"}
    with pytest.raises(DeviceError, match=r"--device gpu: JAX sees no GPU \(only cpu"):
        require(cpu_only, "gpu")
    require(cpu_only, "cpu")  # no error
    if jax.devices()[0].platform == "gpu":
        pytest.skip("this machine has a GPU")
    json_out = tmp_path / "r.json"
    argv = ["--device", "gpu", "--libs", "neuralode", "--problems", "mlp-fwd"]
    assert main(argv + ["--json-out", str(json_out)]) == 2
    err = capsys.readouterr().err
    assert "error: --device gpu: JAX sees no GPU" in err
    assert 'pip install "jax[cuda12]==' in err
    assert not json_out.exists()


def test_a_spent_deadline_runs_no_unit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import run

    args = run._parse(["--problems", "mlp-fwd", "--deadline-s", "0"])
    units = run.plan_units(args, [run.get_problem("mlp-fwd")], tmp_path, 0)
    rows = run._run_round(args, units, run.Clock(0.0))
    assert {r["library"] for r in rows} == {
        "neuralode",
        "diffrax",
        "jaxode",
        "torchdiffeq",
    }
    assert all(r["status"] == "skipped" and "deadline" in r["message"] for r in rows)


def test_control_flow_counts_loops_and_conditionals_in_hlo(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.syncs import ControlFlow, control_flow

    hlo = """HloModule m

%inner_body (p: s32[]) -> s32[] {
  ROOT %c = s32[] conditional(%p, %p, %p), branch_computations={%b0, %b1}
}

%cond (p: s32[]) -> pred[] {
  ROOT %lt = pred[] compare(%p, %p), direction=LT
}

%outer_body (p: s32[]) -> s32[] {
  %w = s32[] while(%p), condition=%cond, body=%inner_body
  ROOT %f = s32[] fusion(%w), kind=kLoop, calls=%fused
}

ENTRY %main (x: s32[]) -> s32[] {
  %top = s32[] conditional(%x, %x, %x), true_computation=%b0, false_computation=%b1
  ROOT %w0 = s32[] while(%top), condition=%cond, body=%outer_body
}
"""
    assert control_flow(hlo) == ControlFlow(
        loops=2, max_depth=2, conditionals_in_loops=1, loops_in_loops=1
    )


def test_gpu_script_dry_run_plans_the_gpu_subset() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    stages = [line.split("== ")[1] for line in lines if "] == " in line]
    assert stages == ["environment", "install", "benchmark", "collect"]
    assert all(line.startswith("[") and " s] " in line for line in lines)
    (cmd,) = [line for line in lines if "-m benchmarks.run" in line]
    for part in (
        "--device gpu",
        "--problems mlp-fwd,big-fwd,vdp-dense,mlp-grad,cnf",
        "--warm-cache",
        "--syncs",
        "--deadline-s",
        "benchmarks/RESULTS-gpu.md",
        "benchmarks/results-gpu.json",
    ):
        assert part in cmd, part
    assert "RESULTS.md" not in cmd.replace("RESULTS-gpu.md", "")
    assert any("to $OUT if set" in line for line in lines)
