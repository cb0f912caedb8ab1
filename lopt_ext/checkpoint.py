"""Saving and loading small_fc_lopt meta-parameters (theta), and importing foreign layouts.

lopt_ext's own format: one safetensors file whose tensor names are theta's tree paths joined by
"/" ("momentum_decays", "rms_decays", "adafactor_decays", "nn/~/w0", "nn/~/b0", ...; the
learned_optimization AdafacMLPLOpt layout, weights stored fan-in by fan-out), all float32. The
file's safetensors metadata holds "lopt_ext.config" (JSON of the SmallFcLOpt fields) and
"lopt_ext.info" (free JSON: provenance). Writes are atomic (temp file + os.replace).

Importers:
- ``import_learned_optimization``: a theta in learned_optimization's nested layout
  {"momentum_decays", "rms_decays", "adafactor_decays", "nn": {"~": {"w0", "b0", ...}}},
  given as a dict (numpy/jax/haiku mappings), a pickle file, or a flax msgpack checkpoint
  (needs flax); wrappers such as {"theta": ...} or an outer-trainer state dict are searched.
- ``import_pylo``: PyLO's small_fc_lopt ``model.safetensors`` (torch Linear layout, out-by-in:
  network.input.weight [H, F], network.input.bias [H], network.linear_{i}.weight/bias,
  network.output.weight [2, H], network.output.bias [2]). PyLO keeps the decay offsets in code
  (zeros for its released weights), so they are arguments here. ``export_pylo`` writes that layout.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple

import numpy as np

from lopt_ext.config import SmallFcLOpt

CONFIG_KEY = "lopt_ext.config"
INFO_KEY = "lopt_ext.info"
KIND_KEY = "kind"  # the configuration class, when it is not SmallFcLOpt


def _lopt_classes():
    from lopt_ext.celo import Celo
    from lopt_ext.mlp_lopt import MLPLOpt
    from lopt_ext.scaled import ScaledSmallFcLOpt
    return {cls.__name__: cls for cls in (SmallFcLOpt, ScaledSmallFcLOpt, MLPLOpt, Celo)}


class CheckpointMismatchError(ValueError):
    """A file's tensors do not match the requested SmallFcLOpt configuration."""


# ---------------------------------------------------------------- helpers
def atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_safetensors(path: str, tensors: Dict[str, Any], metadata: Optional[Dict[str, str]] = None):
    from safetensors.numpy import save
    arrays = {k: np.array(v, order="C") for k, v in tensors.items()}  # (ascontiguousarray turns 0-d into 1-d)
    atomic_write_bytes(path, save(arrays, metadata=metadata))


def read_safetensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Tensors and metadata of a safetensors file; a truncated or corrupted file raises
    CheckpointMismatchError naming the path (never a crash or partial data)."""
    from safetensors import safe_open
    tensors = {}
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointMismatchError(f"{path}: not a complete safetensors file ({type(e).__name__}: {e})") from e
    return tensors, metadata


def lopt_to_json(lopt: SmallFcLOpt) -> Dict[str, Any]:
    import dataclasses
    out = {f.name: (list(v) if isinstance(v, tuple) else v)
           for f in dataclasses.fields(lopt) for v in [getattr(lopt, f.name)]}
    if type(lopt) is not SmallFcLOpt:
        out[KIND_KEY] = type(lopt).__name__
    return out


def lopt_from_json(d: Dict[str, Any]) -> SmallFcLOpt:
    import dataclasses
    d = dict(d)
    kind = d.pop(KIND_KEY, "SmallFcLOpt")
    classes = _lopt_classes()
    if kind not in classes:
        raise ValueError(f"unknown learned optimizer kind {kind!r} in config; known: {sorted(classes)}")
    cls = classes[kind]
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {kind} fields in config: {sorted(unknown)}")
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def flatten_theta(theta) -> Dict[str, np.ndarray]:
    out = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k in node:
                walk(node[k], f"{prefix}/{k}" if prefix else str(k))
        else:
            out[prefix] = np.asarray(node, np.float32)

    walk(theta, "")
    return out


def _expected_flat(lopt: SmallFcLOpt) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v) for k, v in flatten_theta_shapes(lopt.theta_shapes()).items()}


def _expected_paths(shapes, prefix=()):
    """{"/"-joined name: key path} of a theta shape tree (keys may hold "/" themselves, as
    haiku's "mlp/~/linear_0" does, so names are not split back)."""
    out = {}
    for k, v in shapes.items():
        if isinstance(v, dict):
            out.update(_expected_paths(v, prefix + (k,)))
        else:
            out["/".join(prefix + (k,))] = prefix + (k,)
    return out


def flatten_theta_shapes(shapes, prefix=""):
    out = {}
    for k, v in shapes.items():
        name = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten_theta_shapes(v, name))
        else:
            out[name] = v
    return out


