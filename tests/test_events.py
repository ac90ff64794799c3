"""Events: detection, location, the solve's stop, and the event time's gradients."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neuralode as no

from .helpers import van_der_pol

GRAVITY = 9.81
TIGHT = dict(rtol=1e-10, atol=1e-12)


def ball(t, y, g):
    """Height and velocity of a ball under gravity g."""
    return jnp.stack([y[1], -g])


def height(t, y, args):
    return y[0]


def impact_time(h0, v0, g=GRAVITY):
    """When a ball thrown up at v0 from height h0 lands: (v0 + √(v0² + 2gh0))/g."""
    return (v0 + np.sqrt(v0**2 + 2 * g * h0)) / g


def oscillator(t, y, args):
    return jnp.stack([y[1], -y[0]])


TS = jnp.linspace(0.0, 2.0, 11)
FALLS = no.Event(height, direction=-1)


@pytest.mark.parametrize(
    "adjoint",
    [
        no.BacksolveAdjoint(),
        no.CheckpointAdjoint(),
        no.InterpolatingAdjoint(),
    ],
    ids=lambda a: type(a).__name__,
)
def test_impact_time_and_gradients_match_closed_form(adjoint):
    # ForwardMode's event derivatives (jacfwd) are checked against central
    # differences in test_event_gradients_match_finite_differences_….
    h0, v0 = 2.0, 3.0

    def impact(y0, g):
        sol = no.solve(ball, y0, TS, g, event=FALLS, adjoint=adjoint, **TIGHT)
        return sol.event_time, sol.event_state[1]

    y0 = jnp.array([h0, v0])
    t_star, v_star = jax.jit(impact)(y0, GRAVITY)
    exact = impact_time(h0, v0)
    assert abs(float(t_star) - exact) <= 4 * np.spacing(exact)
    np.testing.assert_allclose(v_star, v0 - GRAVITY * exact, rtol=1e-12)

    root = np.sqrt(v0**2 + 2 * GRAVITY * h0)
    dt_dh, dt_dv = 1 / root, (1 + v0 / root) / GRAVITY
    dt_dg = -(v0 + root) / GRAVITY**2 + h0 / (root * GRAVITY)
    expected = np.array([dt_dh, dt_dv, dt_dg])
    # v* = v0 - g t*: its derivatives follow from t*'s.
    expected_v = np.array(
        [-GRAVITY * dt_dh, 1 - GRAVITY * dt_dv, -exact - GRAVITY * dt_dg]
    )
    (dt_dy0, dt_dgrav), (dv_dy0, dv_dgrav) = jax.jit(
        jax.jacrev(impact, argnums=(0, 1))
    )(y0, GRAVITY)
    np.testing.assert_allclose([*dt_dy0, dt_dgrav], expected, rtol=1e-9)
    np.testing.assert_allclose([*dv_dy0, dv_dgrav], expected_v, rtol=1e-9)


def test_solve_stops_at_the_event_and_outputs_after_it_are_nan():
    h0 = 2.0
    sol = no.solve(ball, jnp.array([h0, 0.0]), TS, GRAVITY, event=FALLS, **TIGHT)
    t_star = np.sqrt(2 * h0 / GRAVITY)
    before = np.asarray(TS) <= t_star
    np.testing.assert_allclose(
        sol.ys[before, 0], h0 - GRAVITY * np.asarray(TS)[before] ** 2 / 2, rtol=1e-12
    )
    assert np.all(np.isnan(np.asarray(sol.ys)[~before]))
    assert bool(sol.event_happened) and int(sol.event_index) == 0
    assert int(sol.result) == 0
    # Steps stop at the event: fewer than the solve to the end on a problem
    # whose step size is set by accuracy (the oscillator).
    plain = no.solve(oscillator, jnp.array([1.0, 0.0]), jnp.array([0.0, 10.0]))
    stopped = no.solve(
        oscillator,
        jnp.array([1.0, 0.0]),
        jnp.array([0.0, 10.0]),
        event=no.Event(height),
    )
    to_event = no.solve(
        oscillator, jnp.array([1.0, 0.0]), jnp.array([0.0, float(stopped.event_time)])
    )
    assert int(stopped.stats["num_steps"]) < int(plain.stats["num_steps"]) / 3
    # The steps up to the event are those of the plain solve, plus the step
    # across the event (counted as accepted).
    assert (
        abs(int(stopped.stats["num_accepted"]) - int(to_event.stats["num_accepted"]))
        <= 1
    )
    np.testing.assert_allclose(stopped.event_time, np.pi / 2, rtol=1e-7)


def test_an_event_that_never_happens_changes_nothing():
    y0 = jnp.array([2.0, 3.0])
    plain = no.solve(ball, y0, TS, GRAVITY)
    never = no.solve(
        ball, y0, TS, GRAVITY, event=no.Event(lambda t, y, a: y[0] + 100.0)
    )
    np.testing.assert_array_equal(plain.ys, never.ys)
    assert {k: int(v) for k, v in plain.stats.items()} == {
        k: int(v) for k, v in never.stats.items()
    }
    assert not bool(never.event_happened)
    assert float(never.event_time) == float(TS[-1])
    np.testing.assert_array_equal(never.event_state, plain.ys[-1])
    assert plain.event_time is None and plain.event_state is None
    assert plain.event_happened is None and plain.event_index is None


def test_a_condition_zero_at_the_start_does_not_fire_there():
    v0 = 3.0
    sol = no.solve(ball, jnp.array([0.0, v0]), TS, GRAVITY, event=no.Event(height))
    np.testing.assert_allclose(sol.event_time, 2 * v0 / GRAVITY, rtol=1e-12)


@pytest.mark.parametrize(
    ("direction", "expected"), [(-1, np.pi / 2), (1, 3 * np.pi / 2), (0, np.pi / 2)]
)
def test_direction_selects_the_crossing(direction, expected):
    sol = no.solve(
        oscillator,
        jnp.array([1.0, 0.0]),
        jnp.array([0.0, 6.0]),
        event=no.Event(height, direction=direction),
        **TIGHT,
    )
    np.testing.assert_allclose(sol.event_time, expected, rtol=1e-9)


def test_several_conditions_report_which_fired():
    # Apex (v = 0) at v0/g comes before the impact.
    v0 = 3.0
    event = no.Event([height, lambda t, y, a: y[1]], direction=[-1, -1])
    sol = no.solve(ball, jnp.array([2.0, v0]), TS, GRAVITY, event=event, **TIGHT)
    assert int(sol.event_index) == 1
    np.testing.assert_allclose(sol.event_time, v0 / GRAVITY, rtol=1e-12)
    event = no.Event([lambda t, y, a: y[0] - 100.0, height])
    sol = no.solve(ball, jnp.array([2.0, v0]), TS, GRAVITY, event=event, **TIGHT)
    assert int(sol.event_index) == 1
    np.testing.assert_allclose(sol.event_time, impact_time(2.0, v0), rtol=1e-12)


def oscillating_ball(t, y, g):
    """A falling ball with a small wobble, so that step sizes depend on height."""
    return jnp.stack([y[1], -g + 0.01 * jnp.sin(20 * t)])


def test_vmap_gives_every_sample_its_own_event():
    heights = jnp.array([0.5, 1.0, 3.0, 30.0])

    def impact(h):
        sol = no.solve(oscillating_ball, jnp.stack([h, 0.0]), TS, GRAVITY, event=FALLS)
        return sol.event_time, sol.event_happened, sol.stats["num_steps"]

    times, happened, steps = jax.jit(jax.vmap(impact))(heights)
    # Each sample stopped on its own: its steps are those of its own solve.
    single = jax.jit(impact)
    assert [int(n) for n in steps] == [int(single(h)[2]) for h in heights]
    assert len(set(np.asarray(steps).tolist())) > 1
    expected = np.sqrt(2 * np.asarray(heights) / GRAVITY)
    np.testing.assert_allclose(times[:3], expected[:3], rtol=1e-3)
    # The highest ball does not land within ts: its time is ts[-1].
    assert list(np.asarray(happened)) == [True, True, True, False]
    assert float(times[3]) == float(TS[-1])
    np.testing.assert_allclose(times[1], single(heights[1])[0], rtol=1e-14)


def test_float32_event_time_to_a_few_ulps():
    ts = jnp.linspace(0, 2, 5, dtype=jnp.float32)
    y0 = jnp.array([2.0, 0.0], jnp.float32)
    sol = no.solve(ball, y0, ts, jnp.float32(GRAVITY), event=FALLS, rtol=1e-6)
    assert sol.event_time.dtype == jnp.float32
    exact = np.sqrt(4 / GRAVITY)
    assert abs(float(sol.event_time) - exact) <= 4 * np.spacing(np.float32(exact))


def test_pytree_state_and_backward_in_time():
    def field(t, y, args):
        return {"x": y["v"], "v": -y["x"]}

    y0 = {"x": jnp.array(1.0), "v": jnp.array(0.0)}
    event = no.Event(lambda t, y, a: y["x"])
    # Backwards from t = 0, x = cos t first vanishes at t = -π/2.
    sol = no.solve(field, y0, jnp.array([0.0, -3.0]), event=event, **TIGHT)
    np.testing.assert_allclose(sol.event_time, -np.pi / 2, rtol=1e-9)
    np.testing.assert_allclose(sol.event_state["v"], -np.sin(-np.pi / 2), rtol=1e-9)
    assert abs(float(sol.event_state["x"])) < 1e-12


def test_a_crossing_and_recrossing_inside_one_step_is_found():
    # Thrown up from the ground at v0 = 5, the ball passes height 1 on the way
    # up and down; its polynomial motion lets the solver take steps spanning
    # both crossings, which only the rates dg/dt at the step ends reveal.
    event = no.Event(lambda t, y, a: y[0] - 1.0)
    sol = no.solve(ball, jnp.array([0.0, 5.0]), TS, GRAVITY, event=event, **TIGHT)
    first = (5.0 - np.sqrt(25.0 - 2 * GRAVITY)) / GRAVITY
    np.testing.assert_allclose(sol.event_time, first, rtol=1e-12)


@pytest.mark.parametrize(
    ("solver", "dt0", "rtol"),
    [
        (no.Tsit5(), None, 1e-12),
        (no.Bosh3(), None, 1e-12),
        (no.Fehlberg45(), None, 1e-12),
        (no.Midpoint(), 0.05, 1e-12),
        (no.RK4(), 0.1, 1e-12),
        (no.Euler(), 0.01, 1e-2),
        (no.Kvaerno5(), None, 1e-12),
        (no.Rodas5P(), None, 1e-9),
        (no.AutoSwitch(), None, 1e-9),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, eqx.Module) else None,
)
def test_every_solver_locates_the_event(solver, dt0, rtol):
    sol = no.solve(
        ball, jnp.array([2.0, 0.0]), TS, GRAVITY, event=FALLS, solver=solver, dt0=dt0
    )
    np.testing.assert_allclose(sol.event_time, np.sqrt(4 / GRAVITY), rtol=rtol)


# Gradients on a nonlinear problem: the first time Van der Pol's x crosses 0.
VDP_Y0 = jnp.array([2.0, 0.0])
VDP_MU = 1.5
VDP_EVENT = no.Event(height, direction=-1)


def vdp_event(y0, mu, adjoint, **kwargs):
    sol = no.solve(
        van_der_pol, y0, jnp.array([0.0, 5.0]), mu, event=VDP_EVENT,
        adjoint=adjoint, **kwargs,
    )  # fmt: skip
    return sol.event_time + 0.3 * sol.event_state[1]


def central_differences(fun, x, eps):
    x = np.asarray(x, float)
    grads = []
    for i in range(x.size):
        step = np.zeros_like(x)
        step.flat[i] = eps
        grads.append((fun(x + step) - fun(x - step)) / (2 * eps))
    return np.array(grads)


def test_event_gradients_match_finite_differences_on_a_nonlinear_problem():
    tight = dict(rtol=1e-12, atol=1e-12)

    solve = jax.jit(lambda y0, mu: vdp_event(y0, mu, no.ForwardMode(), **tight))

    def loss(p):
        return float(solve(jnp.asarray(p[:2]), jnp.asarray(p[2])))

    point = np.array([*VDP_Y0, VDP_MU])
    fd = central_differences(loss, point, 1e-5)
    for adjoint in (
        no.BacksolveAdjoint(),
        no.CheckpointAdjoint(),
        no.InterpolatingAdjoint(),
    ):
        grads = jax.jit(
            jax.grad(lambda y0, mu: vdp_event(y0, mu, adjoint, **tight), (0, 1))
        )(VDP_Y0, VDP_MU)
        np.testing.assert_allclose([*grads[0], grads[1]], fd, rtol=1e-6, atol=1e-8)
    forward = jax.jit(
        jax.jacfwd(lambda y0, mu: vdp_event(y0, mu, no.ForwardMode(), **tight), (0, 1))
    )(VDP_Y0, VDP_MU)
    np.testing.assert_allclose([*forward[0], forward[1]], fd, rtol=1e-6, atol=1e-8)


def test_checkpoint_gradient_is_the_exact_derivative_of_a_fixed_step_solve():
    fixed = dict(solver=no.RK4(), dt0=0.05)

    solve = jax.jit(lambda y0, mu: vdp_event(y0, mu, no.CheckpointAdjoint(), **fixed))

    def loss(p):
        return float(solve(jnp.asarray(p[:2]), jnp.asarray(p[2])))

    point = np.array([*VDP_Y0, VDP_MU])
    fd = central_differences(loss, point, 1e-6)
    grads = jax.jit(
        jax.grad(
            lambda y0, mu: vdp_event(y0, mu, no.CheckpointAdjoint(), **fixed), (0, 1)
        )
    )(VDP_Y0, VDP_MU)
    np.testing.assert_allclose([*grads[0], grads[1]], fd, rtol=1e-8, atol=1e-10)


class Threshold(eqx.Module):
    level: jax.Array

    def __call__(self, t, y, args):
        return y[0] - self.level


@pytest.mark.parametrize("adjoint", [no.BacksolveAdjoint(), no.CheckpointAdjoint()])
def test_gradients_reach_the_parameters_of_cond(adjoint):
    h0, level = 5.0, 1.5

    def impact(module_level, closed_level):
        event = no.Event(
            [Threshold(module_level), lambda t, y, a: y[0] - closed_level],
            direction=-1,
        )
        sol = no.solve(
            ball, jnp.array([h0, 0.0]), TS, GRAVITY, event=event, adjoint=adjoint
        )
        return sol.event_time

    # dt*/dL = -1/√(2g(h0 - L)) for t* = √(2(h0 - L)/g); the higher level fires.
    grads = jax.jit(jax.grad(impact, argnums=(0, 1)))(jnp.array(level), jnp.array(1.0))
    np.testing.assert_allclose(
        grads[0], -1 / np.sqrt(2 * GRAVITY * (h0 - level)), rtol=1e-8
    )
    assert float(grads[1]) == 0.0


def test_gradients_of_outputs_before_the_event_are_unchanged():
    ts = jnp.linspace(0.0, 4.0, 9)

    def outputs(y0, event):
        sol = no.solve(oscillator, y0, ts, event=event, adjoint=no.BacksolveAdjoint())
        return jnp.sum(sol.ys[:4] ** 2 * jnp.arange(1.0, 5.0)[:, None])

    y0 = jnp.array([1.0, 0.5])
    with_event = jax.jit(jax.grad(outputs), static_argnums=1)(
        y0, no.Event(height, direction=-1)
    )
    without = jax.jit(jax.grad(outputs), static_argnums=1)(y0, None)
    np.testing.assert_allclose(with_event, without, rtol=1e-6)


def test_bad_events_are_refused_clearly():
    with pytest.raises(TypeError, match="Event condition 1 must be callable"):
        no.Event([height, 3.0])
    with pytest.raises(ValueError, match="direction must be -1, 0 or \\+1"):
        no.Event(height, direction=2)
    with pytest.raises(ValueError, match="2 condition\\(s\\) but 3 directions"):
        no.Event([height, height], direction=[1, 1, -1])
    with pytest.raises(TypeError, match="must return a real floating scalar"):
        no.solve(ball, jnp.ones(2), TS, GRAVITY, event=no.Event(lambda t, y, a: y))
    with pytest.raises(TypeError, match="event must be neuralode.Event"):
        no.solve(ball, jnp.ones(2), TS, GRAVITY, event=height)

    class NoEvents(no.AbstractAdjoint):
        def loop(self, config, problem, params, y0, ts, h0=None):
            raise AssertionError("not reached")

    with pytest.raises(TypeError, match="NoEvents does not support events"):
        no.solve(ball, jnp.ones(2), TS, GRAVITY, event=FALLS, adjoint=NoEvents())
    # The reversible adjoint's own loop has no event stop.
    with pytest.raises(TypeError, match="ReversibleAdjoint does not support events"):
        no.solve(
            ball, jnp.ones(2), TS, GRAVITY, event=FALLS, adjoint=no.ReversibleAdjoint()
        )


# Hybrid systems: a bouncing ball with restitution e.
def bounce(t, y, args):
    return jnp.stack([jnp.zeros_like(y[0]), -args[1] * y[1]])


def falling_ball(t, y, args):
    return jnp.stack([y[1], -args[0]])


def bouncing_heights(ts, h0, g, e):
    """Closed form: fall from rest at h0, bounces reflect the speed times e."""
    landing = np.sqrt(2 * h0 / g)
    out = []
    for t in np.asarray(ts):
        if t <= landing:
            out.append(h0 - g * t**2 / 2)
            continue
        start, speed = landing, g * landing * e
        while t > start + 2 * speed / g:
            start, speed = start + 2 * speed / g, speed * e
        out.append(speed * (t - start) - g * (t - start) ** 2 / 2)
    return np.array(out)


def test_solve_hybrid_bounces_exactly_and_differentiates_end_to_end():
    ts = jnp.linspace(0.0, 3.0, 31)
    h0 = 2.0

    def positions(params):
        sol = no.solve_hybrid(
            falling_ball, jnp.array([h0, 0.0]), ts, params, event=FALLS,
            reset=bounce, max_events=8, rtol=1e-10, atol=1e-12,
        )  # fmt: skip
        return sol.ys[:, 0], sol

    params = (jnp.array(GRAVITY), jnp.array(0.8))
    heights, sol = jax.jit(positions)(params)
    np.testing.assert_allclose(
        heights, bouncing_heights(ts, h0, GRAVITY, 0.8), rtol=0, atol=1e-12
    )
    landing = np.sqrt(2 * h0 / GRAVITY)
    # Bounce k lands 2 v_k / g after the last, v_k = e^k g t_1.
    # (the fourth, at 3.13, is after ts[-1]).
    gaps = 2 * 0.8 ** np.arange(1, 3) * landing
    expected = landing + np.concatenate([[0], np.cumsum(gaps)])
    np.testing.assert_allclose(sol.event_times[:3], expected, rtol=1e-13)
    assert int(sol.num_events) == 3 and np.all(np.isnan(sol.event_times[3:]))

    def loss(p):
        return jnp.sum(positions(p)[0] ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    solve = jax.jit(loss)
    eps = 1e-6
    fd = [
        (solve((params[0] + eps, params[1])) - solve((params[0] - eps, params[1])))
        / (2 * eps),
        (solve((params[0], params[1] + eps)) - solve((params[0], params[1] - eps)))
        / (2 * eps),
    ]
    np.testing.assert_allclose(grads, fd, rtol=1e-6)


def test_solve_hybrid_stops_at_its_last_event_and_refuses_bad_input():
    ts = jnp.linspace(0.0, 3.0, 7)
    sol = no.solve_hybrid(
        falling_ball, jnp.array([2.0, 0.0]), ts, (GRAVITY, 0.8), event=FALLS,
        reset=bounce, max_events=1,
    )  # fmt: skip
    landing = np.sqrt(4 / GRAVITY)
    assert np.all(np.isnan(np.asarray(sol.ys)[np.asarray(ts) > landing]))
    assert int(sol.num_events) == 1
    with pytest.raises(ValueError, match="max_events must be >= 1"):
        no.solve_hybrid(
            falling_ball, jnp.ones(2), ts, (GRAVITY, 0.8), event=FALLS,
            reset=bounce, max_events=0,
        )  # fmt: skip
    with pytest.raises(TypeError, match="reset must be callable"):
        no.solve_hybrid(
            falling_ball, jnp.ones(2), ts, (GRAVITY, 0.8), event=FALLS,
            reset=None, max_events=2,
        )  # fmt: skip


def test_event_benchmark_report_gives_ratios_to_diffrax():
    from benchmarks import events

    rows = [
        {"library": "neuralode", "program": "time", "balls": 8, "first_call_s": 1.0,
         "median_s": 2e-3, "repeats": 5, "error": 1e-14},
        {"library": "diffrax", "program": "time", "balls": 8, "first_call_s": 4.0,
         "median_s": 1e-3, "repeats": 5, "error": 1e-15},
        {"library": "neuralode", "program": "grad-backsolve", "failed": "boom"},
    ]  # fmt: skip
    table = events.markdown(rows)
    assert "| neuralode | time | 8 | 1.00 | 2.00 ms | 2.00 | 0.25 | 1.0e-14 |" in table
    assert "| neuralode | grad-backsolve | failed |" in table
    assert events.heights(4).tolist() == [1.0, 4.0, 7.0, 10.0]
