"""`python -m diffkernels bench --op unet` on a tiny config: rows for ours and diffusers with
a time, a ratio and our ops' share of the time; results written like the other benchmarks."""
import json

import pytest
import torch

from diffkernels.bench import common, unet

pytest.importorskip("diffusers")

TINY_UNET = dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=2,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
TINY_VAE = dict(block_out_channels=[32, 64], norm_num_groups=8, layers_per_block=1,
                down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2)


def test_unet_benchmark_rows(tmp_path):
    rows = unet.run("cpu", cases=[("tiny", TINY_UNET, 8), ("vae", TINY_VAE, 8)], iters=1,
                    batches=(2,))
    providers = {(r.op, r.provider) for r in rows}
    assert providers == {("tiny-unet", "diffkernels-auto"), ("tiny-unet", "diffusers-eager"),
                         ("vae-decode", "diffkernels-auto"), ("vae-decode", "diffusers-eager")}
    for r in rows:
        assert r.device and r.median_ms > 0 and r.ratio is not None and r.baseline == "diffusers-eager"
        if r.provider == "diffkernels-auto":
            assert 0 < r.extra["ours_share_pct"] < 100
    common.write_results(rows, str(tmp_path), "unet", "unet", torch.device("cpu"), unet.NOTES)
    saved = json.load(open(tmp_path / "unet.json"))
    assert len(saved["rows"]) == len(rows)
    assert (tmp_path / "unet.md").read_text().count("| diffkernels-auto") == 2
