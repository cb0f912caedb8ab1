"""The meta-training loop: checkpoints, resume, logging, progress bar.

Checkpoint directory layout (one directory per saved outer step, written atomically: built under
a temporary name, fsync'd, then os.rename'd; ``latest`` is then replaced atomically):

    OUT/latest                         text: name of the newest complete checkpoint
    OUT/step_000100/theta.safetensors  theta (lopt_ext.checkpoint format; loadable by load_theta)
    OUT/step_000100/state.safetensors  everything else as arrays: "outer/NNNNN" (optax state leaves,
                                       in tree order), "slotI/NNNNN" (slot I: params, small_fc_lopt
                                       states, PES accumulators, data keys, in tree order), "rng/key"
    OUT/step_000100/meta.json          {"format": 1, "step", "config", "slots": [{spec_index, step,
                                       horizon, task}], "wall_time_s", "provenance"}
    OUT/log.jsonl                      one JSON line per outer step (step, meta_loss, grad_norm, ...)
    OUT/theta.safetensors, OUT/provenance.json   the final result (written at the end)

``--resume`` reloads the newest checkpoint, truncates the log to it and continues; because all
randomness lives in the saved PRNG key, the continued run is bit-for-bit the uninterrupted one.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lopt_ext import checkpoint as ckpt
from lopt_ext.metatrain import compiled
from lopt_ext.metatrain.pes import MetaState, MetaTrainConfig, MetaTrainer, Slot
from lopt_ext.tasks import family

FORMAT_VERSION = 1


def _leaves_to_dict(prefix, tree):
    return {f"{prefix}/{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(tree))}


def _dict_to_tree(prefix, flat, template, source):
    leaves, treedef = jax.tree_util.tree_flatten(template)
    out = []
    for i, t in enumerate(leaves):
        name = f"{prefix}/{i:05d}"
        if name not in flat:
            raise ckpt.CheckpointMismatchError(f"{source}: key {name!r} is missing")
        v = flat[name]
        if tuple(v.shape) != tuple(np.shape(t)) or v.dtype != np.asarray(t).dtype:
            raise ckpt.CheckpointMismatchError(
                f"{source}: key {name!r} is {v.dtype}{list(v.shape)}, expected {np.asarray(t).dtype}{list(np.shape(t))}")
        out.append(jnp.asarray(v))
    return jax.tree_util.tree_unflatten(treedef, out)


def _outer_arrays(ms: MetaState) -> Dict[str, np.ndarray]:
    """What full and compact checkpoints both hold: outer optimizer state, theta, PRNG key."""
    arrays = _leaves_to_dict("outer", ms.outer_opt_state)
    arrays["rng/key"] = np.asarray(jax.random.key_data(ms.key) if jnp.issubdtype(ms.key.dtype, jax.dtypes.prng_key)
                                   else ms.key)
    arrays["theta/flat"] = np.asarray(ms.theta_flat)
    return arrays


def save_checkpoint(out_dir: str, trainer: MetaTrainer, ms: MetaState, wall_time_s: float,
                    provenance: Dict[str, Any], keep: int = 2, budget_before: Optional[Dict[str, Any]] = None) -> str:
    name = f"step_{ms.step:06d}"
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".tmp-{name}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    ckpt.save_theta(os.path.join(tmp, "theta.safetensors"), trainer.theta(ms), trainer.lopt,
                    info={"outer_step": ms.step})
    arrays = _outer_arrays(ms)
    for i, slot in enumerate(ms.slots):
        arrays.update(_leaves_to_dict(f"slot{i}", slot.arrays()))
    ckpt.atomic_save_safetensors(os.path.join(tmp, "state.safetensors"), arrays)
    meta = {"format": FORMAT_VERSION, "step": ms.step, "config": trainer.cfg.to_json(),
            "slots": [{"spec_index": s.spec_index, "step": s.step, "horizon": s.horizon,
                       "task": family.task_name(trainer.specs[s.spec_index])} for s in ms.slots],
            "wall_time_s": wall_time_s, "provenance": provenance}
    if budget_before is not None:
        meta["budget_before"] = budget_before
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    ckpt.atomic_write_bytes(os.path.join(out_dir, "latest"), name.encode())
    old = sorted(d for d in os.listdir(out_dir) if d.startswith("step_") and d != name)
    for d in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str) -> Optional[str]:
    path = os.path.join(out_dir, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return os.path.join(out_dir, f.read().strip())


def load_checkpoint(path: str, trainer: Optional[MetaTrainer] = None):
    """(trainer, MetaState, meta dict) from a checkpoint directory."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT_VERSION:
        raise ckpt.CheckpointMismatchError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    cfg = MetaTrainConfig(**meta["config"])
    if trainer is None:
        trainer = MetaTrainer(cfg)
    elif trainer.cfg != cfg:
        raise ckpt.CheckpointMismatchError(f"{path}: checkpoint config {cfg} differs from the trainer's {trainer.cfg}")
    flat, _ = ckpt.read_safetensors(os.path.join(path, "state.safetensors"))
    theta_flat = jnp.asarray(flat["theta/flat"])
    outer = _dict_to_tree("outer", flat, trainer.outer_opt.init(theta_flat), path)
    slots = []
    for i, s in enumerate(meta["slots"]):
        task = family.make_task(trainer.specs[s["spec_index"]])
        params, state, accum, keys = trainer._init_pairs_fn(task)(jax.random.PRNGKey(0), jnp.int32(s["horizon"]))
        tmpl = {"params": params, "opt_state": state, "accum": accum, "data_keys": keys}
        arrs = _dict_to_tree(f"slot{i}", flat, tmpl, path)
        slots.append(Slot(s["spec_index"], s["step"], s["horizon"], arrs["params"], arrs["opt_state"],
                          arrs["accum"], arrs["data_keys"]))
    ms = MetaState(meta["step"], theta_flat, outer, slots, jnp.asarray(flat["rng/key"]))
    return trainer, ms, meta


