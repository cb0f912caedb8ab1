#!/usr/bin/env python3
"""Rewrite the README's generated regions from the committed JSON the commands produced.

    python tools/readme_tables.py           # rewrite README.md in place
    python tools/readme_tables.py --check   # exit 1 (with a diff) if README.md is out of date

A region is the text between two marker comments:

    <!-- BEGIN GENERATED benchmarks -->
    ...
    <!-- END GENERATED benchmarks -->

If the begin marker ends its line the region is a block (its content on the lines between the
markers); otherwise it is inline, within one line of prose. REGIONS maps each region name to
(JSON path relative to the repository root, render function: parsed JSON -> markdown). Adding a
table is one entry there plus one render function. No jax needed.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from typing import Any, Callable, Dict, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402  (tools/, on the path above; its formatting is reused, not copied)


# ----------------------------------------------------------------------------- benchmarks

def _bench_rows(data):
    _, meta, ceilings, rows = bench_report.parse(data)
    return meta, ceilings, rows, bench_report._index(rows)


def _largest_tensor_with(rows, idx, *keys):
    """The largest single-tensor workload that has a row for every (optimizer, hidden) key."""
    tensors = sorted((r["num_params"], r["workload"]) for r in rows if r["workload_kind"] == "tensor"
                     and r["optimizer"] == keys[0][0] and r.get("hidden_size") == keys[0][1])
    for n, wl in reversed(tensors):
        if all((wl, o, h) in idx for o, h in keys):
            return n, [idx[(wl, o, h)] for o, h in keys]
    raise ValueError(f"no tensor workload measured for all of {keys}")


def render_bench_headline(data) -> str:
    """The one-line claim at the top of the README: what the fused step costs, measured."""
    meta, _, rows, idx = _bench_rows(data)
    n4, (f4, adam) = _largest_tensor_with(rows, idx, ("fused", 4), ("adam", None))
    n32, (f32, ref32) = _largest_tensor_with(rows, idx, ("fused", 32), ("reference", 32))
    return (f"Measured on {meta.get('cores', '?')} CPU cores (median step, [Benchmarks](#benchmarks)): on a "
            f"{bench_report.fmt_count(n4)}-parameter tensor a fused step at H=4 (the shipped optimizer's size) "
            f"takes {f4['median_s'] / adam['median_s']:.1f}x as long as an optax.adam step; at H=32 (PyLO's "
            f"size) it is {ref32['median_s'] / f32['median_s']:.1f}x faster than the jitted pure-JAX "
            f"reference ({bench_report.fmt_count(n32)} parameters).")


def render_bench_default(data) -> str:
    """What the shipped default optimizer's step costs against adam and the plain fused step (inline)."""
    _, _, rows, idx = _bench_rows(data)
    n, (pre, f4, adam) = _largest_tensor_with(rows, idx, ("pretrained", None), ("fused", 4), ("adam", None))
    return (f"on the {bench_report.fmt_count(n)}-parameter tensor it takes {bench_report.fmt_time(pre['median_s'])}, "
            f"{pre['median_s'] / adam['median_s']:.1f}x optax.adam's step and "
            f"{pre['median_s'] / f4['median_s']:.2f}x the plain fused H=4 step measured in the same run")


def render_benchmarks(data) -> str:
    """Which run, then time per step for every workload and optimizer, then the plot."""
    meta, ceilings, rows, _ = _bench_rows(data)
    return "\n".join([f"Current results ({bench_report.summary_line(meta, ceilings)}):", "",
                      bench_report.section_times(rows), "",
                      "![time per step vs parameter count](docs/bench/benchmarks.png)"])


def render_bench_targets(targets) -> str:
    return bench_report.section_targets(targets)


def render_h4_floor(data) -> str:
    """The memory-traffic bound of an H=4 step against adam's measured step (inline, in prose)."""
    _, ceilings, rows, idx = _bench_rows(data)
    n, (adam,) = _largest_tensor_with(rows, idx, ("adam", None))
    floor_s = H4_STATE_BYTES_PER_PARAM * n / (ceilings["bandwidth_gbs"] * 1e9)
    return (f"at the measured {ceilings['bandwidth_gbs']:.1f} GB/s that alone is "
            f"{bench_report.fmt_time(floor_s)} vs adam's {bench_report.fmt_time(adam['median_s'])} "
            f"({floor_s / adam['median_s']:.2f}x) at {bench_report.fmt_count(n)} parameters")


# A fused step's state traffic (read the state twice, write it once, plus the factored g^2
# pass): a property of the design, stated in the README's prose next to the region.
H4_STATE_BYTES_PER_PARAM = 72


# ----------------------------------------------------------------------------- evaluation

def _module_by_path(relpath, name):
    """A module of the package loaded by path: the README's renderers need only numpy and the
    standard library, not jax (lopt_ext/__init__ imports jax)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report_module():
    return _module_by_path(os.path.join("lopt_ext", "metatrain", "report.py"), "lopt_ext_report")


def render_evaluation(doc) -> str:
    """The field's views at the longest horizon (all tasks and each data regime, then against
    untuned Adam, then the shipping bar) and their plot; the rest is in evaluation.md."""
    report = _report_module()
    head = (f"Optimizer `{doc['optimizer']}`, seeds {doc['seeds']}, {len(doc['results'])} held-out tasks "
            f"(per task, 1000 steps and the earlier protocol: "
            f"[docs/evaluation/evaluation.md](docs/evaluation/evaluation.md)).")
    return (head + "\n\n" + report.render_views(doc["views"])
            + "\n\n![the field's views](docs/evaluation/views.png)")


def _tradeoffs_module():
    return _module_by_path(os.path.join("lopt_ext", "tradeoffs", "report.py"), "lopt_ext_tradeoffs_report")


def render_tradeoffs(doc) -> str:
    return (_tradeoffs_module().render_summary(doc) +
            "\n\n![performance vs step time](docs/tradeoffs/pareto_time.png)")


# ----------------------------------------------------------------------------- registry

Render = Callable[[Any], str]
REGIONS: Dict[str, Tuple[str, Render]] = {
    "bench-headline": ("docs/bench/results.json", render_bench_headline),
    "benchmarks": ("docs/bench/results.json", render_benchmarks),
    "bench-targets": ("docs/bench/targets.json", render_bench_targets),
    "bench-default": ("docs/bench/default_optimizer.json", render_bench_default),
    "bench-h4-floor": ("docs/bench/results.json", render_h4_floor),
    "evaluation": ("docs/evaluation/evaluation.json", render_evaluation),
    "tradeoffs": ("docs/tradeoffs/tradeoffs.json", render_tradeoffs),
}

_MARKER = re.compile(r"<!-- (BEGIN|END) GENERATED ([\w.-]+) -->")


def render_region(name: str, root: str = ROOT, regions=None) -> str:
    path, render = (regions or REGIONS)[name]
    with open(os.path.join(root, path)) as f:
        return render(json.load(f)).strip("\n")


def rewrite(text: str, root: str = ROOT, regions=None) -> str:
    """text with every registered region replaced by its rendering; a marker without its partner,
    a region the registry lacks, or a registered region missing from text raises ValueError."""
    regions = regions or REGIONS
    out, pos, seen = [], 0, set()
    markers = list(_MARKER.finditer(text))
    if len(markers) % 2:
        raise ValueError("unpaired GENERATED marker")
    for begin, end in zip(markers[::2], markers[1::2]):
        name = begin.group(2)
        if begin.group(1) != "BEGIN" or end.group(1) != "END" or end.group(2) != name:
            raise ValueError(f"markers out of order: {begin.group(0)} ... {end.group(0)}")
        if name not in regions:
            raise ValueError(f"README region {name!r} is not registered in tools/readme_tables.py REGIONS")
        if name in seen:
            raise ValueError(f"region {name!r} appears twice")
        seen.add(name)
        content = render_region(name, root, regions)
        block = text.startswith("\n", begin.end())
        if not block and "\n" in content:
            raise ValueError(f"region {name!r} is inline but renders several lines")
        out += [text[pos:begin.end()], f"\n{content}\n" if block else content]
        pos = end.start()
    missing = set(regions) - seen
    if missing:
        raise ValueError(f"registered regions missing from the README: {sorted(missing)}")
    return "".join(out) + text[pos:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 and print a diff if the README differs from what the JSON gives")
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"), help="the file to rewrite or check")
    args = ap.parse_args(argv)
    with open(args.readme, encoding="utf-8") as f:
        text = f.read()
    try:
        new = rewrite(text)
    except (ValueError, OSError, KeyError) as e:
        print(f"{args.readme}: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                       args.readme, f"{args.readme} (generated)"))
            print(f"{args.readme} is out of date: run python tools/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        with open(args.readme, "w", encoding="utf-8") as f:
            f.write(new)
        print(f"rewrote {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
