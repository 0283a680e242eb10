"""Extract the kernel and host-launch code of csrc/cuda/attention.cu and build the CPU emulator.

The .cu file is split at its section banners (`// ==== PTX primitives ====`, `// ==== kernel ====`,
`// ==== host ====`, any number of "="). The PTX primitives are replaced by emu.h; the kernel section is used
as is; the host section is used up to the end of launch_for_head_dim, with the `<<<...>>>` launch
rewritten into a call of emu::launch_kernel. Nothing is written next to the .cu file.

The emulator stands in for the PTX primitives section, so that section is pinned: its code
(comments and layout ignored) must equal modelled_primitives.txt. After changing the primitives,
review emu.h against the change, then re-pin with --pin.

Command line (developers):
    python tests/cuda_emulator/build_emulator.py OUT_DIR [--src FILE.cu]   # build OUT_DIR/emu_test
    python tests/cuda_emulator/build_emulator.py --pin                     # re-pin the primitives
"""
import argparse
import os
import re
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
KERNEL_SRC = ROOT / "csrc" / "cuda" / "attention.cu"
PINNED_PRIMITIVES = HERE / "modelled_primitives.txt"
CXXFLAGS = ["-std=c++17", "-O2", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-variable",
            "-Wno-unused-but-set-variable"]

_BANNER = re.compile(r"^// =+ ([A-Za-z][A-Za-z ]*?) =+$", re.M)
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|//[^\n]*|/\*.*?\*/|\w+|\S', re.S)  # strings, comments, ...
_LAUNCH = re.compile(r"(\w+)\s*<<<(.+?)>>>\s*\((.*?)\)\s*;", re.S)


def _sections(src):
    """{banner title: (start, end)} of the banner-delimited sections of the .cu text."""
    marks = [(m.group(1), m.start()) for m in _BANNER.finditer(src)]
    return {name: (start, marks[i + 1][1] if i + 1 < len(marks) else len(src))
            for i, (name, start) in enumerate(marks)}


def extract(src):
    """The emulator's two include files, {file name: text}, from the text of attention.cu."""
    sec = _sections(src)
    for name in ("PTX primitives", "kernel", "host"):
        if name not in sec:
            raise ValueError(f"attention.cu: no '// ==== {name} ====' banner; the CUDA emulator "
                             "splits the file at its section banners (tests/cuda_emulator)")
    kernel = src[slice(*sec["kernel"])]
    host_start, host_end = sec["host"]
    fn = src.find("void launch_for_head_dim(", host_start, host_end)
    end = src.find("\n}\n", fn, host_end)
    if fn < 0 or end < 0:
        raise ValueError("attention.cu: launch_for_head_dim not found in the host section")
    host = src[host_start:end + 3]
    host, n = _LAUNCH.subn(r"emu::launch_kernel(\1, \2, \3);", host)
    if n != 1:
        raise ValueError(f"attention.cu: expected one <<<...>>> launch in the host section, found {n}")
    return {"kernel_section.inc": kernel, "host_section.inc": host}


def primitives_code(src):
    """The tokens of the PTX primitives section without comments: a space only between two words,
    a line break after each ; { or } (so comments and reformatting do not change it)."""
    sec = _sections(src)
    if "PTX primitives" not in sec or "kernel" not in sec:
        raise ValueError("attention.cu: no '// ==== PTX primitives ====' / '// ==== kernel ====' banner")
    out, prev = [], ""
    for tok in _TOKEN.findall(src[sec["PTX primitives"][0]:sec["kernel"][0]]):
        if tok.startswith(("//", "/*")):
            continue
        if prev and (prev[-1].isalnum() or prev[-1] == "_") and (tok[0].isalnum() or tok[0] == "_"):
            out.append(" ")
        out.append(tok + "\n" if tok in ";{}" else tok)
        prev = tok
    return "".join(out)


def build(out_dir, src_path=KERNEL_SRC, cxx="g++", timeout=300):
    """Extract from `src_path` into `out_dir` and compile the emulator there; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in extract(Path(src_path).read_text()).items():
        (out_dir / name).write_text(text)
    exe = out_dir / "emu_test"
    cmd = [cxx, *CXXFLAGS, f"-I{out_dir}", f"-I{HERE}", str(HERE / "main.cpp"), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"emulator build failed ({' '.join(cmd)}):\n{r.stderr[-6000:]}")
    return exe


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?")
    ap.add_argument("--src", default=str(KERNEL_SRC), help="the .cu file (default: %(default)s)")
    ap.add_argument("--pin", action="store_true", help=f"write {PINNED_PRIMITIVES.name} from --src")
    a = ap.parse_args()
    if a.pin:
        PINNED_PRIMITIVES.write_text(primitives_code(Path(a.src).read_text()))
        print("pinned", PINNED_PRIMITIVES)
    elif a.out_dir:
        print(build(a.out_dir, a.src, cxx=os.environ.get("CXX", "g++")))
    else:
        ap.error("give OUT_DIR or --pin")
