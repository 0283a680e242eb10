"""The CUDA attention kernel (csrc/cuda/attention.cu) run on the CPU by a warp-instruction emulator.

CI has no GPU, so this is what checks the tensor-core kernel's logic there. tests/cuda_emulator/
compiles the kernel section and the host launch code of attention.cu UNCHANGED with g++, with
emu.h standing in for the PTX primitives (ldmatrix, mma.sync, cp.async, shfl, ex2) and for the
CUDA runtime calls, and compares every output against a float64 reference at the DESIGN.md 6
tolerances (fp16 2e-3, bf16 1.6e-2).

Modelled (emu.h, written from the PTX ISA fragment tables, not from the kernel's index math):
- every CUDA thread is a fiber; a random scheduler interleaves them, so warps drift apart between
  barriers; ldmatrix / mma / shfl / __syncwarp are warp collectives, __syncthreads a block barrier;
  a barrier that not every thread reaches is reported as a deadlock;
- ldmatrix.x4 (and .trans) and mma.m16n8k16 fp16 / bf16 fragment layouts, with the instruction
  rules: 16-byte-aligned rows inside shared memory, every lane issuing the same instruction;
- cp.async.cg 16 (zero fill for src-size 0, 16-byte alignment, source inside an input tensor)
  landing at issue or only at cp.async.wait_group, at random: reading a tile before waiting for
  it, or refilling a buffer still being read, gives wrong output;
- shared memory starts as NaN; inputs and the output carry NaN guards around the view, and any
  write outside the output view, past the dynamic shared allocation, or a fully masked row that
  is not exactly zero fails the case;
- fp16 / bf16 round-to-nearest-even conversions, fp16 overflow to inf;
- NaN / inf inputs: the reference has the semantics of SDPA's math implementation (additive -inf
  mask, NaN softmax rows, 0 * inf = NaN in P V), and a row the mask lets attend no key must be 0;
- head dims above 256 (output slices over CTAs), on a 99 KB device and, with a raised opt-in
  limit (an emulated sm_80 / sm_90), the larger configs;
- the launch: grid / block limits, and more than 48 KB of dynamic shared memory only after
  cudaFuncSetAttribute (capped at the device's opt-in limit: 99 KB, the sm_86/89 one, unless a
  case emulates an sm_80 / sm_90).
Not modelled: timing, occupancy and performance; shared-memory bank conflicts; real register
binding (register pressure, spills, local memory); the weak memory model beyond what the barriers
order (a plain shared store is visible at once); ex2.approx's error (exp2f is used) and the
hardware's accumulation order inside an mma; bounds of plain global loads on the scalar path
(only the NaN guards see them); the asm text itself: the PTX primitives section is instead pinned
(test_ptx_primitives_are_the_modelled_ones), so a change there forces a review of emu.h.

By hand:
    python tests/cuda_emulator/build_emulator.py /tmp/emu && /tmp/emu/emu_test [--seed N] [case]
Mutation check (developer tool, not CI, ~10 min): plants 21 known bugs in a copy of the kernel,
each must fail:  python tests/cuda_emulator/mutate.py
"""
import difflib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "build_emulator", Path(__file__).resolve().parent / "cuda_emulator" / "build_emulator.py")
emu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emu)

NEEDS_GXX = pytest.mark.skipif(
    shutil.which("g++") is None or not sys.platform.startswith("linux"),
    reason="the CUDA emulator needs g++ and glibc (ucontext fibers)")


def test_ptx_primitives_are_the_modelled_ones():
    got = emu.primitives_code(emu.KERNEL_SRC.read_text())
    pinned = emu.PINNED_PRIMITIVES.read_text()
    diff = "".join(difflib.unified_diff(pinned.splitlines(True), got.splitlines(True),
                                        "pinned (modelled by emu.h)", "attention.cu"))
    assert got == pinned, (
        "the PTX primitives of csrc/cuda/attention.cu changed, and tests/cuda_emulator/emu.h models "
        "the pinned ones: update emu.h to match, then run "
        f"`python tests/cuda_emulator/build_emulator.py --pin`\n{diff}")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return emu.build(tmp_path_factory.mktemp("cuda_emulator"), timeout=300)


def run_emulator(exe, seed):
    r = subprocess.run([str(exe), "--seed", str(seed)], capture_output=True, text=True, timeout=300)
    report = (f"{r.stdout}\n{r.stderr[-3000:]}\n"
              f"rc={r.returncode}; reproduce: {exe} --seed {seed} [case-name]")
    summary = re.search(r"^(\d+)/(\d+) cases passed", r.stdout, re.M)
    assert r.returncode == 0 and summary, f"emulated kernel failed:\n{report}"
    passed, total = map(int, summary.groups())
    ok_lines = re.findall(r" OK$", r.stdout, re.M)
    assert passed == total == len(ok_lines) > 0, f"not every case passed:\n{report}"


@NEEDS_GXX
def test_attention_kernel_on_emulator(emulator):
    run_emulator(emulator, seed=1)


@NEEDS_GXX
@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3])
def test_attention_kernel_on_emulator_other_schedules(emulator, seed):
    """Other warp interleavings and cp.async landing times."""
    run_emulator(emulator, seed)
