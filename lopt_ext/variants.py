"""Named learned-optimizer configurations: what meta-training, the tradeoffs study and the
checkpoints refer to by name.

``KINDS`` maps a meta-training ``lopt_kind`` to a constructor taking ``hidden_size`` and
``hidden_layers``; ``STUDY`` lists the learned optimizers of the tradeoffs study (issue 12 /
docs/tradeoffs) as (kind, hidden size). Every study variant is meta-trained with the same recipe
and budget, and its theta is committed under lopt_ext/tradeoffs/theta/<name>.safetensors.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict

from lopt_ext.base import LearnedOptimizer
from lopt_ext.celo import Celo
from lopt_ext.config import SmallFcLOpt
from lopt_ext.mlp_lopt import MLPLOpt
from lopt_ext.scaled import ScaledSmallFcLOpt

KINDS: Dict[str, Callable[..., LearnedOptimizer]] = {
    "small_fc_lopt": SmallFcLOpt,
    "scaled": ScaledSmallFcLOpt,
    # the scale also sees how far each tensor has come, and a learned weight decay (lopt_ext.scaled)
    "scaled_progress": functools.partial(ScaledSmallFcLOpt, progress_inputs=True),
    # the scale also sees the fraction of its horizon a run has done (a learned schedule; needs num_steps)
    "scaled_horizon": functools.partial(ScaledSmallFcLOpt, horizon_inputs=True),
    # ... and what the step's minibatch loss has done (optax's value, which every step then needs)
    "scaled_horizon_loss": functools.partial(ScaledSmallFcLOpt, horizon_inputs=True, loss_inputs="train"),
    # ... and the gap between a validation batch's loss and the minibatch loss (validation_value too)
    "scaled_horizon_loss_gap": functools.partial(ScaledSmallFcLOpt, horizon_inputs=True,
                                                 loss_inputs="train+validation"),
    # ablation: no row/column (Adafactor) accumulators or features (10 normalised features, not 28)
    "small_fc_lopt_no_adafactor": functools.partial(SmallFcLOpt, initial_adafactor_decays=()),
    # ablation: one momentum, one rms and one Adafactor decay instead of three, one and three
    "small_fc_lopt_1m1r": functools.partial(
        SmallFcLOpt, initial_momentum_decays=(0.9,), initial_rms_decays=(0.999,),
        initial_adafactor_decays=(0.999,)),
    "mlp_lopt": MLPLOpt,
    # Celo's architecture (its per-element MLP of hidden_size x hidden_layers, LSTM scheduler of
    # 64); meta-training starts it from the published weights with --init-theta (a file of
    # pretrained.load("celo") written by checkpoint.save_theta)
    "celo": lambda hidden_size=4, hidden_layers=2: Celo(ff_hidden_size=hidden_size, ff_hidden_layers=hidden_layers),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    kind: str
    hidden_size: int
    description: str

    def lopt(self) -> LearnedOptimizer:
        return KINDS[self.kind](hidden_size=self.hidden_size)


CELO = "celo"  # the study's Celo entry: its published theta.state (lopt_ext.pretrained.load("celo"))


STUDY = {v.name: v for v in (
    Variant("small_fc_lopt_h4", "small_fc_lopt", 4,
            "small_fc_lopt (AdafacMLPLOpt), hidden size 4: 3 momenta, 1 rms, 3 Adafactor decays"),
    Variant("small_fc_lopt_h32", "small_fc_lopt", 32, "small_fc_lopt, hidden size 32 (PyLO's size)"),
    Variant("small_fc_lopt_h4_no_adafactor", "small_fc_lopt_no_adafactor", 4,
            "small_fc_lopt H=4 without the row/column (Adafactor) accumulators and features"),
    Variant("small_fc_lopt_h4_1m1r", "small_fc_lopt_1m1r", 4,
            "small_fc_lopt H=4 with 1 momentum, 1 rms and 1 Adafactor decay"),
    Variant("mlp_lopt_h32", "mlp_lopt", 32,
            "MLPLOpt (LOLv2), hidden size 32: 6 momenta, 19 inputs, 2 hidden layers"),
    Variant("celo", CELO, 4,
            "Celo (Moudgil et al.), its published weights: small_fc_lopt's accumulators, 30 inputs, "
            "H=4, scaled by a per-tensor LSTM on the loss and the fraction of training done"),
)}
