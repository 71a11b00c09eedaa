"""The `emu3 vq` command on real files: the contract other tools script against, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from emu3.cli import main
from tests.conftest import scene, write_video_file
from tests.test_media import png_declaring


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_image_encode_decode_reconstruct(tiny_dir, tmp_path, capsys):
    Image.fromarray(scene(40, 56)).save(tmp_path / "in.png")
    code, out, _ = run(capsys, "vq", "encode", "--tokenizer", tiny_dir, tmp_path / "in.png", "-o", tmp_path / "c.npy")
    assert code == 0 and "image codes 10x14" in out
    codes = np.load(tmp_path / "c.npy")
    assert codes.dtype == np.int64 and codes.shape == (10, 14)
    meta = json.loads((tmp_path / "c.json").read_text())
    assert meta["kind"] == "image" and meta["pixels"] == [40, 56]

    code, out, _ = run(capsys, "vq", "decode", "--tokenizer", tiny_dir, tmp_path / "c.npy", "-o", tmp_path / "d.png")
    assert code == 0 and Image.open(tmp_path / "d.png").size == (56, 40)

    code, out, _ = run(capsys, "vq", "reconstruct", "--tokenizer", tiny_dir, tmp_path / "in.png",
                       "-o", tmp_path / "r.png")
    assert code == 0 and out.startswith("PSNR ") and "SSIM" in out
    assert np.array_equal(np.asarray(Image.open(tmp_path / "r.png")), np.asarray(Image.open(tmp_path / "d.png")))


@pytest.mark.parametrize("mode", ["chunks", "causal"])
def test_video_encode_decode(tiny_dir, tmp_path, capsys, mode):
    frames = np.stack([np.roll(scene(24, 32, 3), i, axis=1) for i in range(10)])  # 10 frames: not a multiple of 4
    src = write_video_file(tmp_path / "in.mp4", frames, 10)
    code, out, _ = run(capsys, "vq", "encode", "--tokenizer", tiny_dir, src, "-o", tmp_path / "v.npy", "--mode", mode)
    assert code == 0, out
    codes = np.load(tmp_path / "v.npy")
    assert codes.shape == (3, 6, 8) and codes.dtype == np.int64
    meta = json.loads((tmp_path / "v.json").read_text())
    assert meta == {**meta, "kind": "video", "mode": mode, "fps": 10.0, "num_frames": 10}
    for ext in (".mp4", ".gif"):
        code, out, _ = run(capsys, "vq", "decode", "--tokenizer", tiny_dir, tmp_path / "v.npy",
                           "-o", tmp_path / f"o{ext}")
        assert code == 0 and "10 frames of 32x24 at 10 fps" in out
    from emu3.media import read_video
    assert read_video(tmp_path / "o.mp4").frames.shape == (10, 24, 32, 3)

    code, out, _ = run(capsys, "vq", "reconstruct", "--tokenizer", tiny_dir, src, "-o", tmp_path / "r.mp4",
                       "--mode", mode, "--fps", 5)
    assert code == 0 and "5 frames at 32x24" in out and f"{mode} mode" in out


def test_init_and_convert(tmp_path, capsys):
    code, out, _ = run(capsys, "vq", "init", "--preset", "tiny", "-o", tmp_path / "a")
    assert code == 0 and "random weights" in out
    code, out, _ = run(capsys, "vq", "convert", tmp_path / "a", "-o", tmp_path / "b", "--layout", "transformers")
    assert code == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model_type"] == "emu3_vqgan"


def test_errors_are_one_line_with_status_2(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("emu3.assets.builtin_model", lambda: None)  # as in an installation without it
    Image.fromarray(scene(40, 56)).save(tmp_path / "ok.png")
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "bomb.png").write_bytes(png_declaring(20000, 20000))
    Image.fromarray(scene(20, 120)).save(tmp_path / "wide.png")
    Image.fromarray(scene(3, 40)).save(tmp_path / "thin.png")
    # fixed junk: about 1 in 300 draws of random bytes parses as a container with no video stream
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(2000))
    np.save(tmp_path / "far.npy", np.full((4, 4), 10**6))
    np.save(tmp_path / "float.npy", np.zeros((4, 4)))
    cases = [
        ((tmp_path / "ok.png",), "no built-in model, so pass --tokenizer DIR", False),
        ((tmp_path / "text.png",), "not an image file", True),
        ((tmp_path / "bomb.png",), "larger than the limit of 67108864 pixels", True),
        ((tmp_path / "wide.png",), "aspect ratio 6.00", True),
        ((tmp_path / "thin.png",), "too small: 40x3 pixels", True),
        ((tmp_path / "junk.mp4",), "not a video file that can be read", True),
        ((tmp_path / "missing.png",), "no such file", True),
    ]
    for inputs, message, with_tok in cases:
        tok = ["--tokenizer", tiny_dir] if with_tok else []
        code, out, err = run(capsys, "vq", "encode", *tok, *inputs, "-o", tmp_path / "x.npy")
        assert code == 2 and message in err and err.count("\n") == 1, (message, err)
    code, _, err = run(capsys, "vq", "decode", "--tokenizer", tiny_dir, tmp_path / "far.npy", "-o", tmp_path / "x.png")
    assert code == 2 and "codes must be in [0, 64)" in err
    code, _, err = run(capsys, "vq", "decode", "--tokenizer", tiny_dir, tmp_path / "float.npy",
                       "-o", tmp_path / "x.png")
    assert code == 2 and "integer array" in err
    code, _, err = run(capsys, "vq", "decode", "--tokenizer", tiny_dir, tmp_path / "far.npy", "-o", tmp_path / "x.mp3")
    assert code == 2 and "cannot write an image" in err
    code, _, err = run(capsys, "vq", "encode", "--tokenizer", tmp_path / "nowhere", tmp_path / "ok.png", "-o",
                       tmp_path / "x.npy")
    assert code == 2 and "no such folder" in err
    assert not (tmp_path / "x.npy").exists()  # nothing half-written


def test_broken_checkpoint_from_a_real_process(tiny_dir, tmp_path):
    """A real process: exit status 2, one line on stderr, no traceback."""
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_dir / "model.safetensors")
    state.pop("decoder.conv_out.bias")
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"][:8]
    save_file(state, str(tiny_dir / "model.safetensors"))
    Image.fromarray(scene(40, 56)).save(tmp_path / "ok.png")
    p = subprocess.run([sys.executable, "-m", "emu3.cli", "vq", "encode", "--tokenizer", str(tiny_dir),
                        str(tmp_path / "ok.png"), "-o", str(tmp_path / "x.npy")], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1
    assert "1 missing (decoder.conv_out.bias)" in p.stderr
    assert "1 misshaped (encoder.conv_in.weight: file [8, 3, 3, 3] vs model [32, 3, 3, 3])" in p.stderr


def test_bomb_png_is_refused_without_a_huge_allocation(tiny_dir, tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_declaring(20000, 20000))  # 1.2 GB if decoded
    script = ("import resource, sys\nfrom emu3.cli import main\ncode = main(sys.argv[1:])\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(code)")
    p = subprocess.run([sys.executable, "-c", script, "vq", "encode", "--tokenizer", str(tiny_dir),
                        str(tmp_path / "bomb.png"), "-o", str(tmp_path / "x.npy")], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "limit" in p.stderr
    peak_kib = int(p.stdout.split()[-1])
    assert peak_kib < 1_000_000, peak_kib  # well under the 1.2 GB a decode would need


def test_tokenizer_train_encode_decode(tmp_path, capsys):
    from tests.conftest import CORPUS

    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS))
    code, out, _ = run(capsys, "tokenizer", "train", tmp_path / "corpus.txt", "--vocab-size", 400,
                       "--codebook-size", 64, "--min-frequency", 1, "-o", tmp_path / "tok")
    assert code == 0 and "+ 211 control tokens + 64 visual tokens" in out
    code, out, _ = run(capsys, "tokenizer", "encode", "--tokenizer", tmp_path / "tok", "red circle<|extra_204|>")
    ids = [int(x) for x in out.split()]
    assert code == 0 and ids[-1] == 400 + 3 + 204
    code, out, _ = run(capsys, "tokenizer", "decode", "--tokenizer", tmp_path / "tok", *map(str, ids))
    assert out == "red circle<|extra_204|>\n"
    code, _, err = run(capsys, "tokenizer", "encode", "--tokenizer", tmp_path / "tok", "<|visual token 000064|>")
    assert code == 2 and "unknown special token" in err
    code, _, err = run(capsys, "tokenizer", "train", tmp_path / "missing.txt", "-o", tmp_path / "t2")
    assert code == 2 and "no such text file" in err


def _bad_values(dest: str, kind: str) -> list[str]:
    from emu3.cli import _ABOVE_0, _RANGES

    low, high = _RANGES[dest]
    bad = ["many", "0" if low == _ABOVE_0 else str(int(low) - 1)]
    if high is not None:
        bad.append(str(high + 1))
    if kind == "float":
        bad += ["nan", "inf"]
    else:
        bad.append("1.5")
    return bad


def test_every_number_option_refuses_bad_values_in_one_line(capsys):
    """Every int or float option of every command: words, values below or above its range, NaN, fractions
    for counts. One line naming the option and the limit, status 2, nothing loaded."""
    from emu3.cli import _leaves, build_parser

    checked = 0
    for leaf in _leaves(build_parser()):
        words = leaf.prog.split()[1:]
        for action in leaf._actions:
            kind = getattr(action.type, "__name__", "")
            if not action.option_strings or kind not in ("int", "float"):
                continue
            for value in _bad_values(action.dest, kind):
                code, out, err = run(capsys, *words, action.option_strings[-1], value)
                assert code == 2 and err.count("\n") == 1 and not out, (words, action.dest, value, err)
                assert f"argument {action.option_strings[-1]}" in err or "argument " in err, err
                checked += 1
    assert checked > 150  # every command's options were reached


def test_bad_inputs_of_every_kind_get_one_line(model_folder, tiny_dir, tmp_path, capsys):
    """Empty, absurd and wrong-kind inputs across the commands: one line on stderr, status 2."""
    Image.fromarray(scene(32, 32)).save(tmp_path / "ok.png")
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "text.mp4").write_text("hello")
    (tmp_path / "comments.txt").write_text("# only a comment\n\n   # and another\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00 not text")
    m = ["--model", str(model_folder)]
    cases = [
        (["generate", "", "-o", tmp_path / "a.png", *m], "the prompt is empty"),
        (["generate", "   ", "-o", tmp_path / "a.png", *m], "the prompt is empty"),
        (["generate", "x", "--ratio", "100:1", "-o", tmp_path / "a.png", *m], "above the limit of 5"),
        (["generate", "x", "--ratio", "0:1", "-o", tmp_path / "a.png", *m], "'W:H'"),
        (["generate", "--prompts-file", tmp_path / "comments.txt", "-o", tmp_path / "a.png", *m], "has none"),
        (["generate", "--prompts-file", tmp_path / "binary.txt", "-o", tmp_path / "a.png", *m], "not a UTF-8"),
        (["generate", "--prompts-file", tmp_path / "nothing.txt", "-o", tmp_path / "a.png", *m], "no such"),
        (["generate", "x", "--image-area", "100000000", "-o", tmp_path / "a.png", *m], "context"),
        (["generate-video", "", "-o", tmp_path / "a.mp4", *m], "the prompt is empty"),
        (["chat", "--image", tmp_path / "text.png", "what?", *m], "not an image file"),
        (["chat", "--image", tmp_path / "missing.png", "what?", *m], "no such file"),
        (["chat", "--image", tmp_path, "what?", *m], "is a folder"),
        (["extend-video", tmp_path / "text.mp4", "more", "-o", tmp_path / "a.mp4", *m], "not a video file"),
        (["inpaint", tmp_path / "ok.png", "x", "--rings", "9", "--order", "spiral", "-o", tmp_path / "a.png", *m],
         "leaves nothing to inpaint"),
        (["eval-vla", *m], "no fast_tokenizer.json"),
        (["tokenize-dataset", tmp_path / "missing", "-o", tmp_path / "d", *m], "no such file or folder"),
        (["tokenize-dataset", tmp_path / "ok.png", "-o", tmp_path / "d", *m], "inputs are folders"),
        (["train", "tiny-stage1", "steps=-3", f"data={tmp_path}"], "steps must be >= 1"),
        (["train", "tiny-stage1", "bogus=1"], "unknown config key"),
        (["export", tmp_path, "-o", tmp_path / "e"], "not a training run"),
        (["convert", tmp_path / "missing", "-o", tmp_path / "c"], "no such folder"),
        (["vq", "decode", "--tokenizer", tiny_dir, tmp_path / "ok.png", "-o", tmp_path / "x.png"], "not a .npy"),
        (["generate", "x", "-o", tmp_path / "a.png", "--model", tmp_path / "ok.png"], "no such folder"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "a.mp4").exists()


def test_builtin_model_on_a_photo_says_what_it_knows(tmp_path, capsys):
    """The built-in models know the shapes world only: one note on stderr, with the command's released form,
    for an input of another size; none for a world picture."""
    from emu3.assets import builtin_model
    from emu3.world.scenes import render, sample_scene

    if builtin_model() is None:
        pytest.skip("the built-in model is not installed")
    Image.fromarray(scene(300, 451)).save(tmp_path / "photo.jpg")
    Image.fromarray(render(sample_scene(np.random.default_rng(0)))).save(tmp_path / "world.png")
    code, out, err = run(capsys, "vq", "reconstruct", tmp_path / "photo.jpg", "-o", tmp_path / "r.png")
    assert code == 0 and err.count("emu3: note: the built-in model knows only the shapes world") == 1
    assert "is 451x300" in err and "--tokenizer Emu3-VisionTokenizer" in err
    code, out, err = run(capsys, "chat", "--image", tmp_path / "photo.jpg", "what is it?", "--quiet")
    assert code == 0 and "--model Emu3-Chat" in err
    code, out, err = run(capsys, "chat", "--image", tmp_path / "world.png", "how many circles are there?", "--quiet")
    assert code == 0 and "note" not in err
    code, out, _ = run(capsys, "chat", "--help")
    assert "knows only the shapes world" in " ".join(out.split())
