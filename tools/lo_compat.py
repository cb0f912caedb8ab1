"""Lets the 2022 learned_optimization wheel (and Celo's code on top of it) import under today's
jax, for the trajectory recorders (tools/lo_mlp_lopt_trajectories.py, tools/celo_trajectories.py).

Importing this module: TensorFlow, which learned_optimization's summary module imports only to
write TensorBoard summaries (never written here), becomes an empty module, as does flax's
TensorBoard writer and tensorflow_datasets (imported, unused here); jax's old top-level tree
functions (removed since) point at jax.tree_util and jax.lib.xla_client gets the one name its
annotations use.
"""
import sys
import types

try:  # flax.io asks importlib whether TensorFlow exists, which an empty module cannot answer
    import flax.io  # noqa: F401
except ImportError:
    pass

for _name in ("tensorflow", "tensorflow.compat", "tensorflow.compat.v2", "tensorflow_datasets",
              "flax.metrics.tensorboard"):
    sys.modules.setdefault(_name, types.ModuleType(_name))
sys.modules["tensorflow.compat.v2"].enable_v2_behavior = lambda: None
sys.modules["flax.metrics.tensorboard"].SummaryWriter = object

import jax  # noqa: E402

for _name, _fn in (("tree_map", jax.tree_util.tree_map), ("tree_multimap", jax.tree_util.tree_map),
                   ("tree_leaves", jax.tree_util.tree_leaves), ("tree_flatten", jax.tree_util.tree_flatten),
                   ("tree_unflatten", jax.tree_util.tree_unflatten),
                   ("tree_structure", jax.tree_util.tree_structure)):
    setattr(jax, _name, _fn)
if not hasattr(jax.lib, "xla_client"):  # only named in type annotations (gradient_learner.py)
    jax.lib.xla_client = types.SimpleNamespace(Device=object)
if not hasattr(jax, "ShapedArray"):  # moved under jax.core
    jax.ShapedArray = jax.core.ShapedArray
