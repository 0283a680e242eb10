"""`python -m diffkernels sample`: writes PNGs of the requested size with the settings in their
text metadata and prints timings; wrong paths, Hub ids and bad flags exit non-zero with one
line and no traceback."""
import os

import pytest

from sd_tiny import tiny  # noqa: F401  (the session fixture)

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

from diffkernels import cli  # noqa: E402

BASE = ["sample", "--prompt", "a red cat", "--steps", "2", "--height", "16", "--width", "24",
        "--seed", "7", "--device", "cpu"]


def test_sample_folder_writes_png_with_metadata(tiny, tmp_path, capsys):
    out = str(tmp_path / "cat.png")
    assert cli.main(BASE + ["--model", tiny["folder"], "--negative-prompt", "blue", "--out", out]) == 0
    text = capsys.readouterr().out
    for part in ("load", "text encode", "ms/step", "it/s", "VAE decode", "total", "wrote " + out):
        assert part in text, part
    image = PIL.open(out)
    assert image.format == "PNG" and image.size == (24, 16) and image.mode == "RGB"
    meta = image.text
    assert meta["prompt"] == "a red cat" and meta["negative_prompt"] == "blue"
    assert meta["seed"] == "7" and meta["steps"] == "2" and meta["guidance_scale"] == "7.5"
    assert meta["scheduler"] == "DDIMScheduler" and meta["size"] == "24x16"


def test_sample_single_file_batch(tiny, tmp_path, capsys):
    out = str(tmp_path / "img.png")
    tok = os.path.join(tiny["folder"], "tokenizer")
    assert cli.main(BASE + ["--model", tiny["safetensors"], "--tokenizer", tok, "--batch", "2",
                            "--scheduler", "ddpm", "--guidance", "1", "--out", out]) == 0
    capsys.readouterr()
    files = [tmp_path / "img-0.png", tmp_path / "img-1.png"]
    images = [PIL.open(f) for f in files]
    assert all(i.size == (24, 16) for i in images)
    assert [i.text["batch_index"] for i in images] == ["0", "1"]
    assert images[0].text["scheduler"] == "DDPMScheduler"
    assert list(images[0].getdata()) != list(images[1].getdata())  # two different samples


def test_sample_cuda_graph_gives_the_same_image(tiny, tmp_path, capsys):
    """--cuda-graph: the static-buffer loop (captured on a GPU, uncaptured here) makes the
    same PNG pixels as the plain loop."""
    plain, graphed = str(tmp_path / "plain.png"), str(tmp_path / "graph.png")
    for out, extra in ((plain, []), (graphed, ["--cuda-graph"])):
        assert cli.main(BASE + ["--model", tiny["folder"], "--out", out] + extra) == 0
    capsys.readouterr()
    a, b = PIL.open(plain), PIL.open(graphed)
    assert list(a.getdata()) == list(b.getdata())
    assert a.text["cuda_graph"] == "False" and b.text["cuda_graph"] == "True"


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/sd15", "--out", "x.png"], "does not exist"),
    (["--model", "runwayml/stable-diffusion-v1-5", "--out", "x.png"], "Hub id"),
    (["--model", "{folder}", "--out", "x.png", "--dtype", "fp64"], "invalid choice: 'fp64'"),
    (["--model", "{folder}", "--out", "x.png", "--steps", "two"], "invalid int value"),
    (["--model", "{folder}", "--out", "x.png", "--height", "20"], "--height: must be a multiple of 8"),
    (["--model", "{folder}", "--out", "x.jpg"], "--out: expected a .png"),
    (["--model", "{folder}", "--out", "/no/such/dir/x.png"], "does not exist"),
    (["--model", "{bad}", "--out", "x.png"], "unsupported extension"),
])
def test_sample_errors_are_one_line(tiny, tmp_path, capsys, args, message):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\0")
    args = [a.format(folder=tiny["folder"], bad=bad) for a in args]
    argv = ["sample", "--prompt", "x"] + args
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err


def test_sample_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--prompt", "--negative-prompt", "--steps", "--guidance", "--seed",
                 "--scheduler", "--height", "--width", "--batch", "--dtype", "--device",
                 "--backend", "--out", "Nothing is downloaded"):
        assert flag in text, flag
