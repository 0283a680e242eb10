"""Packaging: a wheel built with `pip wheel --no-build-isolation --no-deps .` (pyproject.toml +
setup.py, against the installed torch, CUDA toolkit found by setup.py itself) installs into a
second venv that shares this torch, and works from outside the source tree."""
import os
import subprocess
import sys
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation",
                            "--no-deps", "-q", "-w", str(wheels), ROOT],
                           capture_output=True, text=True, env=env, timeout=3000)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    (wheel,) = wheels.glob("diffkernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("diffkernels/_C") and n.endswith(".so") for n in names), names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # Share this torch (and numpy) without this environment's .pth hooks, which would put the
    # source tree's editable install on the path.
    with open(os.path.join(site, "shared_torch.pth"), "w") as f:
        f.write(os.path.dirname(os.path.dirname(torch.__file__)) + "\n")
    installed = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    info = subprocess.run([py, "-m", "diffkernels", "info"], capture_output=True, text=True,
                          cwd=outside, timeout=300)
    assert info.returncode == 0 and "C++ extension (diffkernels._C): built" in info.stdout, (
        info.stdout + info.stderr)
    script = (
        "import torch, torch.nn.functional as F, diffkernels as dk\n"
        f"assert dk.__file__.startswith({site!r}), dk.__file__\n"
        "x = torch.randn(2, 64, 5, 5)\n"
        "torch.testing.assert_close(dk.group_norm_silu(x, 8), F.silu(F.group_norm(x, 8)),\n"
        "                           atol=1e-4, rtol=1e-4)\n"
        "print('ok')\n")
    run = subprocess.run([py, "-c", script], capture_output=True, text=True, cwd=outside,
                         timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr
