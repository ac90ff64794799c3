"""The persistent compilation cache of the experiments command.

A program is compiled into the cache by one child process, then run by fresh
ones: unchanged it loads from the cache, changed (other solver, other shape)
it is compiled into a new entry, and from damaged entries it is compiled again
and still correct. The children count JAX's cache events (`jax.monitoring`)
and the entries each program adds.
"""

import json
import math
import os
import stat
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from neuralode.__main__ import _build_parser, _parse, main
from neuralode.experiments._compilation_cache import (
    default_cache_dir,
    enable_compilation_cache,
    persistent_cache,
)

_CHILD = r"""
import json, sys, warnings
import jax, jax.numpy as jnp, jax.monitoring, numpy as np
import neuralode as no
from neuralode.experiments._compilation_cache import enable_compilation_cache

directory = enable_compilation_cache()
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
solvers = {"dopri5": no.Dopri5(), "tsit5": no.Tsit5()}
out = {"directory": str(directory), "programs": {}}
for name in sys.argv[1:]:
    solver, size = solvers[name.split("-")[0]], int(name.split("-")[1])

    def solve(y0):  # dy/dt = -2y: everything inside one program
        ts = jnp.linspace(0.0, 1.0, 3)
        field = lambda t, y, k: -k * y
        opts = dict(solver=solver, rtol=1e-6, atol=1e-8, throw=False)
        return no.solve(field, y0, ts, 2.0, **opts).ys[-1]

    before, files = len(events), set(directory.iterdir())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = jax.jit(solve)(np.ones(size, np.float32))
    new = [e.rsplit("/", 1)[-1] for e in events[before:]]
    out["programs"][name] = {
        "y": np.asarray(y).tolist(),
        "hits": new.count("cache_hits"),
        "writes": new.count("cache_misses"),
        "new_files": sorted(p.name for p in set(directory.iterdir()) - files),
        "warnings": [str(w.message) for w in caught],
    }
print(json.dumps(out))
"""

CHANGED = ("tsit5-2", "dopri5-3")  # another solver, another shape


def _child(cache_home, *programs: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NEURALODE_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")
    }
    env |= {"XDG_CACHE_HOME": str(cache_home), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-c", _CHILD, *programs]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":  # a write cut short
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":  # one bit of the compressed program
        data = bytearray(data)
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    else:  # garbage of the same length
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A cold run, a warm one with two changed programs, one on damaged entries."""
    home = tmp_path_factory.mktemp("xdg-cache")
    cold = _child(home, "dopri5-2")
    warm = _child(home, "dopri5-2", *CHANGED)
    directory = home / "neuralode" / "jax"
    damage = {
        "dopri5-2": (cold, "truncate"),
        CHANGED[0]: (warm, "flip"),
        CHANGED[1]: (warm, "garbage"),
    }
    for name, (run, how) in damage.items():
        (file,) = run["programs"][name]["new_files"]
        _damage(directory / file, how)
    damaged = _child(home, *damage)
    return directory, cold, warm, damaged


def _correct(program: dict) -> bool:
    return np.allclose(program["y"], math.exp(-2.0), rtol=1e-4)


def test_cold_run_writes_one_entry_in_the_xdg_directory(runs):
    directory, cold, _, _ = runs
    assert cold["directory"] == str(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    program = cold["programs"]["dopri5-2"]
    assert _correct(program)
    assert (program["hits"], program["writes"]) == (0, 1)
    assert len(program["new_files"]) == 1
    assert program["new_files"][0].endswith("-cache")


def test_same_program_hits_and_changed_programs_miss(runs):
    _, cold, warm, _ = runs
    same = warm["programs"]["dopri5-2"]
    assert _correct(same)
    assert (same["hits"], same["writes"], same["new_files"]) == (1, 0, [])
    seen = set(cold["programs"]["dopri5-2"]["new_files"])
    for name in CHANGED:
        changed = warm["programs"][name]
        assert _correct(changed), name
        assert (changed["hits"], changed["writes"]) == (0, 1), name
        assert len(changed["new_files"]) == 1, name
        assert not seen & set(changed["new_files"]), name
        seen |= set(changed["new_files"])


def test_damaged_entries_are_compiled_again_and_correct(runs):
    *_, damaged = runs
    for name, program in damaged["programs"].items():
        assert _correct(program), name
        assert program["hits"] == 0, name
        (message,) = program["warnings"]
        assert message.startswith("Error reading persistent compilation cache entry")


def test_no_cache_option_and_default(monkeypatch, tmp_path, capsys):
    parser, _ = _build_parser()
    for command in ("digits", "cnf", "spiral", "stiff", "demo"):
        args, cache = _parse(parser, [command])
        assert cache is True and "cache" not in vars(args)  # not in config.json
        assert _parse(parser, [command, "--no-cache"])[1] is False
    # `demo` in this process: the cache directory is created, and JAX's settings
    # are as they were afterwards; with --no-cache, nothing is created.
    for name in ("NEURALODE_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "off"))
    assert main(["demo", "--no-cache"]) == 0
    assert not (tmp_path / "off").exists()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "on"))
    assert main(["demo"]) == 0
    assert (tmp_path / "on" / "neuralode" / "jax").is_dir()
    assert jax.config.jax_compilation_cache_dir == before
    assert "Van der Pol" in capsys.readouterr().out


def test_help_names_the_cache_directory_and_the_option(monkeypatch, capsys):
    monkeypatch.setenv("NEURALODE_CACHE_DIR", "/srv/cache/neuralode")  # not created
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Compiled programs are cached in /srv/cache/neuralode" in text
    assert "--no-cache turns the cache off" in text
    with pytest.raises(SystemExit):
        main(["spiral", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-cache do not read or write the persistent compilation cache" in text


def test_default_directory_follows_xdg(monkeypatch, tmp_path):
    for name in ("NEURALODE_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "neuralode" / "jax"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as XDG says
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "neuralode" / "jax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "neuralode" / "jax"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert default_cache_dir() == tmp_path / "jax"
    monkeypatch.setenv("NEURALODE_CACHE_DIR", str(tmp_path / "ours"))
    assert default_cache_dir() == tmp_path / "ours"


def test_unusable_directory_warns_and_leaves_jax_alone(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    (tmp_path / "file").write_text("not a directory")
    open_to_all = tmp_path / "shared"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    cases = {
        tmp_path / "file" / "jax": "cannot write to it",
        open_to_all: "anyone can write to it",
    }
    for path, problem in cases.items():
        with pytest.warns(RuntimeWarning, match="not using .* compilation cache") as w:
            assert enable_compilation_cache(path) is None
        (warning,) = w
        assert str(path) in str(warning.message) and problem in str(warning.message)
        assert "compiling without a persistent cache" in str(warning.message)
        assert jax.config.jax_compilation_cache_dir == before


def test_persistent_cache_restores_jax_settings(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with persistent_cache(tmp_path / "cache") as directory:
            assert directory == tmp_path / "cache"
            assert jax.config.jax_compilation_cache_dir == str(directory)
            assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    assert jax.config.jax_compilation_cache_dir == before
