"""PES meta-training: estimator vs a hand-written per-member loop, failure handling,
bit-for-bit resume, evaluation helpers, pretrained weights."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lopt_ext import checkpoint
from lopt_ext.metatrain import MetaTrainConfig, MetaTrainer, train
from lopt_ext.metatrain import evaluate as ev

TASK = "logreg_d16_n512_b32_seed0"   # cheapest to compile
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**kw):
    base = dict(num_tasks=1, pairs=2, unroll=2, min_horizon=4, max_horizon=4, sigma=0.05,
                task_names=(TASK,), outer_steps=4, warmup_steps=1)
    base.update(kw)
    return MetaTrainConfig(**base)


def _member(tree, m):
    return jax.tree_util.tree_map(lambda x: x[m], tree)


def _manual_unroll(trainer, task, theta_flat, params, state, data_key, start, num_steps=None, loss_factor=1.0,
                   valid_factor=1.0):
    """One member, plain Python loop over steps, reference implementation. A rule that reads
    the loss is passed each step's minibatch loss, times ``loss_factor`` after the first step
    (and one that reads a validation loss too, that of the step's validation batch, times
    ``valid_factor`` after the first step)."""
    tx = trainer.lopt.transform(trainer.unravel(theta_flat), impl="reference", num_steps=num_steps)
    losses = []
    for i in range(trainer.cfg.unroll):
        key = jax.random.fold_in(data_key, start + i)
        loss, g = jax.value_and_grad(task.loss)(params, task.sample_batch(key))
        if trainer.lopt.uses_validation_loss:
            valid = task.loss(params, task.valid_batch(key)) * (valid_factor if i else 1.0)
            u, state = tx.update(g, state, params, value=loss * (loss_factor if i else 1.0), validation_value=valid)
        elif trainer.lopt.uses_loss:
            u, state = tx.update(g, state, params, value=loss * (loss_factor if i else 1.0))
        else:
            u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        if trainer.cfg.objective == "valid_log":  # a validation batch, after the step
            loss = task.loss(params, task.valid_batch(key))
        losses.append(float(loss))
    norm = np.minimum(np.asarray(losses) / task.loss_scale, trainer.cfg.loss_clip)
    if trainer.cfg.objective in ("log", "valid_log"):
        norm = np.log(np.maximum(norm, 1e-6))
    return params, float(norm.mean())


@pytest.mark.parametrize("impl,objective", [("fused", "normalized"), ("fused", "valid_log"),
                                            pytest.param("reference", "normalized", marks=pytest.mark.slow)])
def test_pes_step_matches_hand_written_estimator(impl, objective):
    cfg = _cfg(impl=impl, objective=objective)
    tr = MetaTrainer(cfg)
    ms = tr.init()
    slot = ms.slots[0]
    task = tr.slot_task(slot)
    P, D = cfg.pairs, tr.dim
    fn = tr._slot_step_fn(task, impl)
    accum = slot.accum
    params, state = slot.params, slot.opt_state
    total_eps = np.zeros((P, D))
    for call, key in enumerate([jax.random.PRNGKey(7), jax.random.PRNGKey(8)]):
        start = call * cfg.unroll
        out = fn(ms.theta_flat, params, state, accum, slot.data_keys, jnp.int32(start), key)
        eps = cfg.sigma * np.asarray(jax.random.normal(jax.random.split(key)[0], (P, D), jnp.float32))
        total_eps += eps
        losses, new_params = [], []
        for m in range(2 * P):
            sign = 1.0 if m < P else -1.0
            theta_m = ms.theta_flat + sign * jnp.asarray(eps[m % P])
            p, l = _manual_unroll(tr, task, theta_m, _member(params, m), _member(state, m),
                                  slot.data_keys[m % P], start)
            losses.append(l)
            new_params.append(p)
        losses = np.asarray(losses)
        # PES: the direction is the accumulated perturbation of the trajectory so far
        expected = np.einsum("p,pd->d", losses[:P] - losses[P:], total_eps) / (2 * cfg.sigma ** 2 * P)
        params, state, accum, _, grad, stats = out
        np.testing.assert_allclose(np.asarray(accum), total_eps, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(float(stats["meta_loss"]), losses.mean(), rtol=1e-5)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(np.asarray(grad), expected, rtol=2e-2, atol=2e-2 * scale)
        for m in range(2 * P):
            for a, b in zip(jax.tree_util.tree_leaves(_member(params, m)), jax.tree_util.tree_leaves(new_params[m])):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
        assert int(stats["failed"]) == 0


def test_es_estimator_uses_only_this_truncation():
    cfg = _cfg(estimator="es")
    tr = MetaTrainer(cfg)
    ms = tr.init()
    s = ms.slots[0]
    fn = tr._slot_step_fn(tr.slot_task(s), "fused")
    params, state, accum, *_ = fn(ms.theta_flat, s.params, s.opt_state, s.accum, s.data_keys, jnp.int32(0),
                                  jax.random.PRNGKey(1))
    np.testing.assert_array_equal(np.asarray(accum), 0.0)
    for x in jax.tree_util.tree_leaves(params):  # both members continue from the positive one
        np.testing.assert_array_equal(np.asarray(x[: cfg.pairs]), np.asarray(x[cfg.pairs:]))


def test_divergent_member_is_clipped_counted_and_reset():
    cfg = _cfg()
    tr = MetaTrainer(cfg)
    ms = tr.init()
    s = ms.slots[0]
    fn = tr._slot_step_fn(tr.slot_task(s), "fused")
    # pair 0's positive member starts from NaN parameters
    bad = jax.tree_util.tree_map(lambda x: x.at[0].set(jnp.nan), s.params)
    accum = jnp.ones_like(s.accum)
    params, state, accum, keys, grad, stats = fn(ms.theta_flat, bad, s.opt_state, accum, s.data_keys,
                                                 jnp.int32(0), jax.random.PRNGKey(2))
    assert int(stats["failed"]) == 1
    assert np.all(np.isfinite(np.asarray(grad)))
    assert float(stats["meta_loss"]) <= cfg.loss_clip
    P = cfg.pairs
    for x in jax.tree_util.tree_leaves(params):
        assert np.all(np.isfinite(np.asarray(x)))
        np.testing.assert_array_equal(np.asarray(x[0]), np.asarray(x[P]))  # the pair restarted together
    np.testing.assert_array_equal(np.asarray(accum[0]), 0.0)
    assert np.all(np.asarray(accum[1]) != 0.0)
    assert int(state.iteration[0]) == 0 and int(state.iteration[1]) == cfg.unroll
    # the outer update stays finite
    theta = tr._outer_update(ms.theta_flat, ms.outer_opt_state, (grad,), (stats["meta_loss"],), (stats["failed"],))[0]
    assert np.all(np.isfinite(np.asarray(theta)))


def _log_without_time(path):
    with open(path) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    for r in rows:
        r.pop("wall_time_s")
    return rows


def test_resume_is_bit_for_bit(tmp_path):
    cfg = _cfg(num_tasks=2, task_names=(TASK, "quadratic_d32_c2_n0.1_seed0"), min_horizon=3, max_horizon=6)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.run(cfg, a, checkpoint_every=2, progress=False, time_inner=False)
    train.run(cfg, b, checkpoint_every=3, stop_at=3, progress=False, time_inner=False)
    assert open(os.path.join(b, "latest")).read() == "step_000003"
    train.run(None, b, resume=True, checkpoint_every=2, progress=False, time_inner=False)
    ta = checkpoint.load_theta(os.path.join(a, "theta.safetensors"))[1]
    tb = checkpoint.load_theta(os.path.join(b, "theta.safetensors"))[1]
    for x, y in zip(jax.tree_util.tree_leaves(ta), jax.tree_util.tree_leaves(tb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    sa, _ = checkpoint.read_safetensors(os.path.join(a, "step_000004", "state.safetensors"))
    sb, _ = checkpoint.read_safetensors(os.path.join(b, "step_000004", "state.safetensors"))
    assert sorted(sa) == sorted(sb)
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    assert _log_without_time(os.path.join(a, "log.jsonl")) == _log_without_time(os.path.join(b, "log.jsonl"))
    # checkpoint layout: complete directories only, the newest recorded in `latest`
    names = sorted(os.listdir(a))
    assert not [n for n in names if n.startswith(".tmp")]
    assert {"latest", "log.jsonl", "theta.safetensors", "provenance.json"} <= set(names)
    meta = json.load(open(os.path.join(a, "step_000004", "meta.json")))
    assert meta["step"] == 4 and meta["config"]["task_names"] == list(cfg.task_names)
    lopt, _ = checkpoint.load_theta(os.path.join(a, "step_000004", "theta.safetensors"))
    assert lopt.hidden_size == cfg.hidden_size


def test_compact_checkpoint_continues_theta_outer_state_and_budget(tmp_path):
    cfg = _cfg(outer_steps=3, lopt_kind="scaled", objective="valid_log")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    first = train.run(cfg, a, progress=False, time_inner=False)
    compact = os.path.join(a, "resume.safetensors")
    assert os.path.getsize(compact) < 64 * 1024  # theta + Adam moments, no task states
    trainer, ms, meta = train.load_compact(compact)
    assert ms.step == 3 and trainer.cfg == cfg and type(trainer.lopt).__name__ == "ScaledSmallFcLOpt"
    theta_a = checkpoint.load_theta(os.path.join(a, "theta.safetensors"))[1]
    from jax.flatten_util import ravel_pytree
    np.testing.assert_array_equal(np.asarray(ms.theta_flat), np.asarray(ravel_pytree(theta_a)[0]))
    state_a, _ = checkpoint.read_safetensors(os.path.join(a, "step_000003", "state.safetensors"))
    outer = [np.asarray(x) for x in jax.tree_util.tree_leaves(ms.outer_opt_state)]
    for i, x in enumerate(outer):
        np.testing.assert_array_equal(x, state_a[f"outer/{i:05d}"])
    # continuing: the schedule goes on from step 3 and the budget adds up
    second = train.run(dataclasses.replace(cfg, outer_steps=5), b, progress=False, time_inner=False,
                       continue_from=compact)
    assert second["outer_steps"] == 5 and [json.loads(l)["step"] for l in open(os.path.join(b, "log.jsonl"))] == [4, 5]
    assert len(second["budget"]["runs"]) == 2
    assert second["budget"]["wall_s"] == pytest.approx(first["budget"]["wall_s"] + second["wall_time_s"])
    with pytest.raises(checkpoint.CheckpointMismatchError, match="pairs"):
        train.load_compact(compact, dataclasses.replace(cfg, pairs=3))
    with pytest.raises(checkpoint.CheckpointMismatchError, match="compact"):
        train.load_compact(os.path.join(a, "theta.safetensors"))


def test_pes_meta_trains_the_progress_variant(tmp_path):
    """scaled_progress carries per-tensor first-step statistics in its state (scale_ref) through
    the PES population and its theta (with the learned decay's entries) through the checkpoints."""
    cfg = _cfg(outer_steps=2, lopt_kind="scaled_progress", objective="valid_log")
    out = str(tmp_path / "p")
    result = train.run(cfg, out, progress=False, time_inner=False)
    assert result["outer_steps"] == 2
    lopt, theta = checkpoint.load_theta(os.path.join(out, "theta.safetensors"))
    assert lopt.progress_inputs and theta["tensor_scale"]["decay_w"].shape == (2,)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(theta))
    trainer, ms, _ = train.load_compact(os.path.join(out, "resume.safetensors"))
    assert trainer.lopt.progress_inputs and ms.step == 2