COMPACT_FORMAT = "lopt_ext.compact-resume-1"


def save_compact(path: str, trainer: MetaTrainer, ms: MetaState, budget: Dict[str, Any],
                 provenance: Dict[str, Any]) -> None:
    """A compact resume checkpoint (a few KB): theta, the outer optimizer's state, the outer
    step (the schedule position), the PRNG key and the budget spent so far. Unlike a full
    checkpoint it holds no inner task states: a run continued from it draws fresh task slots,
    so it continues the meta-training (not the exact trajectory) and can be committed."""
    arrays = _outer_arrays(ms)
    meta = {"format": COMPACT_FORMAT, "step": ms.step, "config": trainer.cfg.to_json(), "budget": budget,
            "provenance": provenance}
    ckpt.atomic_save_safetensors(path, arrays, {"lopt_ext.compact": json.dumps(meta)})


def _read_compact(path: str):
    flat, metadata = ckpt.read_safetensors(path)
    if "lopt_ext.compact" not in metadata:
        raise ckpt.CheckpointMismatchError(f"{path}: not a compact resume checkpoint (no 'lopt_ext.compact' metadata)")
    meta = json.loads(metadata["lopt_ext.compact"])
    if meta.get("format") != COMPACT_FORMAT:
        raise ckpt.CheckpointMismatchError(f"{path}: unknown compact checkpoint format {meta.get('format')!r}")
    return flat, meta


def compact_config(path: str) -> MetaTrainConfig:
    """The configuration a compact resume checkpoint was made with."""
    return MetaTrainConfig(**_read_compact(path)[1]["config"])


def load_compact(path: str, cfg: Optional[MetaTrainConfig] = None):
    """(trainer, MetaState with fresh slots, meta) from ``save_compact``'s file. ``cfg`` may
    change outer_steps (to extend the schedule) and nothing else that shapes theta or the
    estimator; None keeps the stored configuration."""
    flat, meta = _read_compact(path)
    stored = MetaTrainConfig(**meta["config"])
    if cfg is None:
        cfg = stored
    else:
        fixed = ("hidden_size", "hidden_layers", "lopt_kind", "num_tasks", "pairs", "estimator")
        diff = [k for k in fixed if getattr(cfg, k) != getattr(stored, k)]
        if diff:
            raise ckpt.CheckpointMismatchError(f"{path}: was made with {', '.join(f'{k}={getattr(stored, k)!r}' for k in diff)}; "
                                               "a continued run must keep them")
    trainer = MetaTrainer(cfg)
    theta_flat = jnp.asarray(flat["theta/flat"])
    if theta_flat.shape != (trainer.dim,):
        raise ckpt.CheckpointMismatchError(f"{path}: theta has {theta_flat.shape[0]} values, {trainer.lopt} needs {trainer.dim}")
    outer = _dict_to_tree("outer", flat, trainer.outer_opt.init(theta_flat), path)
    key, slots = trainer.draw_slots(jnp.asarray(flat["rng/key"]))
    return trainer, MetaState(meta["step"], theta_flat, outer, slots, key), meta


