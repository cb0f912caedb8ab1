"""Multi-device tests (lopt_ext.sharded) on 8 host CPU devices.

The device count is fixed when jax starts, so the cases (python_tests/sharded_cases.py)
run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 and
JAX_PLATFORMS=cpu; nothing leaks into this process's jax.
"""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _run_cases(extra_args=()):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           os.path.join(HERE, "sharded_cases.py"), *extra_args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return proc


def test_sharded_cases_on_8_host_devices():
    proc = _run_cases(["-m", "not slow"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = [line for line in out.splitlines() if line.strip()][-1]
    assert " passed" in summary and "skipped" not in summary, out[-3000:]


@pytest.mark.slow
def test_sharded_cases_slow_on_8_host_devices():
    proc = _run_cases(["-m", "slow"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


@pytest.mark.slow
def test_multi_process_fsdp_on_localhost():
    """The multi-host recipe on one machine: 2 processes x 2 CPU devices, jax.distributed +
    gloo collectives, FSDP update checked shard by shard against the reference."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "multihost_cpu.py"),
                           "--processes", "2", "--local-devices", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and out.count("-> OK") == 2, out[-4000:]