def test_pes_tells_a_horizon_aware_rule_its_trajectory_length(tmp_path):
    """scaled_horizon: each slot's state holds its drawn horizon, and the
    population step equals a hand-written loop told that horizon, not another one."""
    from lopt_ext.scaled import with_horizon_inputs
    from lopt_ext import ScaledSmallFcLOpt
    from jax.flatten_util import ravel_pytree
    base = ScaledSmallFcLOpt(hidden_size=4)
    lopt, theta = with_horizon_inputs(base, base.init_theta(jax.random.PRNGKey(3)))
    ts = theta["tensor_scale"]
    theta = dict(theta, tensor_scale=dict(ts, w_lin=ts["w_lin"].at[-6:].set(jnp.asarray([1.0, -1.5, 2.0, 1.0, -1.0, 3.0]))))
    path = str(tmp_path / "h.safetensors")
    checkpoint.save_theta(path, theta, lopt)
    cfg = _cfg(lopt_kind="scaled_horizon", init_theta=path, min_horizon=6, max_horizon=10, sigma=1e-9)
    tr = MetaTrainer(cfg)
    ms = tr.init()
    np.testing.assert_array_equal(np.asarray(ms.theta_flat), np.asarray(ravel_pytree(theta)[0]))
    slot = ms.slots[0]
    assert np.all(np.asarray(slot.opt_state.num_steps) == slot.horizon)
    task = tr.slot_task(slot)
    out = tr._slot_step_fn(task, "fused")(ms.theta_flat, slot.params, slot.opt_state, slot.accum, slot.data_keys,
                                          jnp.int32(0), jax.random.PRNGKey(7))
    assert np.all(np.asarray(out[1].num_steps) == slot.horizon)
    for horizon, same in ((slot.horizon, True), (10 * slot.horizon, False)):
        state = _member(slot.opt_state, 0)._replace(num_steps=jnp.int32(horizon))  # the step reads the state's
        p, _ = _manual_unroll(tr, task, ms.theta_flat, _member(slot.params, 0), state, slot.data_keys[0], 0,
                              num_steps=horizon)
        close = all(np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6) for a, b in
                    zip(jax.tree_util.tree_leaves(_member(out[0], 0)), jax.tree_util.tree_leaves(p)))
        assert close == same, horizon


