"""Memory, compute and performance of learned and hand-designed optimizers, measured side by side.

The measurement study of "Practical tradeoffs between memory, compute, and performance in
learned optimizers" (Metz et al. 2022) for lopt_ext's optimizers: ``python -m lopt_ext tradeoffs``.

Optimizers
- hand-designed (optax): sgd, sgd_momentum (momentum 0.9), adam, adafactor (optax.adafactor with
  only its learning rate set);
- learned: every entry of ``lopt_ext.variants.STUDY``, theta from
  ``lopt_ext/tradeoffs/theta/<name>.safetensors`` (shipped with the package), Celo's from its published theta.state
  (``pretrained.load("celo")``: the cached copy or a download) (``--quick``: an untrained theta,
  ``init_theta(PRNGKey(0))``). Each has an unfused path (``impl="reference"``, pure JAX) and a
  fused one (``impl="fused"``, the compiled kernel); a fused kernel that is not available (yet)
  is recorded as null with the reason, and everything else is still measured.

Memory (bytes per parameter, float32 parameters)
- state: the optimizer state pytree of ``tx.init(params)`` (``jax.eval_shape``: nothing is
  allocated), sum of the array leaves' bytes / parameter count, on a ~1M-parameter MLP pytree
  (dense layers 1024-768-256-64 with biases) and on a transformer-shaped pytree (token
  embedding, per layer q/k/v/o attention matrices, two MLP matrices, their biases, two layer
  norms; a final layer norm; 4096 x 128, 6 layers, ~1.7M parameters);
- temporaries: XLA's ``memory_analysis().temp_size_in_bytes`` of the compiled update step
  (``params, state <- step(params, state, grads)``, params and state donated) on the MLP
  pytree / parameter count, for the fused and the unfused path.

Compute
- step time relative to optax.adam measured in the same run, on one square float32 matrix of
  1e6 and 1e7 parameters (1000^2, 3162^2; ``--quick``: 1e4, 1e5): the same jitted, donated
  step, compiled ahead of time, warmed up, the median of at least 7 timed calls covering at
  least 1 s (each waits for its result); Adam is timed before and after the others and its
  pooled median is the reference;
- FLOPs per parameter per step counted from the architecture (``flops_per_param``);
- the machine: ``os.cpu_count()``, the load average before and after, and the ceilings
  measured in the same run: sgemm GFLOP/s (numpy float32 matmul, lopt_ext.timing)
  and stream GB/s (a jitted XLA in-place ``x <- a x + b`` over a large float32 array, bytes
  read + written).

Performance (lopt_ext.metatrain.evaluate's protocol)
- the held-out tasks (``family.list_tasks("test")``, 16 tasks; ``--quick``: the 2 smallest),
  seeds 0, 1, 2 (``--quick``: 0), horizon 1000 steps (``--quick``: 200);
- learned: ``evaluate.evaluate`` (fused when available, else reference) and
  ``evaluate.summarize`` against Adam with a constant learning rate tuned per task;
- hand-designed: each tuned per task over ``evaluate.DEFAULT_LRS`` on the mean over seeds of
  the final smoothed held-out loss (as ``evaluate.baseline_sweep`` tunes Adam), then the same
  metrics (``evaluate.compare`` / ``evaluate.summarize``) against tuned Adam; Adam itself is the
  reference point (final ratio 1);
- reported: median steps ratio, median final ratio, tasks whose mean final ratio exceeds 1.5,
  diverged task-seeds; for learned optimizers also the meta-training CPU-hours that produced
  theta (``budget`` in the theta file's info, when recorded).
The tuned-Adam runs come from docs/evaluation/baselines.json (its usable entries are copied to
DIR/cache/adam_baselines.json; the committed file is never written); the other hand-designed
sweeps are cached in DIR/cache/hand_sweeps.json, so a rerun only re-measures memory and time.

Only the standard library and numpy are imported at module level.

DIR/tradeoffs.json: {study, mode ("full"/"quick"), command, created, wall_s, phase_s, protocol
(the text above), machine {cpu_model, cpu_count, loadavg_start, loadavg_end, versions, ...},
ceilings {sgemm_gflops, sgemm_n, stream_gbs, stream_mib, ...}, settings {tasks, seeds, horizon,
lrs, timing_params {"1e6": n, "1e7": n} (the sizes actually timed), adam_step_time_s, pytrees,
caches}, optimizers {name: record}}; a record: {name, family ("hand-designed"/"learned"),
description, [kind, hidden_size, theta, lopt, fused_available], flops_breakdown,
memory {state_bytes_per_param_mlp, state_bytes_per_param_transformer, temp_bytes_per_param_fused,
temp_bytes_per_param_unfused}, compute {step_time_ratio_1e6_fused, step_time_ratio_1e6_unfused,
step_time_ratio_1e7_fused, step_time_ratio_1e7_unfused, flops_per_param, step_time_s},
performance {median_steps_ratio (null: never reached), median_final_ratio, tasks_worse_than_1.5x
(a count; _names lists them), diverged (task-seeds), meta_training_cpu_hours, reached_and_stayed,
task_seeds, tasks, per_task_mean_final_ratio, impl / best_lr}, null_reasons {field: why}}.
Hand-designed optimizers have one XLA-compiled step, stored as "unfused" (fused: null).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from lopt_ext import timing
from lopt_ext.tradeoffs.report import write_outputs

STUDY_TITLE = ('"Practical tradeoffs between memory, compute, and performance in learned optimizers" '
               "(Metz et al. 2022)")
# the checkout (docs/ holds the committed results and the tuned-Adam cache); outside one these
# paths do not exist and the study runs without them
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the study variants' trained thetas ship with the package, so the study runs outside a checkout
THETA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "theta")
ADAM_CACHE = os.path.join(REPO_ROOT, "docs", "evaluation", "baselines.json")
# runs write under runs/ (git-ignored); the committed docs/tradeoffs is refreshed only by
# asking for it (--out docs/tradeoffs)
DEFAULT_OUT = os.path.join("runs", "tradeoffs")
COMMITTED_OUT = os.path.join("docs", "tradeoffs")
QUICK_OUT = os.path.join("runs", "tradeoffs_quick")

HAND_DESIGNED = ("sgd", "sgd_momentum", "adam", "adafactor")
HAND_DESCRIPTIONS = {
    "sgd": "optax.sgd",
    "sgd_momentum": "optax.sgd, momentum 0.9",
    "adam": "optax.adam (the reference point)",
    "adafactor": "optax.adafactor (defaults, learning rate set)",
}
UNTRAINED = "untrained (quick)"

MLP_WIDTHS = (1024, 768, 256, 64)  # ~1.0M parameters
TRANSFORMER = dict(vocab=4096, d_model=128, layers=6, mlp_mult=4)  # ~1.7M parameters


# ----------------------------------------------------------------------------- settings
def settings(quick: bool, seeds: Optional[Sequence[int]] = None, horizon: Optional[int] = None,
             repeats: Optional[int] = None) -> Dict[str, Any]:
    """What a full or a --quick run measures (explicit values override the mode's)."""
    if quick:
        s = dict(mode="quick", seeds=[0], horizon=200, timing_sizes={"1e6": 10 ** 4, "1e7": 10 ** 5},
                 repeats=3, min_timed_s=0.0, sgemm_n=512, sgemm_repeats=3, stream_mib=32, num_tasks=2)
    else:
        s = dict(mode="full", seeds=[0, 1, 2], horizon=1000, timing_sizes={"1e6": 10 ** 6, "1e7": 10 ** 7},
                 repeats=7, min_timed_s=1.0, sgemm_n=2048, sgemm_repeats=7, stream_mib=256, num_tasks=None)
    if seeds:
        s["seeds"] = sorted(set(int(x) for x in seeds))
    if horizon:
        s["horizon"] = int(horizon)
    if repeats:
        s["repeats"] = int(repeats)
    return s


def study_names() -> List[str]:
    from lopt_ext import variants
    return list(HAND_DESIGNED) + list(variants.STUDY)


def theta_path(name: str, theta_dir: str = THETA_DIR) -> str:
    return os.path.join(theta_dir, f"{name}.safetensors")


def missing_thetas(names: Sequence[str], theta_dir: str = THETA_DIR) -> List[str]:
    """Theta files a full run needs that do not exist (Celo's: its cached theta.state, unless
    huggingface_hub could download it)."""
    import importlib.util
    from lopt_ext import pretrained, variants
    missing = []
    for n in names:
        if n not in variants.STUDY:
            continue
        if variants.STUDY[n].kind == variants.CELO:
            cached = os.path.join(pretrained.cache_dir(), "celo", pretrained.CELO_FILE)
            if not os.path.isfile(cached) and importlib.util.find_spec("huggingface_hub") is None:
                missing.append(cached)
        elif not os.path.isfile(theta_path(n, theta_dir)):
            missing.append(theta_path(n, theta_dir))
    return missing


def load_learned(name: str, quick: bool, theta_dir: str = THETA_DIR):
    """(lopt, theta, theta label, meta-training CPU-hours or None) of a study variant."""
    import jax
    from lopt_ext import checkpoint, variants
    expected = variants.STUDY[name].lopt()
    if quick:
        return expected, expected.init_theta(jax.random.PRNGKey(0)), UNTRAINED, None
    if variants.STUDY[name].kind == variants.CELO:
        from lopt_ext import pretrained
        path = pretrained.celo_path()
        lopt, theta = pretrained.load("celo", path=path)
        return lopt, theta, f"Celo's published {pretrained.CELO_FILE}", None
    path = theta_path(name, theta_dir)
    lopt, theta, info = checkpoint.load_theta(path, with_info=True)
    if (checkpoint.flatten_theta_shapes(lopt.theta_shapes()) != checkpoint.flatten_theta_shapes(expected.theta_shapes())
            or type(lopt) is not type(expected)):
        raise ValueError(f"{path}: stored optimizer {lopt} does not have the layout of study variant {name} "
                         f"({expected})")
    label = os.path.relpath(path, REPO_ROOT) if os.path.abspath(path).startswith(REPO_ROOT + os.sep) else path
    return lopt, theta, label, meta_training_cpu_hours(info, path)


def meta_training_cpu_hours(info: Dict[str, Any], path: Optional[str] = None) -> Optional[float]:
    """``budget`` of a theta file's info ({"cpu_hours": ...} as meta-train records it, or a number);
    else the same key of a NAME.json next to the file (as lopt_ext/pretrained ships it); else None."""
    candidates = [info or {}]
    if path:
        side = os.path.splitext(path)[0] + ".json"
        if os.path.isfile(side):
            try:
                with open(side) as f:
                    candidates.append(json.load(f))
            except (OSError, ValueError):
                pass
    for c in candidates:
        budget = c.get("budget") if isinstance(c, dict) else None
        if isinstance(budget, dict) and isinstance(budget.get("cpu_hours"), (int, float)):
            return float(budget["cpu_hours"])
        if isinstance(budget, (int, float)) and not isinstance(budget, bool):
            return float(budget)
    return None


# ----------------------------------------------------------------------------- optimizers
def hand_tx(name: str, lr=1e-3):
    """The optax transformation of a hand-designed optimizer at learning rate ``lr`` (the same
    factories the evaluation tunes, lopt_ext.metatrain.evaluate.CONSTANT_LR)."""
    from lopt_ext.metatrain import evaluate as ev
    if name not in HAND_DESIGNED:
        raise ValueError(f"unknown hand-designed optimizer {name!r}; expected one of {HAND_DESIGNED}")
    return ev.CONSTANT_LR[name](lr)


def fused_probe(lopt, theta) -> Optional[str]:
    """None when the fused kernel of ``lopt`` runs one step on a small pytree (a matrix and a
    vector); else the reason, one line (NotImplementedError, an FFI error, ...)."""
    import jax
    import jax.numpy as jnp
    import optax
    params = {"w": jnp.full((8, 16), 0.5, jnp.float32), "b": jnp.full((16,), 0.25, jnp.float32)}
    grads = jax.tree_util.tree_map(lambda p: 0.01 * p, params)
    try:
        tx = learned_tx(lopt, theta, "fused")
        state = tx.init(params)

        @jax.jit
        def step(p, s, g):
            u, s = tx.update(g, s, p, value=TIMING_LOSS)
            return optax.apply_updates(p, u), s

        jax.block_until_ready(step(params, state, grads))
    except Exception as e:  # noqa: BLE001  (any failure of the kernel: record it, keep going)
        return _reason(e)
    return None


# What the memory and timing steps pass to rules that read the loss and the horizon (Celo):
# a constant loss, and the study's horizon; neither changes the work a step does.
TIMING_LOSS = 1.0
TIMING_HORIZON = 1000


def learned_tx(lopt, theta, impl: str):
    return lopt.transform(theta, impl=impl, num_steps=TIMING_HORIZON)


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------- pytrees and memory
def mlp_shapes(widths=MLP_WIDTHS) -> Dict[str, Tuple[int, ...]]:
    """Dense layers widths[i] -> widths[i+1], each a weight matrix and a bias."""
    shapes = {}
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        shapes[f"dense{i}/w"] = (a, b)
        shapes[f"dense{i}/b"] = (b,)
    return shapes


def transformer_shapes(vocab=4096, d_model=128, layers=6, mlp_mult=4) -> Dict[str, Tuple[int, ...]]:
    """A decoder-only transformer's parameters: token embedding (tied unembedding), per layer
    q/k/v/o (d x d) with biases, MLP d -> mlp_mult d -> d with biases, two layer norms (scale
    and bias), and a final layer norm."""
    d, f = d_model, mlp_mult * d_model
    shapes = {"embed": (vocab, d)}
    for i in range(layers):
        pre = f"layer{i}/"
        for name in ("q", "k", "v", "o"):
            shapes[pre + f"attn_{name}/w"] = (d, d)
            shapes[pre + f"attn_{name}/b"] = (d,)
        shapes[pre + "mlp_in/w"] = (d, f)
        shapes[pre + "mlp_in/b"] = (f,)
        shapes[pre + "mlp_out/w"] = (f, d)
        shapes[pre + "mlp_out/b"] = (d,)
        for ln in ("ln1", "ln2"):
            shapes[pre + f"{ln}/scale"] = (d,)
            shapes[pre + f"{ln}/bias"] = (d,)
    shapes["ln_final/scale"] = (d,)
    shapes["ln_final/bias"] = (d,)
    return shapes


def num_params(shapes: Dict[str, Tuple[int, ...]]) -> int:
    return int(sum(int(np.prod(s)) for s in shapes.values()))


def _spec_tree(shapes):
    import jax
    import jax.numpy as jnp
    return {k: jax.ShapeDtypeStruct(tuple(s), jnp.float32) for k, s in shapes.items()}


def tree_bytes(tree) -> int:
    """Bytes of the array leaves of a pytree of arrays or ShapeDtypeStructs."""
    import jax
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        total += int(np.prod(np.shape(leaf), dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return int(total)


def state_bytes(tx, shapes: Dict[str, Tuple[int, ...]]) -> int:
    """Bytes of ``tx.init(params)`` for float32 params of these shapes (nothing is allocated)."""
    import jax
    return tree_bytes(jax.eval_shape(tx.init, _spec_tree(shapes)))


def state_bytes_per_param(tx, shapes) -> float:
    return state_bytes(tx, shapes) / num_params(shapes)


def _step_fn(tx):
    import optax
    tx = optax.with_extra_args_support(tx)  # hand-designed ones take no value

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params, value=TIMING_LOSS)
        return optax.apply_updates(params, updates), state

    return step


def compile_step(tx, shapes):
    """The jitted, donated step compiled for float32 params of these shapes (no buffers)."""
    import jax
    params = _spec_tree(shapes)
    state = jax.eval_shape(tx.init, params)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers.*")
        return jax.jit(_step_fn(tx), donate_argnums=(0, 1)).lower(params, state, params).compile()


def temp_bytes(compiled) -> Optional[int]:
    return timing.memory_analysis(compiled).get("temp_size_in_bytes")


# ----------------------------------------------------------------------------- FLOPs
def flops_breakdown(spec) -> Dict[str, int]:
    """FLOPs per parameter per step, counted from the architecture, for an element of a matrix
    (rank-2 leaf). Every add, multiply, divide, sqrt/rsqrt/exp counts 1; per-row/column or
    per-tensor work (O(rows + cols)) is not counted; the final ``p + update`` counts 1.

    Hand-designed (``spec`` a name):
      sgd           u = -lr g (1); p + u (1)                                               -> 2
      sgd_momentum  m = g + 0.9 m (2); -lr m (1); p + u (1)                                -> 4
      adam          mu = b1 mu + (1-b1) g (3); nu = b2 nu + (1-b2) g^2 (4); the two bias
                    corrections (2); sqrt, + eps, divide (3); -lr (1); p + u (1)          -> 14
      adafactor     g^2 + eps (2); row and column sums (2); g * row_factor * col_factor (2);
                    block-RMS clipping: sum of u^2 (2), scale (1); parameter-scale: sum of
                    p^2 (2), scale (1); -lr (1); p + u (1)                                 -> 14
    Learned (``spec`` a LearnedOptimizer), with Dm momenta, Dr rms decays, Da Adafactor decays,
    F normalised features, H hidden width, L hidden layers:
      accumulators   momenta 3 Dm; g^2 1; rms 3 Dr; Adafactor (Da > 0): g^2 + eps 1, row and
                     column sums 2 (the decayed accumulators are per row/column)
      features       m rsqrt(rms) Dm; rsqrt(rms + eps) 2 Dr; per Adafactor decay: the
                     row x column factor 1, g x it 1, m x it 1 (3 Da)
      normalisation  square and sum, then multiply by the tensor's rsqrt: 3 F
      mlp            2 (F H + (L-1) H^2 + 2 H): the matmuls, the 11 step features folded into
                     the first bias (they are the same for every element)
      mlp_bias_act   bias add and ReLU per hidden unit, output bias: 2 L H + 2
      output         d exp(mag exp_mult) step_mult (4); p - step (1)                      -> 5
    SmallFcLOpt: F = 2 + 2 Dm + 2 Dr + 6 Da (28 by default). MLPLOpt: F = 8 (g, p, 6 momenta),
    Dm = 6, no rms or Adafactor accumulators (Dr = Da = 0). Celo: F = 30 and celo_extras
    (gradient clip, its two extra features, the per-tensor output scale: 6 + Dr); its LSTM is
    per tensor, not counted.
    """
    if isinstance(spec, str):
        table = {"sgd": {"update": 1, "apply": 1},
                 "sgd_momentum": {"momentum": 2, "update": 1, "apply": 1},
                 "adam": {"moments": 7, "bias_correction": 2, "normalise": 3, "update": 1, "apply": 1},
                 "adafactor": {"factored_moments": 4, "normalise": 2, "clipping": 3, "parameter_scale": 3,
                               "update": 1, "apply": 1}}
        if spec not in table:
            raise ValueError(f"unknown hand-designed optimizer {spec!r}")
        return dict(table[spec])
    extra = {}
    if hasattr(spec, "lstm_hidden_size"):  # Celo: 30 inputs, no step features
        dm, dr, da = spec.num_decays
        features = spec.num_inputs
        # the +-1000 gradient clip (2), clip(g, 0.1) (2), g rsqrt(rms) (Dr), the output's
        # parameter scale and lr_mult (2)
        extra = {"celo_extras": 6 + dr}
    elif hasattr(spec, "num_decays"):  # SmallFcLOpt and its variants
        dm, dr, da = spec.num_decays
        features = spec.num_features
    else:  # MLPLOpt
        from lopt_ext.mlp_lopt import MOMENTUM_DECAYS, NUM_NORMALIZED
        dm, dr, da = len(MOMENTUM_DECAYS), 0, 0
        features = NUM_NORMALIZED
    h, layers = spec.hidden_size, spec.hidden_layers
    accum = 3 * dm + (1 + 3 * dr if dr else 0) + (3 if da else 0)
    feats = (dm + 2 * dr if dr else 0) + 3 * da
    return {"accumulators": accum, "features": feats, "normalisation": 3 * features,
            "mlp": mlp_flops(features, h, layers), "mlp_bias_act": 2 * layers * h + 2, "output": 5, **extra}


def mlp_flops(num_features: int, hidden_size: int, hidden_layers: int = 2) -> int:
    """2 (F H + (L-1) H^2 + 2 H): the per-element MLP's multiply-adds (272 for F=28, H=4)."""
    f, h, layers = num_features, hidden_size, hidden_layers
    return 2 * (f * h + (layers - 1) * h * h + 2 * h)


def flops_per_param(spec) -> int:
    return int(sum(flops_breakdown(spec).values()))


# ----------------------------------------------------------------------------- machine and timing
def sgemm_ceiling(n: int, repeats: int) -> Dict[str, Any]:
    out = timing.sgemm_gflops(n=n, repeats=repeats)
    out["sgemm_source"] = "lopt_ext.timing.sgemm_gflops (numpy float32 matmul, best of repeats)"
    return out


def stream_ceiling(mib: int, repeats: int) -> Dict[str, Any]:
    return timing.stream_gbs(mib=mib, repeats=repeats)


def machine_info() -> Dict[str, Any]:
    import platform
    import jax
    import optax
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = None
    return {"cpu_model": timing.cpu_model(), "cpu_count": os.cpu_count(), "memory_bytes": mem,
            "jax": jax.__version__, "optax": optax.__version__, "numpy": np.__version__,
            "backend": jax.default_backend(), "platform": platform.platform()}


def time_step(tx, n: int, repeats: int, seed: int = 0, min_timed_s: float = 0.0) -> Dict[str, Any]:
    """Median wall time (s) of the jitted, donated step on one float32 matrix of ~n parameters
    (r x r, r = round(sqrt(n))), by lopt_ext.timing (two warm-up calls). Skipped (time None,
    with a reason) when XLA's temporaries of the compiled step would not fit in half the
    available memory."""
    import jax
    import jax.numpy as jnp
    r = int(round(math.sqrt(n)))
    shapes = {"w": (r, r)}
    compiled = compile_step(tx, shapes)
    temps = temp_bytes(compiled)
    avail = timing.available_memory_bytes()
    need = (temps or 0) + 3 * 4 * r * r + state_bytes(tx, shapes)
    if avail is not None and need > avail // 2:
        return {"time_s": None, "params": r * r, "temp_bytes": temps,
                "reason": f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"}
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = {"w": jax.random.normal(k1, (r, r), jnp.float32)}
    grads = {"w": 1e-3 * jax.random.normal(k2, (r, r), jnp.float32)}
    carry = [(params, tx.init(params))]

    def run():
        carry[0] = jax.block_until_ready(compiled(*carry[0], grads))

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers.*")
        # fast steps (sub-millisecond at 1e6) get more rounds: at least ~min_timed_s of timing
        times = timing.time_calls(run, rounds=repeats, warmup=2, min_timed_s=min_timed_s)
    carry.clear()  # frees the buffers before the next measurement
    return {"time_s": float(np.median(times)), "times_s": [float(t) for t in times], "params": r * r,
            "temp_bytes": temps}


# ----------------------------------------------------------------------------- performance
def held_out_tasks(num: Optional[int] = None) -> List[str]:
    """The held-out split; with ``num``, its ``num`` smallest tasks by parameter count."""
    from lopt_ext.tasks import family
    names = family.list_tasks("test")
    if num:
        sizes = {n: family.get_task(n).num_params() for n in names}
        names = sorted(names, key=lambda n: (sizes[n], n))[:num]
    return names


def prepare_adam_cache(cache_dir: str, seeds: Sequence[int], horizon: int, source: str = ADAM_CACHE) -> str:
    """CACHE/adam_baselines.json: the entries of the committed tuned-Adam cache that this run can
    use (same seeds and horizon), merged into the run's own copy (the committed file is only read)."""
    from lopt_ext.checkpoint import atomic_write_bytes
    path = os.path.join(cache_dir, "adam_baselines.json")
    local = {}
    if os.path.isfile(path):
        with open(path) as f:
            local = json.load(f)
    if os.path.isfile(source) and os.path.abspath(source) != os.path.abspath(path):
        with open(source) as f:
            committed = json.load(f)
        usable = {}
        for key, value in committed.items():
            try:
                k = json.loads(key)
            except ValueError:
                continue
            if list(k[2]) == list(seeds) and int(k[3]) == int(horizon) and key not in local:
                usable[key] = value
        if usable or not os.path.isfile(path):
            atomic_write_bytes(path, json.dumps(dict(usable, **local)).encode())
    return path


def hand_task_result(task, name: str, seeds, horizon: int, every: int, lrs, adam_cache: str,
                     hand_cache: Optional[str]) -> Dict[str, Any]:
    """An evaluate_task-shaped result of a tuned hand-designed optimizer on one task (against both
    tuned Adam baselines), so that evaluate.summarize reads it as it reads a learned one."""
    from lopt_ext.metatrain import evaluate as ev
    if name == "adam":
        mine = ev.baseline_sweep(task, "adam", seeds, horizon, every, lrs, adam_cache, (horizon,))
    else:
        mine = ev.baseline_sweep(task, name, seeds, horizon, every, lrs, hand_cache, (horizon,))
    curve = np.asarray(mine["curve"], np.float64)
    entry = {}
    for base_name in ev.BASELINES:
        base = ev.baseline_sweep(task, base_name, seeds, horizon, every, lrs, adam_cache, (horizon,))
        per_seed = ev.compare(curve, np.asarray(base["curve"]), horizon, every)
        finals_l = [p["lopt_final"] for p in per_seed]
        finals_b = [p["baseline_final"] for p in per_seed]
        mean_ratio = (float(np.mean(finals_l)) / float(np.mean(finals_b))
                      if None not in finals_l and None not in finals_b else None)
        entry[base_name] = {"best_lr": base["best_lr"], "per_seed": per_seed, "mean_final_ratio": mean_ratio}
    return {"task": task.name, "seeds": list(seeds), "best_lr": mine["best_lr"],
            "by_horizon": {str(horizon): entry}}


def performance_from(results, horizon: int) -> Dict[str, Any]:
    from lopt_ext.metatrain import evaluate as ev
    s = ev.summarize(results, (horizon,))[f"adam@{horizon}"]
    return {"median_steps_ratio": s["median_steps_ratio"], "median_final_ratio": s["median_final_ratio"],
            "tasks_worse_than_1.5x": len(s["tasks_worse_than_1.5x"]),
            "tasks_worse_than_1.5x_names": list(s["tasks_worse_than_1.5x"]),
            "diverged": s["diverged_task_seeds"], "reached_and_stayed": s["reached_and_stayed"],
            "task_seeds": s["task_seeds"], "tasks": s["tasks"],
            "per_task_mean_final_ratio": {r["task"]: r["by_horizon"][str(horizon)]["adam"]["mean_final_ratio"]
                                          for r in results}}


# ----------------------------------------------------------------------------- the study
def _clean(obj):
    """JSON-safe: non-finite floats become null, numpy scalars Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj


def memory_and_compute(name: str, lopt=None, theta=None, sizes: Optional[Dict[str, int]] = None,
                       repeats: int = 3, mlp: Optional[Dict[str, Tuple[int, ...]]] = None,
                       transformer: Optional[Dict[str, Tuple[int, ...]]] = None,
                       min_timed_s: float = 0.0) -> Dict[str, Any]:
    """One optimizer's record with the memory and compute axes (``lopt`` None: the hand-designed
    optimizer ``name``). Step times are absolute here (``compute["step_time_s"]``); ``add_ratios``
    turns them into ratios to Adam. A fused kernel that fails (probe or measurement) leaves its
    fields null with the reason in ``null_reasons``."""
    sizes = sizes or {"1e6": 10 ** 6, "1e7": 10 ** 7}
    mlp = mlp or mlp_shapes()
    transformer = transformer or transformer_shapes(**TRANSFORMER)
    rec: Dict[str, Any] = {"name": name, "family": "hand-designed" if lopt is None else "learned",
                           "null_reasons": {}}
    if lopt is None:
        rec["description"] = HAND_DESCRIPTIONS.get(name, name)
        impls = {"unfused": hand_tx(name)}
        rec["null_reasons"]["fused"] = "hand-designed (optax): one XLA-compiled step, reported as unfused"
        rec["flops_breakdown"] = flops_breakdown(name)
    else:
        reason = fused_probe(lopt, theta)
        rec["fused_available"] = reason is None
        impls = {"unfused": learned_tx(lopt, theta, "reference")}
        if reason is None:
            impls["fused"] = learned_tx(lopt, theta, "fused")
        else:
            rec["null_reasons"]["fused"] = f"fused kernel unavailable: {reason}"
        rec["flops_breakdown"] = flops_breakdown(lopt)
    memory = {"state_bytes_per_param_mlp": state_bytes_per_param(impls["unfused"], mlp),
              "state_bytes_per_param_transformer": state_bytes_per_param(impls["unfused"], transformer)}
    compute: Dict[str, Any] = {"flops_per_param": int(sum(rec["flops_breakdown"].values())), "step_time_s": {}}
    for impl in ("fused", "unfused"):
        memory[f"temp_bytes_per_param_{impl}"] = None
        for k in sizes:
            compute[f"step_time_ratio_{k}_{impl}"] = None
            compute["step_time_s"][f"{k}_{impl}"] = None
        if impl not in impls:
            continue
        try:
            memory[f"temp_bytes_per_param_{impl}"] = _div(temp_bytes(compile_step(impls[impl], mlp)), num_params(mlp))
            for k, size in sizes.items():
                res = time_step(impls[impl], size, repeats, min_timed_s=min_timed_s)
                compute["step_time_s"][f"{k}_{impl}"] = res["time_s"]
                if res["time_s"] is None:
                    rec["null_reasons"][f"step_time_{k}_{impl}"] = res["reason"]
        except Exception as e:  # noqa: BLE001  (a kernel failing on these shapes: record, keep going)
            rec["null_reasons"][impl] = f"measurement failed: {_reason(e)}"
            memory[f"temp_bytes_per_param_{impl}"] = None
            compute["step_time_s"].update({f"{k}_{impl}": None for k in sizes})
            if impl == "fused":
                rec["fused_available"] = False
    rec["memory"], rec["compute"] = memory, compute
    return rec


def add_ratios(rec: Dict[str, Any], adam_step_s: Dict[str, float]) -> None:
    """compute["step_time_ratio_<size>_<impl>"] = step time / Adam's at that size."""
    for key, t in rec["compute"]["step_time_s"].items():
        k = key.split("_", 1)[0]
        rec["compute"][f"step_time_ratio_{key}"] = _div(t, adam_step_s.get(k))


def run_study(out_dir: str, quick: bool = False, only: Optional[Sequence[str]] = None,
              seeds: Optional[Sequence[int]] = None, horizon: Optional[int] = None,
              repeats: Optional[int] = None, theta_dir: str = THETA_DIR, progress: bool = True,
              command: str = "") -> Dict[str, Any]:
    """Measures every selected optimizer on the three axes; writes DIR/tradeoffs.json, .md and
    the two Pareto PNGs; returns the JSON document."""
    from lopt_ext import checkpoint, variants
    from lopt_ext.metatrain import evaluate as ev
    from lopt_ext.tasks import family

    cfg = settings(quick, seeds, horizon, repeats)
    names = [n for n in study_names() if not only or n in only]
    t_start = time.perf_counter()
    phase_s: Dict[str, float] = {}
    load_start = os.getloadavg()
    cache_dir = os.path.join(out_dir, "cache")
    os.makedirs(cache_dir, exist_ok=True)
    task_names = held_out_tasks(cfg["num_tasks"])
    seeds_t = tuple(cfg["seeds"])
    T, every, lrs = cfg["horizon"], ev.EVERY, ev.DEFAULT_LRS
    adam_cache = prepare_adam_cache(cache_dir, seeds_t, T)
    hand_cache = os.path.join(cache_dir, "hand_sweeps.json")
    committed_hand = os.path.join(REPO_ROOT, COMMITTED_OUT, "cache", "hand_sweeps.json")
    if not os.path.isfile(hand_cache) and os.path.isfile(committed_hand):  # reuse the study's sweeps (only read)
        shutil.copyfile(committed_hand, hand_cache)
    sizes, reps = cfg["timing_sizes"], cfg["repeats"]

    learned = {n: load_learned(n, quick, theta_dir) for n in names if n not in HAND_DESIGNED}
    work = (["machine ceilings", "adam timing"] + [f"{n}: memory and compute" for n in names]
            + ["adam timing (again)"] + [f"{n}: {t}" for n in names for t in task_names])
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(work), desc="tradeoffs", dynamic_ncols=True)

    def tick(what):
        if bar is not None:
            bar.set_postfix_str(what[:60], refresh=False)
            bar.update(1)

    t0 = time.perf_counter()
    machine = machine_info()
    machine["loadavg_start"] = list(load_start)
    ceilings = dict(sgemm_ceiling(cfg["sgemm_n"], cfg["sgemm_repeats"]))
    ceilings.update(stream_ceiling(cfg["stream_mib"], reps))
    tick(work[0])
    phase_s["ceilings"] = time.perf_counter() - t0

    # Adam's step times, the reference of every ratio: timed before and after the others, pooled
    t0 = time.perf_counter()
    adam_tx = hand_tx("adam")
    min_s = cfg["min_timed_s"]
    adam_times = {k: time_step(adam_tx, n, reps, min_timed_s=min_s)["times_s"] for k, n in sizes.items()}
    tick(work[1])
    mlp, trf = mlp_shapes(), transformer_shapes(**TRANSFORMER)
    records: Dict[str, Dict[str, Any]] = {}
    for n in names:
        lopt, theta, label, _ = learned.get(n, (None, None, None, None))
        rec = memory_and_compute(n, lopt, theta, sizes, reps, mlp, trf, min_timed_s=min_s)
        if lopt is not None:
            v = variants.STUDY[n]
            rec.update(description=v.description, kind=v.kind, hidden_size=v.hidden_size, theta=label,
                       lopt=checkpoint.lopt_to_json(lopt))
        records[n] = rec
        tick(f"{n}: memory and compute")
    for k, size in sizes.items():
        adam_times[k] += time_step(adam_tx, size, reps, min_timed_s=min_s)["times_s"]
    adam_step_s = {k: float(np.median(v)) for k, v in adam_times.items()}
    for rec in records.values():
        add_ratios(rec, adam_step_s)
    tick("adam timing (again)")
    phase_s["memory_and_compute"] = time.perf_counter() - t0

    # performance
    t0 = time.perf_counter()
    tasks_objs = {t: family.get_task(t) for t in task_names}
    for n in names:
        rec = records[n]
        results = []
        if n in HAND_DESIGNED:
            for t in task_names:
                results.append(hand_task_result(tasks_objs[t], n, seeds_t, T, every, lrs, adam_cache, hand_cache))
                tick(f"{n}: {t}")
            perf = performance_from(results, T)
            perf["best_lr"] = {r["task"]: r["best_lr"] for r in results}
            perf["meta_training_cpu_hours"] = None
            rec["null_reasons"]["meta_training_cpu_hours"] = "hand-designed: no meta-training"
        else:
            lopt, theta, label, hours = learned[n]
            impl = "fused" if rec.get("fused_available") else "reference"
            for t in task_names:
                results += ev.evaluate([t], lopt, theta, seeds=seeds_t, horizons=(T,), every=every, lrs=lrs,
                                       impl=impl, progress=False, adam_cache=adam_cache)
                tick(f"{n}: {t}")
            perf = performance_from(results, T)
            perf["impl"] = impl
            perf["meta_training_cpu_hours"] = hours
            if hours is None:
                rec["null_reasons"]["meta_training_cpu_hours"] = (
                    "untrained theta (--quick)" if label == UNTRAINED else
                    "published weights meta-trained elsewhere (Celo: 24 GPU-hours)" if lopt.uses_loss else
                    "no budget recorded in the theta file")
        rec["performance"] = perf
    if bar is not None:
        bar.close()
    phase_s["performance"] = time.perf_counter() - t0

    machine["loadavg_end"] = list(os.getloadavg())
    doc = {
        "study": STUDY_TITLE, "mode": cfg["mode"], "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": time.perf_counter() - t_start,
        "phase_s": phase_s, "protocol": __doc__.split("\nOnly the standard library")[0].strip(),
        "machine": machine, "ceilings": ceilings,
        "settings": {"tasks": task_names, "seeds": list(seeds_t), "horizon": T, "every": every,
                     "smooth": ev.SMOOTH, "lrs": [float(x) for x in lrs], "fail_ratio": ev.FAIL_RATIO,
                     "timing_params": {k: int(round(math.sqrt(v))) ** 2 for k, v in sizes.items()},
                     "timing_repeats": reps, "adam_step_time_s": adam_step_s,
                     "mlp_pytree": {"widths": list(MLP_WIDTHS), "params": num_params(mlp)},
                     "transformer_pytree": dict(TRANSFORMER, params=num_params(trf)),
                     "adam_cache": adam_cache, "hand_sweep_cache": hand_cache},
        "optimizers": records,
    }
    doc = _clean(doc)
    write_outputs(doc, out_dir)
    return doc


def _div(a, b):
    return None if a is None or b in (None, 0) else a / b
