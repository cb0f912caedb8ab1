"""Persistent Evolution Strategies (PES) over truncated unrolls of the task family.

Algorithm (Vicol, Metz, Sohl-Dickstein, ICML 2021), as used here:
- A population of ``num_tasks`` task slots. Each slot holds one task of the training split
  and ``pairs`` antithetic pairs; each pair has its own persistent inner state for the positive
  and for the negative member (params + small_fc_lopt state) and an accumulated perturbation xi.
- Outer step: for each slot draw eps_i ~ N(0, sigma^2 I) per pair, run ``unroll`` inner steps
  of all 2*pairs members (theta + eps_i, theta - eps_i) with ONE jitted function: a vmap over
  the members (spread over the host's CPU devices, population.py) of a lax.scan whose body
  computes the task gradient and applies the learned optimizer through the fused kernel (one
  custom call per step and device for its members).
- Member loss L = mean over the unroll of the per-step training loss divided by the task's
  loss_scale, clipped to ``loss_clip`` (NaN/Inf -> loss_clip, member counted as failed).
- PES: xi_i <- xi_i + eps_i;  g = sum_i xi_i (L+_i - L-_i) / (2 sigma^2 pairs), averaged over
  slots. ES (``estimator="es"``): xi_i is replaced by eps_i and, after each unroll, both members of
  a pair continue from the positive member's state (truncated ES).
- A pair whose member failed is reset (fresh params, zero state, xi = 0), so a divergence never
  leaks NaN into theta; a slot whose trajectory reached its horizon draws a new task and resets.
- Outer optimiser: optax clip_by_global_norm -> Adam with warmup + cosine schedule.
All randomness comes from one jax PRNG key carried in the state, so a resumed run repeats the
uninterrupted run bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from lopt_ext import timing
from lopt_ext.config import SmallFcLOpt
from lopt_ext.variants import KINDS as LOPT_KINDS
from lopt_ext.state import init_state
from lopt_ext.tasks import family
from lopt_ext.metatrain import compiled, distributed, population


OBJECTIVES = ("normalized", "log", "valid_log")


@dataclasses.dataclass(frozen=True)
class MetaTrainConfig:
    hidden_size: int = 4
    hidden_layers: int = 2
    num_tasks: int = 4            # task slots in the population
    pairs: int = 4                # antithetic pairs per slot (2*pairs members vmapped)
    unroll: int = 20              # inner steps per truncation
    min_horizon: int = 200        # inner trajectory length, drawn uniformly, multiple of unroll
    max_horizon: int = 1000
    sigma: float = 0.01
    outer_lr: float = 3e-3
    outer_steps: int = 1000
    warmup_steps: int = 50
    final_lr_fraction: float = 0.1
    grad_clip: float = 1.0
    loss_clip: float = 2.0
    estimator: str = "pes"        # "pes" or "es"
    impl: str = "fused"           # inner-step implementation: "fused" or "reference"
    split: str = "train"
    task_names: Tuple[str, ...] = ()   # if set: meta-train on these tasks (by name) instead of the split
    # per-step value: training-batch loss/scale ("normalized"), log(loss/scale) ("log"), or
    # log(validation-batch loss/scale) after the step ("valid_log": held-out data, late progress
    # counts as much as early progress)
    objective: str = "normalized"
    init_theta: str = ""               # start from this theta .safetensors instead of a random init
    lopt_kind: str = "small_fc_lopt"   # a key of lopt_ext.variants.KINDS
    # meta-train only these entries of theta ("/"-joined tree paths, e.g. tensor_scale/w_lin);
    # the rest stays at its initial value. Empty: all of theta.
    train_only: Tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "task_names", tuple(self.task_names))
        object.__setattr__(self, "train_only", tuple(self.train_only))
        if self.estimator not in ("pes", "es"):
            raise ValueError(f"estimator must be 'pes' or 'es', got {self.estimator!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.lopt_kind not in LOPT_KINDS:
            raise ValueError(f"lopt_kind must be one of {tuple(LOPT_KINDS)}, got {self.lopt_kind!r}")
        if self.impl not in ("fused", "reference"):
            raise ValueError(f"impl must be 'fused' or 'reference', got {self.impl!r}")
        if self.min_horizon < self.unroll or self.max_horizon < self.min_horizon:
            raise ValueError("need unroll <= min_horizon <= max_horizon")
        for name in ("num_tasks", "pairs", "unroll", "outer_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    def lopt(self) -> SmallFcLOpt:
        return LOPT_KINDS[self.lopt_kind](hidden_size=self.hidden_size, hidden_layers=self.hidden_layers)

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def make_outer_optimizer(cfg: MetaTrainConfig):
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.outer_lr, warmup_steps=max(cfg.warmup_steps, 1),
        decay_steps=max(cfg.outer_steps, cfg.warmup_steps + 1), end_value=cfg.outer_lr * cfg.final_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adam(schedule))


@dataclasses.dataclass
class Slot:
    """One task of the population with its antithetic pairs (leading axis 2*pairs: + then -)."""
    spec_index: int
    step: int          # inner steps done in this trajectory
    horizon: int       # inner steps of this trajectory
    params: Any        # task params, leading axis [2P]
    opt_state: Any     # SmallFcLOptState, leading axis [2P]
    accum: jax.Array   # [P, D] accumulated perturbations (PES)
    data_keys: jax.Array  # [P, 2] one batch stream per pair, shared by its two members

    def __post_init__(self):  # where the slot step takes them (fresh or loaded arrays)
        place = lambda tree: jax.tree_util.tree_map(
            lambda x: population.place(x, population.member_sharding(x.shape[0])), tree)
        self.params, self.opt_state, self.accum, self.data_keys = (
            place(self.params), place(self.opt_state), place(self.accum), place(self.data_keys))

    def arrays(self):
        return {"params": self.params, "opt_state": self.opt_state, "accum": self.accum,
                "data_keys": self.data_keys}


@dataclasses.dataclass
class PendingStats:
    """An outer step's statistics, still on the device until ``result()``."""
    step: int
    losses: jax.Array
    failed: jax.Array
    grad_norm: jax.Array
    tasks: List[str]

    def result(self) -> Dict[str, Any]:
        losses, failed, grad_norm = jax.device_get((self.losses, self.failed, self.grad_norm))  # one wait
        return {"step": self.step, "meta_loss": float(np.mean(losses)), "grad_norm": float(grad_norm),
                "failed": int(np.sum(failed)), "tasks": self.tasks}