def test_config_validation():
    with pytest.raises(ValueError, match="estimator"):
        MetaTrainConfig(estimator="sgd")
    with pytest.raises(ValueError, match="unroll"):
        MetaTrainConfig(unroll=50, min_horizon=20)
    with pytest.raises(ValueError, match="objective"):
        MetaTrainConfig(objective="mse")


def test_init_theta_starts_from_a_file(tmp_path):
    from lopt_ext import SmallFcLOpt
    from jax.flatten_util import ravel_pytree
    lopt = SmallFcLOpt()
    theta = lopt.init_theta(jax.random.PRNGKey(42))
    path = str(tmp_path / "t.safetensors")
    checkpoint.save_theta(path, theta, lopt)
    tr = MetaTrainer(_cfg(init_theta=path))
    np.testing.assert_array_equal(np.asarray(tr.init().theta_flat), np.asarray(ravel_pytree(theta)[0]))


def test_init_theta_of_the_scaled_rule_starts_its_progress_and_horizon_variants(tmp_path):
    """meta-train --lopt-kind scaled_progress (scaled_horizon) --init-theta <a ScaledSmallFcLOpt
    file>: the same rule with the progress weights at 0 and the decay off (the horizon weights at 0)."""
    from lopt_ext import ScaledSmallFcLOpt
    from lopt_ext.scaled import with_progress_inputs
    from jax.flatten_util import ravel_pytree
    lopt = ScaledSmallFcLOpt(hidden_size=4)
    theta = lopt.init_theta(jax.random.PRNGKey(43))
    path = str(tmp_path / "s.safetensors")
    checkpoint.save_theta(path, theta, lopt)
    tr = MetaTrainer(_cfg(init_theta=path, lopt_kind="scaled_progress"))
    want = with_progress_inputs(lopt, theta)[1]
    np.testing.assert_array_equal(np.asarray(tr.init().theta_flat), np.asarray(ravel_pytree(want)[0]))
    from lopt_ext.scaled import with_horizon_inputs
    tr = MetaTrainer(_cfg(init_theta=path, lopt_kind="scaled_horizon"))
    want = with_horizon_inputs(lopt, theta)[1]
    np.testing.assert_array_equal(np.asarray(tr.init().theta_flat), np.asarray(ravel_pytree(want)[0]))


