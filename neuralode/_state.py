"""The solver's view of a problem: states as tuples of flat vectors."""

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array

State = tuple[Array, ...]
"""The solver state: a tuple of flat vectors (one for a plain solve; the state,
adjoint and parameter integrals for the backward pass of an adjoint)."""

FlatField = Callable[[Array, State], State]
"""A vector field on states, `f(t, state) -> d state/dt`."""


def select(pred: Array, a: State, b: State) -> State:
    """`a` where `pred`, else `b`, leaf by leaf."""
    return tuple(jnp.where(pred, x, y) for x, y in zip(a, b, strict=True))
