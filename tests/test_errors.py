"""Every error path: trace-time input checks and run-time solve failures."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neuralode as no


def decay(t, y, args):
    return -y


Y0 = jnp.array([1.0, 2.0])
TS = jnp.array([0.0, 1.0])


@pytest.mark.parametrize(
    "ts, match",
    [
        (jnp.zeros((2, 2)), "1-D"),
        (jnp.array([0.0]), "at least 2"),
        (jnp.array([0.0, 1.0, 1.0]), "strictly"),
        (jnp.array([0.0, 2.0, 1.0]), "strictly"),
        (jnp.array([0.0, jnp.nan]), "finite"),
    ],
)
def test_bad_ts(ts, match):
    with pytest.raises(ValueError, match=match):
        no.odeint(decay, Y0, ts)


def test_non_monotonic_ts_is_caught_before_compilation():
    calls = []

    def f(t, y, args):
        calls.append(1)
        return -y

    with pytest.raises(ValueError, match="ts\\[1\\]=2.0 and ts\\[2\\]=1.0"):
        no.odeint(f, Y0, jnp.array([0.0, 2.0, 1.0]))
    assert not calls


def test_integer_y0():
    with pytest.raises(TypeError, match="floating"):
        no.odeint(decay, jnp.array([1, 2]), TS)


def test_integer_ts_are_accepted():
    ys = no.odeint(decay, Y0, jnp.array([0, 1]), rtol=1e-9, atol=1e-12)
    assert np.allclose(ys[-1], Y0 * np.exp(-1.0), rtol=1e-7)


def test_wrong_output_shape_shows_both():
    with pytest.raises(ValueError, match=re.escape("float64[3]")) as err:
        no.odeint(lambda t, y, a: jnp.zeros(3), Y0, TS)
    assert "float64[2]" in str(err.value)


def test_wrong_output_structure():
    with pytest.raises(ValueError, match="same structure"):
        no.odeint(lambda t, y, a: (y, y), Y0, TS)


def test_wrong_output_dtype():
    with pytest.raises(ValueError, match="float32"):
        no.odeint(lambda t, y, a: y.astype(jnp.float32), Y0, TS)


def test_field_with_wrong_signature():
    with pytest.raises(TypeError, match="f\\(t, y, args\\)"):
        no.odeint(lambda t, y: -y, Y0, TS)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(rtol=-1.0), ValueError, "rtol"),
        (dict(atol=-1e-3), ValueError, "atol"),
        (dict(rtol=0.0, atol=0.0), ValueError, "both be zero"),
        (dict(max_steps=0), ValueError, "max_steps"),
        (dict(max_steps=2.5), TypeError, "max_steps"),
        (dict(solver=no.RK4()), ValueError, "dt0"),
        (dict(dt0=0.0), ValueError, "dt0"),
        (dict(controller=no.ConstantStepSize()), ValueError, "dt0"),
        (dict(solver="dopri5"), TypeError, "solver"),
        (dict(adjoint="backsolve"), TypeError, "adjoint"),
    ],
)
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        no.odeint(decay, Y0, TS, **kwargs)


def test_bad_controller_settings():
    with pytest.raises(ValueError, match="min_factor"):
        no.PIController(min_factor=2.0)
    with pytest.raises(ValueError, match="checkpoints"):
        no.BacksolveAdjoint(checkpoints=-1)


def test_max_steps_raises_under_jit_with_time_reached():
    solve = jax.jit(
        lambda y0: no.odeint(decay, y0, jnp.array([0.0, 100.0]), max_steps=3)
    )
    with pytest.raises(
        Exception, match=r"max_steps=3 reached at t=[0-9.e-]+ before t1=100"
    ):
        jax.block_until_ready(solve(Y0))


def test_throw_false_returns_the_code():
    sol = no.solve(decay, Y0, jnp.array([0.0, 100.0]), max_steps=3, throw=False)
    assert int(sol.result) == no.RESULTS.max_steps_reached
    assert int(sol.stats["num_steps"]) == 3
    assert no.RESULTS.message(sol.result) == "max_steps reached"


def test_nonfinite_state_is_reported():
    sol = no.solve(decay, jnp.array([jnp.nan, 1.0]), TS, throw=False)
    assert int(sol.result) == no.RESULTS.nonfinite
    with pytest.raises(no.SolveError, match="non-finite"):
        jax.block_until_ready(no.odeint(decay, jnp.array([jnp.nan, 1.0]), TS))


def test_fixed_step_nonfinite_is_reported():
    f = lambda t, y, a: jnp.where(t > 0.5, jnp.inf, 1.0) * y
    sol = no.solve(f, Y0, TS, solver=no.Euler(), dt0=0.1, throw=False)
    assert int(sol.result) == no.RESULTS.nonfinite


def test_finite_time_blowup_underflows():
    """y' = y² from y(0) = 1 blows up at t = 1: a clear step-size failure."""
    f = lambda t, y, a: y**2
    sol = no.solve(
        f, jnp.array(1.0), jnp.array([0.0, 2.0]), throw=False, max_steps=100_000
    )
    assert int(sol.result) in (no.RESULTS.dt_underflow, no.RESULTS.nonfinite)
    with pytest.raises(no.SolveError, match="at t=0.99|at t=1"):
        jax.block_until_ready(
            no.odeint(f, jnp.array(1.0), jnp.array([0.0, 2.0]), max_steps=100_000)
        )


