"""Issue #18: the CNF on digit images, the latent ODE on CO₂, the toy entropies.

Data loaders (shapes, splits, determinism), the preprocessing's log-Jacobian
against autodiff, bits/dim against the Gaussian's closed form, the quadrature
densities against samples, and each experiment once in --quick mode.
"""

import json
import math
import re
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import neuralode as no
from benchmarks import cnf_gallery
from neuralode.__main__ import main
from neuralode.datasets import (
    WEEK_IN_YEARS,
    bits_per_dim,
    co2_windows,
    dequantize,
    digit_images,
    logit_transform,
    mauna_loa_co2,
    week_of_year,
)
from neuralode.datasets._toy_entropy import (
    toy_2d_density_numerical,
    toy_2d_entropy_with_error,
)
from neuralode.experiments import digits_density, latent
from neuralode.experiments._density_baselines import Gaussian


def _main(argv: list[str]) -> dict:
    with jax.numpy_dtype_promotion("standard"):
        assert main([*argv, "--no-progress"]) == 0
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "metrics.json").read_text())


def _usage_error(argv: list[str], capsys) -> str:
    with jax.numpy_dtype_promotion("standard"), pytest.raises(SystemExit) as info:
        main([*argv, "--no-progress"])
    assert info.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(lines) == 1
    return lines[0]


# ------------------------------------------------------------------ digit images


def test_digit_images_split():
    images = digit_images()
    assert [len(x) for x in images] == [1293, 144, 360]
    for x in images:
        assert x.dtype == np.int32 and x.shape[1] == 64
        assert x.min() == 0 and x.max() == 16
    again = digit_images()
    assert all(np.array_equal(a, b) for a, b in zip(images, again, strict=True))
    other = digit_images(seed=1)
    assert not np.array_equal(images.train, other.train)
    # The three parts are the 1797 images, each once.
    rows = {tuple(r) for part in images for r in part}
    assert len(np.concatenate(images)) == 1797 and len(rows) > 1700


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"valid_fraction": 1.0}, "valid_fraction must be in [0, 1), got 1.0"),
        ({"test_fraction": 0.0}, "test_fraction must be in (0, 1), got 0.0"),
    ],
)
def test_digit_images_bad_fractions(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        digit_images(**kwargs)


def test_dequantize_fills_each_level_bin(key):
    counts = jnp.tile(jnp.arange(17, dtype=jnp.int32), (200, 1))
    x = dequantize(key, counts)
    assert x.dtype == jnp.float32
    assert jnp.all(jnp.floor(x * 17) == counts.astype(jnp.float32))
    assert jnp.array_equal(x, dequantize(key, counts))
    with pytest.raises(ValueError, match="counts must be integer levels"):
        dequantize(key, counts / 16)
    with pytest.raises(ValueError, match="levels must be at least 2, got 1"):
        dequantize(key, counts, levels=1)


@pytest.mark.parametrize("alpha", [1e-6, 0.05])
def test_logit_log_det_matches_autodiff(alpha, key):
    x = jr.uniform(key, (3, 64), jnp.float64, 0.01, 0.99)
    _, log_det = logit_transform(x, alpha)
    jac = jax.jit(jax.vmap(jax.jacfwd(lambda r: logit_transform(r, alpha)[0])))(x)
    sign, expected = jnp.linalg.slogdet(jac)
    assert jnp.all(sign > 0)
    np.testing.assert_allclose(log_det, expected, rtol=1e-10)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 0.5\), got 0.5"):
        logit_transform(x, 0.5)


def test_preprocess_log_det_and_inverse(key):
    images = digit_images()
    prep = digits_density.Preprocess.fit(images.train, 0.05, key)
    prep = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), prep)
    x = dequantize(jr.fold_in(key, 1), images.test[:4]).astype(jnp.float64)
    w, log_det = prep(x)
    jac = jax.jit(jax.vmap(jax.jacfwd(lambda r: prep(r)[0])))(x)
    np.testing.assert_allclose(log_det, jnp.linalg.slogdet(jac)[1], rtol=1e-5)
    np.testing.assert_allclose(prep.inverse(w), x, atol=1e-5)


