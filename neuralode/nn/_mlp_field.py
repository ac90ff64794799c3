"""A multilayer-perceptron vector field acting on the last axis of the state."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray


def _identity(x):
    return x


def _uniform(key, shape, fan_in, dtype):
    lim = 1.0 / math.sqrt(fan_in)
    return jr.uniform(key, shape, dtype, minval=-lim, maxval=lim)


def _check_sizes(data_size, width_size, depth):
    for name, value, least in (
        ("data_size", data_size, 1),
        ("width_size", width_size, 1),
        ("depth", depth, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"`{name}` must be an int >= {least}, got {value!r}.")


def _check_state(y, data_size, name):
    if jnp.ndim(y) == 0 or jnp.shape(y)[-1] != data_size:
        raise ValueError(
            f"{name} expects a state of shape (..., {data_size}); got an array of "
            f"shape {jnp.shape(y)}."
        )


@final
class MLPField(eqx.Module):
    r"""Multilayer-perceptron vector field $f_\theta(t, y)$ for a neural ODE.

    The field is a fully connected network of `depth` hidden layers of width
    `width_size` acting on the last axis of the state,
    $h_0 = y$ (or $[y, t]$ when time dependent), $h_{k+1} = \sigma(h_k W_k + b_k)$,
    $f = \rho(h_D W_D + b_D)\cdot s$ with activation $\sigma$, final activation
    $\rho$ and output scale $s$. Leading axes of `y` are batch axes: the layers
    are plain matrix products over the last axis, so a whole batch is evaluated
    as one large matmul and a batch of states can be integrated as one ODE
    (Chen et al. 2018). The time input is folded into the first layer as
    $y W_y + t\,w_t + b$, which equals concatenating $t$ to $y$.

    **Arguments:**

    - `data_size`: size $d$ of the last axis of the state.
    - `width_size`: width of every hidden layer.
    - `depth`: number of hidden layers (0 gives an affine field).
    - `key`: PRNG key for the initialisation.
    - `time_dependent`: if True (default) the field depends on $t$.
    - `activation`: hidden activation $\sigma$ (default `jax.nn.tanh`).
    - `final_activation`: activation $\rho$ applied to the output (default
      identity).
    - `scale`: constant multiplying the output (default 1.0); a small scale
      starts training near the identity flow.
    - `zero_init`: if True, the last layer starts at zero so that the initial
      flow is the identity map.
    - `dtype`: parameter dtype (default: JAX's default float dtype).

    **Returns:**

    A module called as `field(t, y, args)` returning $dy/dt$ with the shape and
    dtype of `y` (`args` is ignored).

    **References:**

    Chen, Rubanova, Bettencourt, Duvenaud. *Neural Ordinary Differential
    Equations.* NeurIPS 2018.
    """

    weights: list[Float[Array, "fan_in fan_out"]]
    biases: list[Float[Array, " fan_out"]]
    time_weight: Float[Array, " width"] | None
    activation: Callable[[Array], Array]
    final_activation: Callable[[Array], Array]
    scale: float
    data_size: int = eqx.field(static=True)
    width_size: int = eqx.field(static=True)
    depth: int = eqx.field(static=True)
    time_dependent: bool = eqx.field(static=True)

    def __init__(
        self,
        data_size: int,
        width_size: int,
        depth: int,
        *,
        key: PRNGKeyArray,
        time_dependent: bool = True,
        activation: Callable[[Array], Array] = jax.nn.tanh,
        final_activation: Callable[[Array], Array] = _identity,
        scale: float = 1.0,
        zero_init: bool = False,
        dtype: Any = None,
    ):
        _check_sizes(data_size, width_size, depth)
        if dtype is None:
            dtype = jnp.zeros(()).dtype
        sizes = [data_size] + [width_size] * depth + [data_size]
        fan_in0 = data_size + (1 if time_dependent else 0)
        keys = jr.split(key, 2 * (depth + 1) + 1)
        weights, biases = [], []
        for i in range(depth + 1):
            fan_in = fan_in0 if i == 0 else sizes[i]
            shape = (sizes[i], sizes[i + 1])
            if zero_init and i == depth:
                weights.append(jnp.zeros(shape, dtype))
                biases.append(jnp.zeros((sizes[i + 1],), dtype))
            else:
                weights.append(_uniform(keys[2 * i], shape, fan_in, dtype))
                biases.append(_uniform(keys[2 * i + 1], (sizes[i + 1],), fan_in, dtype))
        if time_dependent:
            if zero_init and depth == 0:
                self.time_weight = jnp.zeros((sizes[1],), dtype)
            else:
                self.time_weight = _uniform(keys[-1], (sizes[1],), fan_in0, dtype)
        else:
            self.time_weight = None
        self.weights = weights
        self.biases = biases
        self.activation = activation
        self.final_activation = final_activation
        self.scale = scale
        self.data_size = data_size
        self.width_size = width_size
        self.depth = depth
        self.time_dependent = time_dependent

    def __call__(
        self, t: ArrayLike, y: Float[Array, "*batch data"], args: Any = None
    ) -> Float[Array, "*batch data"]:
        """Evaluate $dy/dt = f_\\theta(t, y)$ (`args` is ignored)."""
        del args
        _check_state(y, self.data_size, "MLPField")
        h = y
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w.astype(y.dtype) + b.astype(y.dtype)
            if i == 0 and self.time_weight is not None:
                h = h + jnp.asarray(t, y.dtype) * self.time_weight.astype(y.dtype)
            if i < self.depth:
                h = self.activation(h)
        h = self.final_activation(h)
        if not (isinstance(self.scale, float | int) and self.scale == 1):
            h = h * self.scale
        return h.astype(y.dtype)
