"""small_fc_lopt as an optax GradientTransformation."""
from __future__ import annotations

import optax

from lopt_ext.config import SmallFcLOpt
from lopt_ext.state import init_state
from lopt_ext.update import IMPLS, apply_step, check_lopt, check_theta


def transform(lopt: SmallFcLOpt, theta, impl: str = "fused", skip_nonfinite: bool = False):
    """updates = -step, so optax.apply_updates(params, updates) == p - step exactly.

    skip_nonfinite=True: a step whose gradients hold a NaN/Inf, or any |g| above
    sqrt(float32 max) ~ 1.8e19 (g^2 would overflow the accumulators), leaves params and
    state unchanged (zero updates) and counts it in state.skipped. Default False, as the
    reference: NaN propagates.
    """
    check_lopt(lopt)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    check_theta(lopt, theta)

    def init_fn(params):
        return init_state(lopt, params)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("small_fc_lopt reads the parameters: call tx.update(grads, state, params)")
        return apply_step(lopt, theta, state, params, updates, impl=impl, write_delta=True,
                          skip_nonfinite=skip_nonfinite, grads_name="updates")

    return optax.GradientTransformation(init_fn, update_fn)
