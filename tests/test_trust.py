"""Every answer right or refused: each class of silent wrong answer that was
found, and failures that users can catch and read."""

import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neuralode as no


def decay(t, y, args):
    return -y


def forced(t, y, args):
    return -y + jnp.sin(t)


TS = jnp.array([0.0, 1.0])


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def _rel(a, b):
    a, b = _flat(a), _flat(b)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# --------------------------------------------------------------------------
# The default gradient: right or refused.


def _mlp(key, sizes, gain, dtype):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (
            jax.random.normal(k, (m, n), dtype) * jnp.asarray(gain / np.sqrt(m), dtype),
            jnp.zeros(n, dtype),
        )
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_field(t, y, params):
    *hidden, (w, b) = params
    for wh, bh in hidden:
        y = jnp.tanh(y @ wh + bh)
    return y @ w + b


def _gradients(field, y0, ts, args, adjoints, **kwargs):
    def loss(args, adjoint):
        ys = no.odeint(field, y0, ts, args, adjoint=adjoint, **kwargs)
        return jnp.sum(ys[-1] ** 2)

    out = {}
    for adjoint in adjoints:
        try:
            with no.reraise_failures():
                grad = jax.jit(jax.grad(loss), static_argnums=1)(args, adjoint)
            out[type(adjoint).__name__] = grad
        except no.SolveError as e:
            out[type(adjoint).__name__] = e
    return out


@pytest.mark.slow
def test_backsolve_refuses_a_long_horizon_gradient_it_cannot_follow():
    """A non-contracting MLP field to T = 30 in float32: the reverse-time
    reconstruction diverges between checkpoints. The exact discrete gradient
    is finite; BacksolveAdjoint must not return a wrong one."""
    params = _mlp(jax.random.key(0), [2, 32, 32, 2], 4.5, jnp.float32)
    y0 = jax.random.normal(jax.random.key(8), (16, 2), jnp.float32)
    ts = jnp.array([0.0, 30.0], jnp.float32)
    grads = _gradients(
        mlp_field, y0, ts, params, [no.CheckpointAdjoint(), no.BacksolveAdjoint()],
        max_steps=16384,
    )  # fmt: skip
    exact = grads["CheckpointAdjoint"]
    assert np.isfinite(np.asarray(_flat(exact))).all()
    got = grads["BacksolveAdjoint"]
    if isinstance(got, no.SolveError):
        assert "lost the forward solution" in str(got)
        assert "CheckpointAdjoint" in str(got)
    else:  # a gradient, then a right one
        assert _rel(got, exact) < 1e-3


def lorenz(t, y, p):
    sigma, rho, beta = p[0], p[1], p[2]
    return jnp.stack(
        [sigma * (y[1] - y[0]), y[0] * (rho - y[2]) - y[1], y[0] * y[1] - beta * y[2]]
    )


@pytest.mark.slow
@pytest.mark.parametrize("horizon", [1.0, 6.0])
def test_chaotic_gradient_right_or_refused(horizon):
    """Lorenz-63 over one and about five Lyapunov times, against the exact
    discrete gradient."""
    p = jnp.array([10.0, 28.0, 8.0 / 3.0])
    grads = _gradients(
        lorenz, jnp.array([1.0, 1.0, 1.0]), jnp.array([0.0, horizon]), p,
        [no.CheckpointAdjoint(), no.BacksolveAdjoint()], rtol=1e-8, atol=1e-8,
    )  # fmt: skip
    got, exact = grads["BacksolveAdjoint"], grads["CheckpointAdjoint"]
    # Forward mode differentiates the same discrete solve exactly, as
    # CheckpointAdjoint does in reverse.
    final = lambda p: jnp.sum(
        no.odeint(lorenz, jnp.array([1.0, 1.0, 1.0]), jnp.array([0.0, horizon]), p,
                  adjoint=no.ForwardMode(), rtol=1e-8, atol=1e-8)[-1] ** 2
    )  # fmt: skip
    assert _rel(jax.jit(jax.jacfwd(final))(p), exact) < 1e-8
    if horizon == 1.0:
        assert not isinstance(got, Exception)
    if isinstance(got, no.SolveError):
        assert "lost the forward solution" in str(got)
    else:
        assert _rel(got, exact) < 1e-4


