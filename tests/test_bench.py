"""The README's main job, `python -m diffkernels bench`: every op's benchmark runs and writes
rows that carry the device name, a time, the derived figure and a ratio to its baseline."""
import importlib
import json

import pytest
import torch

from diffkernels import bench
from diffkernels.bench import common


@pytest.mark.parametrize("op", bench.OPS)
def test_benchmark_rows(op, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "median_ms", lambda fn, device, **kw: (fn(), 1.0)[1])
    module = importlib.import_module(f"diffkernels.bench.{op}")
    rows = module.run("cpu", quick=True, batches=(1,), compile_baseline=False)
    ours = "dk." if op == "overhead" else "diffkernels-cpu"
    assert any(r.provider.startswith(ours) for r in rows), {r.provider for r in rows}
    for r in rows:
        figure = r.extra.get("host_us") if op == "overhead" else r.gbps
        assert r.device and r.median_ms > 0 and figure > 0 and r.ratio is not None, r
    common.write_results(rows, str(tmp_path), op, op, torch.device("cpu"), module.NOTES)
    saved = json.load(open(tmp_path / f"{op}.json"))
    assert saved["meta"]["device"] and len(saved["rows"]) == len(rows)
    assert (tmp_path / f"{op}.md").read_text().count(f"| {ours}") >= 1


def test_bandwidth_never_reports_more_than_the_copy_roofline():
    cpu = torch.device("cpu")
    llc = common.last_level_cache_bytes()
    gbps, pct, extra = common.bandwidth(llc // 2, 1.0, cpu, copy_bw=10.0)
    assert pct is None and extra["cache"].startswith("resident")      # fits in the cache
    gbps, pct, extra = common.bandwidth(4 * llc, 1e-3, cpu, copy_bw=10.0)
    assert pct is None and "above the copy bandwidth" in extra["cache"]
    nbytes = 4 * llc
    gbps, pct, extra = common.bandwidth(nbytes, nbytes / 5e9 * 1e3, cpu, copy_bw=10.0)
    assert abs(pct - 50.0) < 1e-6 and extra == {} and abs(gbps - 5.0) < 1e-6


def test_bench_command_writes_summary_and_plots(tmp_path, capsys):
    """`python -m diffkernels bench --op overhead --quick`: a short summary on stdout (not
    every row), the part's JSON / markdown, a PNG plot and summary.md linking them."""
    pytest.importorskip("matplotlib")
    from diffkernels import cli
    assert cli.main(["bench", "--op", "overhead", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "summary (" in out and "| dk.attention |" in out
    assert "| op | shape |" not in out  # the full rows went to the file, not to stdout
    for name in ("overhead.json", "overhead.md", "overhead.png", "summary.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = (tmp_path / "summary.md").read_text()
    assert "![overhead](overhead.png)" in summary and "(overhead.md)" in summary
    with open(tmp_path / "overhead.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_end_to_end_rows(tmp_path):
    """The end-to-end benchmark on the tiny CPU pipeline: a row per provider available here
    with loop it/s, latency, first call and a ratio; where a step's time goes; results
    written like the other parts."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from diffkernels.bench import pipeline
    case = ("tiny", pipeline.TINY_UNET, pipeline.TINY_VAE, pipeline.TINY_TEXT, 16, (1, 2),
            torch.float32, None, False)
    rows = pipeline.run("cpu", cases=[case], reps=1, first_step=(), compile_baseline=False)
    assert {r.provider for r in rows} == {"diffkernels", "diffusers", "diffusers+accelerate"}
    for r in rows:
        assert r.device and r.median_ms > 0 and r.ratio is not None and r.baseline == "diffusers"
        assert r.extra["prompts"] == "text" and "it_s" in r.extra and r.extra["first_call_s"] > 0
        assert r.extra["new_resolution_ms"] is not None
    breakdown = [n for n in pipeline.NOTES if "one denoising step of" in n]
    assert len(breakdown) == 2 and all("conv" in n and "attention" in n for n in breakdown)
    common.write_results(rows, str(tmp_path), "pipeline", "pipeline", torch.device("cpu"),
                         pipeline.NOTES)
    assert len(json.load(open(tmp_path / "pipeline.json"))["rows"]) == 3
    assert "it/s" in (tmp_path / "pipeline.md").read_text()


def test_start_to_first_step_in_a_fresh_interpreter():
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from diffkernels.bench import pipeline
    t = pipeline.start_to_first_step("tiny", "diffkernels", torch.device("cpu"))
    assert 0 < t["import_s"] < t["start_to_first_step_s"] and t["build_s"] > 0
    assert t["start_to_first_step_s"] == pytest.approx(t["import_s"] + t["first_step_s"])


def test_step_breakdown_kinds():
    from diffkernels.bench.pipeline import kind_of
    assert kind_of("diffkernels::group_norm_silu") == "GroupNorm/SiLU"
    assert kind_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert kind_of("sm90_xmma_fprop_implicit_gemm_f16f16") == "conv"
    assert kind_of("aten::addmm") == "matmul/linear"
    assert kind_of("diffkernels::diffusion_step") == "scheduler step"
    assert kind_of("aten::cat") == "other"
