"""The adaptive integration loop: a pure function on `lax.while_loop`.

One loop iteration is one trial step. The state is a tuple of flat vectors
(the user's pytree flattened once into one; an adjoint's state, adjoint and
parameter integral kept apart), and time runs forwards (τ, see `_problem`),
measured from the first output time. The controller decides each step
(`AbstractController.adapt`). Every attempt stores its step's interpolation
data in the slot of the first output not yet covered; the outputs are read
after the loop (`_dense_output`). A small state with many outputs steps in
chunks of slots, and the loop's scalars travel packed (`_packed_loop`): both
keep XLA:CPU's per-step kernel count and dispatch cost down, which is what a
small system's step costs. `CheckpointAdjoint`'s record of the accepted steps
is `_step_record`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._controller import (
    AbstractController,
    ConstantStepSize,
    StepOutcome,
    error_scale,
    initial_step,
    norm_of_sums,
    rms_norm,
    squares,
    step_bound,
    weighted,
)
from ._dense_output import chunked_loop, output_chunk, read_outputs
from ._event import EventFunction, EventStop, crossed, hidden_crossing
from ._packed_loop import packed_while_loop
from ._solution import RESULTS
from ._solvers import AbstractSolver
from ._state import FlatField, State, present, select

# StepRecord, kept_slots and thinned_stride are re-exported for the adjoints.
from ._step_record import (
    StepRecord as StepRecord,
    kept_slots as kept_slots,
    thinned_stride as thinned_stride,
    thinning_loop,
)
from ._stiffness import stiffness_at_failure


class SolverConfig(eqx.Module):
    """Everything static about a solve: method, control and limits."""

    solver: AbstractSolver
    controller: AbstractController
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    dt0: float | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    # The error norm: RMS over the whole state, or the maximum of the RMS norms
    # of these groups of leaves (leaves in none are left out: a seminorm).
    norm_groups: tuple[tuple[int, ...], ...] | None = eqx.field(
        default=None, static=True
    )
    # Whether f depends on t: then a step must span enough representable
    # times for its stages to be placed apart (see `attempt_step`).
    time_dependent: bool = eqx.field(default=True, static=True)
    # Raise on failure (else report it in the result code, gradients NaN).
    throw: bool = eqx.field(default=True, static=True)
    # The caller always passes a first step size h0 (a backward solve starts
    # from the forward's): Hairer's selection is not compiled; h0 is capped by
    # `step_bound` (Hairer's bound from f0 alone), which replaces an h0 <= 0.
    first_step_given: bool = eqx.field(default=False, static=True)

    @property
    def adaptive(self) -> bool:
        """Whether steps are chosen by error control (else all of size dt0)."""
        return self.solver.adaptive and self.controller.adaptive

    @property
    def step_controller(self) -> AbstractController:
        """The controller in charge: a fixed-step method has no error estimate
        to control, so it takes constant steps whatever was configured."""
        return self.controller if self.solver.adaptive else ConstantStepSize()


class Attempt(NamedTuple):
    """The outcome of one trial step and the controller's verdict."""

    t_new: Array
    h: Array
    y1: State
    f1: State
    dense: State | None
    accept: Bool[Array, ""]
    finite: Bool[Array, ""]
    err: Array
    h_next: Array
    stiffness: Array
    # Whether an implicit method's nonlinear solves converged (else True).
    converged: Bool[Array, ""]
    # (vector-field, Jacobian) evaluations of a method of varying cost, or None.
    cost: tuple[Array, Array] | None
    # The method's carry for the next attempt (None if it has none).
    carry: Any = None


def time_spacing(t: Array) -> Array:
    """The distance from |t| to the next representable time above it."""
    t = jnp.abs(t)
    return jnp.nextafter(t, jnp.full_like(t, jnp.inf)) - t


#: A step of a time-dependent field must span more than this many spacings of
#: the time dtype, or its stage times round onto each other and its error
#: estimate means nothing (a float32 solve at t = 1e6 has spacing 0.0625).
RESOLVED_SPACINGS = 16


