"""Meta-training of small_fc_lopt with PES (or truncated ES) on the offline task family."""
from lopt_ext.metatrain.pes import MetaState, MetaTrainConfig, MetaTrainer, make_outer_optimizer

__all__ = ["MetaState", "MetaTrainConfig", "MetaTrainer", "make_outer_optimizer"]