@dataclasses.dataclass
class MetaState:
    step: int
    theta_flat: jax.Array
    outer_opt_state: Any
    slots: List[Slot]
    key: jax.Array

    def __post_init__(self):  # replicated on the population's devices, as the outer update leaves them
        self.theta_flat = population.place(self.theta_flat, population.replicated())
        self.outer_opt_state = population.place(self.outer_opt_state, population.replicated())


class MetaTrainer:
    def __init__(self, cfg: MetaTrainConfig):
        self.cfg = cfg
        if cfg.num_tasks < jax.process_count():
            raise ValueError(f"num_tasks ({cfg.num_tasks}) must be at least the number of processes "
                             f"({jax.process_count()}): each process steps its share of the task slots")
        self.lopt = cfg.lopt()
        if cfg.task_names:
            self.specs = tuple(family.get_task(n).spec for n in cfg.task_names)
        else:
            self.specs = family.SPLITS[cfg.split]
        theta0 = self.lopt.init_theta(jax.random.PRNGKey(0))
        _, self.unravel = ravel_pytree(theta0)
        self.dim = int(ravel_pytree(theta0)[0].size)
        self.outer_opt = make_outer_optimizer(cfg)
        # An outer step is three kinds of dispatch: its keys, one slot step per slot, the update.
        # Each eager op on the population's devices costs ~0.1 ms of host time, which on 2 cores
        # is taken from the slots' compute.
        self._step_keys = jax.jit(functools.partial(_step_keys, num_slots=cfg.num_tasks))
        self._outer_update = jax.jit(self._outer_update_impl, out_shardings=population.replicated())

    # ----- state -----
    def init(self, seed: int | None = None) -> MetaState:
        seed = self.cfg.seed if seed is None else seed
        key = jax.random.PRNGKey(seed)
        key, k_theta = jax.random.split(key)
        theta = self.lopt.init_theta(k_theta)
        if self.cfg.init_theta:
            theta = warm_start_theta(self.cfg.init_theta, self.lopt, theta)
        theta_flat, _ = ravel_pytree(theta)
        key, slots = self.draw_slots(key)
        return MetaState(0, theta_flat, self.outer_opt.init(theta_flat), slots, key)

    def draw_slots(self, key):
        """(key, num_tasks fresh task slots drawn from it)."""
        slots = []
        for i in range(self.cfg.num_tasks):
            key, k = jax.random.split(key)
            slots.append(self._new_slot(k, self.owns(i)))
        return key, slots

    def _draw_task(self, key):
        k_task, k_hor, k_init = jax.random.split(key, 3)
        spec_index = int(jax.random.randint(k_task, (), 0, len(self.specs)))
        n_min = self.cfg.min_horizon // self.cfg.unroll
        n_max = self.cfg.max_horizon // self.cfg.unroll
        horizon = int(jax.random.randint(k_hor, (), n_min, n_max + 1)) * self.cfg.unroll
        return spec_index, horizon, k_init

    def owns(self, slot_index: int) -> bool:
        """Whether this process steps slot ``slot_index`` (always, in one process; distributed.py)."""
        return distributed.owner(slot_index, jax.process_count()) == jax.process_index()

    def _new_slot(self, key, owned: bool = True) -> Slot:
        spec_index, horizon, k_init = self._draw_task(key)
        if not owned:  # another process's slot: its task and horizon only
            return Slot(spec_index, 0, horizon, None, None, None, None)
        task = family.make_task(self.specs[spec_index])
        params, opt_state, accum, data_keys = self._init_pairs_fn(task)(k_init, jnp.int32(horizon))
        return Slot(spec_index, 0, horizon, params, opt_state, accum, data_keys)

    def slot_task(self, slot: Slot):
        return family.make_task(self.specs[slot.spec_index])

    def _init_pairs_fn(self, task):
        return _init_pairs_cached(self.cfg, task)

    def _slot_step_fn(self, task, impl: str):
        return _slot_step_cached(self.cfg, task, impl)

    def _outer_update_impl(self, theta_flat, opt_state, grads, losses, failed):
        """The outer update from every slot's (gradient, loss, failures), in slot order;
        also returns the gradient's norm and the slots' losses and failures stacked."""
        grad = jnp.mean(jnp.stack(grads), axis=0)
        grad = jnp.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        updates, opt_state = self.outer_opt.update(grad, opt_state, theta_flat)
        return optax.apply_updates(theta_flat, updates), opt_state, _norm(grad), jnp.stack(losses), jnp.stack(failed)


    def outer_step(self, ms: MetaState) -> "PendingStats":
        """One outer step in place on ``ms``, dispatched without waiting for its result;
        ``.result()`` of the returned stats waits and gives floats. Reading them only after the
        next step has been dispatched keeps the host from idling the cores between steps."""
        key, slot_keys = self._step_keys(ms.key)
        # every slot is dispatched before anything is read back: no host round trip until
        # the outer update has been queued
        results = []
        for i, slot in enumerate(ms.slots):
            if self.owns(i):
                fn = self._slot_step_fn(self.slot_task(slot), self.cfg.impl)
                (slot.params, slot.opt_state, slot.accum, slot.data_keys, grad, stats) = fn(
                    ms.theta_flat, slot.params, slot.opt_state, slot.accum, slot.data_keys,
                    jnp.int32(slot.step), slot_keys[2 * i])
                results.append((grad, stats["meta_loss"], stats["failed"]))
            slot.step += self.cfg.unroll
            if slot.step >= slot.horizon:
                ms.slots[i] = self._new_slot(slot_keys[2 * i + 1], self.owns(i))
        # with several processes: every slot's results, in slot order, on every process
        grads, losses, failed = zip(*distributed.gather_in_slot_order(results, len(ms.slots)))
        ms.theta_flat, ms.outer_opt_state, gnorm, losses, failed = self._outer_update(
            ms.theta_flat, ms.outer_opt_state, grads, losses, failed)
        ms.key = key
        ms.step += 1
        return PendingStats(ms.step, losses, failed, gnorm,
                            [family.task_name(self.specs[s.spec_index]) for s in ms.slots])

    def theta(self, ms: MetaState):
        return self.unravel(ms.theta_flat)

    # ----- timing: inner step inside meta-training, fused vs reference -----
    def time_inner_step(self, ms: MetaState, slot_index: int = 0, repeats: int = 3) -> Dict[str, float]:
        """Seconds per inner step per member of one slot's population unroll, both impls."""
        slot = ms.slots[slot_index]
        task = self.slot_task(slot)
        out = {"task": task.name, "members": 2 * self.cfg.pairs}
        for impl in ("fused", "reference"):
            fn = self._slot_step_fn(task, impl)
            args = (ms.theta_flat, slot.params, slot.opt_state, slot.accum, slot.data_keys,
                    jnp.int32(slot.step), jax.random.PRNGKey(0))
            median = timing.median_step_s(lambda: jax.block_until_ready(fn(*args)), rounds=repeats, warmup=1)
            out[f"{impl}_unroll_s"] = median
            out[f"{impl}_inner_step_us"] = median / (self.cfg.unroll * 2 * self.cfg.pairs) * 1e6
        out["speedup"] = out["reference_unroll_s"] / out["fused_unroll_s"]
        return out