def test_backsolve_stiff_decay_gradient_is_right():
    """dy/dt = -a(y - sin t), a = 50: the reverse-time z is violently unstable.
    (BacksolveAdjoint(state_error=False) returned -1e8 for 3.6e-4 here.)"""
    field = lambda t, y, a: -a * (y - jnp.sin(t))
    grads = _gradients(
        field, jnp.array([1.0]), jnp.array([0.0, 10.0]), jnp.array(50.0),
        [no.CheckpointAdjoint(), no.BacksolveAdjoint()],
    )  # fmt: skip
    got, exact = grads["BacksolveAdjoint"], grads["CheckpointAdjoint"]
    if not isinstance(got, no.SolveError):
        assert _rel(got, exact) < 1e-3


def test_state_error_option_is_gone():
    with pytest.raises(TypeError, match="state_error"):
        no.BacksolveAdjoint(state_error=False)


def test_gradient_refusal_is_nan_without_throw():
    params = _mlp(jax.random.key(0), [2, 32, 32, 2], 4.5, jnp.float32)
    y0 = jax.random.normal(jax.random.key(8), (16, 2), jnp.float32)

    def loss(params):
        sol = no.solve(
            mlp_field, y0, jnp.array([0.0, 100.0], jnp.float32), params,
            max_steps=16384, throw=False,
        )  # fmt: skip
        return jnp.sum(sol.ys[-1] ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    assert np.isnan(np.asarray(_flat(grads))).all()


# --------------------------------------------------------------------------
# Other silent wrong answers.


@jax.numpy_dtype_promotion("standard")
def test_tolerance_finer_than_the_dtype_is_refused():
    y0 = jnp.ones(2, jnp.bfloat16)
    with pytest.raises(ValueError, match="finer than the resolution of the bfloat16"):
        no.solve(decay, y0, jnp.array([0.0, 1.0], jnp.float32))
    sol = no.solve(decay, y0, jnp.array([0.0, 1.0], jnp.float32), rtol=1e-2)
    assert np.allclose(np.asarray(sol.ys[-1], np.float32), np.exp(-1.0), rtol=3e-2)


@pytest.mark.parametrize("bad", [[0.0, 2.0, 1.0], [0.0, 1.0, 1.0], [0.0, np.nan]])
def test_traced_ts_are_checked_at_run_time(bad):
    ts = jnp.array(bad)
    solve = jax.jit(lambda ts: no.solve(decay, jnp.ones(2), ts, throw=False))
    sol = solve(ts)
    assert int(sol.result) == no.RESULTS.invalid_ts
    assert np.isnan(np.asarray(sol.ys)).all()
    with pytest.raises(no.SolveError, match="strictly"), no.reraise_failures():
        jax.jit(lambda ts: no.odeint(decay, jnp.ones(2), ts))(ts)


def test_traced_ts_checked_per_sample_under_vmap():
    ts = jnp.array([[0.0, 1.0, 2.0], [0.0, 2.0, 1.0]])
    sol = jax.vmap(lambda ts: no.solve(decay, jnp.ones(2), ts, throw=False))(ts)
    assert np.asarray(sol.result).tolist() == [0, no.RESULTS.invalid_ts]
    assert np.allclose(sol.ys[0, -1], np.exp(-2.0), rtol=1e-5)
    ts_bar = jax.grad(
        lambda ts: jnp.sum(no.solve(decay, jnp.ones(2), ts, throw=False).ys)
    )(ts[1])
    assert np.isnan(np.asarray(ts_bar)).all()


@pytest.mark.parametrize("solver", [no.Dopri5(), no.Bosh3()], ids=["dopri5", "bosh3"])
@pytest.mark.parametrize("start", [1e3, 1e5])
def test_float32_time_offsets_autonomous(solver, start):
    """Large offsets do not limit an autonomous field: the loop measures time
    from the first output."""
    ts = jnp.array([start, start + 1.0], jnp.float32)
    sol = no.solve(decay, jnp.ones(2, jnp.float32), ts, solver=solver, rtol=1e-5)
    assert int(sol.stats["num_steps"]) < 200
    assert np.allclose(sol.ys[-1], np.exp(-1.0), rtol=1e-4)


def test_float32_time_series_at_1000_is_ordinary():
    ts = jnp.array([1000.0, 1020.0], jnp.float32)
    sol = no.solve(forced, jnp.ones(2, jnp.float32), ts, solver=no.Bosh3())
    exact = _forced_exact(1.0, 1000.0, 1020.0)
    assert int(sol.stats["num_steps"]) < 2000
    assert np.allclose(sol.ys[-1], exact, atol=1e-4)


def _forced_exact(y0, t0, t1):
    """y' = -y + sin t: y = (sin t - cos t)/2 + C e^{-t}."""
    particular = lambda t: (np.sin(t) - np.cos(t)) / 2
    return particular(t1) + (y0 - particular(t0)) * np.exp(-(t1 - t0))


@pytest.mark.parametrize(
    "solver, ts",
    [
        (no.Dopri5(), [1e5, 1e5 + 1.0]),
        (no.Bosh3(), [1e6, 1e6 + 0.25]),
    ],
    ids=["dopri5-1e5", "bosh3-1e6"],
)
def test_float32_time_resolution_is_named(solver, ts):
    """A time-dependent field whose steps are a few spacings of the float32
    time: the stage times collapse. Refused, with the cause named, quickly
    (a rejection always shortens the step)."""
    ts = jnp.array(ts, jnp.float32)
    sol = no.solve(
        forced, jnp.ones(2, jnp.float32), ts, solver=solver, throw=False,
        max_steps=100_000,
    )  # fmt: skip
    assert int(sol.result) == no.RESULTS.dt_underflow
    assert int(sol.stats["num_steps"]) < 200
    with pytest.raises(no.SolveError, match="time resolution: float32"):
        no.solve(forced, jnp.ones(2, jnp.float32), ts, solver=solver)


def test_rejections_always_make_progress():
    """Every rejection shortens the step by at least one representable time, so
    a solve that cannot succeed ends in dt_underflow, not at max_steps."""
    ts = jnp.array([0.0, 1.0], jnp.float32)
    jump = lambda t, y, a: jnp.where(t > 0.5, 1e30, 0.0) * jnp.ones_like(y)
    sol = no.solve(jump, jnp.ones(1, jnp.float32), ts, throw=False, max_steps=10**6)
    assert int(sol.result) in (no.RESULTS.dt_underflow, no.RESULTS.nonfinite)
    assert int(sol.stats["num_steps"]) < 1000


def test_forward_mode_jacfwd_of_a_failing_solve_raises_under_jit():
    def final(y0):
        return no.odeint(
            lambda t, y, a: y**2, y0, jnp.array([0.0, 2.0]), adjoint=no.ForwardMode()
        )[-1]

    with pytest.raises(no.SolveError, match="blow up"):
        jax.jacfwd(final)(jnp.ones(1))
    with pytest.raises(no.SolveError, match="blow up"), no.reraise_failures():
        jax.block_until_ready(jax.jit(jax.jacfwd(final))(jnp.ones(1)))


# --------------------------------------------------------------------------
# Failures users can catch and read.


def blow_up(t, y, args):
    return y**2


def test_eager_failure_is_a_solve_error():
    with pytest.raises(no.SolveError, match="^neuralode: step size underflow"):
        no.odeint(blow_up, jnp.ones(1), jnp.array([0.0, 2.0]))


def test_eager_gradient_failure_is_a_solve_error():
    loss = lambda y0: jnp.sum(no.odeint(blow_up, y0, jnp.array([0.0, 2.0])))
    with pytest.raises(no.SolveError, match="blow up"):
        jax.grad(loss)(jnp.ones(1))


def test_compiled_failure_reraised_with_the_message_first(caplog):
    solve = jax.jit(lambda y0: no.odeint(blow_up, y0, jnp.array([0.0, 2.0])))
    with pytest.raises(jax.errors.JaxRuntimeError, match="neuralode: step size"):
        solve(jnp.ones(1))
    with caplog.at_level(logging.ERROR), pytest.raises(no.SolveError) as info:
        with no.reraise_failures():
            solve(jnp.ones(1))
    assert str(info.value).startswith("neuralode: step size underflow")
    assert "Traceback" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    # JAX's logger would print the callback's traceback a second time.
    assert not [r for r in caplog.records if "callback failed" in r.getMessage()]


def test_failure_after_a_successful_call_is_reraised():
    """A compiled function that succeeded once runs from JAX's C++ dispatch
    path, where a failed check surfaces as ValueError, not JaxRuntimeError."""
    solve = jax.jit(lambda y0: no.odeint(blow_up, y0, jnp.array([0.0, 2.0])))
    solve(jnp.full(1, 0.1))
    with pytest.raises(no.SolveError, match="^neuralode: step size underflow"):
        with no.reraise_failures():
            solve(jnp.ones(1))
    with pytest.raises(
        (jax.errors.JaxRuntimeError, ValueError), match="SolveError: neuralode: step"
    ):
        solve(jnp.ones(1))
    # Without x64, JAX's C++ dispatch raises ValueError (seen with jax 0.10.2).
    text = "INTERNAL: CpuCallback error\nSolveError: neuralode: step size underflow"
    with pytest.raises(no.SolveError, match="^neuralode: step size underflow$"):
        with no.reraise_failures():
            raise ValueError(text)


def test_reraise_failures_passes_other_errors_through():
    with pytest.raises(ValueError, match="unrelated"), no.reraise_failures():
        raise ValueError("unrelated")

    @no.reraise_failures()
    def fine():
        return 3

    assert fine() == 3


def test_filter_jit_failure_reraised():
    solve = eqx.filter_jit(lambda y0: no.odeint(blow_up, y0, jnp.array([0.0, 2.0])))
    with pytest.raises(no.SolveError, match="blow up"), no.reraise_failures():
        solve(jnp.ones(1))


def test_blow_up_is_not_called_stiff():
    with pytest.raises(no.SolveError) as info:
        no.odeint(blow_up, jnp.ones(1), jnp.array([0.0, 2.0]))
    assert "blow up" in str(info.value) and "stiff" not in str(info.value)


def test_tiny_interval_far_out_is_a_time_resolution_failure():
    ts = jnp.array([1e8, 1e8 + 1e-7])
    with pytest.raises(no.SolveError) as info:
        no.odeint(forced, jnp.ones(1), ts)
    assert "time resolution: float64" in str(info.value)
    assert "stiff" not in str(info.value)
    # An autonomous field has no time resolution to respect.
    ys = no.odeint(decay, jnp.ones(1), ts)
    assert np.allclose(ys[-1], np.exp(-1e-7 * (1 + 2**-30)), rtol=1e-12)


def test_atol_zero_with_a_zero_component_is_fine():
    field = lambda t, y, a: jnp.stack([-y[0], jnp.zeros_like(y[1])])
    sol = no.solve(field, jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), atol=0.0)
    assert int(sol.result) == 0
    assert np.allclose(sol.ys[-1], [np.exp(-1.0), 0.0], rtol=1e-5)


