"""The experiments command: argument errors, quick runs, resume, --devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from neuralode.__main__ import main


def _main(argv: list[str]) -> dict:
    # optax's Adam mixes weak-typed scalars that strict promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
        assert main([*argv, "--no-progress"]) == 0
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "metrics.json").read_text())


def _assert_files(out: Path, *pngs: str) -> None:
    for name in ("metrics.json", "config.json", "checkpoint.eqx", *pngs):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["digits", "--steps", "0"], "--steps"),
        (["digits", "--devices", "two"], "--devices"),
        (["cnf", "--reg", "kinetc"], "--reg"),
        (["cnf", "--data", "moon"], "--data"),
        (["spiral", "--lr", "-1"], "--lr"),
        (["fit"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err


def test_resume_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["digits", "--resume", str(tmp_path / "nothing")])
    assert info.value.code == 2
    assert "No checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_spiral_quick(tmp_path):
    metrics = _main(["spiral", "--quick", "--out", str(tmp_path)])
    _assert_files(tmp_path, "spirals.png", "loss.png")
    assert metrics["steps"] == 4
    for name in ("test_reconstruction_mse", "test_extrapolation_mse"):
        assert metrics[name] > 0


@pytest.mark.slow
def test_cnf_quick_regularized(tmp_path):
    argv = ["cnf", "--quick", "--reg", "kinetic,jacobian", "--out", str(tmp_path)]
    metrics = _main(argv)
    _assert_files(tmp_path, "density.png", "loss.png")
    assert metrics["reg"] == ["kinetic", "jacobian"]
    assert metrics["nfe_forward"] > 0 and metrics["nfe_backward"] > 0
    entropy = metrics["data_entropy"]
    assert metrics["nll_gap_to_entropy"] == pytest.approx(metrics["test_nll"] - entropy)
    assert {"kinetic", "jacobian", "nll"} <= set(metrics["history"][-1])


@pytest.mark.slow
def test_digits_quick_then_resume_on_four_devices(tmp_path):
    metrics = _main(["digits", "--quick", "--out", str(tmp_path)])
    _assert_files(tmp_path, "predictions.png", "loss.png")
    assert metrics["steps"] == 5
    assert 0 <= metrics["test_accuracy"] <= 1
    assert metrics["nfe_forward_per_batch"] > 0
    assert metrics["nfe_backward_per_batch"] > 0
    # The console entry point in a fresh process: continue to step 7, with the
    # batch split over four (virtual CPU) devices.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    argv = ["--resume", str(tmp_path), "--steps", "7", "--devices", "4"]
    cmd = [sys.executable, "-m", "neuralode", "digits", *argv, "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resumed digits" in proc.stderr
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    assert resumed["steps"] == 7 and resumed["devices"] == 4
    assert [row["step"] for row in resumed["history"]] == [6, 7]
