"""Compile a Triton kernel config for an sm_80 / sm_90 target without a GPU.

`compile_spec(spec, cc)` runs `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`
(real PTX and cubin, as a launch on that GPU would build them) and reports shared memory,
registers and spills. Triton leaves n_regs / n_spills unset until a cubin is loaded on a device,
so they come from `ptxas -v` on the generated PTX. Checked with triton 3.6 and 3.8.
"""
import functools
import importlib
import os
import re
import shutil
import subprocess
import tempfile
import traceback

# Opt-in shared memory per block (bytes).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _ptxas_path():
    try:
        from triton import knobs  # triton >= 3.4
        tool = knobs.nvidia.ptxas
        if tool is not None and os.path.isfile(tool.path):
            return tool.path
    except Exception:  # noqa: BLE001 - older/newer triton layouts: fall through
        pass
    for path in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "ptxas"),
                 shutil.which("ptxas")):
        if path and os.path.isfile(path):
            return path
    raise RuntimeError("ptxas not found (triton's bundled one, $CUDA_HOME/bin or PATH)")


def ptxas_usage(ptx: str) -> dict:
    """Registers and spill bytes of every kernel in `ptx`, from `ptxas -v` for its .target."""
    arch = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas_path(), "-v", f"--gpu-name={arch}", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}:\n{log}")
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", log)]
    spills = [int(a) + int(b) for a, b in
              re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    if not regs:
        raise RuntimeError(f"could not read the register count from ptxas -v:\n{log}")
    return dict(n_regs=max(regs), n_spills=sum(spills), ptxas_log=log)


def _spec_key(spec):
    fn = spec["fn"]
    return (fn.__module__, fn.__name__, tuple(sorted(spec["signature"].items())),
            tuple(sorted((str(k), v) for k, v in spec["constexprs"].items())),
            tuple(sorted((k, str(v)) for k, v in spec.get("attrs", {}).items())),
            spec["num_warps"], spec.get("num_stages", 3))


@functools.lru_cache(maxsize=None)
def _compile_cached(key, cc):
    spec = _SPECS[key]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # Constexprs by argument name: ASTSource turns names into (index,) keys (3.3+); attrs are
    # {(index,): [["tt.divisibility", 16]]} as the launcher passes them.
    src = ASTSource(fn=spec["fn"], signature=dict(spec["signature"]),
                    constexprs=dict(spec["constexprs"]), attrs=dict(spec.get("attrs", {})))
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                            options=dict(num_warps=spec["num_warps"],
                                         num_stages=spec.get("num_stages", 3)))
    asm = dict(kernel.asm)
    md = kernel.metadata
    n_regs = getattr(md, "n_regs", None) if not isinstance(md, dict) else md.get("n_regs")
    n_spills = getattr(md, "n_spills", None) if not isinstance(md, dict) else md.get("n_spills")
    shared = md["shared"] if isinstance(md, dict) else md.shared
    out = dict(shared=int(shared), asm_keys=tuple(asm), ptx=asm.get("ptx"),
               cubin=asm.get("cubin"), ptxas_log=None)
    if n_regs is None or n_spills is None:
        usage = ptxas_usage(asm["ptx"])
        n_regs, n_spills, out["ptxas_log"] = usage["n_regs"], usage["n_spills"], usage["ptxas_log"]
    out.update(n_regs=int(n_regs), n_spills=int(n_spills))
    return out


_SPECS = {}


def compile_spec(spec: dict, cc: int) -> dict:
    """Compile one spec {name, fn, signature, constexprs[, attrs], num_warps, num_stages} for
    compute capability cc (80, 90, ...). Returns {shared (bytes), shared_limit, n_regs,
    n_spills (bytes spilled: stores + loads), asm_keys, ptx, cubin, ptxas_log}. Cached by
    (spec, cc) for the process."""
    key = _spec_key(spec)
    _SPECS[key] = spec
    out = dict(_compile_cached(key, cc))
    out["shared_limit"] = SHARED_LIMIT.get(cc, 99 * 1024)
    return out


@functools.lru_cache(maxsize=None)
def module_specs(module_name: str) -> dict:
    """{spec name: spec} of diffkernels.triton.<module_name>.compile_specs()."""
    module = importlib.import_module(f"diffkernels.triton.{module_name}")
    return {spec["name"]: spec for spec in module.compile_specs()}


def compile_job(job) -> dict:
    """(module name, spec name, cc) -> a small picklable summary {shared, n_regs, n_spills,
    has_cubin, ptxas_log} or {error}: what a pool of worker processes hands back to a test."""
    module_name, spec_name, cc = job
    try:
        res = compile_spec(module_specs(module_name)[spec_name], cc)
        return dict(shared=res["shared"], n_regs=res["n_regs"], n_spills=res["n_spills"],
                    has_cubin="cubin" in res["asm_keys"] and bool(res["cubin"]),
                    ptxas_log=res["ptxas_log"])
    except Exception:  # noqa: BLE001 - reported by the test of that spec
        return dict(error=traceback.format_exc())
