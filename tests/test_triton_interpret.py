"""Runs tests/interpret (Triton kernels on CPU tensors) in a process of its own with
TRITON_INTERPRET=1: the variable must be set before any @triton.jit function is created."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("already in the interpreter process: tests/interpret runs directly")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join(HERE, "interpret")],
                          env=env, capture_output=True, text=True, timeout=1200)
    summary = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    print("\n".join(summary))
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout, "the interpreter suite ran no test"