def robertson(t, y, args):
    k1, k2, k3 = 0.04, 3e7, 1e4
    y1, y2, y3 = y
    return jnp.stack(
        [-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2**2, k2 * y2**2]
    )


@pytest.mark.parametrize(
    "solver",
    [no.Dopri5(), no.Tsit5(), no.Fehlberg45(), no.Bosh3()],
    ids=lambda s: type(s).__name__,
)
def test_stiff_robertson_fails_clearly_and_says_stiff(solver):
    """Dopri5, Tsit5 and Fehlberg45 estimate h·|λ| in every step from two
    stages at t + h (Hairer's indicator); Bosh3 by power iteration on failure."""
    ts = jnp.array([0.0, 1e5])
    y0 = jnp.array([1.0, 0.0, 0.0])
    with pytest.raises(no.SolveError, match="max_steps=4096 reached") as err:
        jax.block_until_ready(no.odeint(robertson, y0, ts, solver=solver))
    assert "looks stiff" in str(err.value)
    assert "implicit" in str(err.value)


def test_non_stiff_max_steps_does_not_claim_stiffness():
    with pytest.raises(no.SolveError, match="max_steps") as err:
        jax.block_until_ready(
            no.odeint(decay, Y0, jnp.array([0.0, 100.0]), max_steps=5)
        )
    message = str(err.value).splitlines()[0]
    assert message.startswith("neuralode: max_steps")
    assert "stiff" not in message
    assert "Raise max_steps" in message


def test_batched_failure_raises_for_the_failing_sample():
    solve = jax.vmap(lambda t1: no.odeint(decay, Y0, jnp.stack([0.0, t1]), max_steps=8))
    with pytest.raises(no.SolveError, match="max_steps=8 reached at .* before t1=100"):
        jax.block_until_ready(solve(jnp.array([0.1, 100.0, 200.0])))


def test_stiffness_stages():
    stages = {
        type(s).__name__: s.stiffness_stage
        for s in (no.Dopri5(), no.Tsit5(), no.Fehlberg45(), no.RK4(), no.Bosh3())
    }
    assert stages == {
        "Dopri5": 5, "Tsit5": 5, "Fehlberg45": 4, "RK4": 3, "Bosh3": None,
    }  # fmt: skip


@pytest.mark.parametrize("adjoint", [no.BacksolveAdjoint(), no.CheckpointAdjoint()])
def test_gradient_reports_a_failed_forward_solve_it_never_reads(adjoint):
    """A loss linear in the solution never reads its values, so only the
    backward pass can report that the forward solve hit max_steps."""
    f = lambda t, y, k: -k * y
    ts = jnp.array([0.0, 10.0])
    loss = lambda k: jnp.sum(
        no.odeint(f, jnp.ones(2), ts, k, max_steps=3, adjoint=adjoint)
    )
    with pytest.raises(no.SolveError, match="max_steps=3 reached"):
        with no.reraise_failures():
            jax.block_until_ready(jax.jit(jax.grad(loss))(jnp.array(1.0)))
