"""Shared helpers: randomised small tokenizers and real media files written to disk."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from emu3.checkpoint import save_model
from emu3.format import Formatter
from emu3.generate import Request, image_template
from emu3.model import Emu3LM, model_config
from emu3.vision import PRESET_PROCESSORS
from emu3.vq import VisionVQ, VQConfig

# One PyTorch thread in the test process and in every process a test starts (emu3.threads says why): the
# tests' models are tiny, and beside other busy processes a second OpenMP thread made the suite many times
# slower. Set EMU3_THREADS before running pytest to choose otherwise.
os.environ.setdefault("EMU3_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", os.environ["EMU3_THREADS"])
torch.set_num_threads(int(os.environ["EMU3_THREADS"]))


def randomize(model: VisionVQ, seed: int = 0) -> VisionVQ:
    """Make every tensor matter: perturb norms and BatchNorm statistics, and spread the codebook over
    the latents' range so that codes are diverse (the default codebook init maps everything to one code)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                b.fill_(7)
        model.eval()
        s = model.config.spatial_factor
        lat = model.encode_latents(torch.rand(1, 3, 4 * s, 4 * s, generator=g) * 2 - 1)
        emb = model.quantize.embedding.weight
        mean, std = lat.mean(dim=(0, 2, 3, 4)), lat.std(dim=(0, 2, 3, 4))  # per channel
        emb.copy_(mean + 1.5 * std * torch.randn(emb.shape, generator=g))
    return model


def assert_twins_agree(fast, slow) -> None:
    """A fast path and its slow twin compute the same math. `fast(dtype)` and `slow(dtype)` return lists of
    tensors. In float64 they must agree to 1e-9 of each tensor's scale: rounding leaves them ~1e-15 apart,
    so any real difference (an index, a scale, a sign) stands out by many orders of magnitude. In float32
    the fast result may be no further from the float64 truth than 4x the slow twin's own rounding error on
    the same input (plus a few ulps of the tensor's scale): kernels and instruction sets accumulate in
    different orders, so the tolerance is measured on this CPU, from the arithmetic, not fixed where the
    test was written."""
    eps = torch.finfo(torch.float32).eps
    f64, s64 = fast(torch.float64), slow(torch.float64)
    assert len(f64) == len(s64)
    # A tensor's scale, floored at 1e-3 of the largest one's: a gradient that is zero in exact arithmetic
    # (a key bias under softmax) is pure rounding noise of the terms that cancel, which are that large.
    top = max(float(b.abs().max()) for b in s64)
    scales = [max(float(b.abs().max()), 1e-3 * top) for b in s64]
    for i, (a, b, scale) in enumerate(zip(f64, s64, scales)):
        gap = float((a - b).abs().max())
        assert gap <= 1e-9 * scale, f"tensor {i}: float64 twins differ by {gap:.3g} at a scale of {scale:.3g}"
    for i, (a, b, truth, scale) in enumerate(zip(fast(torch.float32), slow(torch.float32), s64, scales)):
        slow_err = float((b.double() - truth).abs().max())
        fast_err = float((a.double() - truth).abs().max())
        allowed = 4 * slow_err + 8 * eps * scale
        assert fast_err <= allowed, (f"tensor {i}: the float32 fast path is {fast_err:.3g} from the float64 truth, "
                                     f"its twin {slow_err:.3g} (allowed {allowed:.3g})")