def test_type_error_inside_the_field_is_reported_as_itself():
    def field(t, y, args):
        return y + "oops"

    with pytest.raises(TypeError) as info:
        no.odeint(field, jnp.ones(2), jnp.array([0.0, 1.0]))
    assert "three arguments" not in str(info.value)
    assert "calling f(t, y, args) failed" in str(info.value)


def test_args_may_hold_non_array_leaves():
    args = {"k": 2.0, "act": jnp.tanh, "name": "decay"}
    field = lambda t, y, a: -a["k"] * a["act"](y)
    ys = no.odeint(field, jnp.ones(1), jnp.array([0.0, 1.0]), args)
    assert np.isfinite(np.asarray(ys)).all()
    grad = jax.grad(
        lambda k: no.odeint(
            field, jnp.ones(1), jnp.array([0.0, 1.0]), {**args, "k": k}
        )[-1, 0]
    )(2.0)
    assert np.isfinite(float(grad)) and float(grad) < 0


@pytest.mark.parametrize("adjoint", [no.BacksolveAdjoint(), no.CheckpointAdjoint()])
def test_throw_false_holds_under_grad(adjoint):
    def loss(y0):
        sol = no.solve(blow_up, y0, jnp.array([0.0, 2.0]), adjoint=adjoint, throw=False)
        return jnp.sum(jnp.nan_to_num(sol.ys))

    grad = jax.jit(jax.grad(loss))(jnp.ones(1))
    assert np.isnan(np.asarray(grad)).all()


