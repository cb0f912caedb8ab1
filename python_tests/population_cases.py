"""Cases of test_population.py, run in a subprocess whose jax has 2 CPU devices
(JAX_NUM_CPU_DEVICES=2): populations spread over the devices must compute what one
device's plain jax.vmap computes, and meta-training must compile once per task."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lopt_ext import pretrained
from lopt_ext.metatrain import evaluate as ev
from lopt_ext.metatrain import pes, population
from lopt_ext.tasks import family


def test_two_devices():
    assert len(jax.devices()) == 2


def _short_runs(task, lopt, theta, steps=15):
    """fn(lr_scale, key, params) -> held-out loss after `steps` learned-optimizer steps."""
    def run(scale, key, params):
        tx = lopt.transform(theta)
        state = tx.init(params)

        def body(carry, i):
            p, s = carry
            g = jax.grad(task.loss)(p, task.sample_batch(jax.random.fold_in(key, i)))
            u, s = tx.update(g, s, p)
            u = jax.tree_util.tree_map(lambda x: scale * x, u)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (params, state), jnp.arange(steps))
        return task.eval_loss(p), p

    return run


@pytest.mark.parametrize("members", [5, 6])  # 5: padded to 6 for 2 devices
def test_population_vmap_matches_one_device_vmap(members):
    task = family.get_task("mlp_digits_32_relu_b64_s1")
    lopt, theta = pretrained.load()
    run = _short_runs(task, lopt, theta)
    keys = jax.random.split(jax.random.PRNGKey(3), members)
    params = jax.vmap(task.init)(jax.random.split(jax.random.PRNGKey(4), members))
    scales = jnp.linspace(0.5, 1.5, members)
    want_loss, want_p = jax.jit(jax.vmap(run))(scales, keys, params)
    spread = jax.jit(population.population_vmap(run, in_axes=(0, 0, 0)))
    got_loss, got_p = spread(scales, keys, params)
    assert got_loss.shape == (members,)
    assert len(got_loss.sharding.device_set) == 2  # it did run on both devices
    np.testing.assert_allclose(np.asarray(got_loss), np.asarray(want_loss), rtol=2e-5)
    for a, b in zip(jax.tree_util.tree_leaves(got_p), jax.tree_util.tree_leaves(want_p)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # a shared (unmapped) argument
    shared = jax.jit(population.population_vmap(lambda s, x: s * x, in_axes=(0, None)))
    np.testing.assert_allclose(np.asarray(shared(scales, jnp.float32(2.0))), 2 * np.asarray(scales))


def test_population_vmap_rejects_disagreeing_member_counts():
    f = population.population_vmap(lambda a, b: a + b, in_axes=(0, 0))
    with pytest.raises(ValueError, match="member count"):
        f(jnp.zeros(4), jnp.zeros(6))


def test_run_curves_on_two_devices_match_the_per_member_runs():
    task = family.get_task("logreg_d16_n512_b32_seed0")
    lrs = np.asarray([1e-3, 1e-2, 1e-1], np.float32)
    held, _ = ev.run_curves(task, ev.adam_tx, lrs, seeds=[0], steps=100)  # 3 members, padded
    for i, lr in enumerate(lrs):
        params, key = ev._init_run(task, 0)
        tx = optax.adam(float(lr))
        state = tx.init(params)
        for step in range(100):
            g = jax.grad(task.loss)(params, task.sample_batch(jax.random.fold_in(key, step)))
            u, state = tx.update(g, state, params)
            params = optax.apply_updates(params, u)
        np.testing.assert_allclose(held[i, 0, -1], float(task.eval_loss(params)), rtol=1e-4)


def test_meta_training_compiles_each_task_once_on_two_devices():
    cfg = pes.MetaTrainConfig(num_tasks=2, pairs=2, unroll=5, min_horizon=5, max_horizon=10,
                              task_names=("logreg_d16_n512_b32_seed0", "quadratic_d32_c2_n0.1_seed0"))
    trainer = pes.MetaTrainer(cfg)
    ms = trainer.init()
    for _ in range(6):
        stats = trainer.outer_step(ms).result()
        assert np.isfinite(stats["meta_loss"])
    assert len(ms.theta_flat.sharding.device_set) == 2
    for spec in trainer.specs:
        task = family.make_task(spec)
        fn = pes._slot_step_cached(cfg, task, cfg.impl)
        assert fn._cache_size() == 1, f"{task.name}: the slot step compiled {fn._cache_size()} times"


def test_resume_on_two_devices_is_bit_for_bit(tmp_path):
    import os
    from lopt_ext import checkpoint
    from lopt_ext.metatrain import train
    cfg = pes.MetaTrainConfig(num_tasks=2, pairs=2, unroll=2, min_horizon=3 * 2, max_horizon=3 * 2, sigma=0.05,
                              task_names=("logreg_d16_n512_b32_seed0", "quadratic_d32_c2_n0.1_seed0"),
                              outer_steps=5, warmup_steps=1)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.run(cfg, a, checkpoint_every=5, progress=False, time_inner=False)
    train.run(cfg, b, checkpoint_every=2, stop_at=2, progress=False, time_inner=False)
    train.run(None, b, resume=True, checkpoint_every=5, progress=False, time_inner=False)
    ta = checkpoint.load_theta(os.path.join(a, "theta.safetensors"))[1]
    tb = checkpoint.load_theta(os.path.join(b, "theta.safetensors"))[1]
    for x, y in zip(jax.tree_util.tree_leaves(ta), jax.tree_util.tree_leaves(tb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
