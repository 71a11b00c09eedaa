"""Tasks on a model folder, through the Python API and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from emu3.cli import main
from emu3.errors import InputError
from emu3.orders import border_tokens
from emu3.pipeline import Defaults, Emu3
from tests.conftest import DEFAULTS, scene, write_video_file


@pytest.fixture(scope="module")
def emu(model_folder):
    return Emu3.from_pretrained(model_folder)


def test_folder_defaults_and_released_defaults(emu, tmp_path):
    assert emu.defaults == Defaults(**DEFAULTS)
    assert emu.grid() == (8, 8)  # 32x32 pixels at spatial factor 4
    assert Defaults.load(tmp_path) == Defaults()  # no emu3_defaults.json: the released recipe
    assert Defaults().cfg_scale == 3.0 and Defaults().image_top_k == 2048 and Defaults().text_temperature == 0


def test_generate_images_seeds_and_shapes(emu):
    out = emu.generate_images(["a red circle", "two blue squares"], n=2, seed=10)
    assert [g.seed for g in out] == [10, 11, 12, 13]
    assert all(g.codes.shape == (8, 8) and g.pixels.shape == (32, 32, 3) for g in out)
    again = emu.generate_images(["two blue squares"], n=2, seed=12, batch_size=1)
    assert np.array_equal(again[0].codes, out[2].codes) and np.array_equal(again[1].codes, out[3].codes)
    assert not np.array_equal(out[0].codes, out[1].codes)
    wide = emu.generate_images(["x"], ratio="2:1")[0]
    assert wide.codes.shape == (6, 11) and wide.pixels.shape == (24, 44, 3)


def test_chat_is_deterministic_text(emu):
    image = Image.fromarray(scene(40, 40))
    answer = emu.chat(image, "what is this?", max_new_tokens=6)
    assert isinstance(answer, str) and answer == emu.chat(image, "what is this?", max_new_tokens=6)


def test_video_generation_and_extension(emu):
    video = emu.generate_video("a ball rolls", frames=2, seed=1)
    assert video.codes.shape == (2, 8, 8) and video.pixels.shape == (8, 32, 32, 3)
    given = np.stack([scene(32, 32, i) for i in range(8)])
    longer = emu.extend_video(given, "it keeps rolling", new_frames=1, seed=2)
    context = emu.vision.encode_video(given, "causal").numpy()
    assert longer.codes.shape == (3, 8, 8) and np.array_equal(longer.codes[:2], context)
    assert longer.pixels.shape == (12, 32, 32, 3)


def test_video_top_k_default(emu, monkeypatch):
    """A folder's video_top_k samples video frames (unset: image_top_k); an explicit top_k wins."""
    assert emu.video_request("x", 2).visual.top_k == emu.defaults.image_top_k
    monkeypatch.setattr(emu, "defaults", Defaults(**{**DEFAULTS, "video_top_k": 1}))
    assert emu.video_request("x", 2).visual.top_k == 1 and emu.video_request("x", 2, top_k=5).visual.top_k == 5
    assert emu.image_request("x").visual.top_k == emu.defaults.image_top_k
    a, b = (emu.generate_video("a ball rolls", frames=2, seed=s).codes for s in (1, 2))
    assert np.array_equal(a, b)  # greedy: the seed no longer matters


def test_inpainting_keeps_the_border(emu):
    image = scene(40, 48)
    codes = emu.vision.encode_image(image).numpy()
    with pytest.raises(InputError, match="needs the spiral-in token order"):
        emu.inpaint(image, "fill it", rings=2)  # a raster model
    out = emu.inpaint(image, "fill it", rings=2, seed=3, order="spiral")
    i, j = np.indices(codes.shape)
    ring = np.minimum(np.minimum(i, j), np.minimum(codes.shape[0] - 1 - i, codes.shape[1] - 1 - j))
    assert np.array_equal(out.codes[ring < 2], codes[ring < 2])
    assert (ring < 2).sum() == border_tokens(*codes.shape, 2)


