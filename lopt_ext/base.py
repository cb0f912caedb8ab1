"""``LearnedOptimizer``: the rule protocol plus the user-facing methods built on the shared
machinery. Every learned optimizer of lopt_ext (SmallFcLOpt, ScaledSmallFcLOpt, MLPLOpt,
Celo) inherits from it; a new one is one module that subclasses it and fulfils the protocol
(lopt_ext.protocol).

Layers, each importing only from those above it in this list (python_tests/test_layers.py):
1. lopt_ext.protocol (the rule protocol), lopt_ext.common (pieces several rules share),
   lopt_ext._ffi (the compiled kernels, called on plain arrays and attributes);
2. lopt_ext.state, lopt_ext.update, lopt_ext.optax_api: validation, state, the step assembly,
   fused_update and the optax wrapper, written against the protocol only;
3. this module;
4. one module per learned optimizer: config + reference (small_fc_lopt), scaled, mlp_lopt, celo;
5. everything else (variants, checkpoint, sharded, pretrained, tasks, metatrain, the CLI).
"""
from __future__ import annotations

from lopt_ext import optax_api
from lopt_ext.protocol import MAX_HIDDEN, MAX_HIDDEN_LAYERS, Rule  # noqa: F401  (the protocol's limits)


class LearnedOptimizer(Rule):

    def transform(self, theta, impl: str = "fused", skip_nonfinite: bool = False, num_steps=None):
        """An optax GradientTransformationExtraArgs applying this learned optimizer with ``theta``:
        ``tx.update(grads, state, params, value=loss)``; num_steps: the training horizon (rules
        that read it require it, the others ignore it)."""
        return optax_api.transform(self, theta, impl=impl, skip_nonfinite=skip_nonfinite, num_steps=num_steps)
