"""The solver's view of a problem: states as tuples of flat vectors."""

from collections.abc import Callable
from typing import TypeVar

import jax.numpy as jnp
from jaxtyping import Array

T = TypeVar("T")

State = tuple[Array, ...]
"""The solver state: a tuple of flat vectors (one for a plain solve; the state,
adjoint and parameter integrals for the backward pass of an adjoint)."""

FlatField = Callable[[Array, State], State]
"""A vector field on states, `f(t, state) -> d state/dt`."""


def select(pred: Array, a: State, b: State) -> State:
    """`a` where `pred`, else `b`, leaf by leaf."""
    return tuple(jnp.where(pred, x, y) for x, y in zip(a, b, strict=True))


def present(value: T | None) -> T:
    """`value`, which a static flag of the caller's guarantees is not None.

    Loop states and records hold optional parts (None unless a static option
    asks for them); this narrows one for the type checker where the caller's
    flag says it exists. The check is on a Python object at trace time, never
    on a traced value, so it changes nothing in the compiled program.
    """
    assert value is not None
    return value