# Compiled functions are cached per (config, task, impl) at module level, so that several
# trainers of the same configuration (e.g. a run and its resumption) share compilations. The
# caches hold as many tasks as fit under the OS's mapping limit (compiled.py): 44 tasks at
# Linux's default, so a run on the 53-task training split recompiles the least recently used
# ones instead of crashing; 223 once the limit is raised as meta-train advises.
COMPILED_SLOT_STEPS = compiled.tasks_that_fit()


@functools.lru_cache(maxsize=COMPILED_SLOT_STEPS)
def _init_pairs_cached(cfg: MetaTrainConfig, task):
    P, lopt = cfg.pairs, cfg.lopt()
    dim = int(ravel_pytree(lopt.init_theta(jax.random.PRNGKey(0)))[0].size)

    def init_pairs(key, horizon):
        """horizon: the trajectory's length, which a horizon-aware rule keeps in its state."""
        k_params, k_data = jax.random.split(key)
        params = jax.vmap(task.init)(jax.random.split(k_params, P))
        params2 = jax.tree_util.tree_map(lambda x: jnp.concatenate([x, x]), params)
        state = jax.vmap(lambda p: init_state(lopt, p, num_steps=horizon))(params2)
        return params2, state, jnp.zeros((P, dim), jnp.float32), jax.random.split(k_data, P)

    return _jit_slot_arrays(init_pairs, cfg)