@pytest.mark.parametrize("adjoint", [no.BacksolveAdjoint(), no.CheckpointAdjoint()])
def test_forward_mode_through_a_reverse_rule_says_what_works(adjoint):
    f = lambda y0: no.odeint(decay, y0, jnp.array([0.0, 1.0]), adjoint=adjoint)[-1]
    with pytest.raises(TypeError, match="ForwardMode"):
        jax.jacfwd(f)(jnp.ones(2))
    with pytest.raises(TypeError, match=r"jax\.jacrev\(jax\.jacrev"):
        jax.hessian(lambda y: jnp.sum(f(y)))(jnp.ones(2))
    hessian = jax.jit(jax.jacrev(jax.jacrev(lambda y: jnp.sum(f(y) ** 2))))(jnp.ones(2))
    assert np.allclose(hessian, 2 * np.exp(-2.0) * np.eye(2), rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rtol": jnp.array([1e-6, 1e-6])}, TypeError, "rtol must be one real number"),
        ({"atol": "small"}, TypeError, "atol must be one real number"),
        ({"max_steps": 2**31}, ValueError, "max_steps must be between 1 and"),
        ({"throw": "yes"}, TypeError, "throw must be True or False"),
    ],
)
def test_bad_settings_get_neuralode_messages(kwargs, error, match):
    with pytest.raises(error, match=match):
        no.solve(decay, jnp.ones(2), jnp.array([0.0, 1.0]), **kwargs)


