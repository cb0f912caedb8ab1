"""theta files: lopt_ext's safetensors format, learned_optimization and PyLO layouts."""
import json
import os
import pickle

import jax
import numpy as np
import pytest

from lopt_ext import SmallFcLOpt, checkpoint
from lopt_ext.checkpoint import CheckpointMismatchError


def _theta(lopt, seed=0):
    theta = lopt.init_theta(jax.random.PRNGKey(seed))
    # non-zero decay offsets and biases so that every tensor carries information
    theta["momentum_decays"] = theta["momentum_decays"] + 0.01 * np.arange(1, 4, dtype=np.float32)
    theta["rms_decays"] = theta["rms_decays"] - 0.02
    theta["adafactor_decays"] = theta["adafactor_decays"] + 0.03
    theta["nn"]["~"]["b0"] = theta["nn"]["~"]["b0"] + 0.5
    return theta


def _assert_same(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("hidden", [4, 32])
def test_save_load_roundtrip(tmp_path, hidden):
    lopt = SmallFcLOpt(hidden_size=hidden, hidden_layers=2, initial_rms_decays=(0.99,))
    theta = _theta(lopt)
    path = str(tmp_path / "t.safetensors")
    checkpoint.save_theta(path, theta, lopt, info={"note": "x"})
    lopt2, theta2, info = checkpoint.load_theta(path, with_info=True)
    assert lopt2 == lopt and info == {"note": "x"}
    _assert_same(theta, theta2)
    # the stored tensor names are the documented "/"-joined tree paths
    tensors, meta = checkpoint.read_safetensors(path)
    assert "nn/~/w0" in tensors and tensors["nn/~/w0"].shape == (lopt.num_inputs, hidden)
    assert json.loads(meta[checkpoint.CONFIG_KEY])["hidden_size"] == hidden
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_load_with_wrong_config_names_the_key(tmp_path):
    lopt = SmallFcLOpt()
    path = str(tmp_path / "t.safetensors")
    checkpoint.save_theta(path, _theta(lopt), lopt)
    with pytest.raises(CheckpointMismatchError, match=r"'nn/~/w0' has shape \(39, 4\).*\(39, 8\)"):
        checkpoint.load_theta(path, SmallFcLOpt(hidden_size=8))
    with pytest.raises(CheckpointMismatchError, match="'nn/~/w3' is missing"):
        checkpoint.load_theta(path, SmallFcLOpt(hidden_layers=3))
    with pytest.raises(CheckpointMismatchError, match="'nn/~/[wb]2' is not part of theta"):
        checkpoint.load_theta(path, SmallFcLOpt(hidden_layers=1))


def test_save_rejects_bad_theta(tmp_path):
    lopt = SmallFcLOpt()
    theta = _theta(lopt)
    del theta["nn"]["~"]["b1"]
    with pytest.raises(ValueError, match="keys"):
        checkpoint.save_theta(str(tmp_path / "t.safetensors"), theta, lopt)


def test_learned_optimization_import(tmp_path):
    lopt = SmallFcLOpt()
    theta = _theta(lopt, 3)
    exported = checkpoint.export_learned_optimization(theta)
    assert set(exported) == {"momentum_decays", "rms_decays", "adafactor_decays", "nn"}
    assert set(exported["nn"]["~"]) == {"w0", "b0", "w1", "b1", "w2", "b2"}
    _assert_same(theta, checkpoint.import_learned_optimization(exported, lopt))
    # a pickle of an outer-training state that wraps theta
    path = tmp_path / "outer.pickle"
    with open(path, "wb") as f:
        pickle.dump({"outer_state": {"step": 7, "theta": exported}}, f)
    _assert_same(theta, checkpoint.import_learned_optimization(str(path), lopt))
    broken = checkpoint.export_learned_optimization(theta)
    del broken["nn"]["~"]["w2"]
    with pytest.raises(CheckpointMismatchError, match="'nn/~/w2' is missing"):
        checkpoint.import_learned_optimization(broken, lopt)
    with pytest.raises(CheckpointMismatchError, match="no AdafacMLPLOpt theta"):
        checkpoint.import_learned_optimization({"params": {"w": np.zeros(3)}}, lopt)


def test_pylo_layout_roundtrip(tmp_path):
    lopt = SmallFcLOpt(hidden_size=32)
    theta = _theta(lopt, 5)
    path = str(tmp_path / "model.safetensors")
    sd = checkpoint.export_pylo(theta, lopt, path)
    assert sorted(sd) == ["network.input.bias", "network.input.weight", "network.linear_0.bias",
                          "network.linear_0.weight", "network.output.bias", "network.output.weight"]
    assert sd["network.input.weight"].shape == (32, 39)      # torch: out-by-in
    assert sd["network.output.weight"].shape == (2, 32)
    np.testing.assert_array_equal(sd["network.input.weight"], np.asarray(theta["nn"]["~"]["w0"]).T)
    # PyLO does not store decay offsets: they are arguments
    back = checkpoint.import_pylo(path, lopt, momentum_decays=theta["momentum_decays"],
                                  rms_decays=theta["rms_decays"], adafactor_decays=theta["adafactor_decays"])
    _assert_same(theta, back)
    zero = checkpoint.import_pylo(sd, lopt)
    np.testing.assert_array_equal(zero["momentum_decays"], np.zeros(3, np.float32))
    np.testing.assert_array_equal(zero["nn"]["~"]["w1"], np.asarray(theta["nn"]["~"]["w1"]))


def test_pylo_mismatch_errors(tmp_path):
    lopt = SmallFcLOpt(hidden_size=32)
    sd = checkpoint.export_pylo(_theta(lopt), lopt)
    bad = dict(sd)
    del bad["network.linear_0.weight"]
    with pytest.raises(CheckpointMismatchError, match="'network.linear_0.weight' is missing"):
        checkpoint.import_pylo(bad, lopt)
    with pytest.raises(CheckpointMismatchError, match=r"'network.input.weight' has shape \(32, 39\)"):
        checkpoint.import_pylo(sd, SmallFcLOpt(hidden_size=16))
    extra = dict(sd, **{"network.linear_1.weight": np.zeros((32, 32), np.float32)})
    with pytest.raises(CheckpointMismatchError, match="'network.linear_1.weight' is not part"):
        checkpoint.import_pylo(extra, lopt)


def test_imported_theta_drives_the_optimizer_like_the_original():
    """A theta that went through the PyLO layout gives the same update as the original."""
    import jax.numpy as jnp
    import optax
    lopt = SmallFcLOpt(hidden_size=32)
    theta = _theta(lopt, 1)
    back = checkpoint.import_pylo(checkpoint.export_pylo(theta, lopt), lopt,
                                  momentum_decays=theta["momentum_decays"], rms_decays=theta["rms_decays"],
                                  adafactor_decays=theta["adafactor_decays"])
    params = {"w": jnp.ones((5, 3)), "b": jnp.arange(3.0)}
    grads = jax.tree_util.tree_map(lambda p: 0.1 * p + 0.05, params)
    outs = []
    for th in (theta, back):
        tx = lopt.transform(th, impl="reference")
        u, _ = tx.update(grads, tx.init(params), params)
        outs.append(optax.apply_updates(params, u))
    _assert_same(outs[0], outs[1])