def attempt_step(
    config: SolverConfig,
    f: FlatField,
    t: Array,
    y: State,
    f0: State,
    h_proposed: Array,
    t_target: Array,
    err_prev: Array,
    rejected_last: Array,
    origin: Array,
    dense: bool = True,
    estimate_stiffness: bool = True,
    carry=None,
) -> Attempt:
    """Try a step from t towards t_target, never past it; the controller decides.

    Times are measured from `origin` (the field sees origin + t), so that the
    loop's own time arithmetic keeps full precision whatever the offset. A
    step that would stop within a few ULPs of t_target is stretched to land
    exactly on it. Step-size decisions are made on `stop_gradient` values.
    `Attempt.stiffness` is h·ρ̂ if `estimate_stiffness` and the method has a
    stiffness stage, else NaN. `carry` is the state of a method that carries
    one (see `AbstractSolver.init_carry`).
    """
    h_proposed = lax.stop_gradient(h_proposed)
    t_sg = lax.stop_gradient(t)
    t_target_sg = lax.stop_gradient(t_target)
    t_try = t_sg + h_proposed
    sliver = (
        16 * jnp.finfo(t.dtype).eps * jnp.maximum(jnp.abs(t_target_sg), jnp.abs(t_sg))
    )
    clipped = t_try >= t_target_sg - sliver
    # The last step ends on t_target itself, so that forward-mode derivatives
    # see the final state move with the last output time.
    t_new = jnp.where(clipped, t_target, t_try)
    h = t_new - t_sg
    solver = config.solver
    carried = {} if carry is None else {"carry": carry}
    step = solver.step(
        f, t, y, f0, h, dense=dense, tolerances=tolerances(config), **carried
    )
    real = jnp.real(y[0]).dtype
    pair = step.stiffness_pair if estimate_stiffness else None
    finite, error_sums, stiff_sums = _step_sums(config, y, step, pair, real)
    if config.adaptive:
        sizes = [leaf.size for leaf in y]
        err = lax.stop_gradient(norm_of_sums(error_sums, sizes, config.norm_groups))
        finite = finite & ~jnp.isnan(err)
    else:
        err = jnp.full((), jnp.nan, real)
    converged = jnp.ones((), bool) if step.converged is None else step.converged
    valid = finite & converged
    if config.time_dependent:
        user_t = lax.stop_gradient(origin) + t_sg
        spacings = RESOLVED_SPACINGS * time_spacing(user_t)
        valid = valid & (jnp.abs(lax.stop_gradient(h)) > spacings)
    outcome = StepOutcome(
        t_sg, lax.stop_gradient(h), h_proposed, clipped, err, valid, err_prev,
        rejected_last, solver.error_exponent,
    )  # fmt: skip
    accept, h_next = jax.tree.map(
        lax.stop_gradient, config.step_controller.adapt(outcome)
    )
    if pair is None:
        stiffness = jnp.full((), jnp.nan, real)
    else:
        num, den = present(stiff_sums)  # summed whenever pair is given
        lipschitz = jnp.sqrt(jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0))
        stiffness = jnp.abs(h).astype(real) * lipschitz
    if carry is not None:
        carry = solver.next_carry(carry, step, accept, stiffness, h)
    return Attempt(
        t_new, h, step.y1, step.f1, step.dense, accept, finite, err, h_next,
        stiffness, converged, step.cost, carry,
    )  # fmt: skip


def is_switching(solver: AbstractSolver) -> bool:
    """Whether the solver switches between methods within a solve (`AutoSwitch`)."""
    return getattr(solver, "switching", False)


def tolerances(config: SolverConfig) -> tuple[float, float]:
    """(rtol, atol) as a solver's nonlinear solves see them."""
    return config.rtol, config.atol