def unflatten_theta(flat: Dict[str, Any], lopt: SmallFcLOpt, source: str = "file"):
    """theta from "/"-joined names; every key and shape checked against ``lopt``."""
    import jax.numpy as jnp
    expected = _expected_flat(lopt)
    paths = _expected_paths(lopt.theta_shapes())
    missing = [k for k in expected if k not in flat]
    extra = [k for k in flat if k not in expected]
    if missing:
        raise CheckpointMismatchError(
            f"{source}: key {missing[0]!r} is missing (needed by {lopt}); present keys: {sorted(flat)}")
    if extra:
        raise CheckpointMismatchError(f"{source}: key {extra[0]!r} is not part of theta for {lopt}")
    theta = {}
    for name, shape in expected.items():
        value = np.asarray(flat[name])
        if tuple(value.shape) != shape:
            raise CheckpointMismatchError(
                f"{source}: key {name!r} has shape {tuple(value.shape)}, {lopt} expects {shape}")
        if not np.issubdtype(value.dtype, np.floating):
            raise CheckpointMismatchError(f"{source}: key {name!r} has dtype {value.dtype}, expected floating point")
        node = theta
        parts = paths[name]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = jnp.asarray(value, jnp.float32)
    return theta


# ---------------------------------------------------------------- lopt_ext format
def save_theta(path: str, theta, lopt: SmallFcLOpt, info: Optional[Dict[str, Any]] = None) -> None:
    """Writes theta (validated against ``lopt``) as safetensors, atomically."""
    from lopt_ext.update import check_theta
    check_theta(lopt, theta)
    metadata = {CONFIG_KEY: json.dumps(lopt_to_json(lopt)), INFO_KEY: json.dumps(info or {})}
    atomic_save_safetensors(path, flatten_theta(theta), metadata)


def load_theta(path: str, lopt: Optional[SmallFcLOpt] = None, with_info: bool = False):
    """(lopt, theta) from a file written by ``save_theta`` (or any safetensors in that layout).

    With ``lopt`` given, the file must match it (a mismatch names the key); without, the config
    stored in the file is used. with_info=True adds the stored info dict as a third value.
    """
    tensors, metadata = read_safetensors(path)
    stored = lopt_from_json(json.loads(metadata[CONFIG_KEY])) if CONFIG_KEY in metadata else None
    if lopt is None:
        if stored is None:
            raise CheckpointMismatchError(f"{path}: no {CONFIG_KEY!r} metadata; pass lopt=SmallFcLOpt(...)")
        lopt = stored
    theta = unflatten_theta(tensors, lopt, source=path)
    if with_info:
        return lopt, theta, json.loads(metadata.get(INFO_KEY, "{}"))
    return lopt, theta


# ---------------------------------------------------------------- learned_optimization
def _find_theta_dict(obj, depth=0):
    if isinstance(obj, Mapping):
        if "nn" in obj and "momentum_decays" in obj:
            return obj
        if depth < 6:
            for v in obj.values():
                found = _find_theta_dict(v, depth + 1)
                if found is not None:
                    return found
    elif hasattr(obj, "__dict__") and depth < 6:  # dataclass-like outer states
        return _find_theta_dict(vars(obj), depth + 1)
    return None


def _load_foreign(obj):
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        with open(path, "rb") as f:
            raw = f.read()
        try:
            return pickle.loads(raw)
        except Exception:
            pass
        try:
            from flax import serialization  # learned_optimization's checkpoints are flax msgpack
        except ImportError:
            raise ValueError(f"{path}: not a pickle; reading a flax msgpack checkpoint needs `pip install flax`") from None
        return serialization.msgpack_restore(raw)
    return obj


