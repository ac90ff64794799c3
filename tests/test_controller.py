"""The controller interface: the loop asks `adapt` and nothing else."""

from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest

import neuralode as no


def decay(t, y, args):
    return -y


def test_abstract_classes_cannot_be_built():
    with pytest.raises(TypeError, match="abstract"):
        no.AbstractSolver()
    with pytest.raises(TypeError, match="abstract class attributes"):
        no.AbstractController()


class DoublingController(no.AbstractController):
    """Accepts every valid step and doubles the next one: a controller the loop
    has never heard of."""

    adaptive: ClassVar[bool] = True

    def adapt(self, outcome: no.StepOutcome) -> no.Decision:
        return no.Decision(outcome.valid, 2 * outcome.h)


def test_a_new_controller_plugs_into_the_loop():
    sol = no.solve(
        decay, jnp.ones(1), jnp.array([0.0, 1.0]), dt0=0.1,
        controller=DoublingController(),
    )  # fmt: skip
    # Steps 0.1, 0.2, 0.4 and the last one clipped to 0.3.
    assert int(sol.stats["num_steps"]) == 4
    assert int(sol.stats["num_rejected"]) == 0


def _outcome(**change):
    values = dict(
        t=jnp.float32(1e5), h=jnp.float32(0.0078125), h_proposed=jnp.float32(0.0078125),
        clipped=jnp.bool_(False), err=jnp.float32(1.05), valid=jnp.bool_(True),
        err_prev=jnp.float32(1.0), rejected_last=jnp.bool_(False), exponent=0.2,
    )  # fmt: skip
    return no.StepOutcome(**{**values, **change})


def test_pi_rejection_always_shortens_the_step_representably():
    """At t = 1e5 in float32 a 1 % shrink rounds back to the same end time; the
    controller returns a step that ends strictly earlier."""
    outcome = _outcome()
    accept, h_next = no.PIController().adapt(outcome)
    assert not bool(accept)
    t = np.float32(outcome.t)
    assert np.float32(t + np.float32(h_next)) < np.float32(t + np.float32(outcome.h))


def test_pi_never_accepts_an_invalid_step():
    accept, _ = no.PIController().adapt(_outcome(err=jnp.float32(0.1), valid=False))
    assert not bool(accept)


def test_constant_step_size_accepts_valid_steps_and_keeps_dt0():
    accept, h_next = no.ConstantStepSize().adapt(_outcome(err=jnp.float32(50.0)))
    assert bool(accept) and float(h_next) == 0.0078125
    accept, _ = no.ConstantStepSize().adapt(_outcome(valid=False))
    assert not bool(accept)
