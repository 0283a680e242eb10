"""The CPU kernels at every capability level (csrc/cpu/capability/): ATEN_CPU_CAPABILITY=
default|avx2|avx512 selects ours as it selects ATen's, so each level's equivalence tests run here,
in a process of their own (the choice is made once per process). A level this CPU lacks is
skipped; the level the main test process runs at is covered by the main run."""
import os
import subprocess
import sys

import pytest
import torch

from diffkernels import _backend

HERE = os.path.dirname(os.path.abspath(__file__))
LEVELS = ("default", "avx2", "avx512")


def _supported(level):
    code = "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, ATEN_CPU_CAPABILITY=level),
                         capture_output=True, text=True, timeout=120).stdout.strip()
    return out == level


@pytest.mark.parametrize("level", LEVELS)
def test_cpu_ops_at_capability(level):
    if not _backend.extension_loaded():
        pytest.skip("C++ extension not built")
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        pytest.skip("already in a subprocess of this test")
    if torch.backends.cpu.get_cpu_capability().lower() == level:
        pytest.skip(f"{level} is the level of this process: the main test run covers it")
    if not _supported(level):
        pytest.skip(f"this CPU does not support {level}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=level)
    files = [os.path.join(HERE, f) for f in
             ("test_group_norm_silu.py", "test_attention.py", "test_diffusion_step.py",
              "test_nonfinite.py", "test_cpu_capability.py")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files,
                           "-k", "sd_shapes or test_shapes or backends or large or nonfinite or "
                           "capability_matches"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(HERE))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout
