"""Support code of the benchmark suite in bench/ (not part of the installed library).

bench/ is deliberately not a package: pytest then puts bench/ (not the repository root)
on sys.path, so ``import lopt_ext`` finds the same copy it would find anywhere else
(an installed wheel, or the source tree when run from the repository root).
"""
from __future__ import annotations

import importlib.util
import os
import site
import sysconfig

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(BENCH_DIR)


def child_env(drop=()):
    """Environment for a helper process: finds lopt_bench and the same lopt_ext as this one.

    The helper runs with cwd=bench/, so a source checkout's lopt_ext is only put on
    PYTHONPATH when this process uses that source copy (not an installed one).
    """
    env = {k: v for k, v in os.environ.items() if k not in drop}
    paths = [BENCH_DIR]
    spec = importlib.util.find_spec("lopt_ext")
    if spec is not None and spec.origin:
        root = os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))
        installed = {os.path.abspath(p) for p in site.getsitepackages() + [site.getusersitepackages(),
                                                                             sysconfig.get_paths()["purelib"],
                                                                             sysconfig.get_paths()["platlib"]]}
        if root not in installed:
            paths.append(root)
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env