def test_adam_curves_match_numpy_adam():
    from lopt_ext import tasks
    task = tasks.get_task("quadratic_d32_c2_n0.1_seed100")  # held-out loss = the clean loss
    lr, steps, every = 0.05, 20, 10
    curves, _ = ev.run_curves(task, ev.adam_tx, [lr], [0], steps, every, train_every=20)
    params, key = ev._init_run(task, 0)
    x = np.asarray(params["x"], np.float64)
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    expected = [float(task.train_loss(params))]
    for i in range(steps):
        g = np.asarray(jax.grad(task.loss)({"x": jnp.asarray(x, jnp.float32)},
                                        task.sample_batch(jax.random.fold_in(key, i)))["x"], np.float64)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        x = x - lr * (m / (1 - 0.9 ** (i + 1))) / (np.sqrt(v / (1 - 0.999 ** (i + 1))) + 1e-8)
        if (i + 1) % every == 0:
            expected.append(float(task.train_loss({"x": jnp.asarray(x, jnp.float32)})))
    np.testing.assert_allclose(curves[0, 0], expected, rtol=1e-3)


def test_plot_metaloss(tmp_path):
    from lopt_ext.metatrain import demo
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i + 1, "meta_loss": 1.0 / (i + 1)}) + "\n" for i in range(30)))
    out = demo.plot_metaloss(str(log), str(tmp_path / "m.png"), window=10)
    assert os.path.getsize(tmp_path / "m.png") > 1000
    assert out["steps"] == 30 and out["first_avg"] > out["last_avg"]


def test_pretrained_ships_and_loads_offline():
    from lopt_ext import pretrained
    lopt, theta = pretrained.load("small_fc_lopt_h4")
    assert lopt.hidden_size == 4
    info = pretrained.info("small_fc_lopt_h4")
    for k in ("command", "config", "outer_steps", "wall_time_s", "final_meta_loss_avg50"):
        assert k in info, k
    tx = lopt.transform(theta)
    params = {"w": jnp.ones((4, 3))}
    u, _ = tx.update({"w": jnp.full((4, 3), 0.5)}, tx.init(params), params)
    assert np.all(np.isfinite(np.asarray(u["w"])))
    with pytest.raises(KeyError, match="import_pylo"):
        pretrained.load("small_fc_lopt")


