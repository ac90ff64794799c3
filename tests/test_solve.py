"""Forward solves against analytic solutions, scipy, and convergence orders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg

import neuralode as no

from .helpers import (
    ADAPTIVE,
    ALL,
    kepler,
    kepler_initial,
    linear_field,
    lotka_volterra,
    name,
    random_stable_matrix,
    tree_allclose,
)


def decay(t, y, args):
    return -y


@pytest.mark.parametrize("solver", ADAPTIVE, ids=name)
def test_exponential_decay(solver):
    ts = jnp.linspace(0.0, 3.0, 7)
    ys = no.odeint(
        decay, jnp.array([1.0, -2.0]), ts, solver=solver, rtol=1e-9, atol=1e-12
    )
    exact = jnp.exp(-ts)[:, None] * jnp.array([1.0, -2.0])
    assert np.max(np.abs(ys - exact)) < 1e-7


@pytest.mark.parametrize("solver", ADAPTIVE, ids=name)
def test_harmonic_oscillator_many_outputs(solver):
    """Hundreds of interior outputs come from the interpolant, not extra steps."""
    f = lambda t, y, w: jnp.stack([y[1], -(w**2) * y[0]])
    w = 2.0
    ts = jnp.linspace(0.0, 10.0, 501)
    rtol = 1e-10 if solver.order >= 4 else 1e-8
    kwargs = dict(solver=solver, rtol=rtol, atol=1e-12, max_steps=20_000)
    sol = no.solve(f, jnp.array([1.0, 0.0]), ts, w, **kwargs)
    few = no.solve(f, jnp.array([1.0, 0.0]), ts[jnp.array([0, -1])], w, **kwargs)
    exact = jnp.stack([jnp.cos(w * ts), -w * jnp.sin(w * ts)], axis=1)
    # Hermite interpolation is less accurate than a dedicated continuous
    # extension at the same tolerance.
    tol = 1e-6 if solver.interpolation == "polynomial" else 1e-5
    assert np.max(np.abs(sol.ys - exact)) < tol
    assert int(sol.stats["num_steps"]) == int(few.stats["num_steps"])
    assert sol.ys.shape == (501, 2)
    assert np.array_equal(sol.ys[0], jnp.array([1.0, 0.0]))


@pytest.mark.parametrize("solver", ADAPTIVE, ids=name)
def test_linear_system_matches_expm(solver, key):
    a = random_stable_matrix(key, 5)
    y0 = jnp.arange(1.0, 6.0)
    ts = jnp.array([0.0, 0.3, 1.1, 2.0])
    ys = no.odeint(linear_field, y0, ts, a, solver=solver, rtol=1e-10, atol=1e-12)
    exact = jnp.stack([scipy.linalg.expm(np.asarray(a) * float(t)) @ y0 for t in ts])
    assert np.max(np.abs(ys - exact)) < 1e-7


def _scipy_reference(f, y0, ts, args=None):
    sol = scipy.integrate.solve_ivp(
        lambda t, y: np.asarray(f(t, jnp.asarray(y), args)),
        (float(ts[0]), float(ts[-1])),
        np.asarray(y0),
        method="DOP853",
        t_eval=np.asarray(ts),
        rtol=1e-12,
        atol=1e-14,
    )
    return sol.y.T


@pytest.mark.parametrize("solver", [no.Dopri5(), no.Tsit5()], ids=name)
def test_lotka_volterra_matches_scipy_dop853(solver):
    ts = jnp.linspace(0.0, 10.0, 21)
    y0 = jnp.array([10.0, 5.0])
    ys = no.odeint(lotka_volterra, y0, ts, solver=solver, rtol=1e-10, atol=1e-10)
    ref = _scipy_reference(jax.jit(lotka_volterra), y0, ts)
    assert np.max(np.abs(ys - ref) / (1 + np.abs(ref))) < 1e-7


def test_kepler_orbit_matches_scipy_and_conserves_energy():
    ts = jnp.linspace(0.0, 4 * np.pi, 9)
    y0 = jnp.asarray(kepler_initial(0.5))
    ys = no.odeint(kepler, y0, ts, rtol=1e-11, atol=1e-12)
    ref = _scipy_reference(jax.jit(kepler), y0, ts)
    assert np.max(np.abs(ys - ref)) < 1e-7
    energy = 0.5 * jnp.sum(ys[:, 2:] ** 2, axis=1) - 1 / jnp.linalg.norm(
        ys[:, :2], axis=1
    )
    assert np.ptp(np.asarray(energy)) < 1e-8
    # After two full periods the orbit is back at perihelion.
    assert np.max(np.abs(ys[-1] - y0)) < 1e-7


def _fixed_step_error(solver, n_steps):
    a = jnp.array([[0.0, 1.0], [-1.0, -0.1]])
    y0 = jnp.array([1.0, 0.0])
    t1 = 2.0
    ys = no.odeint(
        linear_field,
        y0,
        jnp.array([0.0, t1]),
        a,
        solver=solver,
        dt0=t1 / n_steps,
        controller=no.ConstantStepSize(),
    )
    exact = scipy.linalg.expm(np.asarray(a) * t1) @ np.asarray(y0)
    return float(np.max(np.abs(ys[-1] - exact)))


@pytest.mark.parametrize("solver", ALL, ids=name)
def test_convergence_order(solver):
    """Observed order of a fixed-step sweep is within ±0.3 of the nominal one."""
    steps = (
        np.array([16, 32, 64, 128]) if solver.order < 4 else np.array([8, 16, 32, 64])
    )
    errors = np.array([_fixed_step_error(solver, n) for n in steps])
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - solver.order) < 0.3, (name(solver), slope, errors)


@pytest.mark.parametrize("solver", [no.Dopri5(), no.Tsit5()], ids=name)
def test_dense_output_is_fourth_order(solver):
    """Interpolation error at a mid-step time shrinks like h^5 locally."""
    f = lambda t, y, args: jnp.stack([y[1], -y[0]])
    errors = []
    for n in (8, 16, 32):
        ts = jnp.linspace(0.0, 2.0, 41)
        sol = no.solve(
            f,
            jnp.array([1.0, 0.0]),
            ts,
            solver=solver,
            dt0=2.0 / n,
            controller=no.ConstantStepSize(),
        )
        errors.append(float(np.max(np.abs(sol.ys[:, 0] - jnp.cos(ts)))))
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(orders > 3.6), (errors, orders)


@pytest.mark.parametrize("solver", ADAPTIVE, ids=name)
def test_tolerance_proportionality(solver):
    """Global error falls roughly in proportion to the tolerance."""
    ts = jnp.linspace(0.0, 5.0, 3)
    y0 = jnp.array([10.0, 5.0])
    ref = _scipy_reference(jax.jit(lotka_volterra), y0, ts)
    errs = []
    tols = [1e-5, 1e-7, 1e-9] if solver.order >= 4 else [1e-4, 1e-6, 1e-8]
    for tol in tols:
        ys = no.odeint(lotka_volterra, y0, ts, solver=solver, rtol=tol, atol=tol)
        errs.append(np.max(np.abs(ys - ref)))
    slope = np.polyfit(np.log(tols), np.log(errs), 1)[0]
    assert 0.6 < slope < 1.4, (errs, slope)
    assert errs[-1] < errs[0] / 100


def test_function_evaluations_close_to_scipy_rk45():
    y0 = np.array([10.0, 5.0])
    counts = []
    for tol in (1e-4, 1e-6, 1e-8):
        ref = scipy.integrate.solve_ivp(
            lambda t, y: np.asarray(lotka_volterra(t, y, None)),
            (0.0, 10.0),
            y0,
            method="RK45",
            rtol=tol,
            atol=tol,
        )
        sol = no.solve(
            lotka_volterra, jnp.asarray(y0), jnp.array([0.0, 10.0]), rtol=tol, atol=tol
        )
        counts.append((ref.nfev, int(sol.stats["num_fevals"])))
    for scipy_nfev, ours in counts:
        assert abs(ours - scipy_nfev) <= 0.2 * scipy_nfev, counts


@pytest.mark.parametrize("solver", ADAPTIVE, ids=name)
def test_backward_in_time_equals_forward_reversed(solver):
    ts = jnp.linspace(0.0, 2.0, 11)
    y0 = jnp.array([1.0, 0.5])
    f = lambda t, y, args: jnp.stack([y[1], -jnp.sin(y[0]) + 0.1 * jnp.cos(t)])
    forward = no.odeint(f, y0, ts, solver=solver, rtol=1e-10, atol=1e-12)
    backward = no.odeint(
        f, forward[-1], ts[::-1], solver=solver, rtol=1e-10, atol=1e-12
    )
    assert np.max(np.abs(backward[::-1] - forward)) < 1e-7


def test_backward_in_time_exact_solution():
    ts = jnp.array([3.0, 2.5, 0.5, -1.0])
    ys = no.odeint(lambda t, y, args: t * y, jnp.array(1.0), ts, rtol=1e-10, atol=1e-12)
    exact = jnp.exp((ts**2 - 9.0) / 2)
    assert np.max(np.abs(ys - exact) / exact) < 1e-8


def test_pytree_state():
    def f(t, y, args):
        return {"x": y["v"], "v": -y["x"], "extra": (jnp.zeros(()), -y["extra"][1])}

    y0 = {
        "x": jnp.ones(3),
        "v": jnp.zeros(3),
        "extra": (jnp.ones(()), jnp.ones((2, 2))),
    }
    ts = jnp.linspace(0.0, 1.0, 4)
    ys = no.odeint(f, y0, ts, rtol=1e-10, atol=1e-12)
    assert ys["x"].shape == (4, 3) and ys["extra"][1].shape == (4, 2, 2)
    assert np.allclose(ys["x"], jnp.cos(ts)[:, None] * jnp.ones(3), atol=1e-8)
    assert np.allclose(ys["extra"][1], jnp.exp(-ts)[:, None, None], atol=1e-8)
    assert tree_allclose(jax.tree.map(lambda y: y[0], ys), y0)


def test_jit_and_vmap_over_y0_args_and_ts():
    f = lambda t, y, k: -k * y
    solve = jax.jit(lambda y0, k, ts: no.odeint(f, y0, ts, k, rtol=1e-9, atol=1e-12))
    y0s = jnp.array([1.0, 2.0, 3.0])
    ks = jnp.array([0.5, 1.0, 2.0])
    tss = jnp.stack(
        [jnp.linspace(0, 1, 5), jnp.linspace(0, 2, 5), jnp.linspace(1, 0, 5)]
    )
    ys = jax.vmap(solve)(y0s, ks, tss)
    exact = y0s[:, None] * jnp.exp(-ks[:, None] * (tss - tss[:, :1]))
    assert np.max(np.abs(ys - exact)) < 1e-7
    single = solve(y0s[1], ks[1], tss[1])
    assert np.allclose(single, ys[1], rtol=1e-12, atol=1e-12)


def test_vmap_gives_each_sample_its_own_steps():
    f = lambda t, y, k: -k * y
    solve = lambda k: no.solve(f, jnp.array(1.0), jnp.array([0.0, 5.0]), k)
    stats = jax.vmap(solve)(jnp.array([0.1, 10.0])).stats
    assert int(stats["num_steps"][0]) < int(stats["num_steps"][1])


@pytest.mark.parametrize("solver", ADAPTIVE, ids=name)
def test_float32_state_and_time(solver):
    ts = jnp.linspace(0.0, 1.0, 5, dtype=jnp.float32)
    y0 = jnp.array([1.0, 2.0], jnp.float32)
    sol = no.solve(decay, y0, ts, solver=solver, rtol=1e-5, atol=1e-6)
    assert sol.ys.dtype == jnp.float32
    assert np.max(np.abs(sol.ys - jnp.exp(-ts)[:, None] * y0)) < 1e-4


def test_float32_lands_exactly_on_t1_without_a_sliver():
    """t1 not representable as t0 + Σh: the last step is stretched to it."""
    t0, t1 = jnp.float32(0.1), jnp.float32(0.7)
    sol = no.solve(
        decay, jnp.float32(1.0), jnp.stack([t0, t1]), solver=no.Euler(), dt0=0.2
    )
    # Three Euler steps of 0.2 in float32 end a few ULPs short of 0.7; no fourth
    # sliver step is taken.
    assert int(sol.stats["num_steps"]) == 3
    assert np.isclose(float(sol.ys[-1]), 0.8**3, rtol=1e-6)


def test_fixed_step_counts():
    sol = no.solve(
        decay, jnp.array(1.0), jnp.array([0.0, 1.0]), solver=no.RK4(), dt0=0.1
    )
    assert int(sol.stats["num_steps"]) == 10
    assert int(sol.stats["num_fevals"]) == 1 + 10 * 4


def test_stats_are_consistent():
    sol = no.solve(
        lotka_volterra,
        jnp.array([10.0, 5.0]),
        jnp.array([0.0, 10.0]),
        rtol=1e-6,
        atol=1e-6,
    )
    s = {k: int(v) for k, v in sol.stats.items()}
    assert s["num_steps"] == s["num_accepted"] + s["num_rejected"]
    assert s["num_fevals"] == 2 + 6 * s["num_steps"]
    assert s["num_rejected"] > 0
    assert int(sol.result) == 0 and bool(sol.successful)


def test_nan_in_trial_step_is_rejected_not_accepted():
    """A field that is NaN for large steps forces rejections, then succeeds."""

    def f(t, y, args):
        # Blows up (NaN) when a stage looks too far ahead in time from y's clock.
        return jnp.stack([jnp.ones(()), jnp.where(t - y[0] > 0.05, jnp.nan, -y[1])])

    sol = no.solve(f, jnp.array([0.0, 1.0]), jnp.array([0.0, 1.0]), dt0=0.5)
    assert int(sol.result) == 0
    assert int(sol.stats["num_rejected"]) > 0
    assert np.all(np.isfinite(sol.ys))
    assert np.isclose(float(sol.ys[-1, 1]), np.exp(-1.0), rtol=1e-5)


@pytest.mark.parametrize("n_out", [40, 20_001])
def test_chunked_dense_output_equals_one_loop(monkeypatch, n_out):
    """A small state with many outputs steps in chunks of output slots (see
    `output_chunk`). Outputs, steps and per-output step counts equal those of
    the single loop, also when one step covers more outputs than a chunk has."""
    from neuralode import _dense_output, _integrate

    a = jnp.array([[-0.1, 2.0], [-2.0, -0.1]])
    f = lambda t, y: (a @ y[0],)
    config = _integrate.SolverConfig(
        no.Dopri5(), no.PIController(), 1e-6, 1e-9, None, 4096
    )
    y0 = (jnp.array([1.0, 0.0]),)
    ts = jnp.linspace(0.0, 10.0, n_out)
    chunk = _dense_output.output_chunk(y0, n_out, True, False)
    assert chunk is not None and chunk < n_out - 1

    def run():
        options = _integrate.LoopOptions(record_output_steps=True)
        solve = lambda y0: _integrate.integrate(config, f, y0, ts, options=options)[:2]
        return jax.jit(solve)(y0)

    (ys,), stats = run()
    monkeypatch.setattr(_dense_output, "SMALL_BUFFER_BYTES", 0)
    assert _dense_output.output_chunk(y0, n_out, True, False) is None
    (ys_one,), stats_one = run()
    exact = jax.vmap(lambda t: jax.scipy.linalg.expm(a * t) @ y0[0])(ts)
    assert np.max(np.abs(ys - exact)) < 1e-5
    assert np.array_equal(ys, ys_one)
    assert np.array_equal(stats.output_steps, stats_one.output_steps)
    assert int(stats.num_steps) == int(stats_one.num_steps)
    if n_out > 1000:  # steps longer than a chunk of outputs
        assert n_out / int(stats.num_accepted) > 2 * chunk


def test_chunked_dense_output_under_vmap_and_grad():
    f = lambda t, y, k: jnp.stack([y[1], -k * y[0] - 0.1 * y[1]])
    ts = jnp.linspace(0.0, 5.0, 300)
    solve = lambda y0, k: no.odeint(f, y0, ts, k, rtol=1e-8, atol=1e-10)
    y0s = jnp.array([[1.0, 0.0], [0.5, -1.0]])
    ks = jnp.array([1.0, 4.0])
    ys = jax.jit(jax.vmap(solve))(y0s, ks)
    single = jax.jit(solve)
    for i in range(2):
        assert np.allclose(ys[i], single(y0s[i], ks[i]), rtol=1e-12, atol=1e-12)
    loss = jax.jit(lambda k: jnp.sum(solve(y0s[0], k)[:, 0] ** 2))
    grad = jax.jit(jax.grad(loss))(ks[0])
    eps = 1e-5
    fd = (loss(ks[0] + eps) - loss(ks[0] - eps)) / (2 * eps)
    assert np.allclose(grad, fd, rtol=1e-5)
    forward = jax.jit(
        lambda k: no.odeint(
            f, y0s[0], ts, k, rtol=1e-8, atol=1e-10, adjoint=no.ForwardMode()
        )
    )
    _, tangent = jax.jit(lambda k: jax.jvp(forward, (k,), (jnp.ones(()),)))(ks[0])
    fd_ys = (forward(ks[0] + eps) - forward(ks[0] - eps)) / (2 * eps)
    assert np.allclose(tangent, fd_ys, rtol=1e-4, atol=1e-6)
