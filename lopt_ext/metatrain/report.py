"""Markdown of evaluation results (``python -m lopt_ext evaluate``'s JSON).

Only the standard library and numpy: tools/readme_tables.py renders the README's tables from
the committed JSON with these functions.
"""
from __future__ import annotations

import numpy as np


def render_evaluation(doc, horizon=None, baseline="adam") -> str:
    """Summary table, then the per-task table at ``horizon`` (default: the first one)."""
    horizon = horizon or doc["horizons"][0]
    references = ""
    if doc.get("references"):
        references = ("For scale, Adam with a cosine decay whose learning rate is tuned per task on the same "
                      "held-out loss, judged against tuned constant-lr Adam in the same way:\n\n"
                      + format_summary(doc["references"]) + "\n\n")
    splits = sorted({r.get("split") or "?" for r in doc["results"]})
    which = "held-out in-family tasks" if splits == ["test"] else f"tasks of the {', '.join(splits)} split"
    return (f"Optimizer `{doc['optimizer']}`, seeds {doc['seeds']}, {which}:\n\n"
            + format_summary(doc["summary"]) + "\n\n" + references
            + f"Per task at {horizon} steps against Adam with a constant learning rate tuned per task "
              f"(held-out loss: 20-step trailing mean, mean over seeds):\n\n"
            + format_table(doc["results"], horizon, baseline))


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def _fmt_ratio(x):
    return "never" if x is None else f"{x:.2f}"


def format_summary(summary) -> str:
    lines = ["| baseline @ horizon | task-seeds | median steps ratio | reached and stayed | median final ratio "
             "| tasks > 1.5x | diverged |", "|---|---:|---:|---:|---:|---:|---:|"]
    for key, s in summary.items():
        lines.append(f"| {key} | {s['task_seeds']} | {_fmt_ratio(s['median_steps_ratio'])} "
                     f"| {s['reached_and_stayed']}/{s['task_seeds']} | {_fmt(s['median_final_ratio'])} "
                     f"| {len(s['tasks_worse_than_1.5x'])}/{s['tasks']} | {s['diverged_task_seeds']} |")
    return "\n".join(lines)


def format_table(results, horizon=1000, baseline="adam") -> str:
    lines = ["| task | split | Adam lr | Adam held-out | LOpt held-out | final ratio | steps ratio (per seed) "
             "| Adam train | LOpt train |", "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in results:
        e = r["by_horizon"][str(horizon)]
        b = e[baseline]
        ps = b["per_seed"]
        mean = lambda k: (float(np.mean([p[k] for p in ps])) if all(p[k] is not None for p in ps) else None)
        lines.append(f"| {r['task']} | {r.get('split', '')} | {b['best_lr']:.2g} | {_fmt(mean('baseline_final'), '.4g')} "
                     f"| {_fmt(mean('lopt_final'), '.4g')} | {_fmt(b['mean_final_ratio'], '.2f')} "
                     f"| {' '.join(_fmt_ratio(p['steps_ratio']) for p in ps)} "
                     f"| {_fmt(b['baseline_final_train'], '.3g')} | {_fmt(e['lopt_final_train'], '.3g')} |")
    return "\n".join(lines)


