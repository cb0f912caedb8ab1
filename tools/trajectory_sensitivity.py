"""Are fused and reference runs of a task apart because of a bug, or because the training
trajectory is chaotic? Runs the reference, the fused kernel, and the reference from params
perturbed by 1e-7 (relative), all on the same batches, and prints how far apart they are.

    python tools/trajectory_sensitivity.py [task] [steps]
"""
import sys

import jax
import jax.numpy as jnp
import optax

from lopt_ext import pretrained
from lopt_ext.tasks import family


def run(lopt, theta, task, impl, params, key, steps, marks):
    tx = lopt.transform(theta, impl=impl)
    state = tx.init(params)

    @jax.jit
    def step(params, state, i):
        grads = jax.grad(task.loss)(params, task.sample_batch(jax.random.fold_in(key, i)))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    out = {}
    for i in range(steps):
        params, state = step(params, state, jnp.int32(i))
        if i + 1 in marks:
            out[i + 1] = (params, float(task.train_loss(params)))
    return out


def rel_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "mlp_digits_48_relu_b64_s1"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    marks = sorted({m for m in (10, 50, 100, 200, 400, 700, steps) if m <= steps})
    task = family.get_task(name)
    lopt, theta = pretrained.load("small_fc_lopt_h4")
    key = jax.random.PRNGKey(0)
    p0 = task.init(key)
    noise = jax.tree.map(lambda x: 1 + 1e-7 * jax.random.normal(jax.random.PRNGKey(5), x.shape), p0)
    ref = run(lopt, theta, task, "reference", p0, key, steps, marks)
    fused = run(lopt, theta, task, "fused", p0, key, steps, marks)
    perturbed = run(lopt, theta, task, "reference", jax.tree.map(jnp.multiply, p0, noise), key, steps, marks)
    print(f"{'step':>5} {'|fused-ref|':>12} {'|ref(p*(1+1e-7))-ref|':>22}   train loss fused / ref / perturbed ref")
    for m in marks:
        print(f"{m:>5} {rel_diff(fused[m][0], ref[m][0]):>12.2e} {rel_diff(perturbed[m][0], ref[m][0]):>22.2e}"
              f"   {fused[m][1]:.4f} / {ref[m][1]:.4f} / {perturbed[m][1]:.4f}")


if __name__ == "__main__":
    main()
