"""Task augmentation for meta-training: the same problem in other coordinates.

``reparameterized(task, seed)`` stores every parameter tensor divided by a fixed factor
s = 10**u, u uniform in [-log10_range, log10_range] (one factor per tensor, drawn from
``seed``), and evaluates the original task at s * q. The losses along any trajectory of the
original parameters are unchanged; what changes is what an optimizer sees: a tensor stored
s times smaller has gradients s times larger. A rule that meta-trains on such copies cannot
rely on the scale a tensor happens to be initialised at (the augmentation Metz et al. call
parameter reparameterisation). Adam, whose step in q does not depend on the gradient's
scale, moves p by s times its learning rate, so its tuned learning rate changes with s.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from lopt_ext.tasks.base import Task


def reparameterization_scales(task: Task, seed: int, log10_range: float = 1.0):
    """The per-tensor factors s (a pytree of Python floats shaped like the parameters)."""
    if not log10_range >= 0:
        raise ValueError(f"log10_range must be >= 0, got {log10_range!r}")
    shapes = jax.eval_shape(task.init, jax.random.PRNGKey(0))
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    u = np.random.RandomState(seed).uniform(-log10_range, log10_range, size=len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [float(10.0 ** x) for x in u])


def reparameterized(task: Task, seed: int, log10_range: float = 1.0) -> Task:
    """``task`` with parameters stored as p / s (see the module docstring); named
    ``{task.name}@reparam{seed}`` so that caches keyed by name keep the copies apart."""
    scales = reparameterization_scales(task, seed, log10_range)

    def to_p(q):
        return jax.tree_util.tree_map(lambda x, s: x * s, q, scales)

    def init(key):
        return jax.tree_util.tree_map(lambda x, s: x / s, task.init(key), scales)

    return dataclasses.replace(
        task, name=f"{task.name}@reparam{seed}", init=init,
        loss=lambda q, batch: task.loss(to_p(q), batch),
        train_loss=lambda q: task.train_loss(to_p(q)),
        eval_loss=lambda q: task.eval_loss(to_p(q)))
