"""Populations spread over several CPU devices (lopt_ext.metatrain.population).

The device count is fixed when jax starts, so the cases (population_cases.py) run in a
subprocess with JAX_NUM_CPU_DEVICES=2; this process's jax keeps its own count.
"""
import os
import subprocess
import sys

import jax

from lopt_ext.metatrain import population

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_population_cases_on_two_cpu_devices():
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           os.path.join(HERE, "population_cases.py")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = [line for line in out.splitlines() if line.strip()][-1]
    assert " passed" in summary and "skipped" not in summary and "deselected" not in summary, out[-3000:]


def test_one_device_is_plain_vmap():
    if len(population.population_devices()) != 1:
        return  # this session's jax has several devices: the subprocess cases cover them
    import numpy as np
    x = np.arange(3, dtype=np.float32)
    got = population.population_vmap(lambda a, b: a * b, in_axes=(0, None))(x, np.float32(2))
    np.testing.assert_array_equal(np.asarray(got), 2 * x)
    assert population.member_sharding(4) is None and population.replicated() is None


def test_use_cpu_cores_after_start_keeps_the_count(capsys):
    jax.devices()  # the backend has started
    have = len(jax.devices("cpu"))
    assert population.use_cpu_cores() == have
    assert capsys.readouterr().err == ""  # the default asks nothing: no warning
    assert population.use_cpu_cores(have + 1) == have
    assert "already runs with" in capsys.readouterr().err