def test_horizon_entry_needs_num_steps_and_continues_as_scaled_horizon():
    """The shipped horizon-aware entry: its transform requires num_steps, its recorded evaluation
    is the committed one of a run that was told its horizon, and its resume checkpoint
    continues it as meta-train's scaled_horizon."""
    from importlib import resources
    from lopt_ext import pretrained
    name = "scaled_small_fc_lopt_h4_horizon"
    lopt, theta = pretrained.load(name)
    assert lopt.horizon_inputs and not lopt.progress_inputs
    with pytest.raises(ValueError, match="num_steps"):
        lopt.transform(theta)
    params = {"w": jnp.ones((4, 3))}
    tx = lopt.transform(theta, num_steps=100)
    u, st = tx.update({"w": jnp.full((4, 3), 0.5)}, tx.init(params), params)
    assert int(st.num_steps) == 100 and np.all(np.isfinite(np.asarray(u["w"])))
    info = pretrained.info(name)
    doc = json.load(open(os.path.join(os.path.dirname(__file__), "..", info["evaluation"]["file"])))
    assert doc["summary"] == info["evaluation"]["summary"] and doc["lopt"]["horizon_inputs"]
    with resources.as_file(resources.files("lopt_ext.pretrained").joinpath(info["resume_checkpoint"])) as path:
        cfg = train.compact_config(str(path))
        assert cfg.lopt_kind == "scaled_horizon" and cfg.lopt() == lopt
        flat, _ = train._read_compact(str(path))
    from jax.flatten_util import ravel_pytree
    np.testing.assert_array_equal(flat["theta/flat"], np.asarray(ravel_pytree(theta)[0]))


def test_default_pretrained_has_provenance_evaluation_and_resume_checkpoint():
    from importlib import resources
    from lopt_ext import ScaledSmallFcLOpt, pretrained
    name = pretrained.default_name()
    assert name in pretrained.list_pretrained()
    lopt, theta = pretrained.load()
    assert isinstance(lopt, ScaledSmallFcLOpt) and lopt == pretrained.load(name)[0]
    info = pretrained.info()
    assert info["budget"]["cpu_hours"] > 0 and info["command"]
    # the evaluation summary recorded with the entry is the committed evaluation of this theta
    doc = json.load(open(os.path.join(os.path.dirname(__file__), "..", info["evaluation"]["file"])))
    assert doc["optimizer"] == f"pretrained:{name}" and doc["summary"] == info["evaluation"]["summary"]
    with resources.as_file(resources.files("lopt_ext.pretrained").joinpath(info["resume_checkpoint"])) as path:
        flat, meta = train._read_compact(str(path))
        assert train.compact_config(str(path)).lopt() == lopt
    from jax.flatten_util import ravel_pytree
    np.testing.assert_array_equal(flat["theta/flat"], np.asarray(ravel_pytree(theta)[0]))
    assert meta["budget"] == info["budget"]


