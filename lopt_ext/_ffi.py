"""The one place that loads the compiled kernels and calls them through jax.ffi.

Plain arrays in, plain arrays out: each learned optimizer packs its own theta into the
kernel's buffer layout (csrc/kernels/lopt_config.h) and names its attributes; nothing here
knows an optimizer class."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

FUSED_UPDATE = "lopt_fused_update"  # small_fc_lopt and its variants
CELO_UPDATE = "lopt_celo_update"
MLP_UPDATE = "lopt_mlp_update"

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


def precision_attrs() -> dict:
    """The precision attributes of lopt_fused_update (read when a step is traced)."""
    return dict(precision=np.int64(CUDA_PRECISIONS[cuda_precision()]),
                cpu_precision=np.int64(CPU_PRECISIONS[cpu_precision()]))


def packed_size(hidden_size: int, hidden_layers: int, dm: int, dr: int, da: int, celo: bool = False) -> int:
    """Floats in the per-member buffer of lopt_fused_update / lopt_celo_update (PackedLayout)."""
    return int(_cpu_module().packed_size(hidden_size, hidden_layers, dm, dr, da, celo=celo))


def mlp_packed_size(hidden_size: int, hidden_layers: int) -> int:
    """Floats in the per-member buffer of lopt_mlp_update (MlpPackedLayout)."""
    return int(_cpu_module().mlp_packed_size(hidden_size, hidden_layers))


def accumulator_call(target, head, leaves, has_adafactor: bool, write_delta: bool, attrs):
    """One custom call of small_fc_lopt's kernel layout (lopt_fused_update, lopt_celo_update)
    for all leaves: operands ``head`` then per leaf p, g, m, rms (v_row, v_col | v_full | none
    without Adafactor features), each state buffer aliased to its result.

    leaves: (p, g, m, rms, v_row, v_col, v_full) float32 tuples, none empty.
    Returns per leaf (out, m, rms, v_row, v_col, v_full), out = p_new or -step (write_delta).
    """
    ensure_registered()
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
    outs = call(*operands, **attrs, write_delta=bool(write_delta))
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


def mlp_call(packed, leaves, attrs, write_delta: bool):
    """lopt_mlp_update (MLPLOpt; CPU only) for all leaves: (p, g, m) float32 tuples, none empty.
    Returns per leaf (out, m), out = p_new or -step."""
    ensure_registered()
    if jax.default_backend() != "cpu":
        raise NotImplementedError("MLPLOpt's fused kernel runs on the CPU only; use impl='reference' "
                                  f"on {jax.default_backend()}")
    operands = [packed]
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
    call = jax.ffi.ffi_call(MLP_UPDATE, results, vmap_method="broadcast_all", input_output_aliases=aliases)
    outs = call(*operands, **attrs, write_delta=bool(write_delta))
    per_leaf = []
    for k, scalar in enumerate(scalars):
        out, m = outs[2 * k], outs[2 * k + 1]
        per_leaf.append((out[0], m[0]) if scalar else (out, m))
    return per_leaf


def _stats_operands(leaves):
    """Operands and factored_axes of the two sharded-path kernels (see apply_call)."""
    operands, axes = [], []
    for p, g, m, rms, st in leaves:
        if p.ndim >= 2:
            extra = [st["v_row"], st["v_col"], st["row_factor"], st["col_factor"], st["scales"]]
            axes += [int(st["axes"][0]), int(st["axes"][1])]
        else:
            extra = [st["v_full"], st["scales"]]
            axes += [-1, -1]
        operands += [p, g, m, rms] + [jnp.asarray(x, jnp.float32) for x in extra]
    return operands, np.asarray(axes, np.int64)


def apply_call(packed, leaves, attrs, write_delta: bool):
    """lopt_fused_apply: the MLP/apply pass alone, with statistics computed elsewhere (e.g.
    psum'd shards).

    leaves: per tensor (p, g, m, rms, stats) with p of rank >= 1 and stats either
    {"axes": (d1, d0), "v_row": new, "v_col": new, "row_factor", "col_factor", "scales"}
    for rank >= 2 (axes chosen on the global shape) or {"v_full": old, "scales"}.
    scales: [num_features] normalisation scales in reference feature order.
    Returns per leaf (out, m, rms, v_full or None).
    """
    ensure_registered()
    operands, axes = _stats_operands(leaves)
    operands = [packed] + operands
    results, aliases, kinds, base_in = [], {}, [], 1
    for p, g, m, rms, st in leaves:
        factored = p.ndim >= 2
        base_out = len(results)
        aliases[base_in + (1 if write_delta else 0)] = base_out
        aliases[base_in + 2] = base_out + 1
        aliases[base_in + 3] = base_out + 2
        outs = [p, m, rms]
        if not factored:
            aliases[base_in + 4] = base_out + 3
            outs.append(st["v_full"])
        base_in += 4 + (5 if factored else 2)
        results += [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in outs]
        kinds.append(factored)
    call = jax.ffi.ffi_call("lopt_fused_apply", results, vmap_method="broadcast_all",
                            input_output_aliases=aliases)
    outs = call(*operands, **attrs, write_delta=bool(write_delta), factored_axes=axes)
    per_leaf, i = [], 0
    for factored in kinds:
        if factored:
            per_leaf.append((*outs[i:i + 3], None))
            i += 3
        else:
            per_leaf.append(tuple(outs[i:i + 4]))
            i += 4
    return per_leaf


def partial_sumsq_call(packed, leaves, attrs, dm: int, dr: int, da: int):
    """lopt_partial_sumsq: local sums of squares of the per-element features of tensor shards
    (kernel pass B alone), given global row/column statistics: the partial sums a sharded step
    psums.

    leaves: as apply_call (the "scales" entries are not read). Returns per leaf a float32
    vector in the compact order g, p, m[dm], rms[dr], m*rsqrt(rms)[dm], rsqrt(rms)[dr],
    fac_g[da], fac_m[da], and for rank-1 tensors v[da], rsqrt(v + 1e-8)[da].
    """
    ensure_registered()
    operands, axes = _stats_operands(leaves)
    results = [jax.ShapeDtypeStruct((2 + 2 * dm + 2 * dr + 2 * da + (0 if p.ndim >= 2 else 2 * da),), jnp.float32)
               for p, *_ in leaves]
    call = jax.ffi.ffi_call("lopt_partial_sumsq", results, vmap_method="broadcast_all")
    return call(packed, *operands, **attrs, factored_axes=axes)


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