def _step_sums(config: SolverConfig, y: State, step, pair, real):
    """Every sum over the state a step needs, one reduction per leaf.

    XLA:CPU runs each reduction as two kernels (a tree of partial sums, then
    their total). A leaf sums what is read: the finiteness of y1, its error if
    the norm counts it, and the stiffness differences `pair` if estimated;
    leaves with only finiteness to check (an adjoint's parameter integrals)
    share one reduction.

    **Returns:** `(finite, error_sums, (num, den) or None)`, with `error_sums[i]`
    the sum of squares of leaf i's weighted error (None where not counted).
    """
    groups = config.norm_groups
    counted = range(len(y)) if groups is None else {i for g in groups for i in g}
    with_error = config.adaptive
    if with_error:
        scale = error_scale(y, step.y1, config.rtol, config.atol)
    sums: list = [None] * len(y)
    for i, leaf in enumerate(step.y1):
        rows = [jnp.real(leaf)]
        if with_error and i in counted:
            rows.append(squares(weighted(step.y_error[i], scale[i])))
        if pair is not None:
            rows += [squares(pair[0][i]), squares(pair[1][i])]
        if len(rows) > 1:
            stacked = jnp.stack([row.astype(real) for row in rows])
            sums[i] = jnp.sum(stacked, axis=-1)
    rest = [
        jnp.real(v).astype(real)
        for v, x in zip(step.y1, sums, strict=True)
        if x is None
    ]
    finite_sums = [x[0] for x in sums if x is not None]
    if rest:
        finite_sums.append(jnp.sum(jnp.concatenate(rest)))
    finite = jnp.all(jnp.isfinite(jnp.stack(finite_sums)))
    error_sums = [
        x[1] if with_error and i in counted else None for i, x in enumerate(sums)
    ]
    stiff_sums = None
    if pair is not None:
        stiff_sums = (sum(x[-2] for x in sums), sum(x[-1] for x in sums))
    return finite, error_sums, stiff_sums


def underflowed(h_next: Array, t: Array) -> Array:
    """Whether a step of h_next would no longer move t (or is below tiny)."""
    tiny = jnp.finfo(t.dtype).tiny
    return jnp.abs(h_next) <= jnp.maximum(4 * jnp.finfo(t.dtype).eps * jnp.abs(t), tiny)


def failure_code(
    config: SolverConfig,
    attempt: Attempt,
    t_after: Array,
    t_end: Array,
    num_steps: Array,
) -> Int[Array, ""]:
    """The result code after a step: non-finite, underflow, Newton failure,
    max_steps or 0.

    A rejected step whose successor could no longer move t (or, for fixed
    steps, any rejected step: they cannot shrink) ends the solve: non-finite
    if the step had NaN/inf, Newton failure if an implicit method's iterations
    did not converge, else underflow (error control or time resolution).
    """
    unfinished = t_after < t_end
    if config.adaptive:
        stuck = underflowed(attempt.h_next, t_after)
    else:
        stuck = ~attempt.accept
    cause = jnp.where(
        attempt.finite,
        jnp.where(
            attempt.converged, RESULTS.dt_underflow, RESULTS.implicit_not_converged
        ),
        RESULTS.nonfinite,
    )
    code = jnp.where(stuck & unfinished, cause, RESULTS.successful)
    code = jnp.where(
        (code == RESULTS.successful) & (num_steps >= config.max_steps) & unfinished,
        RESULTS.max_steps_reached,
        code,
    )
    return code.astype(jnp.int32)


