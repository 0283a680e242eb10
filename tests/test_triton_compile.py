"""Every Triton kernel config the launchers can pick compiles to a real cubin for sm_80 and sm_90
(no GPU needed): no compile error, shared memory within the target's limit, no register spill.

Each module in diffkernels.triton.KERNEL_MODULES exposes compile_specs(); a module that does not
exist yet is skipped. The selected specs are compiled once, in parallel worker processes (one
per core; DK_COMPILE_JOBS overrides), and triton caches the results on disk.
"""
import concurrent.futures
import importlib
import importlib.util
import multiprocessing
import os

import pytest

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET", "0") == "1":  # kernels are interpreter objects then
    pytest.skip("compile tests need TRITON_INTERPRET unset", allow_module_level=True)

from diffkernels.triton import KERNEL_MODULES  # noqa: E402
from diffkernels.triton._compile import SHARED_LIMIT, compile_job, module_specs  # noqa: E402

CCS = (80, 90)


def _modules():
    out = []
    for name in KERNEL_MODULES:
        full = f"diffkernels.triton.{name}"
        if importlib.util.find_spec(full) is None:
            continue  # being written elsewhere
        out.append((name, importlib.import_module(full)))  # an import error fails collection
    return out


def _params():
    params = []
    for name, module in _modules():
        if not hasattr(module, "compile_specs"):
            continue
        for spec_name in module_specs(name):
            for cc in CCS:
                params.append(pytest.param(name, spec_name, cc, id=f"{name}:{spec_name}-sm{cc}"))
    return params


@pytest.fixture(scope="module")
def compiled(request):
    """Results for every spec selected in this session, compiled in parallel up front."""
    jobs = [tuple(item.callspec.params[k] for k in ("module_name", "spec_name", "cc"))
            for item in request.session.items
            if item.originalname == "test_compiles_without_spills" and hasattr(item, "callspec")]
    workers = int(os.environ.get("DK_COMPILE_JOBS", "0")) or min(os.cpu_count() or 1, 8)
    if workers <= 1 or len(jobs) <= 1:
        return {job: compile_job(job) for job in jobs}
    # spawn: fresh workers that never inherit torch's threads; each compiles a share of the jobs
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return dict(zip(jobs, pool.map(compile_job, jobs)))


@pytest.mark.parametrize("module_name,spec_name,cc", _params())
def test_compiles_without_spills(compiled, module_name, spec_name, cc):
    res = compiled[(module_name, spec_name, cc)]
    assert "error" not in res, f"{spec_name} does not compile for sm_{cc}:\n{res.get('error')}"
    assert res["has_cubin"], "no cubin produced"
    assert res["shared"] <= SHARED_LIMIT[cc], (
        f"{spec_name}: {res['shared']} bytes of shared memory > {SHARED_LIMIT[cc]} on sm_{cc}")
    assert res["n_spills"] == 0, (
        f"{spec_name}: {res['n_spills']} bytes of register spills on sm_{cc} "
        f"({res['n_regs']} registers)\n{res['ptxas_log']}")


@pytest.mark.parametrize("module_name", [name for name, m in _modules()
                                         if hasattr(m, "compile_specs")])
def test_spec_names_are_unique(module_name):
    module = importlib.import_module(f"diffkernels.triton.{module_name}")
    names = [spec["name"] for spec in module.compile_specs()]
    assert len(names) == len(set(names)), "spec names identify the configs: make them unique"


def test_group_norm_silu_specs_cover_the_launcher():
    """compile_specs() holds every (kernel, layout, W, BLOCK, num_warps) that _plan picks over a
    sweep of shapes, so the compile test above sees every config a real launch can build."""
    from diffkernels.triton import group_norm_silu as gn

    spec_nw = {s["name"]: s["num_warps"] for s in gn.compile_specs()}
    picked = set()
    for n in (1, 2, 8, 64):
        for c, g in ((32, 32), (64, 1), (128, 32), (256, 32), (320, 32), (512, 32), (640, 32),
                     (960, 32), (1280, 32), (2560, 32), (4096, 32), (96, 3), (4, 4)):
            for spatial in ((1, 1), (7, 9), (8, 8), (12, 12), (16, 16), (32, 32), (48, 48),
                            (64, 64), (96, 96), (128, 128), (256, 256)):
                s = spatial[0] * spatial[1]
                for cl in (False, True):
                    if s == 1:
                        cl = True  # what the launcher does for [N, C, 1, 1]
                    p = gn._plan(n, c, s, g, cl, num_sms=132)
                    kernels = ("single",) if p["kind"] == "single" else ("stats", "apply")
                    for k in kernels:
                        picked.add((f"gn_{k}_kernel-{'cl' if cl else 'nchw'}-W{p['W']}"
                                    f"-B{p['BLOCK']}", p["num_warps"]))
    missing = []
    for dtype in ("fp16", "bf16", "fp32"):
        for base, nw in sorted(picked):
            kernel, rest = base.split("-", 1)
            name = f"{kernel}-{dtype}-{rest}"
            if spec_nw.get(name) != nw:
                missing.append((name, nw))
    assert not missing, f"configs the launcher picks but compile_specs() lacks: {missing}"
    assert len(spec_nw) <= 60
