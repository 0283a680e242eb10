"""The CPU kernels are built once per capability (csrc/cpu/capability/) and picked at run time
like ATen's own: at::get_cpu_capability(), i.e. the best level the CPU supports unless
ATEN_CPU_CAPABILITY=default|avx2|avx512 asks for a lower one. Nothing outside the AVX2 /
AVX-512 units uses AVX, so the library loads on any x86-64."""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from diffkernels import _backend

pytestmark = pytest.mark.skipif(not _backend.extension_loaded(), reason="C++ extension not built")
LEVELS = ("default", "avx2", "avx512")


def _run_with_level(level, code):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=level)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_capability_matches_aten():
    ours = torch.ops.diffkernels.cpu_capability()
    assert ours in LEVELS
    aten = torch.backends.cpu.get_cpu_capability().lower()
    assert ours == (aten if aten in LEVELS else "default")


@pytest.mark.parametrize("level", LEVELS)
def test_aten_cpu_capability_selects_the_level(level):
    code = ("import torch, diffkernels\n"
            "print(torch.backends.cpu.get_cpu_capability().lower(), "
            "torch.ops.diffkernels.cpu_capability())")
    proc = _run_with_level(level, code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    aten, ours = proc.stdout.split()[-2:]
    if aten != level:
        pytest.skip(f"this CPU does not support {level} (ATen runs {aten})")
    assert ours == level


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump")
def test_no_avx_outside_the_capability_units():
    """Every function of the library that holds a VEX/EVEX-encoded instruction (AVX, AVX2,
    AVX-512, FMA, F16C) belongs to the AVX2 / AVX512 variants (its name says so)."""
    import diffkernels._C as ext
    dis = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", ext.__file__],
                         capture_output=True, text=True, check=True).stdout
    offenders, name, seen_avx_fn = set(), None, 0
    for line in dis.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            name = m.group(1)
            continue
        parts = line.split("\t")
        if name is None or len(parts) < 2:
            continue
        mnemonic = parts[1].split()[0] if parts[1].split() else ""
        if mnemonic.startswith("v") and mnemonic not in ("verr", "verw"):
            if "AVX2" in name or "AVX512" in name:
                seen_avx_fn += 1
            else:
                offenders.add(name)
    assert seen_avx_fn > 0, "no AVX code at all: the capability units were not built"
    assert not offenders, "AVX instructions outside a capability unit:\n" + "\n".join(sorted(offenders)[:20])