class LoopStats(NamedTuple):
    """Counters and diagnostics of a finished loop."""

    num_steps: Int[Array, ""]
    num_accepted: Int[Array, ""]
    num_fevals: Int[Array, ""]
    result: Int[Array, ""]
    t_reached: Float[Array, ""]
    h_last: Float[Array, ""]
    stiffness: Float[Array, ""]
    output_steps: Int[Array, " n_out"] | None = None
    # RMS norm of the final state over max(1, that of the initial state): a
    # blow-up shows as a huge growth (for the failure message).
    growth: Float[Array, ""] | None = None
    # The largest drift of a backward solve's state from the forward one, in
    # units of the tolerance (BacksolveAdjoint only).
    drift: Float[Array, ""] | None = None
    # Evaluations of ∂f/∂y (implicit methods).
    num_jacobians: Int[Array, ""] | None = None
    # A switching solver's [number of switches, accepted stiff steps].
    switch_counts: Int[Array, " 2"] | None = None
    # Where a loop with an event stopped (see `_event`), else None.
    event: EventStop | None = None


class _ForwardState(NamedTuple):
    t: Array
    y: State
    f0: State
    h: Array
    err_prev: Array
    rejected_last: Array
    out_index: Array
    slots: tuple[tuple[Array, ...], ...]
    # (start, size) of the step written to each slot; size 0 where none was.
    slot_times: Array
    out_steps: Array | None
    num_steps: Array
    num_accepted: Array
    result: Array
    stiffness: Array
    # (vector-field, Jacobian) evaluations so far, for a method whose steps
    # vary in cost (else None: counted from the number of steps).
    cost: tuple[Array, Array] | None
    # The method's carry (see `AbstractSolver.init_carry`), and a switching
    # solver's numbers of switches and of accepted stiff steps (else None).
    carry: Any
    switch_counts: Array | None
    # Only when recording the accepted steps (for CheckpointAdjoint):
    step_starts: State | None
    step_times: Array | None
    # The carry each recorded step was taken with, where a replay needs it.
    step_carries: Array | None
    stride: Array | None
    # The output times of the slots in this state's buffers: tau_out[base:][:K].
    window: Array
    base: Array
    # With an event: the conditions' values at t, which of them crossed in the
    # step from t (the loop then stops before taking it), whether any did, and
    # that step's size; else None.
    event_g: Array | None = None
    event_fired: Array | None = None
    event_hit: Array | None = None
    event_h: Array | None = None
    # The conditions' rates dg/dt at t, and whether the last attempt was cut
    # short to look for a crossing hidden inside the step before it.
    event_dg: Array | None = None
    event_retry: Array | None = None


def first_step(
    config: SolverConfig,
    f: FlatField,
    t0: Array,
    y0: State,
    f0: State,
    t_span: Array,
    h0: Array | None = None,
) -> tuple[Array, Array]:
    """The first step size and the number of f evaluations it cost.

    A given `h0 > 0` is used as it is; `h0 <= 0` or None selects the step as
    configured (`dt0`, else Hairer's algorithm).
    """
    zero = jnp.zeros((), jnp.int32)
    if config.dt0 is not None:
        if h0 is None:
            return jnp.asarray(config.dt0, t0.dtype), zero
        return jnp.where(h0 > 0, h0, config.dt0).astype(t0.dtype), zero

    def automatic():
        h = initial_step(
            f,
            t0,
            y0,
            f0,
            t_span,
            config.rtol,
            config.atol,
            config.solver.error_exponent,
            config.norm_groups,
        )
        return lax.stop_gradient(h).astype(t0.dtype), zero + 1

    if h0 is None:
        return automatic()
    h0 = lax.stop_gradient(h0).astype(t0.dtype)
    if config.first_step_given:
        bound = step_bound(
            t0, y0, f0, t_span, config.rtol, config.atol,
            config.solver.error_exponent, config.norm_groups,
        )  # fmt: skip
        return jnp.where(h0 > 0, jnp.minimum(h0, bound), bound).astype(t0.dtype), zero
    return lax.cond(h0 > 0, lambda: (h0, zero), automatic)


