"""FFJORD's concat-squash vector field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._mlp_field import _check_sizes, _check_state, _uniform


@final
class ConcatSquashMLP(eqx.Module):
    r"""Concat-squash multilayer perceptron, the time-dependent field of FFJORD.

    Every layer $k$ maps $h \mapsto (h W_k + b_k)\,\mathrm{sigmoid}(t a_k + c_k)
    + t\,d_k$: an affine map whose output is gated ("squashed") and shifted by
    learned functions of time (Grathwohl et al. 2019). Hidden layers are
    followed by the activation, the output layer is not. Leading axes of the
    state are batch axes and each layer is one matmul over the last axis.

    **Arguments:**

    - `data_size`: size $d$ of the last axis of the state.
    - `width_size`: width of every hidden layer.
    - `depth`: number of hidden layers (0 gives a single concat-squash layer).
    - `key`: PRNG key for the initialisation.
    - `activation`: hidden activation (default `jax.nn.softplus`, as in FFJORD's
      density experiments).
    - `dtype`: parameter dtype (default: JAX's default float dtype).

    **Returns:**

    A module called as `field(t, y, args)` returning $dy/dt$ with the shape and
    dtype of `y` (`args` is ignored).

    **References:**

    Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud. *FFJORD: Free-form
    Continuous Dynamics for Scalable Reversible Generative Models.* ICLR 2019.
    """

    weights: list[Float[Array, "fan_in fan_out"]]
    biases: list[Float[Array, " fan_out"]]
    gate_weights: list[Float[Array, " fan_out"]]
    gate_biases: list[Float[Array, " fan_out"]]
    time_shifts: list[Float[Array, " fan_out"]]
    activation: Callable[[Array], Array]
    data_size: int = eqx.field(static=True)
    width_size: int = eqx.field(static=True)
    depth: int = eqx.field(static=True)

    def __init__(
        self,
        data_size: int,
        width_size: int,
        depth: int,
        *,
        key: PRNGKeyArray,
        activation: Callable[[Array], Array] = jax.nn.softplus,
        dtype: Any = None,
    ):
        _check_sizes(data_size, width_size, depth)
        if dtype is None:
            dtype = jnp.zeros(()).dtype
        sizes = [data_size] + [width_size] * depth + [data_size]
        keys = jr.split(key, depth + 1)
        self.weights, self.biases = [], []
        self.gate_weights, self.gate_biases, self.time_shifts = [], [], []
        for i in range(depth + 1):
            fan_in, fan_out = sizes[i], sizes[i + 1]
            kw, kb, ka, kc, kd = jr.split(keys[i], 5)
            self.weights.append(_uniform(kw, (fan_in, fan_out), fan_in, dtype))
            self.biases.append(_uniform(kb, (fan_out,), fan_in, dtype))
            # The time hypernetworks are Linear(1, fan_out) maps, so fan_in = 1.
            self.gate_weights.append(_uniform(ka, (fan_out,), 1, dtype))
            self.gate_biases.append(_uniform(kc, (fan_out,), 1, dtype))
            self.time_shifts.append(_uniform(kd, (fan_out,), 1, dtype))
        self.activation = activation
        self.data_size = data_size
        self.width_size = width_size
        self.depth = depth

    def __call__(
        self, t: ArrayLike, y: Float[Array, "*batch data"], args: Any = None
    ) -> Float[Array, "*batch data"]:
        """Evaluate $dy/dt = f_\\theta(t, y)$ (`args` is ignored)."""
        del args
        _check_state(y, self.data_size, "ConcatSquashMLP")
        dt = y.dtype
        t = jnp.asarray(t, dt)
        h = y
        for i in range(self.depth + 1):
            gate = jax.nn.sigmoid(
                t * self.gate_weights[i].astype(dt) + self.gate_biases[i].astype(dt)
            )
            h = (h @ self.weights[i].astype(dt) + self.biases[i].astype(dt)) * gate
            h = h + t * self.time_shifts[i].astype(dt)
            if i < self.depth:
                h = self.activation(h)
        return h
