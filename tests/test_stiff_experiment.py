"""The stiff experiment: a quick run end to end, its fit, resume and refusals.

One real `stiff --quick` run (module fixture) serves every test that needs a
finished run; the tests that resume or refuse work on copies of it or check
that it is left byte for byte as it was.
"""

import hashlib
import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import neuralode as no
from neuralode.__main__ import main
from neuralode.experiments import stiff

QUICK_STEPS = stiff.QUICK["steps"]


def _main(argv: list[str]) -> dict:
    # optax's Adam mixes weak-typed scalars that strict promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
        assert main([*argv, "--no-progress"]) == 0
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "metrics.json").read_text())


def _usage_error(argv: list[str], capsys) -> str:
    """Run `main`, expecting a usage error (exit 2); return its error line."""
    with jax.numpy_dtype_promotion("standard"), pytest.raises(SystemExit) as info:
        main([*argv, "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def _hashes(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
    }


def _history(directory: Path) -> list[dict]:
    return json.loads((directory / "history.json").read_text())["history"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, dict]:
    """A finished `stiff --quick` run: its directory and metrics."""
    out = tmp_path_factory.mktemp("stiff") / "run"
    return out, _main(["stiff", "--quick", "--out", str(out)])


def test_time_grids_contain_the_observation_times():
    ts, fine, refine = stiff.time_grids(12)
    assert ts.shape == (13,) and ts[0] == 0 and fine[0] == 0
    np.testing.assert_array_equal(ts[1:], fine[1::refine])
    assert ts[1] == pytest.approx(stiff.T_FIRST) and ts[-1] == pytest.approx(1e5)
    assert fine[-1] == ts[-1] and len(fine) - 1 >= stiff.PLOT_POINTS


@pytest.mark.slow
def test_quick_run_writes_its_results(quick_run):
    out, metrics = quick_run
    for name in ("metrics.json", "config.json", "checkpoint.eqx", "history.json"):
        assert (out / name).stat().st_size > 0, name
    for name in ("fit.png", "loss.png", "rates.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert metrics["experiment"] == "stiff" and metrics["steps"] == QUICK_STEPS
    assert metrics["solver"] == "AutoSwitch"
    assert metrics["failed_training_solves"] == 0
    assert [row["step"] for row in _history(out)] == list(range(1, QUICK_STEPS + 1))
    # Each reported relative error is fitted / true - 1 of the reported values.
    for name in stiff.RATE_NAMES:
        fitted, true = metrics[f"{name}_fitted"], metrics[f"{name}_true"]
        assert metrics[f"{name}_relative_error"] == pytest.approx(fitted / true - 1)
    assert [metrics[f"{n}_true"] for n in stiff.RATE_NAMES] == [0.04, 3e7, 1e4]


@pytest.mark.slow
def test_quick_run_moves_the_constants_towards_the_truth(quick_run):
    _, metrics = quick_run
    # Every constant starts a decade off: a distance of sqrt(3) in log10 space.
    assert metrics["initial_log10_distance"] == pytest.approx(math.sqrt(3))
    assert metrics["log10_distance"] < 0.5 * metrics["initial_log10_distance"]
    assert metrics["max_relative_error"] < metrics["initial_max_relative_error"] / 4
    assert metrics["loss"] < metrics["initial_loss"] / 10
    # The noise floor: the true constants give a loss of about 1.
    assert 0.5 < metrics["loss_at_true_rates"] < 2


@pytest.mark.slow
def test_dopri5_cannot_solve_the_same_loss(quick_run):
    _, metrics = quick_run
    assert metrics["dopri5_result"] == no.RESULTS.max_steps_reached
    assert metrics["dopri5_message"] == no.RESULTS.message(no.RESULTS.max_steps_reached)
    assert metrics["dopri5_num_steps"] == metrics["dopri5_max_steps"] == 4096
    assert metrics["dopri5_last_output_time"] < 1e3
    assert metrics["dopri5_loss"] is None  # NaN, written as null


@pytest.mark.slow
def test_a_finished_run_is_never_overwritten(quick_run, capsys):
    out, _ = quick_run
    before = _hashes(out)
    error = _usage_error(["stiff", "--quick", "--out", str(out)], capsys)
    assert "pass --overwrite" in error
    for steps in ([], ["--steps", str(QUICK_STEPS)]):
        error = _usage_error(["stiff", "--resume", str(out), *steps], capsys)
        assert f"is at or below the step {QUICK_STEPS} of the checkpoint" in error
    assert _hashes(out) == before


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(quick_run, tmp_path):
    out, metrics = quick_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    steps = QUICK_STEPS + 3
    resumed = _main(
        ["stiff", "--resume", str(copy), "--steps", str(steps), "--out", str(copy)]
    )
    assert resumed["steps"] == steps
    history = _history(copy)
    assert [row["step"] for row in history] == list(range(1, steps + 1))
    assert history[:QUICK_STEPS] == _history(out)
    # Step 31 starts from the constants the first run ended with.
    for name in stiff.RATE_NAMES:
        logged = history[QUICK_STEPS][f"log10_{name}"]
        assert 10.0**logged == pytest.approx(metrics[f"{name}_fitted"], rel=1e-12)


def test_more_than_one_device_is_refused(tmp_path, capsys):
    new = tmp_path / "new"
    error = _usage_error(
        ["stiff", "--quick", "--devices", "2", "--out", str(new)], capsys
    )
    assert "--devices 2" in error and "one device" in error
    assert not new.exists()
