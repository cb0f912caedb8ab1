"""Meta-trains every learned optimizer of the tradeoffs study (lopt_ext.variants.STUDY) with one
recipe and one wall-clock budget, and writes each trained theta to
lopt_ext/tradeoffs/theta/<name>.safetensors with its recipe and budget (read by
`python -m lopt_ext tradeoffs`).

    python tools/train_study.py --budget-s 600 [--only NAME ...] [--work runs/study]

The budget is wall time on this machine (2 cores: CPU-minutes = 2 x wall minutes); the variants
run one after the other, so each gets the machine the same way. A variant's run stops at the
budget or at RECIPE["outer_steps"], whichever comes first.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lopt_ext import checkpoint  # noqa: E402
from lopt_ext.metatrain import train  # noqa: E402
from lopt_ext.metatrain.pes import MetaTrainConfig  # noqa: E402
from lopt_ext.variants import STUDY  # noqa: E402

# One recipe for every variant: PES from the variant's own random init, the held-out log-loss
# objective, 4 task slots of the training split with 4 antithetic pairs each, truncations of
# 20 steps, inner horizons 100-1000.
RECIPE = dict(num_tasks=4, pairs=4, unroll=20, min_horizon=100, max_horizon=1000, sigma=0.01,
              outer_lr=3e-3, outer_steps=3000, warmup_steps=50, objective="valid_log", split="train",
              impl="fused", seed=0)
THETA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lopt_ext", "tradeoffs", "theta")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=600.0, help="wall-clock seconds per variant")
    ap.add_argument("--only", nargs="+", choices=sorted(STUDY), default=None, help="these variants only")
    ap.add_argument("--work", default="runs/study", help="meta-training output directories (one per variant)")
    ap.add_argument("--theta-dir", default=THETA_DIR, help="where the trained thetas are written")
    args = ap.parse_args(argv)
    os.makedirs(args.theta_dir, exist_ok=True)
    for name in args.only or list(STUDY):
        v = STUDY[name]
        cfg = MetaTrainConfig(hidden_size=v.hidden_size, lopt_kind=v.kind, **RECIPE)
        out = os.path.join(args.work, name)
        command = f"python tools/train_study.py --budget-s {args.budget_s:g} --only {name}"
        print(f"train_study: {name} ({v.description})", flush=True)
        summary = train.run(cfg, out, checkpoint_every=100, time_budget_s=args.budget_s, command=command,
                            time_inner=False)
        lopt, theta = checkpoint.load_theta(os.path.join(out, "theta.safetensors"))
        info = {"variant": name, "description": v.description, "recipe": RECIPE, "command": command,
                "budget": summary["budget"], "outer_steps": summary["outer_steps"],
                "final_meta_loss_avg50": summary.get("final_meta_loss_avg50")}
        checkpoint.save_theta(os.path.join(args.theta_dir, f"{name}.safetensors"), theta, lopt, info=info)
        print(f"train_study: {name}: {summary['outer_steps']} outer steps, "
              f"{summary['budget']['cpu_hours'] * 60:.1f} CPU-min", flush=True)


if __name__ == "__main__":
    main()
