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