def _budget(before: Dict[str, Any], wall: float, outer_steps: int, prov: Dict[str, Any]) -> Dict[str, Any]:
    """The budget of every run that led here (continued runs add up). cpu_hours counts this
    machine's cores; a run of processes on several machines used "processes" times as many."""
    return {"wall_s": before["wall_s"] + wall, "cpu_hours": before["cpu_hours"] + _cpu_hours(wall),
            "outer_steps": outer_steps, "cpu_count": os.cpu_count(), "processes": jax.process_count(),
            "runs": before["runs"] + [{"command": prov["command"], "wall_s": wall, "outer_steps_end": outer_steps}]}


# A run on the full training split meets 53 task shapes, each ~1100 memory mappings of compiled
# code (compiled.py): past the limit the least recently used are recompiled, which costs 4-6 s
# each, so a long run wants the limit raised.
MAP_COUNT_WANTED = 262144


def map_count_warning(path: str = compiled.MAP_COUNT_PATH) -> Optional[str]:
    """A one-line warning when the kernel's mapping limit is below what a long run needs."""
    limit = compiled.max_map_count(path)
    if limit is None or limit >= MAP_COUNT_WANTED:
        return None
    return (f"meta-train: warning: vm.max_map_count is {limit}: the compiled steps of only "
            f"{compiled.tasks_that_fit(path)} tasks fit, others are recompiled when met again (4-6 s "
            f"each). Raise it first: sudo sysctl -w vm.max_map_count={MAP_COUNT_WANTED}")


def _cpu_hours(wall_s: float) -> float:
    return wall_s * (os.cpu_count() or 1) / 3600.0


def _provenance(command):
    import lopt_ext
    return {"command": command or " ".join(sys.argv), "lopt_ext": lopt_ext.__version__, "jax": jax.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "kernels_available": lopt_ext.kernels_available()}


