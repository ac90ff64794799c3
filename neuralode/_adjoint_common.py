"""What the custom_vjp adjoints share: the `custom_vjp` around a solve, the
cotangents of parameters and output times, and the forward solve's check."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
from jaxtyping import Array, PyTree

from ._event import event_function
from ._failure import checked
from ._integrate import LoopOptions, SolverConfig, integrate


def direction_and_tau(ts: Array) -> tuple[Array, Array]:
    direction = lax.stop_gradient(jnp.sign(ts[-1] - ts[0]))
    return direction, direction * ts


def as_arrays(tree: PyTree) -> PyTree:
    """JAX may hand a custom rule Python-number literals for scalar inputs; make
    them arrays so that they are recognised as (inexact) parameters."""
    return jax.tree.map(
        lambda x: jnp.asarray(x) if isinstance(x, bool | int | float | complex) else x,
        tree,
    )


def zero_cotangent(x):
    if eqx.is_inexact_array(x):
        return jnp.zeros_like(x)
    if eqx.is_array(x):
        return np.zeros(x.shape, dtype=jax.dtypes.float0)
    return None


def parameter_cotangents(params_bar: PyTree, params_arrays: PyTree) -> PyTree:
    """Cotangents for every array leaf: computed for inexact ones (cast to the
    leaf's dtype), zeros (float0 for integer and boolean leaves) elsewhere."""
    filled = eqx.combine(params_bar, jax.tree.map(zero_cotangent, params_arrays))
    return jax.tree.map(
        lambda bar, x: (
            lax.convert_element_type(bar, x.dtype)
            if eqx.is_inexact_array(x)
            else zero_cotangent(x)
        ),
        filled,
        params_arrays,
    )


def time_cotangents(problem, params, direction, tau, ys, ys_bar, a0) -> Array:
    """∂L/∂τ_i = ȳ_i · f(τ_i, y_i) for i ≥ 1 and ∂L/∂τ_0 = -a(τ_0) · f(τ_0, y_0).

    `a0` is the adjoint at τ_0 from the later outputs (the output ys[0] = y0 does
    not move with τ_0). Chen et al. (2018), appendix B.2.
    """
    fs = jax.vmap(lambda t, y: problem.f_flat(t, y, params, direction))(tau, ys)
    # A sum over the state's (one or more) leaves: an array.
    dots = cast(
        Array,
        sum(
            jnp.sum(jnp.real(jnp.conj(bar) * f), axis=-1)
            for bar, f in zip(ys_bar, fs, strict=True)
        ),
    )
    first = -sum(
        jnp.sum(jnp.real(jnp.conj(a) * f[0])) for a, f in zip(a0, fs, strict=True)
    )
    return dots.at[0].set(first).astype(tau.dtype)


def is_symbolic_zero(x) -> bool:
    return isinstance(x, SymbolicZero)


def instantiate(cotangent):
    """Zeros in place of JAX's symbolic zeros."""
    return jax.tree.map(
        lambda c: jnp.zeros(c.shape, c.dtype) if is_symbolic_zero(c) else c,
        cotangent,
        is_leaf=is_symbolic_zero,
    )


def custom_vjp_loop(
    forward: Callable,
    backward: Callable,
    primal: Callable | None = None,
    select: Callable | None = None,
    expand: Callable | None = None,
    check: Callable | None = None,
):
    """A `custom_vjp` solve of (params_arrays, y0, tau, direction, h0).

    `forward(...) -> (out, stats)` and `backward(out, stats, params_arrays, y0,
    tau, direction, out_bar) -> (params_bar, y0_bar, tau_bar)`, where the leaves
    of `out_bar` that JAX knows to be zero are `SymbolicZero`s or None (so that
    a backward pass can skip buffers nobody differentiates; `instantiate` turns
    them into arrays). The forward rule calls the custom function itself, so
    that differentiating the backward pass again (gradients of gradients) goes
    through this same rule. Direction and first step get no gradient.

    With `primal(...) -> (ys, stats)`, the returned function computes only that
    when it is not differentiated (a solve without the extra states `forward`
    keeps for the backward pass); differentiated, it returns
    `select(out, tau) -> ys` of `forward`'s output, and `expand(out, tau, ys_bar)`
    gives `backward` its `out_bar`.

    `check(cotangents, stats, tau, direction) -> cotangents` (see
    `forward_check`) checks the forward solve again in the backward pass, so
    that a gradient that never reads the solution's values still reports a
    failed solve.
    """

    @jax.custom_vjp
    def solve(params_arrays, y0, tau, direction, h0):
        return forward(as_arrays(params_arrays), y0, tau, direction, h0)

    def unwrap(primals):
        return tuple(
            jax.tree.map(
                lambda p: p.value,
                x,
                is_leaf=lambda p: isinstance(p, CustomVJPPrimal),
            )
            for x in primals
        )

    def fwd(*primals):
        primals = unwrap(primals)
        out, stats = solve(*primals)
        return (out, stats), (out, stats, *primals)

    def cotangents_of_inputs(residuals, out_bar):
        out, stats, params_arrays, y0, tau, direction, h0 = residuals
        params_arrays = as_arrays(params_arrays)
        params_bar, y0_bar, tau_bar = backward(
            out, stats, params_arrays, y0, tau, direction, out_bar
        )
        params_bar = parameter_cotangents(params_bar, params_arrays)
        cotangents = (params_bar, y0_bar, tau_bar)
        if check is not None:
            cotangents = check(cotangents, stats, tau, direction)
        return (*cotangents, jnp.zeros_like(direction), jnp.zeros_like(h0))

    def bwd(residuals, cotangents):
        return cotangents_of_inputs(residuals, cotangents[0])

    solve.defvjp(fwd, bwd, symbolic_zeros=True)
    if primal is None:
        return solve
    assert select is not None and expand is not None  # they come with primal

    @jax.custom_vjp
    def solve_outputs(params_arrays, y0, tau, direction, h0):
        return primal(as_arrays(params_arrays), y0, tau, direction, h0)

    def outputs_fwd(*primals):
        out, stats = solve(*primals)
        ys = select(out, primals[2])
        return (ys, stats._replace(output_steps=None)), (out, stats, *primals)

    def outputs_bwd(residuals, cotangents):
        out, tau = residuals[0], residuals[4]
        return cotangents_of_inputs(residuals, expand(out, tau, cotangents[0]))

    solve_outputs.defvjp(outputs_fwd, outputs_bwd)
    return solve_outputs


def forward_check(config: SolverConfig):
    """The `check` of `custom_vjp_loop`: the forward solve's failure test
    applied to the cotangents (raising, or NaN without `config.throw`)."""

    def check(cotangents, stats, tau, direction):
        t0, t1 = direction * tau[0], direction * tau[-1]
        return checked(config, cotangents, stats, direction, t0, t1)

    return check


def primal_solve(
    config: SolverConfig, problem, params_static, diagnose_stiffness: bool = True
):
    """The `primal` of `custom_vjp_loop`: a plain solve of `problem` at the
    output times, keeping nothing for a backward pass."""
    options = LoopOptions(diagnose_stiffness=diagnose_stiffness)

    def primal(params_arrays, y0, tau, direction, h0):
        params = eqx.combine(params_arrays, params_static)
        f = lambda t, y: problem.f_flat(t, y, params, direction)
        event = event_function(problem, params, direction)
        return integrate(config, f, y0, tau, h0, options, event)[:2]

    return primal


def first_step_argument(h0: Array | None, tau: Array) -> Array:
    return jnp.zeros((), tau.dtype) if h0 is None else jnp.asarray(h0, tau.dtype)