def _slot_shardings(cfg: MetaTrainConfig):
    """Shardings of a slot's params, opt_state, accum and data_keys (None: one device)."""
    pop, pairs = population.member_sharding(2 * cfg.pairs), population.member_sharding(cfg.pairs)
    return None if pop is None else (pop, pop, pairs, pairs)


def _jit_slot_arrays(fn, cfg: MetaTrainConfig, extra_outputs: int = 0):
    """jit whose first four outputs (a slot's arrays) come out sharded as the slot step takes
    them, so that it compiles once per task."""
    shardings = _slot_shardings(cfg)
    if shardings is None:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=shardings + (population.replicated(),) * extra_outputs)


@functools.lru_cache(maxsize=COMPILED_SLOT_STEPS)
def _slot_step_cached(cfg: MetaTrainConfig, task, impl: str):
    """jit of one truncation of one slot: all 2*pairs members vmapped (the hot path)."""
    lopt = cfg.lopt()
    _, unravel = ravel_pytree(lopt.init_theta(jax.random.PRNGKey(0)))
    P, K = cfg.pairs, cfg.unroll
    init_pairs = _init_pairs_cached(cfg, task)
    mask = trainable_mask(cfg)
    scale = float(task.loss_scale)

    def member_unroll(theta_flat, params, state, data_key, start):
        # a horizon-aware rule reads its trajectory's length from the state init_pairs made
        tx = lopt.transform(unravel(theta_flat), impl=impl, num_steps=state.num_steps if lopt.uses_horizon else None)

        def body(carry, i):
            params, state = carry
            key = jax.random.fold_in(data_key, start + i)
            loss, grads = jax.value_and_grad(task.loss)(params, task.sample_batch(key))
            if not lopt.uses_loss:
                updates, state = tx.update(grads, state, params)
            else:  # a loss-reading rule gets the losses it reads: this batch's, a validation batch's, or both
                losses = {"value": loss} if lopt.loss_source == "train" else {}
                if lopt.loss_source == "validation" or lopt.uses_validation_loss:
                    losses["validation_value" if losses else "value"] = task.loss(params, task.valid_batch(key))
                updates, state = tx.update(grads, state, params, **losses)
            params = optax.apply_updates(params, updates)
            if cfg.objective == "valid_log":  # held-out batch, scored after the step
                loss = task.loss(params, task.valid_batch(key))
            return (params, state), loss

        (params, state), losses = lax.scan(body, (params, state), jnp.arange(K))
        return params, state, losses

    population_unroll = population.population_vmap(member_unroll, in_axes=(0, 0, 0, 0, None))

    def slot_step(theta_flat, params, state, accum, data_keys, start, key):
        k_eps, k_reset = jax.random.split(key)
        eps = cfg.sigma * jax.random.normal(k_eps, (P, theta_flat.size), jnp.float32)
        if mask is not None:  # perturb (and so estimate gradients for) the trained entries only
            eps = eps * mask
        thetas = theta_flat[None] + jnp.concatenate([eps, -eps])
        keys2 = jnp.concatenate([data_keys, data_keys])
        params, state, losses = population_unroll(thetas, params, state, keys2, start)
        norm = losses / scale
        finite_params = jax.vmap(lambda p: jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(p)])))(params)
        member_failed = ~(jnp.all(jnp.isfinite(norm), axis=1) & finite_params)
        value = jnp.clip(jnp.nan_to_num(norm, nan=cfg.loss_clip, posinf=cfg.loss_clip, neginf=cfg.loss_clip),
                         None, cfg.loss_clip)
        if cfg.objective in ("log", "valid_log"):  # late, small losses weigh as much as early ones
            value = jnp.log(jnp.maximum(value, 1e-6))
        worst = cfg.loss_clip if cfg.objective == "normalized" else float(np.log(cfg.loss_clip))
        member_loss = jnp.where(member_failed, worst, jnp.mean(value, axis=1))
        l_pos, l_neg = member_loss[:P], member_loss[P:]
        if cfg.estimator == "pes":
            accum = accum + eps
            direction = accum
        else:
            direction = eps
        grad = jnp.einsum("p,pd->d", l_pos - l_neg, direction) / (2 * cfg.sigma ** 2 * P)
        if cfg.estimator == "es":  # both members continue from the positive member
            take_pos = lambda x: jnp.concatenate([x[:P], x[:P]])
            params = jax.tree_util.tree_map(take_pos, params)
            state = jax.tree_util.tree_map(take_pos, state)
        # reset failed pairs: fresh params and state, zero accumulator, new data stream
        pair_failed = member_failed[:P] | member_failed[P:]
        f_params, f_state, _, f_keys = init_pairs(k_reset, jnp.int32(0))
        if lopt.uses_horizon:  # a reset pair keeps its slot's horizon
            f_state = f_state._replace(num_steps=state.num_steps)
        sel2 = jnp.concatenate([pair_failed, pair_failed])

        def pick(new, old):
            mask = sel2.reshape((-1,) + (1,) * (old.ndim - 1))
            return jnp.where(mask, new, old)

        params = jax.tree_util.tree_map(pick, f_params, params)
        state = jax.tree_util.tree_map(pick, f_state, state)
        accum = jnp.where(pair_failed[:, None], 0.0, accum)
        data_keys = jnp.where(pair_failed[:, None], f_keys, data_keys)
        stats = {"meta_loss": jnp.mean(member_loss), "failed": jnp.sum(member_failed)}
        return params, state, accum, data_keys, grad, stats

    return _jit_slot_arrays(slot_step, cfg, extra_outputs=2)


