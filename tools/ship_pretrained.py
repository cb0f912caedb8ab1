"""Copy a finished meta-training run into the package as a named pretrained entry.

    python tools/ship_pretrained.py runs/scaled_h4 scaled_small_fc_lopt_h4 \
        --evaluation docs/evaluation/evaluation.json --note "..."

Writes lopt_ext/pretrained/NAME.safetensors (theta), NAME.resume.safetensors (the compact resume
checkpoint: `meta-train --continue-from` continues the meta-training from it) and NAME.json
(provenance: the run's command(s), config, budget in CPU-hours, meta-loss curve summary, and the
evaluation summary of that theta). Registering the name in lopt_ext/pretrained/__init__.py
(AVAILABLE, DEFAULT) stays a reviewed code change.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="meta-train output directory (holds theta.safetensors, provenance.json, "
                                "resume.safetensors, log.jsonl), or a tools/scale_search.py or "
                                "tools/scale_es.py output directory")
    ap.add_argument("name", help="entry name, e.g. scaled_small_fc_lopt_h4")
    ap.add_argument("--evaluation", default=None, help="evaluation.json of this theta (`evaluate --theta`)")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    search = os.path.join(args.run, "search.json")
    es = os.path.join(args.run, "es.json")
    searched = os.path.isfile(search) or os.path.isfile(es)
    needed = ("theta.safetensors", "resume.safetensors") + (() if searched else ("provenance.json", "log.jsonl"))
    for f in needed:
        if not os.path.isfile(os.path.join(args.run, f)):
            ap.error(f"argument run: {os.path.join(args.run, f)} is missing (did the run finish?)")
    if os.path.isfile(es):  # made by tools/scale_es.py
        with open(es) as f:
            info = json.load(f)
        entry = {"name": args.name, "note": args.note, "method": "evolution strategies (tools/scale_es.py)",
                 "command": info["command"], "budget": info["budget"], "search": {
                     k: info[k] for k in ("from_pretrained", "objective", "best", "best_score", "generation",
                                          "pairs", "steps", "seeds", "tasks")},
                 "search_curve": [{"generation": h["generation"], "mean_score": h["mean_score"],
                                   "sigma": h["sigma"]} for h in info["history"]],
                 "continue_config": info["config"]}
    elif os.path.isfile(search):  # made by tools/scale_search.py
        with open(search) as f:
            info = json.load(f)
        entry = {"name": args.name, "note": args.note, "method": "grid search (tools/scale_search.py)",
                 "command": info["command"], "budget": info["budget"], "search": {
                     k: info[k] for k in ("grid", "best", "steps", "tasks")},
                 "continue_config": info["config"]}
    else:  # a meta-train run
        with open(os.path.join(args.run, "provenance.json")) as f:
            prov = json.load(f)
        with open(os.path.join(args.run, "log.jsonl")) as f:
            loss = np.asarray([json.loads(line)["meta_loss"] for line in f if line.strip()])
        w = min(100, len(loss))
        entry = {"name": args.name, "note": args.note, "method": "PES (python -m lopt_ext meta-train)",
                 "command": prov["provenance"]["command"], "config": prov["config"], "budget": prov["budget"],
                 "outer_steps": prov["outer_steps"], "completed": prov["completed"],
                 "outer_steps_per_s": prov.get("outer_steps_per_s"), "provenance": prov["provenance"],
                 "meta_loss_curve": {"first_avg100": float(loss[:w].mean()), "last_avg100": float(loss[-w:].mean()),
                                     "steps": int(len(loss))}}
    entry["resume_checkpoint"] = f"{args.name}.resume.safetensors"
    if args.evaluation:
        with open(args.evaluation) as f:
            ev = json.load(f)
        entry["evaluation"] = {"file": os.path.relpath(os.path.abspath(args.evaluation), ROOT),
                               "seeds": ev["seeds"], "horizons": ev["horizons"], "summary": ev["summary"],
                               "tasks": [r["task"] for r in ev["results"]]}
        if "views" in ev and "ship_check" in ev["views"]:  # the shipping bar, as evaluate checked it
            entry["evaluation"]["ship_check"] = ev["views"]["ship_check"]
    dest = os.path.join(ROOT, "lopt_ext", "pretrained")
    shutil.copyfile(os.path.join(args.run, "theta.safetensors"), os.path.join(dest, f"{args.name}.safetensors"))
    shutil.copyfile(os.path.join(args.run, "resume.safetensors"), os.path.join(dest, f"{args.name}.resume.safetensors"))
    with open(os.path.join(dest, f"{args.name}.json"), "w") as f:
        json.dump(entry, f, indent=1)
    print(f"wrote {dest}/{args.name}.{{safetensors,resume.safetensors,json}}")


if __name__ == "__main__":
    sys.exit(main())