@pytest.mark.slow
def test_cli_meta_train_resume_and_plot(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = str(tmp_path / "run")
    args = [sys.executable, "-m", "lopt_ext", "meta-train", "--out", out, "--outer-steps", "3", "--num-tasks", "1",
            "--pairs", "1", "--unroll", "2", "--min-horizon", "2", "--max-horizon", "4", "--task-names", TASK,
            "--checkpoint-every", "1", "--time-budget", "0", "--no-progress", "--no-time-inner"]
    subprocess.run(args, check=True, env=env, cwd=ROOT)
    assert open(os.path.join(out, "latest")).read() == "step_000001"
    subprocess.run([sys.executable, "-m", "lopt_ext", "meta-train", "--out", out, "--resume", "--no-progress",
                    "--no-time-inner"], check=True, env=env, cwd=ROOT)
    assert json.load(open(os.path.join(out, "provenance.json")))["outer_steps"] == 3
    subprocess.run([sys.executable, "-m", "lopt_ext", "plot", out, "--png", str(tmp_path / "p.png")],
                   check=True, env=env, cwd=ROOT)
    assert os.path.exists(tmp_path / "p.png")


def test_map_count_warning(tmp_path):
    """Below the mapping limit a long run needs, meta-train says so in one line with the remedy."""
    from lopt_ext.metatrain import train
    low, high = tmp_path / "low", tmp_path / "high"
    low.write_text("65530\n")
    high.write_text(f"{train.MAP_COUNT_WANTED}\n")
    msg = train.map_count_warning(str(low))
    assert msg is not None and "65530" in msg and "sysctl -w vm.max_map_count=" in msg and "\n" not in msg
    assert train.map_count_warning(str(high)) is None
    assert train.map_count_warning(str(tmp_path / "missing")) is None


def test_compiled_step_caches_hold_what_fits_under_the_mapping_limit(tmp_path):
    """(limit - 16384 reserved) // 1100 mappings per task, by hand; at least 8; 256 without a
    readable limit; the PES caches are sized so."""
    from lopt_ext.metatrain import compiled, pes, train
    low, tiny = tmp_path / "low", tmp_path / "tiny"
    low.write_text("65530\n")
    tiny.write_text("20000\n")
    assert compiled.tasks_that_fit(str(low)) == 44
    assert compiled.tasks_that_fit(str(tmp_path / "high")) == 256
    assert compiled.tasks_that_fit(str(tiny)) == 8
    assert "only 44 tasks fit" in train.map_count_warning(str(low))
    for cache in (pes._slot_step_cached, pes._init_pairs_cached):
        assert cache.cache_info().maxsize == compiled.tasks_that_fit()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_meta_train_exactly_as_one(tmp_path):
    """meta-train --num-processes 2 (two local processes, jax.distributed over gloo): the
    slots are split between them and the outer updates are the one-process run's, bit for bit
    (the same seeds, one CPU device per process and in the single run)."""
    tasks = [TASK, "logreg_d16_n512_b32_seed1", "quadratic_d32_c2_n0.1_seed0"]  # 3 slots: 2 + 1
    common = [sys.executable, "-m", "lopt_ext", "meta-train", "--num-tasks", "3", "--pairs", "2", "--unroll", "2",
              "--min-horizon", "4", "--max-horizon", "6", "--outer-steps", "5", "--warmup-steps", "1",
              "--task-names", *tasks, "--cpu-devices", "1", "--no-progress", "--no-time-inner"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    one = str(tmp_path / "one")
    subprocess.run(common + ["--out", one], check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    two = str(tmp_path / "two")
    port = _free_port()
    procs = [subprocess.Popen(common + ["--out", two, "--num-processes", "2", "--process-id", str(i),
                                        "--coordinator", f"localhost:{port}"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
    _, theta_one = checkpoint.load_theta(os.path.join(one, "theta.safetensors"))
    _, theta_two = checkpoint.load_theta(os.path.join(two, "theta.safetensors"))
    for a, b in zip(jax.tree_util.tree_leaves(theta_one), jax.tree_util.tree_leaves(theta_two)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    read = lambda d: [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
    log_one, log_two = read(one), read(two)
    assert [r["meta_loss"] for r in log_one] == [r["meta_loss"] for r in log_two] and len(log_one) == 5
    assert [r["tasks"] for r in log_one] == [r["tasks"] for r in log_two]
    assert not any(n.startswith("step_") for n in os.listdir(two))  # compact checkpoints only
    trainer, ms, _ = train.load_compact(os.path.join(two, "resume.safetensors"))
    assert ms.step == 5


def test_pes_feeds_a_loss_reading_rule_its_minibatch_loss(tmp_path):
    """scaled_horizon_loss: started from a horizon rule's file (the loss weights at 0), the
    population step equals a hand-written loop that passes each step's minibatch loss as value,
    and not one that passes another loss."""
    from lopt_ext.scaled import with_horizon_inputs, with_loss_inputs
    from lopt_ext import ScaledSmallFcLOpt
    from jax.flatten_util import ravel_pytree
    base = ScaledSmallFcLOpt(hidden_size=4)
    stored, theta = with_horizon_inputs(base, base.init_theta(jax.random.PRNGKey(5)))
    path = str(tmp_path / "h.safetensors")
    checkpoint.save_theta(path, theta, stored)
    tr = MetaTrainer(_cfg(lopt_kind="scaled_horizon_loss", init_theta=path, min_horizon=6, max_horizon=6,
                          sigma=1e-9, unroll=3))
    lopt, started = with_loss_inputs(stored, theta)
    assert tr.lopt == lopt
    ms = tr.init()
    np.testing.assert_array_equal(np.asarray(ms.theta_flat), np.asarray(ravel_pytree(started)[0]))
    ts = started["tensor_scale"]
    theta_flat = ravel_pytree(dict(started, tensor_scale=dict(ts, w_lin=ts["w_lin"].at[-3:].set(
        jnp.asarray([2.0, -3.0, 2.5])))))[0]
    slot = ms.slots[0]
    task = tr.slot_task(slot)
    out = tr._slot_step_fn(task, "fused")(theta_flat, slot.params, slot.opt_state, slot.accum, slot.data_keys,
                                          jnp.int32(0), jax.random.PRNGKey(7))
    _assert_fed_the_minibatch_loss(tr, theta_flat, slot, out)


def test_pes_feeds_a_gap_reading_rule_its_minibatch_and_validation_losses(tmp_path):
    """scaled_horizon_loss_gap: started from a loss rule's file (the gap weights at 0), the
    population step equals a hand loop that passes the minibatch loss as value and the step's
    validation-batch loss as validation_value, and not one that passes a tenth of the latter."""
    from lopt_ext.scaled import NUM_GAP_INPUTS, with_horizon_inputs, with_loss_inputs
    from lopt_ext import ScaledSmallFcLOpt
    from jax.flatten_util import ravel_pytree
    base = ScaledSmallFcLOpt(hidden_size=4)
    stored, theta = with_loss_inputs(*with_horizon_inputs(base, base.init_theta(jax.random.PRNGKey(5))))
    path = str(tmp_path / "l.safetensors")
    checkpoint.save_theta(path, theta, stored)
    tr = MetaTrainer(_cfg(lopt_kind="scaled_horizon_loss_gap", init_theta=path, min_horizon=6, max_horizon=6,
                          sigma=1e-9, unroll=3))
    lopt, started = with_loss_inputs(stored, theta, "train+validation")
    assert tr.lopt == lopt and lopt.uses_validation_loss
    ms = tr.init()
    np.testing.assert_array_equal(np.asarray(ms.theta_flat), np.asarray(ravel_pytree(started)[0]))
    ts = started["tensor_scale"]
    theta_flat = ravel_pytree(dict(started, tensor_scale=dict(ts, w_lin=ts["w_lin"].at[-NUM_GAP_INPUTS:].set(
        jnp.asarray([3.0, -2.5])))))[0]
    slot = ms.slots[0]
    task = tr.slot_task(slot)
    out = tr._slot_step_fn(task, "fused")(theta_flat, slot.params, slot.opt_state, slot.accum, slot.data_keys,
                                          jnp.int32(0), jax.random.PRNGKey(7))
    moved = lambda p: [np.asarray(a) - np.asarray(b) for a, b in  # noqa: E731
                       zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(_member(slot.params, 0)))]
    for factor, same in ((1.0, True), (0.1, False)):
        params, _ = _manual_unroll(tr, task, theta_flat, _member(slot.params, 0), _member(slot.opt_state, 0),
                                   slot.data_keys[0], 0, num_steps=slot.horizon, valid_factor=factor)
        close = all(np.allclose(a, b, rtol=1e-3, atol=1e-7) for a, b in zip(moved(_member(out[0], 0)), moved(params)))
        assert close == same, factor


def _assert_fed_the_minibatch_loss(tr, theta_flat, slot, out):
    """The slot step's first member (out) equals a hand loop of the reference that passes each
    step's minibatch loss and the slot's horizon, and not one that passes a tenth of the loss."""
    # the parameters' moves, not the parameters: Celo's steps are small next to them
    moved = lambda p: [np.asarray(a) - np.asarray(b) for a, b in  # noqa: E731
                       zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(_member(slot.params, 0)))]
    for factor, same in ((1.0, True), (0.1, False)):
        params, _ = _manual_unroll(tr, tr.slot_task(slot), theta_flat, _member(slot.params, 0),
                                   _member(slot.opt_state, 0), slot.data_keys[0], 0, num_steps=slot.horizon,
                                   loss_factor=factor)
        close = all(np.allclose(a, b, rtol=1e-3, atol=1e-7) for a, b in zip(moved(_member(out[0], 0)), moved(params)))
        assert close == same, factor


def test_pes_meta_trains_celo_from_a_file_feeding_it_the_loss_and_horizon(tmp_path):
    """meta-train --lopt-kind celo --init-theta <Celo file>: theta starts as the file's, and the
    population step feeds Celo each step's minibatch loss and the slot's horizon."""
    from lopt_ext import Celo
    from jax.flatten_util import ravel_pytree
    stored = Celo()
    theta = stored.init_theta(jax.random.PRNGKey(11))
    path = str(tmp_path / "celo.safetensors")
    checkpoint.save_theta(path, theta, stored)
    tr = MetaTrainer(_cfg(lopt_kind="celo", init_theta=path, min_horizon=6, max_horizon=6, sigma=1e-9, unroll=3))
    assert tr.lopt == stored
    ms = tr.init()
    np.testing.assert_array_equal(np.asarray(ms.theta_flat), np.asarray(ravel_pytree(theta)[0]))
    slot = ms.slots[0]
    assert np.all(np.asarray(slot.opt_state.num_steps) == slot.horizon)
    out = tr._slot_step_fn(tr.slot_task(slot), "fused")(ms.theta_flat, slot.params, slot.opt_state, slot.accum,
                                                        slot.data_keys, jnp.int32(0), jax.random.PRNGKey(7))
    _assert_fed_the_minibatch_loss(tr, ms.theta_flat, slot, out)


def test_loss_entry_needs_the_loss_and_num_steps_and_continues_as_scaled_horizon_loss():
    """The shipped loss-reading entry: its updates require value= and num_steps, its recorded
    evaluation is the committed one, and its resume checkpoint continues it as meta-train's
    scaled_horizon_loss."""
    from importlib import resources
    from lopt_ext import pretrained
    name = "scaled_small_fc_lopt_h4_loss"
    lopt, theta = pretrained.load(name)
    assert lopt.horizon_inputs and lopt.loss_inputs == "train" and lopt.uses_loss
    params, g = {"w": jnp.ones((4, 3))}, {"w": jnp.full((4, 3), 0.5)}
    tx = lopt.transform(theta, num_steps=100)
    with pytest.raises(ValueError, match="value="):
        tx.update(g, tx.init(params), params)
    u, st = tx.update(g, tx.init(params), params, value=jnp.float32(0.7))
    assert float(st.loss_first) == pytest.approx(0.7) and np.all(np.isfinite(np.asarray(u["w"])))
    info = pretrained.info(name)
    doc = json.load(open(os.path.join(os.path.dirname(__file__), "..", info["evaluation"]["file"])))
    assert doc["summary"] == info["evaluation"]["summary"] and doc["lopt"]["loss_inputs"] == "train"
    with resources.as_file(resources.files("lopt_ext.pretrained").joinpath(info["resume_checkpoint"])) as path:
        cfg = train.compact_config(str(path))
        assert cfg.lopt_kind == "scaled_horizon_loss" and cfg.lopt() == lopt
        flat, _ = train._read_compact(str(path))
    from jax.flatten_util import ravel_pytree
    np.testing.assert_array_equal(flat["theta/flat"], np.asarray(ravel_pytree(theta)[0]))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc")
def test_a_run_through_more_task_shapes_than_its_caches_hold_stays_flat(monkeypatch):
    """Issue 25's 12-hour run, in short: a run meeting more tasks than its compiled-step caches
    hold (6 tasks, caches of 2, a new task drawn after every outer step) recompiles the ones it
    evicted instead of accumulating executables, so the process's memory mappings (what crashed
    long runs at vm.max_map_count) and its resident memory stop growing once the caches are
    full; an unbounded cache would add every new task's mappings."""
    import functools
    from helpers import memory_mappings, resident_bytes
    from lopt_ext.metatrain import pes
    names = tuple(f"logreg_d16_n512_b32_seed{i}" for i in range(3)) + tuple(
        f"quadratic_d32_c2_n0.1_seed{i}" for i in range(3))
    small = 2
    for cache in ("_init_pairs_cached", "_slot_step_cached"):
        monkeypatch.setattr(pes, cache, functools.lru_cache(maxsize=small)(getattr(pes, cache).__wrapped__))
    trainer = MetaTrainer(_cfg(task_names=names, min_horizon=2, max_horizon=2, outer_steps=100))
    ms = trainer.init(0)
    met = []

    def run(steps):
        for _ in range(steps):
            r = trainer.outer_step(ms).result()
            assert np.isfinite(r["meta_loss"])
            met.extend(r["tasks"])

    start = (memory_mappings(), resident_bytes())
    run(6)  # fills both caches and then evicts
    warm = (memory_mappings(), resident_bytes())
    run(18)
    end = (memory_mappings(), resident_bytes())
    assert len(set(met)) > small + 2, met  # the run did move through more tasks than fit
    assert pes._slot_step_cached.cache_info().misses > small + 4  # and recompiled evicted ones
    assert pes._slot_step_cached.cache_info().currsize <= small
    per_task = (warm[0] - start[0]) / small  # an upper bound of what one task's executables map
    assert per_task > 10, (start, warm)      # compiled code is mapped (else this proves nothing)
    assert end[0] - warm[0] < per_task, (start, warm, end)
    assert end[1] - warm[1] < 0.5 * max(warm[1] - start[1], 64 << 20), (start, warm, end)