def _step_keys(key, num_slots: int):
    """(the next state's key, the outer step's 2 * num_slots keys as separate arrays: each
    slot's truncation key and its key for a new task), split from ``key``: separate outputs, so
    that no indexing op runs per slot."""
    key, k_step = jax.random.split(key)
    slot_keys = jax.random.split(k_step, 2 * num_slots)
    return key, tuple(slot_keys[i] for i in range(2 * num_slots))


def trainable_mask(cfg: MetaTrainConfig):
    """None (all of theta is meta-trained), or a float32 0/1 vector over the flat theta
    marking the entries named by cfg.train_only."""
    if not cfg.train_only:
        return None
    lopt = cfg.lopt()
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    paths, treedef = jax.tree_util.tree_flatten_with_path(theta)
    names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in paths]
    unknown = [n for n in cfg.train_only if n not in names]
    if unknown:
        raise ValueError(f"train_only: {unknown} not in theta of {lopt}; entries: {names}")
    leaves = [jnp.full(x.shape, float(n in cfg.train_only), jnp.float32) for n, (_, x) in zip(names, paths)]
    return ravel_pytree(jax.tree_util.tree_unflatten(treedef, leaves))[0]


def warm_start_theta(path: str, lopt: SmallFcLOpt, theta):
    """theta with every entry the file at ``path`` holds: a file of the same configuration
    replaces all of it; a ScaledSmallFcLOpt file starts its progress, horizon and loss input
    variants as the same rule (lopt_ext.scaled.with_progress_inputs, with_horizon_inputs,
    with_loss_inputs); a
    plain small_fc_lopt file of the same sizes gives a scaled variant its per-element part (its
    per-tensor scale keeps the fresh init, s = 1)."""
    from lopt_ext.checkpoint import CheckpointMismatchError, load_theta
    stored, _ = load_theta(path)
    from lopt_ext.scaled import ScaledSmallFcLOpt, with_horizon_inputs, with_loss_inputs, with_progress_inputs
    if (isinstance(lopt, ScaledSmallFcLOpt) and type(stored) is ScaledSmallFcLOpt and stored != lopt
            and all(getattr(lopt, f) or not getattr(stored, f) for f in ("progress_inputs", "horizon_inputs"))
            and (stored.loss_inputs in (None, lopt.loss_inputs)
                 or (stored.loss_inputs, lopt.loss_inputs) == ("train", "train+validation"))
            and dataclasses.replace(stored, progress_inputs=lopt.progress_inputs, horizon_inputs=lopt.horizon_inputs,
                                    loss_inputs=lopt.loss_inputs) == lopt):
        rule, out = stored, load_theta(path, stored)[1]  # the same rule, the new inputs at weight 0
        if lopt.progress_inputs:
            rule, out = with_progress_inputs(rule, out)
        if lopt.horizon_inputs:
            rule, out = with_horizon_inputs(rule, out)
        if lopt.loss_inputs:
            rule, out = with_loss_inputs(rule, out, lopt.loss_inputs)
        return out
    if type(stored) is type(lopt):
        return load_theta(path, lopt)[1]
    base = SmallFcLOpt(**{f.name: getattr(lopt, f.name) for f in dataclasses.fields(SmallFcLOpt)})
    if type(stored) is not SmallFcLOpt or stored != base:
        raise CheckpointMismatchError(f"{path}: holds {stored}, which cannot start {lopt}")
    return dict(theta, **load_theta(path, base)[1])


def _norm(tree):
    tree_norm = getattr(getattr(optax, "tree", None), "norm", None)
    return tree_norm(tree) if tree_norm is not None else optax.global_norm(tree)
