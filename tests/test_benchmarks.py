"""Smoke test of the benchmark suite: ``python -m benchmarks.run --quick``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