def small_vq(seed: int = 0, **cfg) -> VisionVQ:
    torch.manual_seed(seed)
    base = dict(codebook_size=64, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[2])
    return randomize(VisionVQ(VQConfig(**{**base, **cfg})), seed)


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic picture with gradients, shapes and texture (uint8 HxWx3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 3) % 256], -1).astype(np.uint8)
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(2, max(3, min(h, w) // 3)))
        d.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return np.array(im)


def write_video_file(path: Path, frames: np.ndarray, fps: float, codec: str | None = None) -> Path:
    """Write frames with PyAV (mp4: H.264, webm: VP9) or PIL (gif), independently of emu3.media."""
    import av

    path = Path(path)
    if path.suffix == ".gif":
        ims = [Image.fromarray(f) for f in frames]
        ims[0].save(path, save_all=True, append_images=ims[1:], duration=round(1000 / fps), loop=0)
        return path
    codec = codec or {".mp4": "libx264", ".webm": "libvpx-vp9", ".mkv": "libx264"}[path.suffix]
    with av.open(str(path), "w") as out:
        st = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        st.width, st.height, st.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec == "libx264":
            st.options = {"crf": "0", "preset": "ultrafast"}
        for f in frames:
            for pkt in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return path


def counter_frames(n: int, h: int = 32, w: int = 32) -> np.ndarray:
    """Frame i is a flat grey of level 8*i + 4, so a decoded frame tells which source frame it was."""
    return np.stack([np.full((h, w, 3), 8 * i + 4, np.uint8) for i in range(n)])


def frame_index(frame: np.ndarray) -> int:
    return int(round((float(frame.mean()) - 4) / 8))


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    """A released-layout tokenizer folder (tiny preset, randomised)."""
    from emu3.vision import PRESET_PROCESSORS, VisionTokenizer

    tok = VisionTokenizer(small_vq(0), PRESET_PROCESSORS["tiny"])
    path = tmp_path / "tiny-vq"
    tok.save_pretrained(path)
    return path


CORPUS = [
    "a red circle above two blue squares on a grey background",
    "three green triangles left of a yellow star; the star is small",
    "You are a helpful assistant. USER: how many circles are there?. ASSISTANT: There are two circles.",
    "Emu3 tokenizes images, text and video into one vocabulary and predicts the next token.",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 16:9 4:3 90*90 64*64 3.14159",
    "naïve café — “quotes” ÅΩ≈ç√∫ 中文字符 😀 emoji\r\n\ttabs and newlines\n\n",
    "It's what they'd say: we'll see, you're right, I'm here, they've gone.",
] * 20


@pytest.fixture(scope="session")
def small_tokenizer():
    """A byte-level BPE of 600 text tokens and a 64-code visual vocabulary (codebook of small_vq)."""
    from emu3.tokenizer import TextTokenizer

    return TextTokenizer.train(CORPUS, 600, 64, min_frequency=1)


def released_tokenizer_dir(folder: Path) -> Path:
    """A folder in the released layout with the real vocabulary: dashscope ships qwen.tiktoken, the same
    151,643-entry BPE file that BAAI ships as emu3.tiktoken."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("dashscope")
    if spec is None:
        pytest.skip("dashscope (dev extra) not installed: no copy of the real BPE file")
    source = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, folder / "emu3.tiktoken")
    visual = [f"<|visual token {k:06d}|>" for k in range(32768)]
    lines = ["<|image token|>", "<|image start|>", "<|image end|>", *visual]
    (folder / "emu3_vision_tokens.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def dataset_inputs(tmp_path_factory, small_tokenizer):
    """Raw training inputs (a folder of captioned images, a JSONL manifest with every other record
    kind, and bad records), plus the tokenizer folders they are tokenized with."""
    import json

    from emu3.vision import PRESET_PROCESSORS, VisionTokenizer

    root = tmp_path_factory.mktemp("inputs")
    (root / "imgs").mkdir()
    for i in range(24):
        Image.fromarray(scene(32, 32, i)).save(root / "imgs" / f"{i:02d}.png")
        (root / "imgs" / f"{i:02d}.txt").write_text(f"picture {i} with {i % 4 + 1} circles")
    Image.fromarray(scene(32, 32, 99)).save(root / "imgs" / "nocaption.png")
    (root / "imgs" / "broken.png").write_bytes(b"not a png")
    (root / "imgs" / "broken.txt").write_text("a broken file")
    write_video_file(root / "clip.mp4", np.stack([scene(32, 32, i) for i in range(8)]), 8)
    v = small_tokenizer.vocab
    lines = [{"video": "clip.mp4", "caption": "a moving scene"},
             {"image": "imgs/00.png", "question": "how many circles?", "answer": "one"},
             {"text": "plain text about shapes and colours"},
             {"segments": [{"text": "first"}, {"image": "imgs/01.png"}, {"text": "then"}, {"image": "imgs/02.png"}]},
             {"prompt_ids": [v.bos, 10, 11, v.boi], "chosen": [v.visual(1), v.visual(2), v.eos],
              "rejected": [v.visual(3), v.eos]},
             {"prompt_ids": [v.bos, 12, v.boi], "chosen": [v.visual(5), v.eos], "rejected": [v.visual(6), v.visual(7),
                                                                                           v.eos]}]
    (root / "more.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    small_tokenizer.save_pretrained(root / "tok")
    VisionTokenizer(small_vq(0), PRESET_PROCESSORS["tiny"]).save_pretrained(root / "vq")
    return root


@pytest.fixture(scope="session")
def token_dataset(dataset_inputs, tmp_path_factory):
    from emu3.data.tokenize import Settings, tokenize_dataset

    out = tmp_path_factory.mktemp("data") / "shapes"
    tokenize_dataset([dataset_inputs / "imgs", dataset_inputs / "more.jsonl"], out,
                     Settings(str(dataset_inputs / "tok"), str(dataset_inputs / "vq")), workers=1, shard_size=8,
                     progress=False)
    return out


@pytest.fixture(scope="session")
def lm(small_tokenizer):
    torch.manual_seed(0)
    model = Emu3LM(model_config("tiny", small_tokenizer.vocab, attention_dropout=0.0))
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # a peakier head, so that greedy choices are not near-ties
        model.lm_head.weight.mul_(40)
    return model.eval()


@pytest.fixture(scope="session")
def fmt(small_tokenizer):
    return Formatter(small_tokenizer)


def image_request(fmt, prompt, grid, **kw):
    return Request(fmt.generation_prompt(prompt, grid), image_template(fmt.vocab, *grid),
                   negative=fmt.negative_prompt(grid), **kw)


DEFAULTS = {"positive_suffix": "", "negative_prompt": "", "cfg_scale": 2.0, "image_top_k": 16}


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory, small_tokenizer):
    """A tiny model folder (random weights) with its vision tokenizer and generation defaults."""
    torch.manual_seed(0)
    model = Emu3LM(model_config("tiny", small_tokenizer.vocab, attention_dropout=0.0, image_area=32 * 32))
    model.init_weights(torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("model") / "tiny-emu3"
    save_model(model, path, tokenizer=small_tokenizer, vq=small_vq(0), extra_files={
        "vision_tokenizer": {"preprocessor_config.json": PRESET_PROCESSORS["tiny"].to_dict()},
        "emu3_defaults.json": DEFAULTS})
    return path
