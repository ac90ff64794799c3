"""The stiff work–precision benchmark: its equal-error ratio and a quick run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import neuralode
from benchmarks import stiff_work_precision as stiff

ROOT = Path(__file__).resolve().parents[1]


def _rows(points: list[tuple[float, float]]) -> list[dict]:
    return [
        {"status": "ok", "error": error, "time_median_s": seconds}
        for error, seconds in points
    ]


def test_pareto_front_drops_dominated_points() -> None:
    points = [(1e-3, 1.0), (1e-4, 3.0), (1e-4, 2.0), (1e-5, 5.0), (1e-3, 4.0)]
    assert stiff.pareto_front(points) == [(1e-5, 5.0), (1e-4, 2.0), (1e-3, 1.0)]


def test_ratio_at_equal_error_interpolates_log_log() -> None:
    # time = error^(-1/4) against 4·error^(-1/4) over different error ranges:
    # the ratio is 1/4 wherever both are defined (decades 1e-7 … 1e-4).
    mine = _rows([(10.0**-k, 10.0 ** (k / 4)) for k in (3, 5, 7, 8)])
    rival = _rows([(10.0**-k, 4 * 10.0 ** (k / 4)) for k in (4, 6, 7)])
    result = stiff.ratio_at_equal_error(mine, rival)
    assert result["levels"] == pytest.approx([1e-7, 1e-6, 1e-5, 1e-4])
    assert result["ratios"] == pytest.approx([0.25] * 4)
    assert result["geomean"] == pytest.approx(0.25)


def test_ratio_at_equal_error_without_overlap_says_so() -> None:
    mine = _rows([(1e-8, 2.0), (1e-7, 1.0)])
    rival = _rows([(1e-4, 2.0), (1e-3, 1.0)])
    result = stiff.ratio_at_equal_error(mine, rival)
    assert result["ratios"] == [] and result["geomean"] is None
    assert "no common error range" in result["note"]


def test_quick_run(tmp_path: Path) -> None:
    """The quick mode end to end on SciPy and neuralode's Rodas5P (HIRES)."""
    has_rodas = hasattr(neuralode, "Rodas5P")
    libs = "scipy,neuralode" if has_rodas else "scipy"
    json_out, md_out, png = (tmp_path / n for n in ("s.json", "s.md", "s.png"))
    cmd = [sys.executable, "-m", "benchmarks.stiff_work_precision", "--quick"]
    cmd += ["--libs", libs, "--solvers", "Radau,BDF,LSODA,Rodas5P"]
    cmd += ["--json-out", str(json_out), "--md-out", str(md_out)]
    cmd += ["--plot-out", str(png)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads(json_out.read_text())
    assert results["settings"]["quick"] is True
    assert list(results["problems"]) == [stiff.QUICK_PROBLEM]
    rows = results["rows"]
    expected = {("scipy", s) for s in ("Radau", "BDF", "LSODA")}
    if has_rodas:
        expected.add(("neuralode", "Rodas5P"))
    assert {(r["library"], r["solver"]) for r in rows} == expected
    for library, solver in expected:
        mine = sorted(
            (r for r in rows if (r["library"], r["solver"]) == (library, solver)),
            key=lambda r: -r["rtol"],
        )
        assert [r["rtol"] for r in mine] == sorted(stiff.QUICK_RTOLS, reverse=True)
        for row in mine:
            assert row["status"] == "ok", row
            assert math.isfinite(row["error"]) and row["error"] < 1e-3, row
            assert row["time_median_s"] > 0 and row["first_call_s"] > 0
            assert row["fevals"] > 0 and row["steps"] > 0
        # A tighter tolerance gives a smaller error.
        assert mine[1]["error"] < mine[0]["error"], mine
    if has_rodas:
        rodas = [r for r in rows if r["solver"] == "Rodas5P"]
        assert all(r["error"] < 100 * r["rtol"] for r in rodas), rodas
        pair = next(
            p for p in results["summary"]["pairs"] if p["rival"] == ["scipy", "Radau"]
        )
        assert pair["first_call_ratio"] > 0 and not pair["first_calls_fresh"]
        assert pair["equal_error"]["geomean"] > 0, pair

    report = md_out.read_text()
    assert "python -m benchmarks.stiff_work_precision --quick" in report
    assert f"## {stiff.QUICK_PROBLEM}" in report and "| scipy | Radau |" in report
    assert png.stat().st_size > 10_000