def run(cfg: MetaTrainConfig, out_dir: str, resume: bool = False, checkpoint_every: int = 50,
        stop_at: Optional[int] = None, progress: bool = True, command: Optional[str] = None,
        time_inner: bool = True, time_budget_s: Optional[float] = None,
        continue_from: Optional[str] = None) -> Dict[str, Any]:
    """Meta-trains to cfg.outer_steps (or ``stop_at``); returns the summary written to provenance.json.

    continue_from: a compact resume checkpoint (``save_compact``) to continue: theta, outer
    optimizer state, schedule position and RNG come from it, task slots are drawn anew, and
    the budget it records is added to this run's. OUT/resume.safetensors is written at the end.
    """
    # with jax.distributed (distributed.py) every process steps its share of the slots and
    # process 0 alone writes; the full checkpoints hold every slot's arrays, which no one process
    # has, so such a run writes compact resume checkpoints (continue with --continue-from)
    processes, main = jax.process_count(), jax.process_index() == 0
    if processes > 1 and resume:
        raise ValueError(f"resume: a run of {processes} processes writes compact checkpoints only; continue it "
                         f"with continue_from={os.path.join(out_dir, 'resume.safetensors')!r}")
    progress = progress and main
    os.makedirs(out_dir, exist_ok=True)
    warning = map_count_warning()
    if warning and progress:
        print(warning, file=sys.stderr)
    log_path = os.path.join(out_dir, "log.jsonl")
    wall0 = 0.0
    prov = _provenance(command)
    budget_before = {"wall_s": 0.0, "cpu_hours": 0.0, "outer_steps": 0, "runs": []}
    last = latest_checkpoint(out_dir) if resume else None
    if continue_from and last is None:
        trainer, ms, meta = load_compact(continue_from, cfg)
        cfg = trainer.cfg
        budget_before = meta["budget"]
        prov = dict(prov, continued_from=continue_from)
        if main and os.path.exists(log_path):  # process 0 alone writes
            os.unlink(log_path)
    elif last:
        trainer, ms, meta = load_checkpoint(last, MetaTrainer(cfg) if cfg is not None else None)
        cfg = trainer.cfg
        wall0 = meta["wall_time_s"]
        prov = dict(meta["provenance"], resumed_with=prov["command"])
        budget_before = meta.get("budget_before", budget_before)
        lines = []
        if os.path.exists(log_path):
            with open(log_path) as f:
                lines = [l for l in f if l.strip() and json.loads(l)["step"] <= ms.step]
        ckpt.atomic_write_bytes(log_path, "".join(lines).encode())
    else:
        if resume:
            print(f"meta-train: no checkpoint in {out_dir}; starting fresh", file=sys.stderr)
        trainer = MetaTrainer(cfg)
        ms = trainer.init()
        if main and os.path.exists(log_path):  # process 0 alone writes
            os.unlink(log_path)
    end = cfg.outer_steps if stop_at is None else min(stop_at, cfg.outer_steps)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=end, initial=ms.step, desc="meta-train", dynamic_ncols=True)
    t_start = time.perf_counter()
    t_steady, steady_steps = None, 0
    start_step = ms.step
    warm = min(20, max(0, (end - start_step) // 2))
    recent = []
    with open(log_path if main else os.devnull, "a") as log:
        def record(pending):  # waits for that step's statistics
            nonlocal recent
            stats = pending.result()
            stats["wall_time_s"] = wall0 + time.perf_counter() - t_start
            log.write(json.dumps(stats) + "\n")
            recent = (recent + [stats["meta_loss"]])[-50:]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(meta_loss=f"{stats['meta_loss']:.4f}", avg50=f"{np.mean(recent):.4f}",
                                failed=stats["failed"])

        previous = None  # the step before, read once this one has been dispatched
        while ms.step < end:
            current = trainer.outer_step(ms)
            if previous is not None:
                record(previous)
            previous = current
            now = time.perf_counter()
            if ms.step - start_step == warm:
                t_steady, steady_steps = now, ms.step   # steps/s measured once compilation has settled
            out_of_time = time_budget_s is not None and now - t_start > time_budget_s
            if processes > 1 and time_budget_s is not None:  # process 0's clock decides for all
                from jax.experimental import multihost_utils
                out_of_time = bool(multihost_utils.broadcast_one_to_all(np.bool_(out_of_time)))
            if ms.step % checkpoint_every == 0 or ms.step == end or out_of_time:
                record(previous)  # the log holds every step up to the checkpoint
                previous = None
                log.flush()
                wall = wall0 + time.perf_counter() - t_start
                if processes == 1:
                    save_checkpoint(out_dir, trainer, ms, wall, prov, budget_before=budget_before)
                elif main:
                    save_compact(os.path.join(out_dir, "resume.safetensors"), trainer, ms,
                                 _budget(budget_before, wall, ms.step, prov), prov)
            if out_of_time:
                print(f"meta-train: time budget reached at outer step {ms.step}; resume with --resume",
                      file=sys.stderr)
                break
    if bar is not None:
        bar.close()
    wall = wall0 + time.perf_counter() - t_start
    steps_per_s = ((ms.step - steady_steps) / (time.perf_counter() - t_steady)
                   if t_steady is not None and ms.step > steady_steps else float("nan"))
    summary = {"outer_steps": ms.step, "wall_time_s": wall, "outer_steps_per_s": steps_per_s,
               "outer_steps_per_s_incl_compile": (ms.step - start_step) / max(time.perf_counter() - t_start, 1e-9),
               "final_meta_loss_avg50": float(np.mean(recent)) if recent else float("nan"),
               "config": cfg.to_json(), "provenance": prov}
    summary["processes"] = processes
    if time_inner and main:  # slot 0 is process 0's
        summary["inner_step_timing"] = trainer.time_inner_step(ms)
    summary["completed"] = ms.step >= cfg.outer_steps
    summary["budget"] = _budget(budget_before, wall, ms.step, prov)
    if not main:
        return summary
    save_compact(os.path.join(out_dir, "resume.safetensors"), trainer, ms, summary["budget"], prov)
    ckpt.save_theta(os.path.join(out_dir, "theta.safetensors"), trainer.theta(ms), trainer.lopt,
                    info={k: summary[k] for k in ("outer_steps", "wall_time_s", "final_meta_loss_avg50",
                                                  "completed")})
    ckpt.atomic_write_bytes(os.path.join(out_dir, "provenance.json"), json.dumps(summary, indent=1).encode())
    return summary
