"""Slow checks (run with -m slow; CI runs them): the full-size model, and the CLI on the example media."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from emu3.checkpoint import load_vq, save_vq
from emu3.reference import emu3_vqvae
from emu3.vq import VisionVQ, vq_config
from tests.conftest import randomize

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_full_size_parity_with_transformers(tmp_path):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = randomize(VisionVQ(vq_config("emu3")))
    save_vq(ours, tmp_path / "released")  # 1.08 GB, as released
    assert abs((tmp_path / "released" / "model.safetensors").stat().st_size - 1.083e9) < 0.01e9
    ours = load_vq(tmp_path / "released")
    ref = emu3_vqvae(ours)
    g = torch.Generator().manual_seed(1)
    for x in (torch.rand(1, 3, 32, 48, generator=g) * 2 - 1, torch.rand(1, 4, 3, 32, 32, generator=g) * 2 - 1):
        with torch.no_grad():
            ref_codes = torch.stack(ref.encode(x, image_sizes=torch.tensor([x.shape[-2:]])).image_tokens)
            ref_pixels = ref.decode(ref_codes)
        codes = ours.encode(x)
        assert torch.equal(codes, ref_codes) and codes.unique().numel() > 8
        torch.testing.assert_close(ours.decode(ref_codes), ref_pixels, rtol=0, atol=1e-5)


def emu3(*args):
    p = subprocess.run([sys.executable, "-m", "emu3.cli", *map(str, args)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.parametrize("mode", ["chunks", "causal"])
def test_cli_on_example_media(tmp_path, mode):
    emu3("vq", "init", "--preset", "demo", "-o", tmp_path / "tok")
    out = emu3("vq", "reconstruct", "--tokenizer", tmp_path / "tok", EXAMPLES / "cat.jpg", "-o", tmp_path / "cat.png")
    assert "PSNR" in out and "at 72x48" in out  # 451x300 -> smart_resize to the world's 64^2 pixels
    out = emu3("vq", "encode", "--tokenizer", tmp_path / "tok", EXAMPLES / "cat-pan.mp4", "-o", tmp_path / "v.npy",
               "--mode", mode)
    codes = np.load(tmp_path / "v.npy")
    meta = json.loads((tmp_path / "v.json").read_text())
    assert meta["num_frames"] == 22 and meta["fps"] == 12 and meta["mode"] == mode
    assert codes.shape[0] == 6  # 22 frames padded to 24 -> 6 latent frames
    emu3("vq", "decode", "--tokenizer", tmp_path / "tok", tmp_path / "v.npy", "-o", tmp_path / "v.gif")
    from emu3.media import read_video

    back = read_video(tmp_path / "v.gif")
    assert len(back.frames) == 22 and back.frames.shape[1:3] == tuple(8 * s for s in codes.shape[1:])


def test_compiled_decode_step_gives_the_same_tokens(small_tokenizer):
    from emu3.format import Formatter
    from emu3.generate import Engine, Request, Sampling, image_template
    from emu3.model import Emu3LM, model_config

    v = small_tokenizer.vocab
    model = Emu3LM(model_config("tiny", v, attention_dropout=0.0))
    model.init_weights(torch.Generator().manual_seed(0))
    fmt = Formatter(small_tokenizer)
    reqs = [Request(fmt.generation_prompt(p, (3, 4)), image_template(v, 3, 4), negative=fmt.negative_prompt((3, 4)),
                    cfg_scale=3.0, visual=Sampling(1.0, 8, 1.0), seed=i) for i, p in enumerate(["a cat", "two dogs"])]
    eager = Engine(model).generate(reqs)
    compiled = Engine(model, compile=True).generate(reqs)
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(eager, compiled))


@pytest.mark.slow
def test_compiled_static_loop_gives_the_eager_tokens(lm, fmt):
    """The decode step and the choice compiled (static shapes, fullgraph; CUDA graphs where there is CUDA) give
    the tokens of the eager static loop and of the general core, twice (the second run reuses the code)."""
    from emu3.generate import Engine, Sampling
    from tests.test_generate import static_requests

    requests = static_requests(fmt, Sampling(1.0, 8))
    plain = [r.tokens.tolist() for r in Engine(lm).generate(requests, static=False)]
    engine = Engine(lm, compile=True)
    for _ in range(2):
        assert [r.tokens.tolist() for r in engine.generate(requests, static=True)] == plain


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_tiny_configuration():
    """benchmarks/bench_gpu.py is prepared for a lent GPU; here it runs its small configuration on the CPU and
    every row of its table must come out (a failed row says 'failed')."""
    out = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--tiny", "--batches", "1", "--short", "12"],
                         capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert "failed" not in out.stdout, out.stdout
    labels = [r.split("|")[1].strip() for r in rows]
    assert labels[0].startswith("static, compiled") and labels[1:] == [
        "eager (general core)", "jacobi (general core)", "official (transformers generate + processors)"], rows
    assert "16 of 16 the same" in out.stdout