def _stiffness(config, f, final: _ForwardState, diagnose: bool) -> Array:
    """h·ρ(∂f/∂y) at the last attempt of a failed solve (0 on success).

    Free where the solver has a `stiffness_stage` (each step estimates it);
    otherwise a power iteration run only on failure (JVPs of f to compile).
    """
    real = jnp.real(final.y[0]).dtype
    failed = final.result != RESULTS.successful
    if not diagnose:
        return jnp.full((), jnp.nan, real)
    if config.solver.stiffness_stage is not None:
        return jnp.where(failed, final.stiffness, 0).astype(real)
    return stiffness_at_failure(f, final.t, final.y, final.h, failed)


class LoopOptions(NamedTuple):
    """What a loop records and computes besides the outputs.

    - `diagnose_stiffness`: on failure, report h·ρ(∂f/∂y) at the last attempt
      in `stats.stiffness` (for the message; see `_stiffness`); otherwise NaN.
    - `record_output_steps`: fill `stats.output_steps[i]` with the number of
      accepted steps taken up to output i.
    - `record_steps`: also return a `StepRecord` of the accepted steps: every
      step's times, and the start states of every stride-th step in
      `record_slots` slots (default `max_steps`: every step, stride 1).
    - `dense_output`: compute each step's interpolant (default: only when an
      output lies strictly inside the span, i.e. len(tau_out) > 2).
    """

    diagnose_stiffness: bool = True
    record_output_steps: bool = False
    record_steps: bool = False
    record_slots: int | None = None
    dense_output: bool | None = None


class LoopResult(NamedTuple):
    """What `integrate` returns: `ys[·][i]` the state at `tau_out[i]`, the
    loop's `stats`, and the `record` of its steps (None unless recorded)."""

    ys: State
    stats: LoopStats
    record: StepRecord | None = None


def _growth(y: State, y0: State) -> Array:
    """‖y‖ / max(1, ‖y0‖) (RMS norms), which tells a blow-up in a message."""
    return lax.stop_gradient(rms_norm(y) / jnp.maximum(rms_norm(y0), 1))