def test_bits_per_dim_of_the_gaussian_baseline_is_its_closed_form(key):
    """On the points it was fitted to, the Gaussian's mean NLL is its entropy."""
    images = digit_images()
    prep = digits_density.Preprocess.fit(images.train, 0.05, key)
    w, log_det = prep(dequantize(jr.fold_in(key, 1), images.train))
    gaussian = Gaussian.fit(np.asarray(w))
    nll = -(gaussian.log_prob(np.asarray(w)) + np.asarray(log_det, np.float64))
    closed = (gaussian.entropy() - np.mean(np.asarray(log_det, np.float64))) / 64
    bpd = float(jnp.mean(bits_per_dim(jnp.asarray(nll), 64)))
    assert bpd == pytest.approx((closed + math.log(17)) / math.log(2), rel=1e-9)
    assert gaussian.num_params == 64 + 64 * 65 // 2
    # A uniform density on the cube scores log2(17).
    assert float(bits_per_dim(0.0, 64)) == pytest.approx(math.log2(17))
    with pytest.raises(ValueError, match="needs more points than dimensions"):
        Gaussian.fit(np.zeros((64, 64)))


# --------------------------------------------------------------------------- CO2


def test_mauna_loa_co2():
    series = mauna_loa_co2()
    assert series.year.shape == series.ppm.shape == (2284,)
    assert int(np.isnan(series.ppm).sum()) == 59
    np.testing.assert_allclose(np.diff(series.year), WEEK_IN_YEARS, rtol=1e-9)
    assert 1958.2 < series.year[0] < 1958.3 and 2001.9 < series.year[-1] < 2002.0
    assert 310 < np.nanmin(series.ppm) and np.nanmax(series.ppm) < 375


def test_co2_windows():
    series = mauna_loa_co2()
    w = co2_windows(series, [0, 100], 208)
    assert w.ppm.shape == w.measured.shape == (2, 208)
    np.testing.assert_array_equal(w.ppm[1], np.nan_to_num(series.ppm[100:308]))
    np.testing.assert_array_equal(w.measured[1], ~np.isnan(series.ppm[100:308]))
    assert (
        w.t[1] == pytest.approx(WEEK_IN_YEARS) and w.start_year[1] == series.year[100]
    )
    assert week_of_year(series, 1990.0) == np.searchsorted(series.year, 1990.0)
    with pytest.raises(ValueError, match="starting at index 2200 does not fit"):
        co2_windows(series, [2200], 208)
    with pytest.raises(ValueError, match="length must be at least 2 weeks, got 1"):
        co2_windows(series, [0], 1)
    with pytest.raises(ValueError, match="year 2003 is after the last week"):
        week_of_year(series, 2003)


def test_latent_view_splits_seen_and_held_out(key):
    series = mauna_loa_co2()
    w = co2_windows(series, np.arange(0, 600, 50), 208)
    ppm, measured = jnp.asarray(w.ppm), jnp.asarray(w.measured)
    view = latent.view(ppm, measured, 0.5, key)
    seen, target = np.asarray(view.seen), np.asarray(view.target)
    assert not seen[:, latent.SEEN_WEEKS :].any()
    np.testing.assert_array_equal(seen | target, w.measured)
    assert not (seen & target).any()
    assert 0.4 < seen.sum() / w.measured[:, : latent.SEEN_WEEKS].sum() < 0.6
    offset = (w.ppm * seen).sum(1) / seen.sum(1)
    np.testing.assert_allclose(view.offset, offset, rtol=1e-6)
    assert np.array_equal(seen, np.asarray(latent.view(ppm, measured, 0.5, key).seen))


