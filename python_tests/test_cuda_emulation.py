"""The CUDA kernels' logic on the host: tools/cuda_emu_test.sh compiles lopt_cuda.cu with a
small emulation of the CUDA features it uses (threads, barriers, shuffles, mma.sync) and
compares its in-place results with the CPU driver's, for fp32 and TF32 modes, every rank,
populations of more than one launch group. No GPU or CUDA toolkit needed (g++ >= 10)."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cuda_kernels_in_host_emulation(tmp_path):
    r = subprocess.run([os.path.join(ROOT, "tools", "cuda_emu_test.sh"), str(tmp_path)],
                       capture_output=True, text=True, timeout=1800)
    print(r.stdout[-4000:], r.stderr[-4000:])
    assert r.returncode == 0
    assert "all cases passed" in r.stdout
