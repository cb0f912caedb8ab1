"""The one place that loads the compiled kernels and calls them through jax.ffi."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from lopt_ext.config import SmallFcLOpt, step_features

TARGET = "lopt_fused_update"

# How the CUDA kernels evaluate the MLP (the CPU kernels always use float32):
#   "fp32": float32 FMAs, agrees with the reference to float32 round-off (default);
#   "tf32": TF32 tensor cores for the hidden layers (hidden_size 16, 32 or 64), faster,
#           steps agree with the reference to about 1e-2 of the tensor's largest step.
# Read when a step is traced: set it before jit-compiling the update.
CUDA_PRECISIONS = {"fp32": 0, "tf32": 1}
_cuda_precision = os.environ.get("LOPT_CUDA_PRECISION", "fp32")


def set_cuda_precision(name: str) -> None:
    """Chooses "fp32" (exact, default) or "tf32" (tensor cores) for later traces."""
    global _cuda_precision
    if name not in CUDA_PRECISIONS:
        raise ValueError(f"cuda precision must be one of {sorted(CUDA_PRECISIONS)}, got {name!r}")
    _cuda_precision = name


def _checked(value: str, choices, env_name: str) -> str:
    """A precision setting, which may have come from the environment variable env_name."""
    if value not in choices:
        raise ValueError(f"{env_name} must be one of {sorted(choices)}, got {value!r}")
    return value


def cuda_precision() -> str:
    return _checked(_cuda_precision, CUDA_PRECISIONS, "LOPT_CUDA_PRECISION")


# How the CPU kernel evaluates the MLP's first and hidden layers:
#   "fp32": float32 FMAs, agrees with the reference to float32 round-off (default);
#   "bf16": bf16 inputs and weights with float32 accumulation on AMX (Intel Xeon 4th
#           generation or later), used from BF16_MIN_HIDDEN (16) hidden units: about 1.5x
#           faster at hidden size 32, steps within 4% of the update's largest step of the
#           reference (measured worst 1.7%; docs/benchmarks.md). Smaller MLPs keep float32.
# Read when a step is traced: set it before jit-compiling the update.
CPU_PRECISIONS = {"fp32": 0, "bf16": 1}
_cpu_precision = os.environ.get("LOPT_CPU_PRECISION", "fp32")


def cpu_bf16_available() -> bool:
    """True when this CPU and OS can run the "bf16" CPU precision (AMX-BF16)."""
    return available() and bool(_cpu_module().cpu_has_bf16())


def set_cpu_precision(name: str) -> None:
    """Chooses "fp32" (exact, default) or "bf16" (AMX) for later traces of the CPU kernel."""
    global _cpu_precision
    if name not in CPU_PRECISIONS:
        raise ValueError(f"cpu precision must be one of {sorted(CPU_PRECISIONS)}, got {name!r}")
    if name == "bf16" and not cpu_bf16_available():
        raise ValueError("cpu precision 'bf16' needs AMX-BF16 (Intel Xeon 4th generation or later) "
                         "and an OS that allows it; this machine has neither, use 'fp32'")
    _cpu_precision = name


def cpu_precision() -> str:
    return _checked(_cpu_precision, CPU_PRECISIONS, "LOPT_CPU_PRECISION")


@functools.lru_cache(maxsize=None)
def _cpu_module():
    from lopt_ext import _lopt_cpu  # built by `pip install .`
    return _lopt_cpu


@functools.lru_cache(maxsize=None)
def _cuda_module():
    from lopt_ext import _lopt_cuda  # built where nvcc was found
    return _lopt_cuda


@functools.lru_cache(maxsize=None)
def _register(platform: str) -> None:
    module = _cpu_module() if platform == "cpu" else _cuda_module()
    for name, capsule in module.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform=platform)


def available() -> bool:
    """True when the compiled CPU kernels import."""
    try:
        _cpu_module()
        return True
    except ImportError:
        return False


def ensure_registered() -> None:
    """Registers the targets for the platforms jax uses; clear errors when missing."""
    try:
        _register("cpu")
    except ImportError as e:
        raise ImportError(
            "lopt_ext's compiled kernels are missing (lopt_ext._lopt_cpu did not import). "
            "Reinstall with `pip install .` from the source tree, or use impl='reference'."
        ) from e
    if any(d.platform == "gpu" for d in jax.devices()) or jax.default_backend() == "gpu":
        try:
            _register("CUDA")
        except ImportError as e:
            raise ImportError(
                "A GPU is in use but lopt_ext was built without its CUDA kernels "
                "(lopt_ext._lopt_cuda did not import). Rebuild where nvcc is on PATH "
                "(pip install . -Ccmake.define.LOPT_CUDA=ON), or use impl='reference'."
            ) from e


def _config_attrs(lopt: SmallFcLOpt) -> dict:
    """The FFI attributes every call takes (the configuration)."""
    dm, dr, da = lopt.num_decays
    return dict(hidden_size=np.int64(lopt.hidden_size), hidden_layers=np.int64(lopt.hidden_layers),
                dm=np.int64(dm), dr=np.int64(dr), da=np.int64(da),
                exp_mult=np.float32(lopt.exp_mult), step_mult=np.float32(lopt.step_mult))


def pack_theta(lopt: SmallFcLOpt, theta, iteration) -> jax.Array:
    """The per-member float32 buffer the kernels read (layout: csrc/kernels/lopt_config.h).

    The step features are identical for every element, so they are folded into b0 here.
    """
    mom_b, rms_b, fac_b = lopt.decays(theta)
    rms_c = jnp.clip(rms_b, 0.0, 1.0)
    fac_c = jnp.clip(fac_b, 0.0, 1.0)
    nn = theta["nn"]["~"]
    nf = lopt.num_features
    w0 = nn["w0"].astype(jnp.float32)
    b0 = nn["b0"] + jnp.matmul(step_features(iteration), w0[nf:], precision=jax.lax.Precision.HIGHEST)
    parts = [mom_b, 1 - mom_b, rms_c, 1 - rms_c, fac_c, 1 - fac_c, w0[:nf].ravel(), b0]
    for i in range(1, lopt.hidden_layers + 1):
        parts += [nn[f"w{i}"].ravel(), nn[f"b{i}"]]
    packed = jnp.concatenate([jnp.asarray(x, jnp.float32).ravel() for x in parts])
    expected = _cpu_module().packed_size(lopt.hidden_size, lopt.hidden_layers, *lopt.num_decays)
    assert packed.shape == (expected,), (packed.shape, expected)
    return packed


def step_leaves(lopt: SmallFcLOpt, theta, iteration, leaves, *, write_delta: bool):
    """One fused custom call for all leaves.

    leaves: (p, g, m, rms, v_row, v_col, v_full) float32 tuples, none empty.
    Returns per leaf (out, m, rms, v_row, v_col, v_full), out = p_new or -step.
    """
    ensure_registered()
    return _accumulator_call(TARGET, [pack_theta(lopt, theta, iteration)], leaves, lopt.has_adafactor,
                             write_delta, dict(**_config_attrs(lopt), write_delta=bool(write_delta),
                                               precision=np.int64(CUDA_PRECISIONS[cuda_precision()]),
                                               cpu_precision=np.int64(CPU_PRECISIONS[cpu_precision()])))


def _accumulator_call(target, head, leaves, has_adafactor: bool, write_delta: bool, attrs):
    """The custom call of small_fc_lopt's kernel layout (lopt_fused_update, lopt_celo_update):
    operands ``head`` then per leaf p, g, m, rms (v_row, v_col | v_full | none without Adafactor
    features), each state buffer aliased to its result; returns per leaf
    (out, m, rms, v_row, v_col, v_full)."""
    operands = list(head)
    results, aliases, layout = [], {}, []
    for p, g, m, rms, v_row, v_col, v_full in leaves:
        scalar = p.ndim == 0
        if scalar:  # the kernels see a scalar as shape [1]
            p, g, m, rms, v_full = p[None], g[None], m[None], rms[None], v_full[None]
        factored = p.ndim >= 2 and has_adafactor
        # no Adafactor features: no accumulator operands
        acc = () if not has_adafactor else (v_row, v_col) if factored else (v_full,)
        ins = [p, g, m, rms, *acc]
        base_in, base_out = len(operands), len(results)
        aliases[base_in + (1 if write_delta else 0)] = base_out  # g or p buffer -> out
        for k in range(2, len(ins)):
            aliases[base_in + k] = base_out + k - 1
        operands += ins
        results += [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in [p, m, rms, *acc]]
        layout.append((scalar, factored, len(acc)))
    call = jax.ffi.ffi_call(target, results, vmap_method="broadcast_all", input_output_aliases=aliases)
    outs = call(*operands, **attrs)
    per_leaf, i = [], 0
    for (scalar, factored, n_acc), (_, _, _, _, v_row, v_col, v_full) in zip(layout, leaves):
        out, m, rms, *acc = outs[i:i + 3 + n_acc]
        i += 3 + n_acc
        if scalar:
            out, m, rms, *acc = (x[0] for x in (out, m, rms, *acc))
        if factored:
            v_row, v_col = acc
        elif acc:
            (v_full,) = acc
        per_leaf.append((out, m, rms, v_row, v_col, v_full))
    return per_leaf


def pack_mlp_theta(lopt, theta, iteration) -> jax.Array:
    """MLPLOpt's per-member float32 buffer (csrc/kernels/lopt_config.h, MlpPackedLayout); the
    step features are folded into the first-layer bias."""
    from lopt_ext.mlp_lopt import MOMENTUM_DECAYS, NUM_NORMALIZED
    decays = jnp.asarray(MOMENTUM_DECAYS, jnp.float32)
    first = theta["mlp/~/linear_0"]
    w0 = jnp.asarray(first["w"], jnp.float32)
    b0 = first["b"] + jnp.matmul(step_features(iteration), w0[NUM_NORMALIZED:],
                                 precision=jax.lax.Precision.HIGHEST)
    parts = [decays, 1 - decays, w0[:NUM_NORMALIZED], b0]
    for i in range(1, lopt.hidden_layers + 1):
        layer = theta[f"mlp/~/linear_{i}"]
        parts += [layer["w"], layer["b"]]
    packed = jnp.concatenate([jnp.asarray(x, jnp.float32).ravel() for x in parts])
    expected = _cpu_module().mlp_packed_size(lopt.hidden_size, lopt.hidden_layers)
    assert packed.shape == (expected,), (packed.shape, expected)
    return packed


def mlp_step_leaves(lopt, theta, iteration, leaves, *, write_delta: bool):
    """MLPLOpt through one fused custom call for all leaves (CPU only).

    leaves: (p, g, m) float32 tuples, none empty. Returns per leaf (out, m), out = p_new or -step.
    """
    ensure_registered()
    if jax.default_backend() != "cpu":
        raise NotImplementedError("MLPLOpt's fused kernel runs on the CPU only; use impl='reference' "
                                  f"on {jax.default_backend()}")
    operands = [pack_mlp_theta(lopt, theta, iteration)]
    results, aliases, scalars = [], {}, []
    for p, g, m in leaves:
        scalar = p.ndim == 0
        if scalar:  # the kernel sees a scalar as shape [1]
            p, g, m = p[None], g[None], m[None]
        base_in, base_out = len(operands), len(results)
        aliases[base_in + (1 if write_delta else 0)] = base_out  # g or p buffer -> out
        aliases[base_in + 2] = base_out + 1
        operands += [p, g, m]
        results += [jax.ShapeDtypeStruct(p.shape, jnp.float32), jax.ShapeDtypeStruct(m.shape, jnp.float32)]
        scalars.append(scalar)
    call = jax.ffi.ffi_call("lopt_mlp_update", results, vmap_method="broadcast_all",
                            input_output_aliases=aliases)
    outs = call(*operands, hidden_size=np.int64(lopt.hidden_size), hidden_layers=np.int64(lopt.hidden_layers),
                exp_mult=np.float32(lopt.exp_mult), step_mult=np.float32(lopt.step_mult),
                write_delta=bool(write_delta))
    per_leaf = []
    for k, scalar in enumerate(scalars):
        out, m = outs[2 * k], outs[2 * k + 1]
        per_leaf.append((out[0], m[0]) if scalar else (out, m))
    return per_leaf


# Celo's 14 first-layer input groups (w0__0 ... w0__13) in the kernel's feature order
# (csrc/kernels/lopt_config.h FeatureIndex): g, p, m, rms, m*rsqrt, rsqrt, fac_g, row v, col v,
# row rsqrt, col rsqrt, fac_m, then Celo's clip(g, 0.1) and g*rsqrt(rms).
CELO_GROUP_ORDER = (0, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 1, 8)


def pack_celo_theta(lopt, theta) -> jax.Array:
    """Celo's per-member float32 buffer in the small_fc_lopt layout (PackedLayout with celo):
    its fixed decays, the first-layer rows reordered, the output layer's unused third column
    dropped."""
    mom_b, rms_b, fac_b = lopt.decays()
    rms_c, fac_c = jnp.clip(rms_b, 0.0, 1.0), jnp.clip(fac_b, 0.0, 1.0)
    ff = theta["ff_mod_stack"]["~"]
    w0 = jnp.concatenate([ff[f"w0__{i}"][0] for i in CELO_GROUP_ORDER], axis=0)
    parts = [mom_b, 1 - mom_b, rms_c, 1 - rms_c, fac_c, 1 - fac_c, w0, ff["b0"][0]]
    for i in range(1, lopt.ff_hidden_layers):
        parts += [ff[f"w{i}"][0], ff[f"b{i}"][0]]
    last = lopt.ff_hidden_layers
    parts += [ff[f"w{last}"][0][:, :2], ff[f"b{last}"][0][:2]]
    packed = jnp.concatenate([jnp.asarray(x, jnp.float32).ravel() for x in parts])
    expected = _cpu_module().packed_size(lopt.ff_hidden_size, lopt.ff_hidden_layers, *lopt.num_decays, celo=True)
    assert packed.shape == (expected,), (packed.shape, expected)
    return packed


def celo_step_leaves(lopt, theta, lr_mult, leaves, *, write_delta: bool):
    """Celo's per-element rule through one fused custom call for all leaves (CPU, and CUDA
    where its module is built).

    leaves: (p, g, m, rms, v_row, v_col, v_full) float32 tuples, none empty; lr_mult: [n] the
    scheduler's per-tensor multipliers. Returns per leaf (out, m, rms, v_row, v_col, v_full).
    """
    ensure_registered()
    dm, dr, da = lopt.num_decays
    attrs = dict(hidden_size=np.int64(lopt.ff_hidden_size), hidden_layers=np.int64(lopt.ff_hidden_layers),
                 dm=np.int64(dm), dr=np.int64(dr), da=np.int64(da), exp_mult=np.float32(lopt.exp_mult),
                 step_mult=np.float32(lopt.step_mult), write_delta=bool(write_delta))
    head = [pack_celo_theta(lopt, theta), jnp.asarray(lr_mult, jnp.float32)]
    return _accumulator_call("lopt_celo_update", head, leaves, True, write_delta, attrs)


def apply_leaves(lopt: SmallFcLOpt, theta, iteration, leaves, *, write_delta: bool):
    """The MLP/apply pass alone, with statistics computed elsewhere (e.g. psum'd shards).

    leaves: per tensor (p, g, m, rms, stats) with p of rank >= 1 and stats either
    {"axes": (d1, d0), "v_row": new, "v_col": new, "row_factor", "col_factor", "scales"}
    for rank >= 2 (axes chosen on the global shape) or {"v_full": old, "scales"}.
    scales: [num_features] normalisation scales in reference feature order.
    Returns per leaf (out, m, rms, v_full or None).
    """
    ensure_registered()
    operands = [pack_theta(lopt, theta, iteration)]
    results, aliases, axes, kinds = [], {}, [], []
    for p, g, m, rms, st in leaves:
        factored = p.ndim >= 2
        if factored:
            extra = [st["v_row"], st["v_col"], st["row_factor"], st["col_factor"], st["scales"]]
            axes += [int(st["axes"][0]), int(st["axes"][1])]
        else:
            extra = [st["v_full"], st["scales"]]
            axes += [-1, -1]
        base_in, base_out = len(operands), len(results)
        aliases[base_in + (1 if write_delta else 0)] = base_out
        aliases[base_in + 2] = base_out + 1
        aliases[base_in + 3] = base_out + 2
        outs = [p, m, rms]
        if not factored:
            aliases[base_in + 4] = base_out + 3
            outs.append(st["v_full"])
        operands += [p, g, m, rms] + [jnp.asarray(x, jnp.float32) for x in extra]
        results += [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in outs]
        kinds.append(factored)
    call = jax.ffi.ffi_call("lopt_fused_apply", results, vmap_method="broadcast_all",
                            input_output_aliases=aliases)
    outs = call(*operands, **_config_attrs(lopt), write_delta=bool(write_delta),
                factored_axes=np.asarray(axes, np.int64))
    per_leaf, i = [], 0
    for factored in kinds:
        if factored:
            per_leaf.append((*outs[i:i + 3], None))
            i += 3
        else:
            per_leaf.append(tuple(outs[i:i + 4]))
            i += 4
    return per_leaf


def partial_sumsq(lopt: SmallFcLOpt, theta, iteration, leaves):
    """Local sums of squares of the per-element features of tensor shards (kernel pass B
    alone), given global row/column statistics: the partial sums a sharded step psums.

    leaves: as apply_leaves (the "scales" entries are not read). Returns per leaf a float32
    vector in the compact order g, p, m[dm], rms[dr], m*rsqrt(rms)[dm], rsqrt(rms)[dr],
    fac_g[da], fac_m[da], and for rank-1 tensors v[da], rsqrt(v + 1e-8)[da].
    """
    ensure_registered()
    dm, dr, da = lopt.num_decays
    operands = [pack_theta(lopt, theta, iteration)]
    results, axes = [], []
    for p, g, m, rms, st in leaves:
        if p.ndim >= 2:
            extra = [st["v_row"], st["v_col"], st["row_factor"], st["col_factor"], st["scales"]]
            axes += [int(st["axes"][0]), int(st["axes"][1])]
        else:
            extra = [st["v_full"], st["scales"]]
            axes += [-1, -1]
        operands += [p, g, m, rms] + [jnp.asarray(x, jnp.float32) for x in extra]
        n = 2 + 2 * dm + 2 * dr + 2 * da + (0 if p.ndim >= 2 else 2 * da)
        results.append(jax.ShapeDtypeStruct((n,), jnp.float32))
    call = jax.ffi.ffi_call("lopt_partial_sumsq", results, vmap_method="broadcast_all")
    return call(*operands, **_config_attrs(lopt), factored_axes=np.asarray(axes, np.int64))


def scale_sums(items, dm: int, dr: int, fallback):
    """Per item (p, m_new, rms_new) the sums ScaledSmallFcLOpt's step scale needs, [2 + dm]
    float32 (see ScaledSmallFcLOpt.scale_sums), by the CPU kernel's threaded pass; on other
    platforms by ``fallback(p, m_new, rms_new)`` (there is no CUDA version)."""
    ensure_registered()
    results = [jax.ShapeDtypeStruct((2 + dm,), jnp.float32) for _ in items]
    call = jax.ffi.ffi_call("lopt_scale_sums", results, vmap_method="broadcast_all")
    operands = [jnp.asarray(x, jnp.float32) for it in items for x in it]

    def on_cpu(*ops):
        return tuple(call(*ops, dm=np.int64(dm), dr=np.int64(dr)))

    def elsewhere(*ops):
        return tuple(fallback(*ops[3 * i:3 * i + 3]) for i in range(len(items)))

    return list(jax.lax.platform_dependent(*operands, cpu=on_cpu, default=elsewhere))


def cpu_isa() -> str:
    """Instruction set of the CPU loops in use (generic, avx2 or avx512)."""
    return _cpu_module().cpu_isa()