def test_rnn_dt_predicts_from_earlier_weeks_only(key):
    rnn = eqx.filter_jit(latent.RNNDeltaT)(8, 8, key=key)
    t = jnp.arange(12, dtype=jnp.float32) * WEEK_IN_YEARS
    y = jr.normal(key, (12,), jnp.float32)
    seen = jnp.arange(12) % 3 != 1
    jac = eqx.filter_jit(jax.jacfwd(lambda y, rnn: rnn(t, y, seen)))(y, rnn)
    # Prediction i depends on the seen values before week i, nothing else.
    allowed = np.tril(np.ones((12, 12), bool), -1) & np.asarray(seen)[None, :]
    assert np.all(np.asarray(jac)[~allowed] == 0)
    assert np.all(np.abs(np.asarray(jac)[allowed & (np.arange(12)[:, None] > 2)]) > 0)


# ----------------------------------------------------------------- toy entropies


@pytest.mark.parametrize(
    "name, entropy", [("moons", 2.3939), ("2spirals", 2.6454), ("pinwheel", 2.3179)]
)
def test_numerical_densities_match_samples(name, entropy):
    """-log p of fresh samples averages to the documented quadrature entropy."""
    x = no.datasets.toy_2d(name, 4000, key=jr.key(7))
    nll = -np.log(np.asarray(toy_2d_density_numerical(name, x, num=512), np.float64))
    assert abs(nll.mean() - entropy) < 4 * nll.std() / np.sqrt(len(nll))


def test_entropy_with_error_closed_forms():
    e = toy_2d_entropy_with_error("checkerboard")
    assert (e.value, e.error, e.method) == (math.log(32), 0.0, "closed form")
    with pytest.raises(ValueError, match="Unknown toy dataset 'moon'"):
        toy_2d_entropy_with_error("moon")
    with pytest.raises(ValueError, match="No numerical density for 'rings'"):
        toy_2d_density_numerical("rings", jnp.zeros((1, 2)))


def test_gallery_table(tmp_path):
    metrics = {
        "test_nll": 2.84,
        "test_nll_stderr": 0.007,
        "train_seconds": 90.0,
        "nfe_forward": 32,
        "nfe_backward": 43,
    }
    rows = [cnf_gallery.row("8gaussians", metrics, 101.0)]
    rows.append(cnf_gallery.row("checkerboard", metrics | {"test_nll": 3.6}, None))
    text = cnf_gallery.markdown(rows, "python -m benchmarks.cnf_gallery")
    lines = text.splitlines()
    assert "| 8gaussians | 2.8400 ± 0.0070 | 2.8316 (closed form) | +0.0084" in text
    assert lines[-1].startswith("| checkerboard | 3.6000") and "| no |" in lines[-1]
    with pytest.raises(SystemExit, match="no finished run at"):
        cnf_gallery.main(["--runs", str(tmp_path), "--no-train"])


# ------------------------------------------------------------ the experiments


def _count_only(ctx):
    """Stands in for an experiment's run: a step that only counts."""

    def step(state, batch, key):
        step = state.step + 1
        return eqx.tree_at(lambda s: s.step, state, step), {"loss": 1.0 / step}

    state, summary = ctx.train(ctx.state, step, lambda i: None, ctx.key)
    return {"steps": int(state.step), "history": summary["history"]}


