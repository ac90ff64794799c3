"""A `lax.while_loop` whose scalar bookkeeping travels packed."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import jax
import jax.lax as lax
import jax.numpy as jnp

from ._state import State

S = TypeVar("S", bound="LoopState")


class LoopState(Protocol):
    """What `packed_while_loop` needs of a loop state: a NamedTuple (its
    fields read by name and replaced) with the state `y` and its slope `f0`."""

    @property
    def y(self) -> State: ...

    @property
    def f0(self) -> State: ...

    def _asdict(self) -> dict[str, Any]: ...

    def _replace(self: S, **kwargs: Any) -> S: ...


def packed_while_loop(cond, body, init: S) -> S:
    """`lax.while_loop` with the state's scalars carried as one vector per dtype
    (flags with the int32 counters) and each leaf of y stacked with its f0.

    XLA:CPU computes each loop output in its own kernel; packed, the scalar
    bookkeeping of a step (time, step size, counters, result) is a handful of
    kernels instead of one each, which is most of a small state's step cost.
    """
    fields = init._asdict()
    names = [n for n, v in fields.items() if isinstance(v, jax.Array) and v.ndim == 0]
    carried = lambda dtype: jnp.dtype(jnp.int32) if dtype == jnp.bool_ else dtype
    groups: dict = {}
    for name in names:
        groups.setdefault(carried(fields[name].dtype), []).append(name)

    def pack(state: S):
        values = state._asdict()
        vectors = tuple(
            jnp.stack([values[n].astype(dtype) for n in members])
            for dtype, members in groups.items()
        )
        # Each leaf of y with its f0, so that both are one loop output.
        y_f0 = tuple(jnp.stack(pair) for pair in zip(state.y, state.f0, strict=True))
        rest = state._replace(**dict.fromkeys(names), y=None, f0=None)
        return vectors, y_f0, rest

    def unpack(carry) -> S:
        vectors, y_f0, rest = carry
        values = {}
        for vector, members in zip(vectors, groups.values(), strict=True):
            for i, name in enumerate(members):
                values[name] = vector[i].astype(fields[name].dtype)
        y = tuple(pair[0] for pair in y_f0)
        f0 = tuple(pair[1] for pair in y_f0)
        return rest._replace(**values, y=y, f0=f0)

    final = lax.while_loop(
        lambda carry: cond(unpack(carry)),
        lambda carry: pack(body(unpack(carry))),
        pack(init),
    )
    return unpack(final)