def import_learned_optimization(obj, lopt: SmallFcLOpt):
    """theta from a learned_optimization AdafacMLPLOpt theta (dict, pickle path or flax msgpack path)."""
    tree = _find_theta_dict(_load_foreign(obj))
    if tree is None:
        raise CheckpointMismatchError("no AdafacMLPLOpt theta (a dict with 'nn' and 'momentum_decays') found")
    nn = tree["nn"]
    if isinstance(nn, Mapping) and "~" not in nn and any(str(k).endswith("~") for k in nn):
        nn = {"~": next(v for k, v in nn.items() if str(k).endswith("~"))}
    flat = {k: np.asarray(tree[k]) for k in tree if k != "nn"}
    if not isinstance(nn, Mapping) or "~" not in nn:
        raise CheckpointMismatchError("theta['nn'] must hold the haiku params {'~': {'w0', 'b0', ...}}")
    for k, v in nn["~"].items():
        flat[f"nn/~/{k}"] = np.asarray(v)
    return unflatten_theta(flat, lopt, source="learned_optimization theta")


def export_learned_optimization(theta) -> Dict[str, Any]:
    """theta as plain nested numpy dicts (learned_optimization's layout), e.g. for pickling."""
    return {k: ({"~": {kk: np.asarray(vv) for kk, vv in v["~"].items()}} if k == "nn" else np.asarray(v))
            for k, v in theta.items()}


# ---------------------------------------------------------------- PyLO
def _pylo_names(lopt: SmallFcLOpt):
    """(pylo module name, lopt_ext layer index) for input, linear_i, output."""
    names = ["network.input"] + [f"network.linear_{i}" for i in range(lopt.hidden_layers - 1)] + ["network.output"]
    return list(zip(names, range(lopt.hidden_layers + 1)))


def import_pylo(obj, lopt: Optional[SmallFcLOpt] = None, momentum_decays=None, rms_decays=None,
                adafactor_decays=None):
    """theta from PyLO's small_fc_lopt state dict / model.safetensors path.

    lopt defaults to SmallFcLOpt(hidden_size=32) (PyLO's small_fc_lopt). The decay offsets are
    not in PyLO's file: pass them (default zeros, which is what PyLO's code uses).
    """
    lopt = lopt or SmallFcLOpt(hidden_size=32)
    if isinstance(obj, (str, os.PathLike)):
        tensors, _ = read_safetensors(os.fspath(obj))
        source = os.fspath(obj)
    else:
        tensors, source = {k: np.asarray(v) for k, v in obj.items()}, "PyLO state dict"
    dm, dr, da = lopt.num_decays
    flat = {}
    expected_keys = set()
    for name, i in _pylo_names(lopt):
        for part in ("weight", "bias"):
            key = f"{name}.{part}"
            expected_keys.add(key)
            if key not in tensors:
                raise CheckpointMismatchError(f"{source}: key {key!r} is missing (needed by {lopt}); "
                                              f"present keys: {sorted(tensors)}")
        w, b = np.asarray(tensors[f"{name}.weight"], np.float32), np.asarray(tensors[f"{name}.bias"], np.float32)
        want = lopt.layer_shapes()[f"w{i}"]
        if w.shape != (want[1], want[0]):
            raise CheckpointMismatchError(f"{source}: key {name + '.weight'!r} has shape {w.shape}, {lopt} expects "
                                          f"{(want[1], want[0])} (torch out-by-in)")
        flat[f"nn/~/w{i}"] = w.T
        flat[f"nn/~/b{i}"] = b
    extra = sorted(set(tensors) - expected_keys)
    if extra:
        raise CheckpointMismatchError(f"{source}: key {extra[0]!r} is not part of {lopt} in PyLO's layout")
    for key, value, n in (("momentum_decays", momentum_decays, dm), ("rms_decays", rms_decays, dr),
                          ("adafactor_decays", adafactor_decays, da)):
        flat[key] = np.zeros((n,), np.float32) if value is None else np.asarray(value, np.float32)
    return unflatten_theta(flat, lopt, source=source)


def export_pylo(theta, lopt: SmallFcLOpt, path: Optional[str] = None) -> Dict[str, np.ndarray]:
    """theta's MLP in PyLO's layout (decay offsets are dropped: PyLO keeps them in code)."""
    nn = theta["nn"]["~"]
    out = {}
    for name, i in _pylo_names(lopt):
        out[f"{name}.weight"] = np.ascontiguousarray(np.asarray(nn[f"w{i}"], np.float32).T)
        out[f"{name}.bias"] = np.asarray(nn[f"b{i}"], np.float32)
    if path is not None:
        atomic_save_safetensors(path, out)
    return out