def test_numpy_integer_max_steps_accepted_everywhere():
    ys = no.odeint(decay, jnp.ones(2), jnp.array([0.0, 1.0]), max_steps=np.int64(100))
    field = no.nn.MLPField(2, 4, 1, key=jax.random.key(0))
    model = no.NeuralODE(field, max_steps=np.int64(100))
    assert ys.shape == (2, 2) and model(jnp.ones(2)).shape == (2,)


# --------------------------------------------------------------------------
# Programs without host callbacks export for every platform.


def _exported(fn, *args):
    exported = jax.export.export(jax.jit(fn), platforms=("cpu", "cuda", "tpu"))(*args)
    return exported.mlir_module()


def test_throw_false_programs_export_for_cpu_gpu_and_tpu():
    ts = jnp.array([0.0, 0.5, 1.0])
    y0 = jnp.ones(2)

    def solve(y0, k):
        return no.solve(forced, y0, ts, k, throw=False).ys

    for adjoint in (no.BacksolveAdjoint(), no.CheckpointAdjoint()):
        loss = lambda y0, k, adjoint=adjoint: jnp.sum(
            no.solve(lambda t, y, k: -k * y, y0, ts, k, adjoint=adjoint, throw=False).ys
        )
        text = _exported(jax.grad(loss, argnums=(0, 1)), y0, 1.5)
        assert "callback" not in text
    assert "callback" not in _exported(solve, y0, 1.0)
    cnf = no.CNF(no.nn.MLPField(2, 8, 1, key=jax.random.key(0)), throw=False)
    assert "callback" not in _exported(lambda x: cnf.log_prob(x), jnp.ones((4, 2)))


@pytest.mark.parametrize("adjoint", [no.CheckpointAdjoint(), no.BacksolveAdjoint()])
def test_float32_gradients_do_not_depend_on_the_time_origin(adjoint):
    """The loop and CheckpointAdjoint's replay measure time from ts[0]: an
    autonomous problem's gradient at t = 1e5 in float32 is that at t = 0."""
    field = lambda t, y, k: -k * jnp.tanh(y)

    def grad(start):
        ts = jnp.array([start, start + 0.5, start + 1.0], jnp.float32)
        loss = lambda k: jnp.sum(no.odeint(field, jnp.ones(2, jnp.float32), ts, k,
                                           adjoint=adjoint) ** 2)  # fmt: skip
        return jax.grad(loss)(jnp.float32(0.7))

    assert float(grad(1e5)) == float(grad(0.0))
