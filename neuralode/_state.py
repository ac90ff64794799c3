"""The solver's view of a problem: states as tuples of flat vectors."""

from collections.abc import Callable

from jaxtyping import Array

State = tuple[Array, ...]
"""The solver state: a tuple of flat vectors (one for a plain solve; the state,
adjoint and parameter integrals for the backward pass of an adjoint)."""

FlatField = Callable[[Array, State], State]
"""A vector field on states, `f(t, state) -> d state/dt`."""
