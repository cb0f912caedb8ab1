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
        references = ("For scale, Adam with warmup and a cosine decay whose learning rate is tuned per task on the same "
                      "held-out loss, judged against tuned constant-lr Adam in the same way:\n\n"
                      + format_summary(doc["references"]) + "\n\n")
    splits = sorted({r.get("split") or "?" for r in doc["results"]})
    which = "held-out in-family tasks" if splits == ["test"] else f"tasks of the {', '.join(splits)} split"
    views = ""
    if doc.get("views"):
        views = ("The field's views:\n\n" + render_views(doc["views"]) + "\n\n"
                 + ("" if len(doc["horizons"]) < 2 else
                    render_views(doc["views"], min(doc["horizons"]), groups=False) + "\n\n")
                 + "Sustained crossings of the final held-out loss of Adam tuned on it "
                   "(the earlier protocol, kept for comparison):\n\n")
    return (f"Optimizer `{doc['optimizer']}`, seeds {doc['seeds']}, {which}:\n\n" + views
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




# ----------------------------------------------------------------------------- the field's views

VIEW_TITLES = (("best_heldout", "best held-out"), ("final_heldout", "final held-out"),
               ("train_final", "training loss"), ("train_speedup", "training speedup"),
               ("time_to_target", "time-to-target"))


def _num(x):
    """A view's value; null (how the JSON stores an infinite ratio: never reached) is ∞."""
    return "∞" if x is None or x == float("inf") else f"{x:.2f}"


def _view_cell(a) -> str:
    lo, hi = a["median_ci"]
    return f"{_num(a['median'])} [{_num(lo)}, {_num(hi)}] · {_num(a['iqm'])} ({a['at_least_as_good']}/{a['task_seeds']})"


def format_views(summary, reference: str) -> str:
    """One table per task group: contenders x views (median [95% CI] · IQM (task-seeds at least
    as good as the reference))."""
    out = []
    for group, rows in summary.items():
        any_row = next(iter(rows.values()))
        n = any_row["best_heldout"]
        out += [f"{group} ({n['tasks']} tasks, {n['task_seeds']} task-seeds), against {reference}:", "",
                "| optimizer | " + " | ".join(t for _, t in VIEW_TITLES) + " | diverged |",
                "|---|" + "---:|" * (len(VIEW_TITLES) + 1)]
        for name, agg in rows.items():
            out.append(f"| {name} | " + " | ".join(_view_cell(agg[v]) for v, _ in VIEW_TITLES)
                       + f" | {agg['diverged']} |")
        out.append("")
    return "\n".join(out).rstrip("\n")


def format_ship_check(check) -> str:
    """The bar's criteria for the optimizer (value, pass) and, where recorded, the same bar for
    Adam's one run per task (a value and pass column each): what one Adam run meets of it."""
    others = check.get("adam_one_run", {})
    head = f"Shipping bar for `{check['optimizer']}` at {check['horizon']} steps (issue 24)"
    cols = ["value", "pass"] + [f"{name} | pass" for name in others]
    lines = [head + (", and the same bar for Adam's one run per task:" if others else ":"), "",
             "| criterion | " + " | ".join(cols) + " |", "|---|" + "---:|---|" * (1 + len(others))]
    cell = lambda c: (f"{c['value'] if isinstance(c['value'], int) else _num(c['value'])} | "
                      f"{'yes' if c['pass'] else '**no**'}")
    by_criterion = [{o["criterion"]: o for o in checks} for checks in others.values()]
    for c in check["checks"]:
        row = [cell(c)] + [cell(o[c["criterion"]]) if c["criterion"] in o else "- | -" for o in by_criterion]
        lines.append(f"| {c['criterion']} | " + " | ".join(row) + " |")
    return "\n".join(lines)


VIEWS_LEGEND = ("Cells: median [95% bootstrap interval, tasks then seeds resampled] · interquartile mean "
                "(task-seeds at least as good as the reference). Ratios (losses, steps) below 1 and "
                "speedups above 1 favour the row. Views: best held-out = lowest smoothed held-out loss "
                "over the run (early stopping); final held-out = at the horizon; training loss = full "
                "training set at the horizon; training speedup = horizon / step at which the row reaches "
                "the reference's final training loss; time-to-target = steps to reach the reference's best "
                "held-out loss / the reference's steps (∞: never). The reference is tuned per task, per "
                "view, on that view's own quantity.")


def render_views(views, horizon=None, groups=True) -> str:
    """The views at ``horizon`` (default: the longest) against tuned Adam, then against Adam
    1e-3 (all tasks only), then the shipping bar."""
    horizon = str(horizon or max(int(h) for h in views["by_horizon"]))
    e = views["by_horizon"][horizon]
    tuned = e["vs_tuned_adam"]["summary"] if groups else {"all": e["vs_tuned_adam"]["summary"]["all"]}
    parts = [f"At {horizon} steps. " + VIEWS_LEGEND, "",
             format_views(tuned, "Adam tuned per task (constant or warmup-cosine x 7 learning rates)"), "",
             format_views({"all": e["vs_adam_1e-3"]["summary"]["all"]},
                          f"untuned Adam (lr {views['untuned_lr']:g}, constant)")]
    if views.get("ship_check") and str(views["ship_check"]["horizon"]) == horizon:
        parts += ["", format_ship_check(views["ship_check"])]
    return "\n".join(parts)
