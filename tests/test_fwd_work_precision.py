"""The batch-MLP work–precision benchmark: equal-error ratios and a real sweep."""

from __future__ import annotations

import json

import pytest

from benchmarks import fwd_work_precision as fwp


def _rows(library: str, points: list[tuple[float, float]]) -> list[dict]:
    return [
        {
            "problem": "p",
            "dtype": "float32",
            "library": library,
            "rtol": 10.0**-k,
            "status": "ok",
            "error": error,
            "time_s": seconds,
        }
        for k, (error, seconds) in enumerate(points, start=3)
    ]


def test_ratio_at_equal_error_interpolates_log_log() -> None:
    # time = error^(-1/5) against 2·error^(-1/5), sampled at different errors:
    # the ratio is 1/2 at every matched error, inside the common range only.
    mine = _rows("neuralode", [(10.0**-k, 10.0 ** (k / 5)) for k in (3, 4.5, 6, 8)])
    rival = _rows("diffrax", [(10.0**-k, 2 * 10.0 ** (k / 5)) for k in (2, 4, 7)])
    result = fwp.ratio_at_equal_error(mine, rival)
    assert result["range"] == pytest.approx([1e-7, 1e-3])
    assert result["errors"] == pytest.approx([1e-7, 1e-6, 10**-4.5, 1e-4, 1e-3])
    assert result["ratios"] == pytest.approx([0.5] * 5)
    assert result["max"] == pytest.approx(0.5)
    assert result["geomean"] == pytest.approx(0.5)


def test_ratio_at_equal_error_skips_a_float32_floor() -> None:
    # Tighter tolerances that buy time but no accuracy (a rounding floor) are
    # off the Pareto front and never enter the ratio.
    mine = _rows("neuralode", [(1e-3, 1.0), (1e-5, 3.0), (2e-5, 6.0), (3e-5, 9.0)])
    rival = _rows("diffrax", [(1e-3, 2.0), (1e-5, 6.0)])
    result = fwp.ratio_at_equal_error(mine, rival)
    assert result["errors"] == pytest.approx([1e-5, 1e-3])
    assert result["ratios"] == pytest.approx([0.5, 0.5])


def test_ratio_at_equal_error_without_overlap_says_so() -> None:
    mine = _rows("neuralode", [(1e-8, 2.0), (1e-7, 1.0)])
    rival = _rows("diffrax", [(1e-4, 2.0), (1e-3, 1.0)])
    result = fwp.ratio_at_equal_error(mine, rival)
    assert result["ratios"] == [] and result["max"] is None
    assert "no common error range" in result["note"]


def test_failed_solves_are_left_out_of_the_ratio() -> None:
    mine = _rows("neuralode", [(1e-3, 1.0), (1e-5, 3.0)])
    rival = _rows("diffrax", [(1e-3, 2.0), (1e-5, 6.0)])
    mine[1]["status"] = "failed"
    result = fwp.ratio_at_equal_error(mine, rival)
    assert result["max"] is None
    assert "fewer than two" in result["note"]


def test_a_refused_tolerance_is_reported_not_matched() -> None:
    # neuralode refuses an rtol below the dtype's epsilon at trace time; the
    # row stays in the table and the ratio uses the tolerances both solved.
    mine = _rows("neuralode", [(1e-3, 1.0), (1e-5, 3.0), (0.0, 0.0)])
    mine[2].update(dict.fromkeys(fwp.MEASURED), status="refused", message="rtol")
    rival = _rows("diffrax", [(1e-3, 2.0), (1e-5, 6.0), (1e-6, 9.0)])
    rows = [dict(r, atol=r["rtol"] * fwp.ATOL_FACTOR) for r in mine + rival]
    for r in rows:
        r.setdefault("accepted", 10)
        r.setdefault("rejected", 0)
        r.setdefault("nfe", 62)
    results = {
        "rows": rows,
        "equal_error": fwp.summarise(rows),
        "equal_error_nfe": fwp.summarise(rows, "nfe"),
    }
    ratio = results["equal_error"]["p"]["float32"]
    assert ratio["ratios"] == pytest.approx([0.5, 0.5])
    assert ratio["target_met"] is True
    # Every row has the same NFE, so each library's NFE front is one point (its
    # most accurate), too few to match.
    assert results["equal_error_nfe"]["p"]["float32"]["max"] is None
    lines = fwp.markdown(results).splitlines()
    refused = [line for line in lines if "| 1e-05 |" in line]
    assert len(refused) == 1 and "refused / 10" in refused[0], lines


def test_sampling_times_cheap_calls_more_often() -> None:
    sampling = fwp.Sampling(repeats=5, target_s=1.0, max_repeats=200)
    assert sampling.count(2.0) == 5
    assert sampling.count(0.01) == 100
    assert sampling.count(1e-6) == 200


def test_quick_sweep_converges_and_reports_ratios() -> None:
    # The sweep compares with diffrax, a benchmark extra (not in CI's dev extra).
    pytest.importorskip("diffrax")
    """The real solves (quick mlp-fwd, float64 as the test session runs)."""
    results = fwp.run(
        quick=True,
        problems=("mlp-fwd",),
        dtypes=("float64",),
        sampling=fwp.QUICK_SAMPLING,
        count_evals=False,
    )
    results = json.loads(json.dumps(results))  # what the JSON file holds
    rows = results["rows"]
    assert {(r["library"], r["rtol"]) for r in rows} == {
        (lib, rtol) for lib in fwp.PROGRAMS for rtol in fwp.QUICK_RTOLS
    }
    for library in fwp.PROGRAMS:
        mine = sorted(
            (r for r in rows if r["library"] == library), key=lambda r: -r["rtol"]
        )
        assert all(r["status"] == "ok" and r["time_s"] > 0 for r in mine), mine
        assert all(r["atol"] == r["rtol"] * fwp.ATOL_FACTOR for r in mine)
        errors = [r["error"] for r in mine]
        steps = [r["accepted"] for r in mine]
        # Tightening rtol 100× cuts the error by well over 10× and needs more steps.
        assert errors[1] < errors[0] / 10, mine
        assert errors[0] < 100 * mine[0]["rtol"], mine
        assert steps[1] > steps[0], mine
    neuralode = [r for r in rows if r["library"] == "neuralode"]
    assert all(r["reported_nfe"] >= 6 * r["accepted"] for r in neuralode)
    ratio = results["equal_error"]["mlp-fwd"]["float64"]
    assert set(ratio) >= {"range", "errors", "ratios", "max", "geomean", "target_met"}
    assert ratio["max"] is not None and ratio["max"] > 0, ratio
    table = fwp.markdown(results)
    assert table.count("| mlp-fwd | float64 |") == len(fwp.QUICK_RTOLS) + 1
