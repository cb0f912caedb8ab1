"""Lets the 2022 learned_optimization wheel (and Celo's code on top of it) import under today's
jax, for the trajectory recorders (tools/lo_mlp_lopt_trajectories.py, tools/celo_trajectories.py).

Importing this module: TensorFlow, which learned_optimization's summary module imports only to
write TensorBoard summaries (never written here), becomes an empty module, as does flax's
TensorBoard writer; jax's old top-level tree functions (removed since) point at jax.tree_util.
"""
import sys
import types

for _name in ("tensorflow", "tensorflow.compat", "tensorflow.compat.v2", "flax.metrics.tensorboard"):
    sys.modules.setdefault(_name, types.ModuleType(_name))
sys.modules["tensorflow.compat.v2"].enable_v2_behavior = lambda: None
sys.modules["flax.metrics.tensorboard"].SummaryWriter = object

import jax  # noqa: E402

for _name, _fn in (("tree_map", jax.tree_util.tree_map), ("tree_multimap", jax.tree_util.tree_map),
                   ("tree_leaves", jax.tree_util.tree_leaves), ("tree_flatten", jax.tree_util.tree_flatten),
                   ("tree_unflatten", jax.tree_util.tree_unflatten),
                   ("tree_structure", jax.tree_util.tree_structure)):
    setattr(jax, _name, _fn)