def integrate(
    config: SolverConfig,
    f: FlatField,
    y0: State,
    tau_out: Float[Array, " n_out"],
    h0: Array | None = None,
    options: LoopOptions = LoopOptions(),
    event: EventFunction | None = None,
) -> LoopResult:
    """Solve from tau_out[0] to tau_out[-1] (increasing), returning y at tau_out.

    **Arguments:**

    - `f`: the vector field f(τ, y) on states that are tuples of flat vectors.
    - `y0`: the initial state at tau_out[0], a tuple of flat vectors (one for a
      plain solve; separate vectors stay separate, e.g. so that each keeps its
      own sharding).
    - `tau_out`: increasing output times.
    - `h0`: a first step size to use instead of the configured one (if > 0).
    - `options`: what to record besides the outputs (`LoopOptions`).
    - `event`: stop before the first accepted step across which a condition
      changes sign (see `_event`); outputs after the time reached then hold
      the state there, and `stats.event` says where the loop stopped.
    """
    (
        diagnose_stiffness,
        record_output_steps,
        record_steps,
        record_slots,
        dense_output,
    ) = options
    real = jnp.real(y0[0]).dtype
    # The loop measures time from tau_out[0], so that its step arithmetic has
    # full precision whatever the offset (float32 at t = 1e5 resolves 0.008).
    origin = tau_out[0]
    field = f
    f = lambda s, y: field(origin + s, y)
    if event is not None:
        event_values = lambda s, y: event.values(origin + s, y).astype(real)

        def event_rates(s, y, f_y):
            """The conditions' values and rates dg/dt = ∂g/∂t + ∂g/∂y·f."""
            one = jnp.ones_like(s)
            return jax.jvp(event_values, (s, y), (one, f_y))

    tau_out = tau_out - origin
    t0 = tau_out[0]
    t_end = tau_out[-1]
    n_out = tau_out.shape[0]
    f0 = f(t0, y0)
    h0, init_fevals = first_step(config, f, t0, y0, f0, t_end - t0, h0)
    degree = config.solver.dense_degree

    # Dense output without a loop over outputs: every attempt writes its step's
    # interpolation data into the slot of the first output not yet covered
    # (`out_index`), which then advances past the outputs an accepted step
    # covers. The last write to a slot is therefore the step that covers it,
    # and after the loop each output reads the slot of the step covering it.
    # Outputs at t0 are y0 and the last one is the final state: with no output
    # in between, no step needs its interpolant (the common ts = [t0, t1]).
    dense_output = bool(dense_output) or n_out > 2
    chunk = output_chunk(y0, n_out, dense_output, record_steps)
    # The step loop holds slots [base, base + width): all of them, or a chunk.
    width = n_out if chunk is None else chunk
    search = "compare_all" if width <= 128 else "scan_unrolled"
    # Only a diagnosing solve whose method has a stiffness stage carries h·ρ̂.
    switching = is_switching(config.solver)
    carry0 = config.solver.init_carry(y0)
    replayed = record_steps and carry0 is not None and config.solver.replays_carry
    track_stiffness = switching or (
        diagnose_stiffness and config.solver.stiffness_stage is not None
    )

    def write_slot(state: _ForwardState, attempt: Attempt):
        k = state.out_index - state.base
        update = lambda buffer, value: lax.dynamic_update_slice(
            buffer, value[None], (k,) + (jnp.zeros((), jnp.int32),) * value.ndim
        )
        slots = state.slots
        if dense_output:
            # Attempts are made with dense=dense_output: each has its interpolant.
            interpolants = present(attempt.dense)
            slots = tuple(
                (update(coeffs[0], y),)
                + tuple(update(c, d) for c, d in zip(coeffs[1:], dense, strict=True))
                for coeffs, y, dense in zip(slots, state.y, interpolants, strict=True)
            )
        slot_times = update(state.slot_times, jnp.stack([state.t, attempt.h]))
        out_steps = state.out_steps
        if out_steps is not None:
            out_steps = update(out_steps, state.num_accepted + 1)
        local = jnp.searchsorted(
            state.window, attempt.t_new, side="right", method=search
        )
        out_index = jnp.where(attempt.accept, state.base + local, state.out_index)
        return slots, slot_times, out_steps, out_index.astype(jnp.int32)

    def running(state: _ForwardState) -> Array:
        going = (state.t < t_end) & (state.result == RESULTS.successful)
        if event is None:
            return going
        return going & ~present(state.event_hit)  # set whenever event is given

    def body(state: _ForwardState) -> _ForwardState:
        attempt = attempt_step(
            config,
            f,
            state.t,
            state.y,
            state.f0,
            state.h,
            t_end,
            state.err_prev,
            state.rejected_last,
            origin,
            dense=dense_output,
            estimate_stiffness=track_stiffness,
            carry=state.carry,
        )
        hit = None
        if event is not None:
            # The state holds the event's fields whenever event is given.
            g, dg = present(state.event_g), present(state.event_dg)
            retried, event_h = present(state.event_retry), present(state.event_h)
            # A step across which a condition changes sign is not taken: the
            # loop stops before it, and `_event.locate` finds the crossing.
            g_new, dg_new = event_rates(attempt.t_new, attempt.y1, attempt.f1)
            fired = attempt.accept & crossed(g, g_new, event.directions)
            hit = jnp.any(fired)
            accept = attempt.accept & ~hit
            retry = jnp.zeros((), bool)
            if config.adaptive:
                # A crossing and re-crossing inside the step leaves the same
                # sign at both ends; where the cubic through the ends' values
                # and rates suggests one, the step is retried once, ending at
                # the first place the cubic has the other sign, so that the
                # crossing shows as a sign change (a step size decision: not
                # differentiated).
                h_sg = lax.stop_gradient(attempt.h).astype(real)
                suspect, theta = hidden_crossing(
                    g, h_sg * dg, g_new, h_sg * dg_new, event.directions
                )
                retry = accept & jnp.any(suspect) & ~retried
                theta = jnp.min(theta).astype(attempt.h.dtype)
                accept = accept & ~retry
                attempt = attempt._replace(
                    h_next=jnp.where(
                        retry, lax.stop_gradient(theta * attempt.h), attempt.h_next
                    )
                )
            attempt = attempt._replace(accept=accept)
            state = state._replace(
                event_g=jnp.where(accept, g_new, g),
                event_dg=jnp.where(accept, dg_new, dg),
                event_fired=fired,
                event_hit=hit,
                event_h=jnp.where(hit, attempt.h, event_h),
                event_retry=retry,
            )
            if attempt.carry is not None:
                attempt = attempt._replace(
                    carry=jax.tree.map(
                        lambda old, new: jnp.where(hit, old, new),
                        state.carry,
                        attempt.carry,
                    )
                )
        slots, slot_times, out_steps, out_index = write_slot(state, attempt)
        accept = attempt.accept
        t = jnp.where(accept, attempt.t_new, state.t)
        num_steps = state.num_steps + 1
        if record_steps:
            # Written unconditionally: after a rejection the next attempt
            # rewrites them, since k only advances on acceptance.
            k = state.num_accepted
            slot = k
            stride = present(state.stride)  # record_steps sets the record's fields
            if thinning:  # steps off the stride go to the spare last slot
                kept = lax.rem(k, stride) == 0
                slot = jnp.where(kept, lax.div(k, stride), n_record)
            starts = present(state.step_starts)
            state = state._replace(
                step_starts=tuple(
                    lax.dynamic_update_index_in_dim(buffer, y, slot, 0)
                    for buffer, y in zip(starts, state.y, strict=True)
                ),
                step_times=present(state.step_times).at[k + 1].set(attempt.t_new),
                step_carries=(
                    present(state.step_carries).at[k].set(state.carry)
                    if replayed
                    else None
                ),
            )
        switch_counts = state.switch_counts
        if switching:
            # A switching solver carries its mode, and its counts are kept.
            mode, new_mode = state.carry[0], present(attempt.carry)[0]
            switch_counts = present(switch_counts) + jnp.stack(
                [new_mode != mode, accept & (mode == 1)]
            ).astype(jnp.int32)
        return state._replace(
            t=t,
            y=select(accept, attempt.y1, state.y),
            f0=select(accept, attempt.f1, state.f0),
            h=attempt.h_next,
            err_prev=jnp.where(accept, jnp.maximum(attempt.err, 1e-4), state.err_prev),
            rejected_last=~accept,
            out_index=out_index,
            slots=slots,
            slot_times=slot_times,
            out_steps=out_steps,
            num_steps=num_steps,
            num_accepted=state.num_accepted + accept.astype(jnp.int32),
            result=(
                failure_code(config, attempt, t, t_end, num_steps)
                if hit is None
                else jnp.where(
                    hit, 0, failure_code(config, attempt, t, t_end, num_steps)
                ).astype(jnp.int32)
            ),
            stiffness=attempt.stiffness if track_stiffness else state.stiffness,
            cost=(
                None
                if state.cost is None
                # A method of varying cost reports every attempt's.
                else tuple(
                    a + b
                    for a, b in zip(state.cost, present(attempt.cost), strict=True)
                )
            ),
            carry=attempt.carry,
            switch_counts=switch_counts,
        )

    def slot_buffers(size: int):
        """Zeroed slots and slot times for `size` outputs."""
        slots = tuple(
            tuple(jnp.zeros((size,) + y.shape, y.dtype) for _ in range(degree + 1))
            for y in (y0 if dense_output else ())
        )
        out_steps = jnp.zeros(size, jnp.int32) if record_output_steps else None
        return slots, jnp.zeros((size, 2), t0.dtype), out_steps

    zero = jnp.zeros((), jnp.int32)
    slots, slot_times, out_steps = slot_buffers(width)
    n_record = kept_slots(record_slots, config.max_steps)
    thinning = record_steps and n_record < config.max_steps
    step_carries = None
    if replayed:  # only with a carry
        first_carry = present(carry0)
        step_carries = jnp.zeros(
            (config.max_steps,) + first_carry.shape, first_carry.dtype
        )
    init = _ForwardState(
        t=t0,
        y=y0,
        f0=f0,
        h=jnp.where(jnp.isfinite(h0), h0, 1e-6 * (t_end - t0)).astype(t0.dtype),
        err_prev=jnp.ones((), real),
        rejected_last=jnp.zeros((), bool),
        out_index=jnp.ones((), jnp.int32),
        slots=slots,
        slot_times=slot_times,
        out_steps=out_steps,
        num_steps=zero,
        num_accepted=zero,
        result=zero,
        stiffness=jnp.zeros((), real),
        cost=None if config.solver.fevals_per_step is not None else (zero, zero),
        carry=carry0,
        switch_counts=jnp.zeros(2, jnp.int32) if switching else None,
        step_carries=step_carries,
        step_starts=(
            tuple(jnp.zeros((n_record + thinning,) + y.shape, y.dtype) for y in y0)
            if record_steps
            else None
        ),
        stride=zero + 1 if record_steps else None,
        step_times=(
            jnp.zeros(config.max_steps + 1, t0.dtype).at[0].set(t0)
            if record_steps
            else None
        ),
        window=tau_out,
        base=zero,
    )
    if event is not None:
        g0, dg0 = event_rates(t0, y0, f0)
        init = init._replace(
            event_g=g0,
            event_dg=dg0,
            event_retry=jnp.zeros((), bool),
            event_fired=jnp.zeros(g0.shape, bool),
            event_hit=jnp.zeros((), bool),
            event_h=jnp.zeros((), t0.dtype),
        )
    if thinning:
        final = thinning_loop(running, body, init, n_record)
        buffers = (final.slots, final.slot_times, final.out_steps)
    elif chunk is None:
        final = packed_while_loop(running, body, init)
        buffers = (final.slots, final.slot_times, final.out_steps)
    else:
        final, buffers = chunked_loop(running, body, init, tau_out, chunk)
    ys, output_steps = read_outputs(final, *buffers, tau_out, t0, y0)
    stop = None
    if event is not None:
        # Outputs after the stopping time hold the state there (see `_event`).
        beyond = jnp.arange(n_out, dtype=jnp.int32) >= final.out_index
        hit = present(final.event_hit)  # the event's fields are set with one
        frozen = (beyond & hit)[:, None]
        ys = tuple(
            jnp.where(frozen, y, leaf) for leaf, y in zip(ys, final.y, strict=True)
        )
        stop = EventStop(
            hit,
            present(final.event_fired),
            final.t,
            present(final.event_h),
            final.carry if carry0 is not None else None,
        )
    if final.cost is None:
        # The cost is counted from the steps when every step costs the same.
        fevals_per_step = present(config.solver.fevals_per_step)
        step_fevals = final.num_steps * fevals_per_step
        step_jacobians = final.num_steps * config.solver.jacobians_per_step
    else:
        step_fevals, step_jacobians = final.cost
    stats = LoopStats(
        num_steps=final.num_steps,
        num_accepted=final.num_accepted,
        num_fevals=(1 + init_fevals + step_fevals).astype(jnp.int32),
        num_jacobians=step_jacobians.astype(jnp.int32),
        switch_counts=final.switch_counts,
        result=final.result,
        t_reached=origin + final.t,
        h_last=final.h,
        stiffness=_stiffness(config, f, final, diagnose_stiffness),
        output_steps=output_steps,
        growth=_growth(final.y, y0) if diagnose_stiffness else None,
        event=stop,
    )
    if record_steps:
        record = StepRecord(  # record_steps sets the record's fields
            present(final.step_starts),
            present(final.stride),
            present(final.step_times),
            final.num_accepted,
            final.step_carries,
        )
        return LoopResult(ys, stats, record)
    return LoopResult(ys, stats)
