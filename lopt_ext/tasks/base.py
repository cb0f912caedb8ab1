"""The task interface used by meta-training, evaluation and the demo."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

Params = Any
Batch = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A small training problem; every function is pure and jittable.

    init(key) -> params
    loss(params, batch) -> scalar training loss on a batch
    sample_batch(key) -> batch     (the batch stream: batch i uses fold_in(key, i))
    train_loss(params) -> scalar   loss on a fixed large slice of the training data
    eval_loss(params) -> scalar    held-out loss (test data never used for training)
    sample_valid_batch(key) -> batch   a batch of validation data (never trained on, and not
      the test data of eval_loss): what meta-training may score an optimizer on; tasks without
      a validation split use a fresh training batch (one not used for the gradient)
    loss_scale: typical loss at initialisation; meta-training divides by it so that tasks
      with different loss ranges weigh the same ("normalised per task").
    """

    name: str
    spec: Any
    init: Callable[[jax.Array], Params]
    loss: Callable[[Params, Batch], jax.Array]
    sample_batch: Callable[[jax.Array], Batch]
    train_loss: Callable[[Params], jax.Array]
    eval_loss: Callable[[Params], jax.Array]
    loss_scale: float = 1.0
    sample_valid_batch: Callable[[jax.Array], Batch] | None = None

    def valid_batch(self, key: jax.Array) -> Batch:
        sampler = self.sample_valid_batch or self.sample_batch
        return sampler(jax.random.fold_in(key, 0x5EED))

    def batches(self, key: jax.Array, num: int):
        """A Python iterator over ``num`` batches (the same stream scan-based code draws)."""
        for i in range(num):
            yield self.sample_batch(jax.random.fold_in(key, i))

    def num_params(self) -> int:
        shapes = jax.eval_shape(self.init, jax.random.PRNGKey(0))
        return int(sum(_prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)))

    def __repr__(self):
        return f"Task({self.name})"


def _prod(shape):
    out = 1
    for d in shape:
        out *= int(d)
    return out


def softmax_xent(logits, labels):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))