def test_cli_generate_saves_images_and_tokens(model_folder, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a red circle\n\n two squares \n")
    code = main(["generate", "--model", str(model_folder), "--prompts-file", str(tmp_path / "prompts.txt"), "--n", "2",
                 "-o", str(tmp_path / "img.png"), "--save-tokens", str(tmp_path / "codes.npy"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("img-*.png")) == [f"img-00{i}.png" for i in range(4)]
    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (4, 8, 8) and codes.dtype == np.int64
    code = main(["chat", "--model", str(model_folder), "--image", str(tmp_path / "img-000.png"), "what?",
                 "--max-new-tokens", "4"])
    assert code == 0


def test_cli_video_commands(model_folder, tmp_path, capsys):
    write_video_file(tmp_path / "in.mp4", np.stack([scene(32, 32, i) for i in range(8)]), 8)
    assert main(["generate-video", "rolling", "--model", str(model_folder), "--frames", "2", "-o",
                 str(tmp_path / "v.gif"), "--quiet"]) == 0
    assert main(["extend-video", str(tmp_path / "in.mp4"), "more", "--model", str(model_folder), "--frames", "1",
                 "-o", str(tmp_path / "e.mp4"), "--quiet"]) == 0
    assert "8 given + 4 generated frames" in capsys.readouterr().out
    from emu3.media import read_video
    assert len(read_video(tmp_path / "e.mp4").frames) == 12


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "-o", "o.png"], "no built-in model, so pass --model DIR"),
    (["generate", "x", "-o", "o.png", "--image-area", "1000000"], "more than the model's context of 4096 tokens"),
    (["generate", "x", "-o", "o.png", "--top-p", "0"], "argument --top-p: expected a number above 0 and <= 1"),
    (["generate", "x", "-o", "o.png", "--temperature", "nan"], "argument --temperature: expected a finite number"),
    (["generate", "x", "-o", "o.png", "--ratio", "16-9"], "'W:H'"),
    (["generate", "x", "-o", "o.txt"], "cannot write an image"),
    (["generate", "-o", "o.png"], "give a prompt"),
    (["generate-video", "x", "-o", "o.png"], "cannot write a video"),
])
def test_cli_errors_before_compute(model_folder, tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.setattr("emu3.assets.builtin_model", lambda: None)  # as in an installation without it
    argv = [a if not a.startswith("o.") else str(tmp_path / a) for a in argv]
    if "--model" not in argv and message != "no built-in model, so pass --model DIR":
        argv += ["--model", str(model_folder)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_convert_to_hf_keeps_everything_needed(model_folder, tmp_path):
    assert main(["convert", str(model_folder), "-o", str(tmp_path / "hf"), "--layout", "transformers"]) == 0
    defaults = json.loads((tmp_path / "hf" / "emu3_defaults.json").read_text())
    assert defaults["image_area"] == 32 * 32 and defaults["cfg_scale"] == 2.0
    hf = Emu3.from_pretrained(tmp_path / "hf")
    ours = Emu3.from_pretrained(model_folder)
    a = hf.generate_images(["a red circle"], seed=5)[0]
    b = ours.generate_images(["a red circle"], seed=5)[0]
    assert np.array_equal(a.codes, b.codes)
    assert main(["convert", str(tmp_path / "hf"), "-o", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "vision_tokenizer" / "model.safetensors").exists()


def test_interleaved_generation_and_its_folder(emu, model_folder, tmp_path, capsys):
    """generate_interleaved returns text and complete pictures in order (one list per prompt when given a
    list, the same as alone); `emu3 interleave` writes the pictures, segments.json naming them in order,
    and one self-contained page; bad limits are refused before any compute."""
    from emu3.format import Text
    from emu3.pipeline import Picture
    from emu3.report import save_interleaved

    one = emu.generate_interleaved("a story", max_images=2, max_new_tokens=40, seed=1)
    both = emu.generate_interleaved(["a story", "another"], max_images=2, max_new_tokens=40, seed=1)
    assert len(both) == 2 and [type(s) for s in both[0]] == [type(s) for s in one]
    assert all(isinstance(s, Text) and s.text or isinstance(s, Picture) and s.pixels.ndim == 3 for s in one)
    with pytest.raises(InputError, match="max_images must be in"):
        emu.generate_interleaved("a story", max_images=9)
    with pytest.raises(InputError, match="prompt is empty"):
        emu.generate_interleaved("  ")

    picture = Picture(np.zeros((2, 2), np.int64), np.full((16, 16, 3), 200, np.uint8))
    page = save_interleaved(tmp_path / "s", "first", [picture, Text("then"), picture])
    items = json.loads((tmp_path / "s" / "segments.json").read_text())
    assert items == [{"type": "text", "text": "first"}, {"type": "image", "path": "image-1.png", "codes": [2, 2]},
                     {"type": "text", "text": "then"}, {"type": "image", "path": "image-2.png", "codes": [2, 2]}]
    assert Image.open(tmp_path / "s" / "image-2.png").size == (16, 16)
    html = page.read_text()
    assert html.count("data:image/png;base64") == 2 and html.index("first") < html.index("then")

    assert main(["interleave", "a story", "--model", str(model_folder), "-o", str(tmp_path / "cli"),
                 "--max-images", "2", "--max-new-tokens", "40", "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    items = json.loads((tmp_path / "cli" / "segments.json").read_text())
    assert items[0] == {"type": "text", "text": "a story"}
    assert all((tmp_path / "cli" / it["path"]).is_file() for it in items if it["type"] == "image")
    assert main(["interleave", "a story", "--model", str(model_folder), "-o", str(tmp_path / "x"),
                 "--max-images", "9"]) == 2
    assert "--max-images" in capsys.readouterr().err
