"""The experiments command: argument errors, quick runs, resume, --devices.

The fast tests swap the digits experiment's `run` for a stand-in whose training
step only counts (`fake_digits`), so that everything around training (options,
directories, checkpoints, history, usage errors) runs for real in seconds.
"""

import builtins
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

from neuralode.__main__ import main
from neuralode.experiments import EXPERIMENTS, Run, digits
from neuralode.experiments._checkpoint import initial_state, save_checkpoint
from neuralode.experiments._output import write_json

from .conftest import FAST_COMPILE


def _main(argv: list[str]) -> dict:
    # optax's Adam mixes weak-typed scalars that strict promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
        assert main([*argv, "--no-progress"]) == 0
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "metrics.json").read_text())


def _usage_error(argv: list[str], capsys) -> str:
    """Run `main`, expecting a usage error (exit 2); return its one error line."""
    with jax.numpy_dtype_promotion("standard"), pytest.raises(SystemExit) as info:
        main([*argv, "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def _hashes(directory: Path) -> dict[str, str]:
    """The SHA-256 of every file under `directory`, by relative path."""
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(
            path.read_bytes()
        ).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _fake_run(ctx: Run) -> dict:
    """Train with a step that only counts (loss 1/step), report like digits."""

    def step(state, batch, key):
        step = state.step + 1
        return eqx.tree_at(lambda s: s.step, state, step), {"loss": 1.0 / step}

    state, summary = ctx.train(ctx.state, step, lambda i: None, ctx.key)
    return {"steps": int(state.step), "history": summary["history"]}


@pytest.fixture
def fake_digits(monkeypatch):
    monkeypatch.setattr(digits, "run", _fake_run)


@pytest.fixture
def saved_run(tmp_path, fake_digits) -> Path:
    """A `digits --quick` run directory, trained (by `_fake_run`) to step 5."""
    out = tmp_path / "run"
    _main(["digits", "--quick", "--out", str(out)])
    return out


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
    env["XLA_FLAGS"] = FAST_COMPILE
    argv = ["--resume", str(tmp_path), "--steps", "7", "--devices", "4"]
    cmd = [sys.executable, "-m", "neuralode", "digits", *argv, "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resumed digits" in proc.stderr
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    assert resumed["steps"] == 7 and resumed["devices"] == 4
    # The history of the first five steps is kept, not replaced.
    assert [row["step"] for row in resumed["history"]] == list(range(1, 8))
    history = _read(tmp_path / "history.json")["history"]
    assert [row["step"] for row in history] == list(range(1, 8))


@pytest.mark.parametrize("name", ["metrics.json", "config.json", "checkpoint.eqx"])
def test_out_refuses_an_existing_run(tmp_path, name, capsys):
    (tmp_path / name).write_text("an earlier run's results")
    before = _hashes(tmp_path)
    error = _usage_error(["digits", "--quick", "--out", str(tmp_path)], capsys)
    assert str(tmp_path) in error
    assert "pass --overwrite" in error and "choose another --out" in error
    assert _hashes(tmp_path) == before


def test_overwrite_replaces_the_run(saved_run):
    metrics = _main(
        ["digits", "--quick", "--steps", "3", "--out", str(saved_run), "--overwrite"]
    )
    assert metrics["steps"] == 3
    history = _read(saved_run / "history.json")["history"]
    assert [row["step"] for row in history] == [1, 2, 3]
    assert _read(saved_run / "config.json")["steps"] == 3


def test_resume_into_another_run_is_refused(saved_run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text("{}")
    before = _hashes(other)
    argv = ["digits", "--resume", str(saved_run), "--steps", "9", "--out", str(other)]
    assert "pass --overwrite" in _usage_error(argv, capsys)
    assert _hashes(other) == before


def test_resume_checks_the_experiment(saved_run, capsys):
    before = _hashes(saved_run)
    error = _usage_error(["spiral", "--resume", str(saved_run), "--steps", "9"], capsys)
    assert "is a digits run, not a spiral run" in error
    assert _hashes(saved_run) == before


def test_resume_checks_the_model(saved_run, tmp_path, capsys):
    before = _hashes(saved_run)
    new = tmp_path / "new"
    argv = ["digits", "--resume", str(saved_run), "--steps", "9", "--hidden", "9"]
    error = _usage_error([*argv, "--out", str(new)], capsys)
    assert str(saved_run / "checkpoint.eqx") in error
    assert "does not fit the digits model" in error
    assert "float32[8, 64] in the file but float32[9, 64]" in error
    assert _hashes(saved_run) == before
    assert not new.exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # an interrupted copy
        lambda data: data[:20],  # inside the first array's header
        lambda data: b"",
        lambda data: b"not a checkpoint\n" * 100,
    ],
    ids=["half", "header", "empty", "foreign"],
)
def test_resume_refuses_a_broken_checkpoint(saved_run, damage, capsys):
    path = saved_run / "checkpoint.eqx"
    path.write_bytes(damage(path.read_bytes()))
    before = _hashes(saved_run)
    error = _usage_error(["digits", "--resume", str(saved_run), "--steps", "9"], capsys)
    assert (
        f"cannot resume from {path}: the file is truncated or not a checkpoint" in error
    )
    assert _hashes(saved_run) == before


def test_resume_refuses_a_checkpoint_with_arrays_left_over(saved_run, capsys):
    path = saved_run / "checkpoint.eqx"
    path.write_bytes(path.read_bytes() * 2)
    before = _hashes(saved_run)
    error = _usage_error(["digits", "--resume", str(saved_run), "--steps", "9"], capsys)
    assert str(path) in error and "more arrays" in error
    assert _hashes(saved_run) == before


@pytest.mark.parametrize("steps", [[], ["--steps", "5"], ["--steps", "3"]])
def test_resume_needs_steps_beyond_the_checkpoint(saved_run, steps, capsys):
    before = _hashes(saved_run)
    error = _usage_error(["digits", "--resume", str(saved_run), *steps], capsys)
    assert "is at or below the step 5 of the checkpoint" in error
    assert _hashes(saved_run) == before


def test_resume_appends_to_the_history(saved_run):
    metrics = _main(
        ["digits", "--resume", str(saved_run), "--steps", "8", "--out", str(saved_run)]
    )
    assert [row["step"] for row in metrics["history"]] == list(range(1, 9))
    history = _read(saved_run / "history.json")["history"]
    assert [row["step"] for row in history] == list(range(1, 9))
    assert history[0]["loss"] == 1.0 and history[-1]["loss"] == 1 / 8
    assert _read(saved_run / "config.json")["steps"] == 8


def test_config_records_the_settings_used(saved_run, tmp_path):
    config = _read(saved_run / "config.json")
    assert config["experiment"] == "digits" and config["quick"] is True
    quick = {"steps": 5, "hidden": 8, "width": 16, "batch_size": 32}
    assert {k: config[k] for k in quick} == quick
    # Rerunning with these settings (no --quick) reproduces them.
    argv = ["digits", "--out", str(tmp_path / "rerun")]
    for name, value in config.items():
        if name not in ("experiment", "quick"):
            argv += [f"--{name.replace('_', '-')}", str(value)]
    _main(argv)
    rerun = _read(tmp_path / "rerun" / "config.json")
    assert rerun == config | {"quick": False}


def test_explicit_options_win_over_quick(tmp_path, fake_digits):
    _main(["digits", "--quick", "--hidden", "12", "--out", str(tmp_path)])
    assert _read(tmp_path / "config.json")["hidden"] == 12


@pytest.mark.parametrize(
    "argv, message",
    [
        (["digits", "--quick", "--devices", "3"], "not a multiple of --devices 3"),
        (["spiral", "--quick", "--num-obs", "30"], "--num-obs must be in"),
        (["cnf", "--quick", "--baseline", "nowhere"], "--baseline nowhere"),
    ],
)
def test_bad_settings_create_nothing(tmp_path, monkeypatch, argv, message, capsys):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored
    new = tmp_path / "new"
    assert message in _usage_error([*argv, "--out", str(new)], capsys)
    assert not new.exists()


def _option_helps(text: str) -> dict[str, str]:
    """Each option's entry of `--help` (flags and help, one line), by first flag."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current is not None and line.startswith("   "):
            entries[current] += line
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_help_shows_each_default_once(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    helps = _option_helps(capsys.readouterr().out)
    assert {"--seed", "--steps", "--out", "--overwrite", "--no-progress"} <= set(helps)
    for option, text in helps.items():
        if option != "-h":
            assert text.lower().count("default") == 1, text
    assert "hide the progress bar (shown by default)" in helps["--no-progress"]


class _Interrupted(BaseException):
    """Stands in for a kill (like KeyboardInterrupt) in the middle of a write."""


class _HalfWriter:
    """A file that writes half of the first chunk it is given, then fails."""

    def __init__(self, file):
        self._file = file

    def write(self, data):
        self._file.write(data[: len(data) // 2])
        self._file.flush()
        raise _Interrupted("interrupted mid-write")

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def _save_json(directory: Path, value: int) -> Path:
    write_json(directory / "metrics.json", {"value": value, "rows": list(range(99))})
    return directory / "metrics.json"


def _save_checkpoint(directory: Path, value: int) -> Path:
    return save_checkpoint(directory, initial_state(jnp.full(99, value), ()))


@pytest.mark.parametrize("save", [_save_json, _save_checkpoint])
def test_an_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch, save):
    path = save(tmp_path, 1)
    before = path.read_bytes()
    real_open = builtins.open

    def interrupted_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        inside = str(file).startswith(str(tmp_path))
        return _HalfWriter(f) if "w" in mode and inside else f

    monkeypatch.setattr(builtins, "open", interrupted_open)
    monkeypatch.setattr(io, "open", interrupted_open)
    with pytest.raises(_Interrupted):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_missing_experiment_dependencies_are_named(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tqdm" else real(name, *a),
    )
    assert main(["digits", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "missing: tqdm" in err and "neuralode[experiments]" in err