def test_cnf_digits_defaults_quick_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(digits_density, "run", _count_only)
    full, quick = tmp_path / "full", tmp_path / "quick"
    _main(["cnf", "--data", "digits", "--steps", "2", "--out", str(full)])
    config = json.loads((full / "config.json").read_text())
    defaults = digits_density.DEFAULTS | {"steps": 2}
    assert {k: config[k] for k in defaults} == defaults
    _main(["cnf", "--data", "digits", "--quick", "--width", "7", "--out", str(quick)])
    config = json.loads((quick / "config.json").read_text())
    assert config["width"] == 7 and config["depth"] == digits_density.QUICK["depth"]
    # --resume without --data picks the digits model again.
    _main(["cnf", "--resume", str(full), "--steps", "3", "--out", str(full)])
    assert json.loads((full / "metrics.json").read_text())["steps"] == 3
    bad = ["cnf", "--data", "digits", "--logit-alpha", "0.5", "--out", str(tmp_path)]
    assert "--logit-alpha must be in [0, 0.5), got 0.5" in _usage_error(bad, capsys)
    toy = tmp_path / "toy"
    toy.mkdir()
    (toy / "metrics.json").write_text(
        json.dumps(
            {"experiment": "cnf", "data": "moons", "test_nll": 1.0}
            | {"nfe_forward": 1, "nfe_backward": 1}
        )
    )
    new = tmp_path / "new"
    argv = ["cnf", "--data", "digits", "--baseline", str(toy), "--out", str(new)]
    assert "is a cnf run on moons, not on digits" in _usage_error(argv, capsys)


@pytest.mark.slow
def test_cnf_digits_quick(tmp_path):
    argv = ["cnf", "--data", "digits", "--quick", "--reg", "kinetic,jacobian"]
    metrics = _main([*argv, "--out", str(tmp_path)])
    for name in ("metrics.json", "config.json", "checkpoint.eqx", "samples.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert metrics["data"] == "digits" and metrics["steps"] == 3
    for model in ("", "gaussian_", "maf_"):
        assert 0 < metrics[f"{model}test_bits_per_dim"] < 8
        assert metrics[f"{model}test_bits_per_dim_stderr"] > 0
    assert metrics["gaussian_params"] == 2144 and metrics["maf_params"] > 0
    assert metrics["nfe_forward"] > 0 and "nfe_backward" not in metrics  # --quick
    assert metrics["maf_train_seconds"] > 0 and metrics["maf_steps"] == 3
    assert {"kinetic", "jacobian", "bpd"} <= set(metrics["history"][-1])


@pytest.mark.slow
def test_latent_co2_quick(tmp_path):
    metrics = _main(["latent", "--quick", "--out", str(tmp_path)])
    for name in ("metrics.json", "config.json", "checkpoint.eqx", "co2.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert metrics["steps"] == 3 and metrics["num_test_windows"] == 1
    for model in ("latent_ode", "rnn_dt", "ets"):
        assert metrics[f"{model}_interpolation_mse"] > 0
        assert metrics[f"{model}_extrapolation_mse"] > 0
    # ETS on two full seasons of real data forecasts within a few ppm².
    assert metrics["ets_extrapolation_mse"] < 5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seen-fraction", "1.5"], "--seen-fraction must be in (0, 1), got 1.5"),
        (["--num-test", "40"], "--num-test must be at most 17, got 40"),
    ],
)
def test_latent_bad_settings_create_nothing(tmp_path, argv, message, capsys):
    new = tmp_path / "new"
    assert message in _usage_error(["latent", *argv, "--out", str(new)], capsys)
    assert not new.exists()


def test_missing_real_data_extra_is_named(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "statsmodels" else real(name, *a),
    )
    error = _usage_error(["latent", "--out", str(tmp_path / "new")], capsys)
    assert "needs statsmodels: pip install 'neuralode[real-data]'" in error


def test_spiral_extrapolation_breakdown():
    from neuralode.experiments import spiral

    clean = np.zeros((4, 8, 2))
    clean[..., 0] = np.array([1.0, 1.0, 3.0, 3.0])[:, None]  # radii 1 and 3
    err = np.zeros((4, 8))
    err[:, 4:] = np.arange(1, 5)  # growing with the horizon, x and y summed
    err[2:, 4:] *= 2  # larger on the outer spirals
    out = spiral._extrapolation_breakdown(err, clean, 4)
    assert out["test_extrapolation_mse_by_quarter"] == [0.75, 1.5, 2.25, 3.0]
    assert out["test_extrapolation_mse_outer_half"] == 2.5
    assert out["test_extrapolation_mse_inner_half"] == 1.25
    assert out["test_extrapolation_relative_mse"] == pytest.approx(3.75 / 5)
