"""The CPU kernels' fallback: with ATEN_CPU_CAPABILITY=default (as on a CPU without AVX2) the
C++ ops run ATen composites instead of their AVX2 sections; the equivalence tests must still
pass. Runs them in a process of its own, since the choice is made once per process."""
import os
import subprocess
import sys

import pytest

from diffkernels import _backend

HERE = os.path.dirname(os.path.abspath(__file__))


def test_cpu_ops_without_avx2_kernels():
    if not _backend.extension_loaded():
        pytest.skip("C++ extension not built")
    if os.environ.get("ATEN_CPU_CAPABILITY") == "default":
        pytest.skip("already in the fallback process")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    files = [os.path.join(HERE, f) for f in
             ("test_group_norm_silu.py", "test_attention.py", "test_diffusion_step.py")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files,
                           "-k", "sd_shapes or test_shapes or backends or large"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(HERE))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout
