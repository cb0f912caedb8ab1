"""Damaged checkpoints give clear errors, and a meta-training run killed with SIGKILL
resumes from its last complete checkpoint."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import lopt_ext
from lopt_ext import checkpoint
from lopt_ext.metatrain import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _saved_theta(tmp_path):
    lopt = lopt_ext.SmallFcLOpt()
    path = str(tmp_path / "theta.safetensors")
    checkpoint.save_theta(path, lopt.init_theta(jax.random.PRNGKey(0)), lopt)
    return lopt, path


@pytest.mark.parametrize("damage", ["truncate_half", "truncate_header", "garbage", "zero_bytes"])
def test_damaged_theta_file_names_the_path(tmp_path, damage):
    lopt, path = _saved_theta(tmp_path)
    data = open(path, "rb").read()
    if damage == "truncate_half":
        data = data[: len(data) // 2]
    elif damage == "truncate_header":
        data = data[:5]
    elif damage == "garbage":
        data = bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8))
    else:
        data = b""
    open(path, "wb").write(data)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="theta.safetensors"):
        checkpoint.load_theta(path)


def test_theta_for_another_config_names_the_key(tmp_path):
    _, path = _saved_theta(tmp_path)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="w0|nn"):
        checkpoint.load_theta(path, lopt=lopt_ext.SmallFcLOpt(hidden_size=8))


def test_sigkill_mid_run_resumes_from_last_complete_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "lopt_ext", "meta-train", "--out", out, "--checkpoint-every", "1",
           "--no-progress", "--no-time-inner", "--num-tasks", "1", "--pairs", "2", "--unroll", "2",
           "--min-horizon", "4", "--max-horizon", "4", "--outer-steps", "100000", "--warmup-steps", "1",
           "--task-names", "quadratic_d32_c2_n0.1_seed0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = os.path.join(out, "latest")
    deadline = time.time() + 240
    try:
        # Wait until a few checkpoints exist, then kill without warning (mid-write, most likely:
        # the run checkpoints after every outer step).
        while time.time() < deadline:
            if os.path.exists(latest) and open(latest).read().strip() >= "step_000005":
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        else:
            pytest.fail("meta-train made no checkpoints in time")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    name = open(latest).read().strip()
    step = int(name.split("_")[-1])
    # The checkpoint `latest` names is complete: every file loads.
    for fn in os.listdir(os.path.join(out, name)):
        if fn.endswith(".safetensors"):
            checkpoint.read_safetensors(os.path.join(out, name, fn))
    # Resuming continues from it, two more outer steps.
    train.run(None, out, resume=True, checkpoint_every=1, stop_at=step + 2, progress=False, time_inner=False)
    assert open(latest).read().strip() == f"step_{step + 2:06d}"
    lopt, theta = checkpoint.load_theta(os.path.join(out, f"step_{step + 2:06d}", "theta.safetensors"))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(theta))
