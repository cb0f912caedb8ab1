"""Every learned optimizer of lopt_ext as an optax GradientTransformationExtraArgs."""
from __future__ import annotations

import optax

from lopt_ext.protocol import Rule
from lopt_ext.state import init_state
from lopt_ext.update import IMPLS, apply_step, check_lopt, check_num_steps, check_theta


def transform(lopt: Rule, theta, impl: str = "fused", skip_nonfinite: bool = False, num_steps=None):
    """An optax GradientTransformationExtraArgs: ``tx.update(grads, state, params, value=loss)``.

    updates = -step, so optax.apply_updates(params, updates) == p - step exactly.
    num_steps: the training horizon, kept in the state; value: the loss at params;
    validation_value: the loss on a validation batch (data not trained on). Rules that read
    them (Celo: ``lopt.uses_horizon``, ``lopt.uses_loss``; ``lopt.uses_validation_loss``)
    require them, the others ignore them (so ``optax.chain`` passes them through unharmed).

    skip_nonfinite=True: a step whose gradients hold a NaN/Inf, or any |g| above
    sqrt(float32 max) ~ 1.8e19 (g^2 would overflow the accumulators), leaves params and
    state unchanged (zero updates) and counts it in state.skipped. Default False, as the
    reference: NaN propagates.
    """
    check_lopt(lopt)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    check_theta(lopt, theta)
    num_steps = check_num_steps(num_steps)
    if lopt.uses_horizon and num_steps is None:
        raise ValueError(f"{type(lopt).__name__} reads the training horizon: pass num_steps= "
                         "(the number of steps you will train for) to transform")

    def init_fn(params):
        return init_state(lopt, params, num_steps=num_steps)

    def update_fn(updates, state, params=None, *, value=None, validation_value=None, **extra_args):
        del extra_args  # optax.chain hands every extra argument to every member
        if params is None:
            raise ValueError(f"{type(lopt).__name__} reads the parameters: call tx.update(grads, state, params)")
        return apply_step(lopt, theta, state, params, updates, impl=impl, write_delta=True,
                          skip_nonfinite=skip_nonfinite, value=value, validation_value=validation_value)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
